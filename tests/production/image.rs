//! The container image, without a container engine: the Dockerfile's final stage is
//! distroless, non-root, shell-less and gets only the binary; the build context cannot carry
//! secrets or build output; and the binary serves checks the way the image runs it: as user
//! 65532, in a chroot holding only the binary, its shared libraries, the CA bundle and its
//! config, all read-only, with a HOME that does not exist.
//!
//! Not tested here (no engine): that the image builds, that the distroless base has what the
//! binary links against (checked against the package list of distroless/cc-debian12 instead),
//! and HTTPS to Keycloak/OpenFGA through the image's CA bundle.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::process::{Proc, free_port, http_ok};
use crate::common::sidecar::{header, http, status};
use crate::common::tools;
use crate::read;

use authz_sidecar::proto::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;

// ---- Dockerfile ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct Stage {
    pub from: String,
    pub alias: Option<String>,
    /// (INSTRUCTION in upper case, arguments)
    pub instructions: Vec<(String, String)>,
}

/// Stages of a Dockerfile: comments dropped, `\` continuations joined.
pub fn stages(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut out: Vec<Stage> = Vec::new();
    for l in logical {
        let (kw, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let kw = kw.to_ascii_uppercase();
        let args = args.trim().to_string();
        if kw == "FROM" {
            let parts: Vec<&str> = args.split_whitespace().collect();
            let alias = match parts.as_slice() {
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            out.push(Stage {
                from: parts.first().unwrap_or(&"").to_string(),
                alias,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = out.last_mut() {
            stage.instructions.push((kw, args));
        }
    }
    out
}

/// What is wrong with a Dockerfile for this project; empty when nothing is.
pub fn lint_dockerfile(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let stages = stages(text);
    let (Some(last), true) = (stages.last(), stages.len() >= 2) else {
        return vec!["want a multi-stage build: a build stage and a runtime stage".into()];
    };
    let build = &stages[..stages.len() - 1];
    let get = |kw: &str| -> Vec<&String> {
        last.instructions
            .iter()
            .filter(|(k, _)| k == kw)
            .map(|(_, a)| a)
            .collect()
    };

    // Build: the command CI runs, on the runtime's Debian release (same glibc).
    if !build
        .iter()
        .flat_map(|s| &s.instructions)
        .any(|(k, a)| k == "RUN" && a.contains("cargo build --release --locked"))
    {
        problems.push("no build stage runs `cargo build --release --locked`".into());
    }
    if !build.iter().any(|s| s.from.contains("bookworm")) || !last.from.contains("debian12") {
        problems.push(format!(
            "build and runtime must share the Debian release (glibc): build FROM {:?}, runtime FROM {}",
            build.iter().map(|s| &s.from).collect::<Vec<_>>(),
            last.from
        ));
    }

    // Runtime: distroless (no shell, no package manager), never a :debug variant (busybox).
    if !last.from.starts_with("gcr.io/distroless/") || last.from.contains("debug") {
        problems.push(format!(
            "runtime FROM {} is not a shell-less distroless image",
            last.from
        ));
    }
    for kw in ["RUN", "SHELL", "ADD"] {
        if !get(kw).is_empty() {
            problems.push(format!(
                "runtime stage has {kw}: there is no shell to run it"
            ));
        }
    }
    match get("USER").last() {
        Some(u) if ["65532", "65532:65532", "nonroot", "nonroot:nonroot"].contains(&u.as_str()) => {
        }
        other => problems.push(format!(
            "runtime USER must be nonroot (65532), got {other:?}"
        )),
    }
    let entrypoint = match get("ENTRYPOINT").last() {
        Some(e) => match serde_json::from_str::<Vec<String>>(e) {
            Ok(v) if !v.is_empty() => Some(v[0].clone()),
            _ => {
                problems.push(format!(
                    "ENTRYPOINT {e} is not exec form (a JSON array): shell form needs /bin/sh"
                ));
                None
            }
        },
        None => {
            problems.push("runtime stage has no ENTRYPOINT".into());
            None
        }
    };
    if let Some(cmd) = get("CMD").last()
        && serde_json::from_str::<Vec<String>>(cmd).is_err()
    {
        problems.push(format!("CMD {cmd} is not exec form (a JSON array)"));
    }
    let build_aliases: Vec<&str> = build.iter().filter_map(|s| s.alias.as_deref()).collect();
    let copies = get("COPY");
    if copies.is_empty() {
        problems.push("runtime stage copies nothing".into());
    }
    for c in copies {
        let words: Vec<&str> = c.split_whitespace().collect();
        let from = words
            .iter()
            .find_map(|w| w.strip_prefix("--from="))
            .filter(|f| build_aliases.contains(f));
        let paths: Vec<&str> = words
            .iter()
            .copied()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let dest = paths.last().copied().unwrap_or("");
        let is_binary = entrypoint.as_deref() == Some(dest);
        let is_config = dest.starts_with("/etc/authz-sidecar/");
        if from.is_none() || !(is_binary || is_config) {
            problems.push(format!(
                "runtime COPY {c}: only the binary (the ENTRYPOINT) and config under \
                 /etc/authz-sidecar/, from a build stage"
            ));
        }
        if paths
            .iter()
            .any(|p| p.contains("deploy/local") || p.ends_with(".pem"))
        {
            problems.push(format!("runtime COPY {c} copies dev keys or dev config"));
        }
    }
    problems
}

#[test]
fn the_dockerfile_builds_like_ci_and_runs_distroless_as_nonroot_with_only_the_binary() {
    let text = read("Dockerfile");
    assert_eq!(lint_dockerfile(&text), Vec::<String>::new());

    let stages = stages(&text);
    let last = stages.last().unwrap();
    let arg = |kw: &str| {
        last.instructions
            .iter()
            .rev()
            .find(|(k, _)| k == kw)
            .map(|(_, a)| a.clone())
            .unwrap()
    };
    // The binary the build produces is the one the image starts.
    let entry: Vec<String> = serde_json::from_str(&arg("ENTRYPOINT")).unwrap();
    assert_eq!(entry, ["/usr/local/bin/authz-sidecar"]);
    assert!(text.contains("target/release/authz-sidecar"));
    let cmd: Vec<String> = serde_json::from_str(&arg("CMD")).unwrap();
    assert_eq!(cmd[..2], ["serve", "--config"]);
    // The listeners' default ports are what the image exposes.
    let exposed: Vec<&str> = last
        .instructions
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace())
        .collect();
    assert_eq!(exposed, ["9191", "9092"]);
    // strip = true keeps the image small.
    let cargo = read("Cargo.toml");
    let release = cargo
        .split("[profile.release]")
        .nth(1)
        .map(|rest| rest.split("\n[").next().unwrap_or(""))
        .expect("Cargo.toml has [profile.release]");
    assert!(
        release.lines().any(|l| l.replace(' ', "") == "strip=true"),
        "[profile.release] strip = true"
    );
}

#[test]
fn the_dockerfile_lint_catches_what_it_is_for() {
    let good = read("Dockerfile");
    let cases = [
        ("USER 65532:65532", "USER root", "USER must be nonroot"),
        (
            "ENTRYPOINT [\"/usr/local/bin/authz-sidecar\"]",
            "ENTRYPOINT /usr/local/bin/authz-sidecar",
            "not exec form",
        ),
        (
            "FROM gcr.io/distroless/cc-debian12:nonroot",
            "FROM gcr.io/distroless/cc-debian12:debug-nonroot",
            "shell-less",
        ),
        (
            "USER 65532:65532",
            "RUN chmod 0755 /usr/local/bin/authz-sidecar\nUSER 65532:65532",
            "has RUN",
        ),
        (
            "COPY --from=build /out/authz-sidecar /usr/local/bin/authz-sidecar",
            "COPY --from=build /out/authz-sidecar /usr/local/bin/authz-sidecar\nCOPY deploy/local/ /etc/authz-sidecar/",
            "only the binary",
        ),
        (
            "cargo build --release --locked",
            "cargo build --release",
            "cargo build --release --locked",
        ),
        (
            "rust:${RUST_VERSION}-bookworm",
            "rust:${RUST_VERSION}-trixie",
            "Debian release",
        ),
    ];
    for (from, to, want) in cases {
        assert!(good.contains(from), "Dockerfile no longer has {from:?}");
        let bad = good.replacen(from, to, 1);
        let problems = lint_dockerfile(&bad);
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{to:?}: want a problem containing {want:?}, got {problems:?}"
        );
    }
}

// ---- .dockerignore ------------------------------------------------------------------------

/// Whether Docker leaves `path` out of the build context, by the rules of `.dockerignore`
/// (moby/patternmatcher): the last pattern matching the path or one of its parents wins,
/// `!` lets a path back in, `*` and `?` stay within a segment, `**` spans segments.
pub fn docker_excludes(patterns: &str, path: &str) -> bool {
    let mut excluded = false;
    for line in patterns.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negate, pat) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pat: Vec<&str> = pat
            .trim_start_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let segs: Vec<&str> = path.split('/').collect();
        if (1..=segs.len()).any(|n| glob(&pat, &segs[..n])) {
            excluded = !negate;
        }
    }
    excluded
}

fn glob(pat: &[&str], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|i| glob(rest, &path[i..])),
        Some((p, rest)) => match path.split_first() {
            Some((s, path_rest)) => segment(p.as_bytes(), s.as_bytes()) && glob(rest, path_rest),
            None => false,
        },
    }
}

