//! deploy/kubernetes and docker-compose.yml, read as a reviewer would: every reference
//! resolves (labels and selectors, named ports, volumes, ConfigMaps, the Secret), probes hit
//! /healthz and /readyz on the ops port the config opens, the shutdown timeline fits in the
//! grace period, no Secret is applied by kustomize, and the image, versions and ports agree
//! with the Dockerfile, the README, the tool pins and the stack script. When `kubectl` is on
//! PATH, `kubectl kustomize` must also build both overlays.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::tools;
use crate::image::stages;
use crate::{documented_image, on_path, port_of, read, yaml, yaml_docs, yaml_docs_str};

const K8S: &str = "deploy/kubernetes";

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// The Kubernetes objects of deploy/kubernetes, by "Kind/name", with the kustomization.
fn objects() -> (Value, BTreeMap<String, Value>) {
    let kustomization = yaml(&format!("{K8S}/kustomization.yaml"));
    let mut objects = BTreeMap::new();
    for res in kustomization["resources"].as_array().expect("resources") {
        for doc in yaml_docs(&format!("{K8S}/{}", s(res))) {
            let key = format!("{}/{}", s(&doc["kind"]), s(&doc["metadata"]["name"]));
            assert!(objects.insert(key.clone(), doc).is_none(), "{key} twice");
        }
    }
    (kustomization, objects)
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// containerPort of a named port of a container.
fn named_port(c: &Value, name: &str) -> u64 {
    c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container {} has no port named {name}", c["name"]))
}

/// `matchLabels` all present with the same values in `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let m = selector["matchLabels"].as_object().expect("matchLabels");
    !m.is_empty() && m.iter().all(|(k, v)| labels[k] == *v)
}

fn duration(v: &Value, default: &str) -> Duration {
    humantime::parse_duration(v.as_str().unwrap_or(default))
        .unwrap_or_else(|e| panic!("duration {v}: {e}"))
}

#[test]
fn kustomize_never_applies_a_secret_and_the_example_documents_the_one_the_pod_mounts() {
    let (kustomization, objects) = objects();
    assert!(
        objects.keys().all(|k| !k.starts_with("Secret/")),
        "kustomization.yaml would apply a Secret (and replace real API keys): {:?}",
        objects.keys().collect::<Vec<_>>()
    );
    assert!(
        !kustomization["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| s(r).contains("secret")),
        "the example Secret stays out of resources"
    );
    assert!(kustomization["secretGenerator"].is_null());

    let examples = yaml_docs(&format!("{K8S}/secret-api-keys.example.yaml"));
    let example = |name: &str| {
        examples
            .iter()
            .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("secret-api-keys.example.yaml has no Secret {name}"))
    };
    let deployment = &objects["Deployment/mcp-server"];
    let pod = &deployment["spec"]["template"]["spec"];
    let sidecar = container(deployment, "authz-sidecar");
    let config = yaml(&format!("{K8S}/sidecar.yaml"));

    // The API-key Secret: its name, the file in it, and where the config reads it.
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"].is_object())
        .expect("a Secret volume");
    let secret_name = s(&vol["secret"]["secretName"]);
    assert_ne!(
        vol["secret"]["optional"], true,
        "the pod waits for the Secret instead of starting without keys"
    );
    let mount = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == vol["name"])
        .expect("the Secret volume is mounted in authz-sidecar");
    assert_eq!(mount["readOnly"], true);
    let keys_file = s(&config["api_keys"]["file"]);
    let file_in_secret = keys_file
        .strip_prefix(&format!("{}/", s(&mount["mountPath"])))
        .unwrap_or_else(|| panic!("api_keys.file {keys_file} is not in the Secret mount"));
    assert!(
        example(secret_name)["stringData"][file_in_secret].is_string(),
        "the example Secret {secret_name} holds {file_in_secret}"
    );
    // The OpenFGA token Secret referenced by the env.
    let token_ref = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "OPENFGA_API_TOKEN")
        .map(|e| &e["valueFrom"]["secretKeyRef"])
        .expect("OPENFGA_API_TOKEN from a Secret");
    assert!(example(s(&token_ref["name"]))["stringData"][s(&token_ref["key"])].is_string());

    // The README says how to create it.
    let readme = read("README.md");
    assert!(
        readme.contains(&format!("create secret generic {secret_name}")),
        "README.md shows `kubectl create secret generic {secret_name}`"
    );
}

