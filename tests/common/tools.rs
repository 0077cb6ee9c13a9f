//! Where the external programs used by the integration tests live.
//!
//! They are installed by `scripts/install-tools.sh` into `${AUTHZ_TOOLS_DIR:-<repo>/target/tools}`:
//! `bin/openfga`, `bin/grpcurl`, `bin/ghz`, `bin/envoy`, `bin/promtool`, and `keycloak/` (unzipped
//! distribution).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The crate root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `$AUTHZ_TOOLS_DIR`, or `<repo>/target/tools`.
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("AUTHZ_TOOLS_DIR") {
        Some(dir) if !dir.is_empty() => {
            let p = PathBuf::from(dir);
            if p.is_absolute() {
                p
            } else {
                repo_root().join(p)
            }
        }
        _ => repo_root().join("target").join("tools"),
    }
}

/// `<tools>/bin/<name>`; panics with an install hint if it is not there.
pub fn tool(name: &str) -> PathBuf {
    let path = tools_dir().join("bin").join(name);
    if !is_executable(&path) {
        panic!(
            "{name} not installed: run scripts/install-tools.sh (looked for {})",
            path.display()
        );
    }
    path
}

/// True if `<tools>/bin/<name>` exists (for tests that want to skip rather than fail).
pub fn has_tool(name: &str) -> bool {
    is_executable(&tools_dir().join("bin").join(name))
}

/// The unzipped Keycloak distribution (`<tools>/keycloak`, with `bin/kc.sh`); panics with an
/// install hint if it is not there.
pub fn keycloak_home() -> PathBuf {
    let home = tools_dir().join("keycloak");
    if !is_executable(&home.join("bin").join("kc.sh")) {
        panic!(
            "keycloak not installed: run scripts/install-tools.sh (looked for {})",
            home.join("bin/kc.sh").display()
        );
    }
    home
}

/// A file under the repository (e.g. `repo_file("deploy/openfga/model.json")`).
pub fn repo_file(rel: &str) -> PathBuf {
    repo_root().join(rel)
}

/// `<repo>/target/test-logs`, created if needed.
pub fn test_logs_dir() -> PathBuf {
    let dir = repo_root().join("target").join("test-logs");
    std::fs::create_dir_all(&dir).expect("create target/test-logs");
    dir
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