fn segment(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => segment(&p[1..], s) || (!s.is_empty() && segment(p, &s[1..])),
        (Some(b'?'), Some(_)) => segment(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => segment(&p[1..], &s[1..]),
        _ => false,
    }
}

#[test]
fn the_build_context_holds_only_what_cargo_build_reads() {
    let ignore = read(".dockerignore");
    // The matcher itself, on the shapes that matter.
    assert!(docker_excludes("*\n!src", "target"));
    assert!(!docker_excludes("*\n!src", "src/authn/jwt.rs"));
    assert!(docker_excludes("!src\n**/*.pem", "src/a/b.pem"));
    assert!(docker_excludes("**/target", "x/target/debug/y"));

    for never in [
        "deploy/local/dev-signing-key.pem",
        "tests/fixtures/keys/rsa-a.pem",
        "target/release/authz-sidecar",
        "target/tools/bin/envoy",
        ".git/HEAD",
        "deploy/kubernetes/secret-api-keys.example.yaml",
        "src/keys/leaked.pem",
        "src/target/x",
    ] {
        assert!(
            docker_excludes(&ignore, never),
            "{never} must not reach the build context"
        );
    }
    // Everything the build stage copies is in the context.
    let text = read("Dockerfile");
    let stages = stages(&text);
    let build = &stages[0];
    for (kw, args) in &build.instructions {
        if kw != "COPY" || args.contains("--from") {
            continue;
        }
        let words: Vec<&str> = args.split_whitespace().collect();
        for src in &words[..words.len() - 1] {
            assert!(
                !docker_excludes(&ignore, src),
                "the build stage copies {src}, which .dockerignore leaves out"
            );
        }
    }
    // Of the tracked files, exactly the sources of the build get in.
    let out = Command::new("git")
        .args(["ls-files"])
        .current_dir(tools::repo_root())
        .output()
        .expect("git ls-files");
    let files = String::from_utf8(out.stdout).unwrap();
    assert!(files.lines().count() > 20, "git ls-files listed too little");
    for f in files.lines() {
        let wanted = ["Cargo.toml", "Cargo.lock", "build.rs"].contains(&f)
            || f.starts_with("src/")
            || f.starts_with("proto/");
        assert_eq!(
            !docker_excludes(&ignore, f),
            wanted,
            "{f}: in the build context should be {wanted}"
        );
    }
}