#[test]
fn selectors_ports_volumes_and_probes_line_up() {
    let (kustomization, objects) = objects();
    let deployment = &objects["Deployment/mcp-server"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let pod = &deployment["spec"]["template"]["spec"];
    assert!(selects(&deployment["spec"]["selector"], labels));
    assert!(selects(
        &serde_json::json!({ "matchLabels": objects["Service/mcp-server"]["spec"]["selector"] }),
        labels
    ));
    let pdb = &objects["PodDisruptionBudget/mcp-server"];
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
    match (
        pdb["spec"]["maxUnavailable"].as_u64(),
        pdb["spec"]["minAvailable"].as_u64(),
    ) {
        (Some(n), None) => assert!(n >= 1 && n < replicas, "maxUnavailable {n}"),
        (None, Some(n)) => assert!(n < replicas, "minAvailable {n} blocks every eviction"),
        other => panic!("PDB wants exactly one of maxUnavailable/minAvailable: {other:?}"),
    }
    let netpol = &objects["NetworkPolicy/mcp-server"];
    assert!(selects(&netpol["spec"]["podSelector"], labels));
    assert_eq!(
        objects["ServiceAccount/mcp-server"]["metadata"]["name"],
        pod["serviceAccountName"]
    );

    // Service -> Envoy's named port -> the listener of envoy.yaml.
    let envoy = container(deployment, "envoy");
    let svc_port = &objects["Service/mcp-server"]["spec"]["ports"][0];
    let http = named_port(envoy, s(&svc_port["targetPort"]));
    let envoy_cfg = yaml(&format!("{K8S}/envoy.yaml"));
    let listener = &envoy_cfg["static_resources"]["listeners"][0]["address"]["socket_address"];
    assert_eq!(listener["port_value"].as_u64(), Some(http));

    // Sidecar: ops port and probes, the gRPC port Envoy calls, the config path.
    let config = yaml(&format!("{K8S}/sidecar.yaml"));
    let sidecar = container(deployment, "authz-sidecar");
    let ops = named_port(sidecar, "ops");
    assert_eq!(u64::from(port_of(s(&config["server"]["ops_addr"]))), ops);
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &sidecar[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "ops", "{probe} on the ops port");
    }
    let grpc = u64::from(port_of(s(&config["server"]["grpc_addr"])));
    assert_eq!(named_port(sidecar, "grpc-authz"), grpc);
    let clusters = envoy_cfg["static_resources"]["clusters"]
        .as_array()
        .unwrap();
    let authz = clusters
        .iter()
        .find(|c| c["name"] == "authz_sidecar")
        .unwrap();
    let ep = &authz["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(ep["port_value"].as_u64(), Some(grpc));
    assert_eq!(ep["address"], "127.0.0.1");

    let args: Vec<&str> = sidecar["args"].as_array().unwrap().iter().map(s).collect();
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let cfg_mount = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["subPath"] == "sidecar.yaml")
        .expect("sidecar.yaml mounted by subPath");
    assert_eq!(s(&cfg_mount["mountPath"]), config_path);
    // The image's default command reads the same path.
    let dockerfile = read("Dockerfile");
    let last = stages(&dockerfile).pop().unwrap();
    let cmd = last
        .instructions
        .iter()
        .rev()
        .find(|(k, _)| k == "CMD")
        .unwrap();
    let cmd: Vec<String> = serde_json::from_str(&cmd.1).unwrap();
    assert_eq!(cmd, ["serve", "--config", config_path]);

    // Every mount has a volume; ConfigMap volumes are the generated ones.
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (s(&v["name"]), v))
        .collect();
    let generated: Vec<&str> = kustomization["configMapGenerator"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| s(&g["name"]))
        .collect();
    for c in pod["containers"].as_array().unwrap() {
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let v = volumes
                .get(s(&m["name"]))
                .unwrap_or_else(|| panic!("{}: no volume {}", c["name"], m["name"]));
            if let Some(cm) = v["configMap"]["name"].as_str() {
                assert!(generated.contains(&cm), "ConfigMap {cm} is not generated");
            }
        }
    }
    for g in kustomization["configMapGenerator"].as_array().unwrap() {
        for f in g["files"].as_array().unwrap() {
            assert!(tools::repo_file(&format!("{K8S}/{}", s(f))).exists());
        }
    }

    // Image: what the README tells you to build, at the crate's version.
    let image = s(&sidecar["image"]);
    assert_eq!(image, documented_image());
    assert_eq!(
        image.rsplit_once(':').map(|(_, t)| t),
        Some(env!("CARGO_PKG_VERSION")),
        "image tag = crate version"
    );

    // NetworkPolicy: rule 0 port 0 is Envoy's (deploy/istio patches it); the monitoring rule
    // reaches the ops port and Istio's merged metrics port.
    let rules = netpol["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules[0]["ports"][0]["port"].as_u64(), Some(http));
    let scrape: Vec<u64> = rules
        .iter()
        .filter(|r| r["from"][0]["namespaceSelector"].is_object())
        .flat_map(|r| r["ports"].as_array().unwrap().iter())
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert!(scrape.contains(&ops), "ops port {ops} open to monitoring");
    assert!(
        scrape.contains(&15020),
        "Istio's merged metrics port 15020 open to monitoring"
    );
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], ops.to_string());
}

