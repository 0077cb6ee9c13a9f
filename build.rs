//! Compiles the hand-written protobuf definitions under `proto/` into Rust, and passes the
//! git commit to the build info metric when the build environment names it.
//!
//! No system `protoc` is needed: `protox` parses the files into a
//! `FileDescriptorSet` (it ships the `google/protobuf/*` well-known types), and
//! `tonic-prost-build` generates the prost messages plus the tonic server and
//! client for `envoy.service.auth.v3.Authorization`.
//!
//! Besides the generated `*.rs` files, `OUT_DIR/authz_sidecar_descriptor.bin`
//! holds the encoded `FileDescriptorSet` (our files plus their imports), for a
//! gRPC reflection service.

use std::{
    env, fs, io,
    path::{Path, PathBuf},
};

const PROTO_DIR: &str = "proto";
const DESCRIPTOR_FILE: &str = "authz_sidecar_descriptor.bin";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    println!("cargo:rerun-if-changed=build.rs");
    build_commit();

    let mut protos = Vec::new();
    collect_protos(Path::new(PROTO_DIR), &mut protos)?;
    protos.sort();
    if protos.is_empty() {
        return Err(format!("no .proto files under {PROTO_DIR}/").into());
    }

    let mut compiler = protox::Compiler::new([PROTO_DIR])?;
    // Source info carries the .proto comments into rustdoc; imports (the
    // google/protobuf well-known types) make the set self-contained for
    // reflection and let prost-build see every referenced message. prost-build
    // emits no code for them: `.google.protobuf` maps to `prost_types`.
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(&protos)?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join(DESCRIPTOR_FILE),
        compiler.encode_file_descriptor_set(),
    )?;
    let fds = compiler.file_descriptor_set();

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    Ok(())
}

/// The git commit for `authz_sidecar_build_info`, when the build is told it: `AUTHZ_GIT_COMMIT`
/// (`docker build --build-arg`, a release script) or CI's `GITHUB_SHA`. Git itself is not run:
/// that would rebuild the crate on every commit, and the image build has no `.git`.
fn build_commit() {
    for var in ["AUTHZ_GIT_COMMIT", "GITHUB_SHA"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let commit = ["AUTHZ_GIT_COMMIT", "GITHUB_SHA"]
        .into_iter()
        .filter_map(|var| env::var(var).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric()));
    if let Some(commit) = commit {
        println!("cargo:rustc-env=AUTHZ_BUILD_COMMIT={commit}");
    }
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