// ---- the binary as the image runs it -------------------------------------------------------

/// The binary under test: `AUTHZ_IMAGE_BINARY` (e.g. target/release/authz-sidecar, the
/// stripped release build the image ships) or the one cargo built for these tests.
fn binary() -> PathBuf {
    match std::env::var_os("AUTHZ_IMAGE_BINARY") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                tools::repo_root().join(p)
            }
        }
        _ => PathBuf::from(env!("CARGO_BIN_EXE_authz-sidecar")),
    }
}

/// The shared objects of gcr.io/distroless/cc-debian12: libc6, libgcc-s1, libgomp1,
/// libstdc++6, libssl3 (packages of the image, as distroless lists them).
const DISTROLESS_CC_LIBS: &[&str] = &[
    "linux-vdso.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libresolv.so.2",
    "libgcc_s.so.1",
    "libgomp.so.1",
    "libstdc++.so.6",
    "libssl.so.3",
    "libcrypto.so.3",
];

/// (name, resolved path) of every shared object the binary loads, by `ldd`.
fn shared_objects(bin: &Path) -> Vec<(String, Option<PathBuf>)> {
    let out = Command::new("ldd").arg(bin).output().expect("run ldd");
    assert!(out.status.success(), "ldd {}: {:?}", bin.display(), out);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let name = l.split_whitespace().next()?;
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
                None => Some(name).filter(|n| n.starts_with('/')),
            };
            let base = Path::new(name).file_name()?.to_string_lossy().into_owned();
            Some((base, path.map(PathBuf::from)))
        })
        .collect()
}