#[test]
fn the_shutdown_timeline_fits_the_grace_period() {
    let (_, objects) = objects();
    let deployment = &objects["Deployment/mcp-server"];
    let pod = &deployment["spec"]["template"]["spec"];
    let config = yaml(&format!("{K8S}/sidecar.yaml"));
    let pre_stop = |c: &str| {
        let secs = &container(deployment, c)["lifecycle"]["preStop"]["sleep"]["seconds"];
        Duration::from_secs(
            secs.as_u64()
                .unwrap_or_else(|| panic!("{c}: preStop sleep")),
        )
    };
    // The sidecar answers for as long as Envoy may still send checks.
    assert!(pre_stop("authz-sidecar") >= pre_stop("envoy"));
    // After SIGTERM: shutdown_delay (default 5 s, README "server.shutdown_delay"), then the
    // drain (server.drain_timeout, default 20 s); all before SIGKILL.
    let delay = duration(&config["server"]["shutdown_delay"], "5s");
    let drain = duration(&config["server"]["drain_timeout"], "20s");
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    let needed = pre_stop("authz-sidecar") + delay + drain;
    assert!(
        grace > needed,
        "terminationGracePeriodSeconds {grace:?} must exceed preStop + shutdown_delay + drain_timeout = {needed:?}"
    );
}

#[test]
fn worker_threads_follow_the_cpu_request() {
    let (_, objects) = objects();
    let sidecar = container(&objects["Deployment/mcp-server"], "authz-sidecar");
    let env = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "TOKIO_WORKER_THREADS")
        .expect("TOKIO_WORKER_THREADS in the sidecar's env");
    let field = &env["valueFrom"]["resourceFieldRef"];
    assert_eq!(field["resource"], "requests.cpu");
    // Whole cores, rounded up (the downward API takes the ceiling): never 0, which tokio refuses.
    assert!(field["divisor"].is_null() || field["divisor"] == "1");
    assert!(sidecar["resources"]["requests"]["cpu"].is_string());
}

#[test]
fn both_envoy_configs_are_one_and_answer_503_when_the_sidecar_fails() {
    let k8s = read(&format!("{K8S}/envoy.yaml"));
    let plain = read("deploy/envoy/envoy.yaml");
    let k8s_body: String = k8s.split_inclusive('\n').skip(2).collect();
    assert_eq!(
        k8s_body, plain,
        "deploy/kubernetes/envoy.yaml = deploy/envoy/envoy.yaml"
    );
    let cfg = yaml("deploy/envoy/envoy.yaml");
    let filters = &cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"];
    let authz = filters
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.ext_authz")
        .unwrap();
    assert_eq!(authz["typed_config"]["failure_mode_allow"], false);
    assert_eq!(
        authz["typed_config"]["status_on_error"]["code"],
        "ServiceUnavailable"
    );
}

