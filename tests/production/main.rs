//! Running it in production (issue 8), as far as it can be tested without a container engine
//! or a cluster: the image's recipe (Dockerfile, .dockerignore) and the binary as the image
//! runs it (unprivileged, read-only root with only its config), the Kubernetes manifests and
//! docker-compose.yml cross-checked against each other and the sidecar's config, and the local
//! stack script end to end.

#[path = "../common/mod.rs"]
mod common;

mod dev_stack;
mod image;
mod manifests;

use std::path::Path;

use serde_json::Value;

/// A repository file as text; panics naming it.
pub fn read(rel: &str) -> String {
    let path = common::tools::repo_file(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every YAML document of a repository file, as JSON values.
pub fn yaml_docs(rel: &str) -> Vec<Value> {
    yaml_docs_str(&read(rel), rel)
}

pub fn yaml_docs_str(text: &str, what: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: not valid YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The single YAML document of a repository file.
pub fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: expected one YAML document");
    docs.remove(0)
}

/// Whether a program is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| Path::new(&dir).join(program).is_file())
    })
}

/// The port of `HOST:PORT`.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} is not HOST:PORT"))
}

/// The image name the README documents: `docker build -t NAME .`.
pub fn documented_image() -> String {
    let readme = read("README.md");
    let line = readme
        .lines()
        .find(|l| l.contains("docker build -t "))
        .expect("README.md documents `docker build -t <image> .`");
    line.split("docker build -t ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("an image name after `docker build -t`")
        .to_string()
}