#[test]
fn the_binary_links_only_what_distroless_cc_provides() {
    let libs = shared_objects(&binary());
    assert!(libs.iter().any(|(n, _)| n == "libc.so.6"), "{libs:?}");
    for (name, _) in &libs {
        assert!(
            DISTROLESS_CC_LIBS.contains(&name.as_str()),
            "{} needs {name}, which gcr.io/distroless/cc-debian12 does not have",
            binary().display()
        );
    }
}

fn euid_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A root filesystem like the image's: the binary, its shared objects, the CA bundle,
/// /etc/passwd with nonroot, and the config (deploy/local/sidecar.yaml, its JWKS and keys).
fn image_like_root(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let put = |rel: &str, from: &Path| {
        let to = dir.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    put("/usr/local/bin/authz-sidecar", &binary());
    for (name, path) in shared_objects(&binary()) {
        if let Some(p) = path {
            put(&p.to_string_lossy(), &p);
        } else {
            assert_eq!(name, "linux-vdso.so.1", "ldd did not resolve {name}");
        }
    }
    let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if ca.exists() {
        put("/etc/ssl/certs/ca-certificates.crt", ca);
    }
    let local = tools::repo_file("deploy/local");
    for f in ["sidecar.yaml", "dev-jwks.json", "api-keys.yaml"] {
        put(&format!("/etc/authz-sidecar/{f}"), &local.join(f));
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n").unwrap();
    // World-readable, owned by root (the test's user): 65532 can read, never write.
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::metadata(&p).unwrap();
        let mode = if meta.is_dir() || meta.permissions().mode() & 0o111 != 0 {
            0o755
        } else {
            0o644
        };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

// Multi-threaded: `Proc::kill` blocks its thread while the sidecar drains, and the gRPC
// client's connection task must keep running to answer the server's GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_checks_as_user_65532_on_a_read_only_root_with_only_its_config() {
    if !euid_is_root() {
        eprintln!(
            "SKIPPED: needs root for chroot, a mount namespace and the switch to uid 65532 (CI runs as root)"
        );
        return;
    }
    for tool in ["unshare", "chroot", "mount"] {
        assert!(
            crate::on_path(tool),
            "{tool} not on PATH (util-linux, coreutils)"
        );
    }
    let root = tempfile::Builder::new()
        .prefix("authz-image-root-")
        .tempdir()
        .unwrap();
    image_like_root(root.path());
    let (grpc, ops) = (free_port(), free_port());

    // A private mount namespace, the root bind-mounted read-only onto itself, then chroot and
    // drop to 65532:65532 (no supplementary groups): exec all the way, so the pid we hold is
    // the sidecar's.
    // `env -i`: only the variables below, as in the image (Proc keeps a command's added
    // variables but not an env_clear).
    let mut cmd = Command::new("env");
    cmd.arg("-i")
        .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
        .arg("HOME=/home/nonroot")
        .arg("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
        .arg(format!("AUTHZ_GRPC_ADDR=127.0.0.1:{grpc}"))
        .arg(format!("AUTHZ_OPS_ADDR=127.0.0.1:{ops}"))
        .arg("AUTHZ_SHUTDOWN_DELAY=0s")
        .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec chroot --userspec=65532:65532 "$@""#,
        )
        .arg("sh")
        .arg(root.path())
        .args([
            "/usr/local/bin/authz-sidecar",
            "serve",
            "--config",
            "/etc/authz-sidecar/sidecar.yaml",
        ]);
    let mut proc = Proc::spawn("image-root", grpc, &cmd);
    let ready = format!("http://127.0.0.1:{ops}/readyz");
    proc.wait_until(
        || {
            let url = ready.clone();
            async move { http_ok(&url).await }
        },
        Duration::from_secs(20),
        "sidecar in the image-like root",
    )
    .await;

    let pid = proc.pid();
    assert_eq!(status_field(pid, "Uid"), "65532 65532 65532 65532");
    assert_eq!(status_field(pid, "Gid"), "65532 65532 65532 65532");
    let groups = status_field(pid, "Groups");
    assert!(
        groups.split_whitespace().all(|g| g == "65532"),
        "no supplementary group but its own: {groups:?}"
    );
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        root.path().canonicalize().unwrap(),
        "the sidecar sees only the image-like root"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_mount = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a mount at / in the sidecar's view");
    let options = root_mount.split_whitespace().nth(5).unwrap();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "its root is read-only: {root_mount}"
    );

    let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .expect("connect to the sidecar");
    let allowed = client
        .check(http(
            "GET",
            "/api/agents",
            &[("x-api-key", "mcpkey_test_local_alice")],
            None,
        ))
        .await
        .expect("Check")
        .into_inner();
    assert_eq!(status(&allowed), 200, "{allowed:?}");
    assert_eq!(
        header(&allowed, "x-auth-subject").as_deref(),
        Some("user:alice")
    );
    let denied = client
        .check(http("GET", "/admin/users", &[], None))
        .await
        .expect("Check")
        .into_inner();
    assert_eq!(status(&denied), 401, "{denied:?}");
    drop(client);

    // SIGTERM: drains and exits 0, with nothing to write anywhere.
    proc.kill();
    let exit = proc.try_status().expect("exited");
    assert!(exit.success(), "exit {exit}; log:\n{}", proc.tail(30));
    let log = std::fs::read_to_string(proc.log_path()).unwrap_or_default();
    assert!(
        !log.to_lowercase().contains("permission denied") && !log.contains("Read-only file system"),
        "{log}"
    );
}

/// Threads named like tokio's workers (its blocking threads share the name).
fn tokio_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "tokio-rt-worker")
        .count()
}