#[test]
fn istio_writes_the_same_access_line_as_envoy_with_the_decision_id() {
    // deploy/envoy's json_format and Istio's envoyFileAccessLog labels: one format, so the
    // decision id joins istio-proxy's line exactly as it joins Envoy's.
    let cfg = yaml("deploy/envoy/envoy.yaml");
    let hcm =
        &cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let envoy_format = &hcm["access_log"][0]["typed_config"]["log_format"]["json_format"];
    let mesh = yaml("deploy/istio/mesh-config.yaml");
    let providers = mesh["spec"]["meshConfig"]["extensionProviders"]
        .as_array()
        .unwrap();
    let decisions = providers
        .iter()
        .find(|p| p["name"] == "authz-decisions")
        .expect("an authz-decisions provider in deploy/istio/mesh-config.yaml");
    let labels = &decisions["envoyFileAccessLog"]["logFormat"]["labels"];
    assert_eq!(labels, envoy_format);
    assert_eq!(
        s(&labels["decision_id"]),
        "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%"
    );
    // Turned on for the pods the AuthorizationPolicy covers.
    let telemetry = yaml("deploy/istio/telemetry.yaml");
    let policy = yaml("deploy/istio/authorizationpolicy.yaml");
    assert_eq!(telemetry["spec"]["selector"], policy["spec"]["selector"]);
    assert_eq!(
        telemetry["spec"]["accessLogging"][0]["providers"][0]["name"],
        "authz-decisions"
    );
    let kustomization = read("deploy/istio/kustomization.yaml");
    assert!(
        kustomization.contains("- telemetry.yaml"),
        "{kustomization}"
    );
}

fn kustomize(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(tools::repo_root())
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs_str(&String::from_utf8(out.stdout).unwrap(), dir)
}

