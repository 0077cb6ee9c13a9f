#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what the tests start for real
# (OpenFGA, Envoy, Keycloak, promtool, Jaeger; cached in target/tools), checks formatting and
# lints, then runs every unit and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
export AUTHZ_TOOLS_DIR="${AUTHZ_TOOLS_DIR:-$PWD/target/tools}"
mkdir -p "$AUTHZ_TOOLS_DIR"

scripts/install-tools.sh openfga envoy keycloak grpcurl
# promtool and Jaeger are built from Go source: minutes of CPU on a fresh machine. They build
# while cargo compiles (which leaves a core idle much of the time) and are waited for before
# any test runs.
go_log="$AUTHZ_TOOLS_DIR/install-go-tools.log"
scripts/install-tools.sh promtool jaeger > "$go_log" 2>&1 &
go_tools=$!
trap 'kill "$go_tools" 2>/dev/null || true' EXIT

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets --no-run

if ! wait "$go_tools"; then
    cat "$go_log" >&2
    echo "test.sh: installing promtool and jaeger failed (log: $go_log)" >&2
    exit 1
fi
trap - EXIT
cat "$go_log"
cargo test --locked --all-targets "$@"