async fn sidecar_threads(worker_threads: Option<usize>) -> usize {
    let (grpc, ops) = (free_port(), free_port());
    let mut cmd = Command::new("env");
    cmd.arg("-i")
        .arg(format!("AUTHZ_GRPC_ADDR=127.0.0.1:{grpc}"))
        .arg(format!("AUTHZ_OPS_ADDR=127.0.0.1:{ops}"))
        .arg("AUTHZ_SHUTDOWN_DELAY=0s");
    if let Some(n) = worker_threads {
        cmd.arg(format!("TOKIO_WORKER_THREADS={n}"));
    }
    cmd.arg(binary())
        .args(["serve", "--config"])
        .arg(tools::repo_file("deploy/local/sidecar.yaml"));
    let mut proc = Proc::spawn("worker-threads", grpc, &cmd);
    let ready = format!("http://127.0.0.1:{ops}/readyz");
    proc.wait_until(
        || {
            let url = ready.clone();
            async move { http_ok(&url).await }
        },
        Duration::from_secs(20),
        "sidecar",
    )
    .await;
    tokio_threads(proc.pid())
}

/// deploy/kubernetes sizes the runtime with TOKIO_WORKER_THREADS (from the CPU request):
/// the binary's runtime must keep honouring it (tokio reads it unless the builder is given
/// `worker_threads`).
#[tokio::test]
async fn tokio_worker_threads_sizes_the_runtime() {
    let by_default = sidecar_threads(None).await;
    let wanted = by_default + 3;
    let with_env = sidecar_threads(Some(wanted)).await;
    assert!(
        with_env >= wanted,
        "TOKIO_WORKER_THREADS={wanted}: {with_env} runtime threads (default: {by_default})"
    );
}
