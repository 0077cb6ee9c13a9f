#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what the tests start for real
# (OpenFGA, Envoy, Keycloak, promtool, Jaeger; cached in target/tools), checks formatting and lints, then runs
# every unit and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
export AUTHZ_TOOLS_DIR="${AUTHZ_TOOLS_DIR:-$PWD/target/tools}"

scripts/install-tools.sh test grpcurl
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets "$@"