#[test]
fn kustomize_builds_both_overlays() {
    if !on_path("kubectl") {
        eprintln!("SKIPPED: kubectl not on PATH (the structural checks above still ran)");
        return;
    }
    for dir in [K8S, "deploy/istio"] {
        let docs = kustomize(dir);
        let kinds: Vec<&str> = docs.iter().map(|d| s(&d["kind"])).collect();
        assert!(!kinds.contains(&"Secret"), "{dir} applies a Secret");
        assert!(kinds.contains(&"PodDisruptionBudget"), "{dir}: {kinds:?}");
        let netpol = docs.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
        let ports: Vec<u64> = netpol["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["ports"].as_array().unwrap().iter())
            .filter_map(|p| p["port"].as_u64())
            .collect();
        assert!(
            ports.contains(&15020) && ports.contains(&9092),
            "{dir}: {ports:?}"
        );
        let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        // The generated ConfigMap names (hash-suffixed) are what the pod mounts.
        for v in deployment["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
        {
            if let Some(cm) = v["configMap"]["name"].as_str() {
                assert!(
                    docs.iter()
                        .any(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm),
                    "{dir}: volume refers to ConfigMap {cm}, which is not generated"
                );
            }
        }
    }
}

// ---- docker-compose.yml ---------------------------------------------------------------------

/// `NAME=value` pinned in scripts/install-tools.sh.
fn tool_pin(name: &str) -> String {
    read("scripts/install-tools.sh")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("{name} not pinned in scripts/install-tools.sh"))
        .to_string()
}

/// The default of `${STACK_X:-default}` in scripts/dev-stack.sh.
fn stack_default(var: &str) -> u16 {
    let text = read("scripts/dev-stack.sh");
    let pat = format!("${{{var}:-");
    let at = text
        .find(&pat)
        .unwrap_or_else(|| panic!("{var} not in dev-stack.sh"))
        + pat.len();
    text[at..].split('}').next().unwrap().parse().unwrap()
}

#[test]
fn compose_runs_the_same_stack_as_the_script_with_the_pinned_versions() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    let image = |svc: &str| s(&services[svc]["image"]).to_string();
    assert_eq!(
        image("openfga"),
        format!("openfga/openfga:{}", tool_pin("OPENFGA_VERSION"))
    );
    assert_eq!(
        image("keycloak"),
        format!("quay.io/keycloak/keycloak:{}", tool_pin("KEYCLOAK_VERSION"))
    );
    assert_eq!(
        image("envoy"),
        format!("envoyproxy/envoy:v{}", tool_pin("ENVOY_VERSION"))
    );
    let (_, objects) = objects();
    let k8s_envoy = s(&container(&objects["Deployment/mcp-server"], "envoy")["image"]);
    assert!(
        k8s_envoy.ends_with(&image("envoy")),
        "{k8s_envoy} vs compose"
    );

    // The sidecar: built from the Dockerfile, the README's image name, read-only, in the
    // app's network namespace like the pod, mounting only its config and the hashed keys.
    let sidecar = &services["authz-sidecar"];
    assert_eq!(sidecar["build"], ".");
    assert!(tools::repo_file("Dockerfile").exists());
    assert_eq!(image("authz-sidecar"), documented_image());
    assert_eq!(sidecar["read_only"], true);
    for svc in ["authz-sidecar", "envoy"] {
        assert_eq!(services[svc]["network_mode"], "service:app", "{svc}");
    }
    let mut mounted = BTreeMap::new();
    for (name, svc) in services {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let mut parts = s(v).split(':');
            let (src, dst) = (parts.next().unwrap(), parts.next().unwrap());
            let path = tools::repo_file(src.trim_start_matches("./"));
            assert!(path.is_file(), "{name}: bind source {src} is not a file");
            assert!(!src.ends_with(".pem"), "{name} mounts a key: {src}");
            assert!(s(v).ends_with(":ro"), "{name}: {src} read-only");
            mounted.insert((name.clone(), dst.to_string()), src.to_string());
        }
    }
    let cmd: Vec<&str> = sidecar["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    let config = cmd[cmd.iter().position(|a| *a == "--config").unwrap() + 1];
    assert_eq!(
        mounted[&("authz-sidecar".to_string(), config.to_string())],
        "./deploy/local/sidecar-stack.yaml"
    );
    assert_eq!(
        mounted[&("envoy".to_string(), "/etc/envoy/envoy.yaml".to_string())],
        "./deploy/envoy/envoy.yaml"
    );
    assert_eq!(
        sidecar["depends_on"]["openfga-seed"]["condition"],
        "service_completed_successfully"
    );

    // Host ports: the script's defaults, none twice, none of the README's (9191 9092 8080 8000).
    let published: Vec<(String, u16, u16)> = services
        .iter()
        .flat_map(|(name, svc)| {
            svc["ports"].as_array().into_iter().flatten().map(move |p| {
                let (host, container) = s(p).split_once(':').unwrap();
                (
                    name.clone(),
                    host.parse().unwrap(),
                    container.parse().unwrap(),
                )
            })
        })
        .collect();
    let host_of = |container: u16, svc: &str| {
        published
            .iter()
            .find(|(n, _, c)| n == svc && *c == container)
            .map(|(_, h, _)| *h)
            .unwrap_or_else(|| panic!("{svc} does not publish {container}"))
    };
    assert_eq!(host_of(8080, "app"), stack_default("STACK_ENVOY_PORT"));
    assert_eq!(host_of(9092, "app"), stack_default("STACK_OPS_PORT"));
    assert_eq!(
        host_of(8080, "keycloak"),
        stack_default("STACK_KEYCLOAK_PORT")
    );
    assert_eq!(
        host_of(8080, "openfga"),
        stack_default("STACK_OPENFGA_PORT")
    );
    let mut hosts: Vec<u16> = published.iter().map(|(_, h, _)| *h).collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), published.len(), "a host port published twice");
    for readme_port in [9191, 9092, 8080, 8000] {
        assert!(!hosts.contains(&readme_port));
    }
    // Keycloak's issuer is the URL tokens are fetched from on the host.
    assert_eq!(
        services["keycloak"]["environment"]["KC_HOSTNAME"],
        format!("http://localhost:{}", stack_default("STACK_KEYCLOAK_PORT"))
    );
}
