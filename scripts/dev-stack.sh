#!/usr/bin/env bash
# The whole stack on loopback, one command, no Docker:
#
#   OpenFGA (deploy/openfga/model.json + demo-tuples.json)   Keycloak (deploy/keycloak/realm.json)
#                    \                                        /
#   curl --> Envoy (deploy/envoy/envoy.yaml) --ext_authz--> authz-sidecar (deploy/local/sidecar-stack.yaml)
#               \--> demo app (scripts/echo-upstream.py: echoes what it receives)
#
#   scripts/dev-stack.sh            # prints tokens, keys and curl lines; Ctrl-C stops everything
#
# Needs the tools of scripts/install-tools.sh (openfga envoy keycloak) in
# ${AUTHZ_TOOLS_DIR:-target/tools}, python3, curl, and a JDK >= 21 for Keycloak
# (KEYCLOAK_JAVA_HOME, default /usr/lib/jvm/temurin-25-jdk-amd64, else JAVA_HOME).
#
# Settings (environment):
#   STACK_ENVOY_PORT=18080 STACK_ENVOY_ADMIN_PORT=18901 STACK_APP_PORT=18000
#   STACK_GRPC_PORT=18191 STACK_OPS_PORT=18092 STACK_KEYCLOAK_PORT=18180
#   STACK_KEYCLOAK_MGMT_PORT=18190 STACK_OPENFGA_PORT=18081 STACK_OPENFGA_GRPC_PORT=18082
#   STACK_DIR=<dir>            state: logs/, configs, Keycloak data, pids, stack.env
#                              (default: a new temp dir, removed on a clean stop)
#   AUTHZ_SIDECAR_BIN=<path>   the sidecar binary (default: `cargo build` it, target/debug)
#
# The first run imports the realm into a Keycloak database and keeps it in
# <tools>/keycloak-seed/dev-stack-<hash> (about a minute, once); later runs start from a copy
# and are up in about 10 s.
# Every process runs in its own process group and is stopped by that id (TERM, then KILL
# after 15 s) on Ctrl-C, SIGTERM, or when one of them dies. $STACK_DIR/pids lists them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${AUTHZ_TOOLS_DIR:-$REPO/target/tools}"
case "$TOOLS" in /*) ;; *) TOOLS="$REPO/$TOOLS" ;; esac

ENVOY_PORT="${STACK_ENVOY_PORT:-18080}"
ENVOY_ADMIN_PORT="${STACK_ENVOY_ADMIN_PORT:-18901}"
APP_PORT="${STACK_APP_PORT:-18000}"
GRPC_PORT="${STACK_GRPC_PORT:-18191}"
OPS_PORT="${STACK_OPS_PORT:-18092}"
KC_PORT="${STACK_KEYCLOAK_PORT:-18180}"
KC_MGMT_PORT="${STACK_KEYCLOAK_MGMT_PORT:-18190}"
FGA_PORT="${STACK_OPENFGA_PORT:-18081}"
FGA_GRPC_PORT="${STACK_OPENFGA_GRPC_PORT:-18082}"
REALM=mcp-server
KC_CLIENT_SECRET=test-only-mcp-server-secret   # test-only, from deploy/keycloak/realm.json

say() { printf 'dev-stack: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# ---- prerequisites ------------------------------------------------------------------------
for cmd in curl python3 setsid; do
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' is required but not on PATH"
done
OPENFGA="$TOOLS/bin/openfga"; ENVOY="$TOOLS/bin/envoy"; KC_DIST="$TOOLS/keycloak"
[ -x "$OPENFGA" ] || die "openfga not installed: scripts/install-tools.sh openfga (looked for $OPENFGA)"
[ -x "$ENVOY" ] || die "envoy not installed: scripts/install-tools.sh envoy (looked for $ENVOY)"
[ -x "$KC_DIST/bin/kc.sh" ] && [ -f "$KC_DIST/.authz-build" ] \
    || die "keycloak not installed and pre-built: scripts/install-tools.sh keycloak (looked in $KC_DIST)"
JAVA_HOME_KC=""
for cand in "${KEYCLOAK_JAVA_HOME:-/usr/lib/jvm/temurin-25-jdk-amd64}" "${JAVA_HOME:-}"; do
    if [ -n "$cand" ] && [ -x "$cand/bin/java" ]; then JAVA_HOME_KC="$cand"; break; fi
done
[ -n "$JAVA_HOME_KC" ] || die "Keycloak needs a JDK >= 21: set KEYCLOAK_JAVA_HOME"

ports=("$ENVOY_PORT" "$ENVOY_ADMIN_PORT" "$APP_PORT" "$GRPC_PORT" "$OPS_PORT" "$KC_PORT" "$KC_MGMT_PORT" "$FGA_PORT" "$FGA_GRPC_PORT")
[ "$(printf '%s\n' "${ports[@]}" | sort -u | wc -l)" -eq "${#ports[@]}" ] || die "two STACK_*_PORT settings are the same port"
for p in "${ports[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port $p is in use (set the STACK_*_PORT variables, see the top of this script)"
    fi
done

if [ -n "${AUTHZ_SIDECAR_BIN:-}" ]; then
    SIDECAR="$AUTHZ_SIDECAR_BIN"
else
    say "building the sidecar (cargo build --locked)"
    (cd "$REPO" && cargo build --locked --quiet --bin authz-sidecar) || die "cargo build failed"
    SIDECAR="$REPO/target/debug/authz-sidecar"
fi
[ -x "$SIDECAR" ] || die "sidecar binary $SIDECAR is not executable"

OWN_DIR=0
if [ -z "${STACK_DIR:-}" ]; then
    STACK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/authz-dev-stack.XXXXXX")"; OWN_DIR=1
fi
mkdir -p "$STACK_DIR/logs"
STACK_DIR="$(cd "$STACK_DIR" && pwd)"
LOGS="$STACK_DIR/logs"
: > "$STACK_DIR/pids"
rm -f "$STACK_DIR/ready"

# ---- processes ----------------------------------------------------------------------------
NAMES=(); PIDS=(); STOPPING=0; FAILED=0

# start NAME CMD...: own session and process group (pgid = pid), output to logs/NAME.log.
# Ctrl-C in the terminal reaches only this script, which stops the rest in order.
start() {
    local name=$1; shift
    setsid "$@" > "$LOGS/$name.log" 2>&1 < /dev/null &
    NAMES+=("$name"); PIDS+=("$!")
    echo "$name $!" >> "$STACK_DIR/pids"
}

# alive PID: running (an exited child that was not reaped yet, a zombie, is not).
alive() {
    kill -0 "$1" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# stop_one NAME PID: TERM to the group, KILL after 15 s; returns once the group is gone.
stop_one() {
    local name=$1 pid=$2 i
    kill -TERM -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        # Reap the leader once it has exited: a zombie still counts as a group member.
        alive "$pid" || wait "$pid" 2>/dev/null || true
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 -- "-$pid" 2>/dev/null; then
        say "$name (pgid $pid) still running 15 s after SIGTERM: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? i
    [ "$STOPPING" = 1 ] && return
    STOPPING=1
    trap '' INT TERM
    if [ "${#PIDS[@]}" -gt 0 ]; then say "stopping"; fi
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_one "${NAMES[$i]}" "${PIDS[$i]}"
    done
    if [ "$FAILED" = 1 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; }; then
        say "logs kept in $LOGS"
    elif [ "$OWN_DIR" = 1 ]; then
        rm -rf -- "$STACK_DIR"
    fi
    say "stopped"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for WHAT SECONDS PID CMD...: poll CMD every 0.2 s; fail naming the log if the process
# exits or time runs out.
wait_for() {
    local what=$1 secs=$2 pid=$3 name; shift 3
    local deadline=$((SECONDS + secs))
    name="$(awk -v p="$pid" '$2 == p {print $1}' "$STACK_DIR/pids")"
    until "$@" >/dev/null 2>&1; do
        if ! alive "$pid"; then
            FAILED=1; tail -n 30 "$LOGS/$name.log" >&2 || true
            die "$name exited before $what; log: $LOGS/$name.log"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            FAILED=1; tail -n 30 "$LOGS/$name.log" >&2 || true
            die "$what not ready after ${secs}s; log: $LOGS/$name.log"
        fi
        sleep 0.2
    done
}
http_ok() { curl -fsS -o /dev/null --max-time 2 "$1"; }

# ---- OpenFGA ------------------------------------------------------------------------------
start openfga "$OPENFGA" run --datastore-engine memory \
    --http-addr "127.0.0.1:$FGA_PORT" --grpc-addr "127.0.0.1:$FGA_GRPC_PORT" \
    --metrics-enabled=false --playground-enabled=false --profiler-enabled=false \
    --log-format text --log-level warn
FGA_PID=$!

# ---- Keycloak -----------------------------------------------------------------------------
kc_home() { # DIR: bin/kc.sh copied (it derives its home from its own path), the rest linked
    mkdir -p "$1/bin" "$1/data"
    cp "$KC_DIST/bin/kc.sh" "$1/bin/kc.sh"
    for sub in lib conf providers themes; do ln -s "$KC_DIST/$sub" "$1/$sub"; done
}
kc_start() { # NAME HOME [--import-realm]
    local name=$1 home=$2; shift 2
    start "$name" env -u KC_DB -u KC_HOSTNAME JAVA_HOME="$JAVA_HOME_KC" \
        JAVA_OPTS_APPEND="${AUTHZ_KC_JAVA_OPTS_APPEND:--XX:TieredStopAtLevel=1}" \
        KC_BOOTSTRAP_ADMIN_USERNAME=admin KC_BOOTSTRAP_ADMIN_PASSWORD=admin \
        "$home/bin/kc.sh" start --optimized --http-enabled=true --http-host=127.0.0.1 \
        --http-port="$KC_PORT" --hostname="http://127.0.0.1:$KC_PORT" \
        --http-management-port="$KC_MGMT_PORT" --cache=local --log-console-color=false "$@"
}
KC_URL="http://127.0.0.1:$KC_PORT"
KC_WELL_KNOWN="$KC_URL/realms/$REALM/.well-known/openid-configuration"
seed_key="$( { echo dev-stack-v1; cat "$REPO/deploy/keycloak/realm.json" "$KC_DIST/version.txt" "$KC_DIST/.authz-build"; } | sha256sum | cut -c1-16)"
SEED="$TOOLS/keycloak-seed/dev-stack-$seed_key"
if [ ! -f "$SEED/h2/keycloakdb.mv.db" ]; then
    say "importing realm $REALM into a fresh Keycloak database (once; kept in $SEED)"
    kc_home "$STACK_DIR/keycloak-import"
    mkdir -p "$STACK_DIR/keycloak-import/data/import"
    cp "$REPO/deploy/keycloak/realm.json" "$STACK_DIR/keycloak-import/data/import/"
    kc_start keycloak-import "$STACK_DIR/keycloak-import" --import-realm
    wait_for "Keycloak realm import" 240 "${PIDS[-1]}" http_ok "$KC_WELL_KNOWN"
    stop_one keycloak-import "${PIDS[-1]}"
    unset 'NAMES[-1]' 'PIDS[-1]'
    mkdir -p "$TOOLS/keycloak-seed"
    staged="$(mktemp -d "$TOOLS/keycloak-seed/.staging.XXXXXX")"
    cp -R "$STACK_DIR/keycloak-import/data/h2" "$staged/h2"
    rm -f "$staged"/h2/*.trace.db
    # Atomic publish; a concurrent run may have won, which is fine.
    mv -T "$staged" "$SEED" 2>/dev/null || rm -rf -- "$staged"
    rm -rf -- "$STACK_DIR/keycloak-import"
fi
kc_home "$STACK_DIR/keycloak"
cp -R "$SEED/h2" "$STACK_DIR/keycloak/data/h2"
kc_start keycloak "$STACK_DIR/keycloak"
KC_PID=$!

# ---- demo app -----------------------------------------------------------------------------
start app python3 "$REPO/scripts/echo-upstream.py" 127.0.0.1 "$APP_PORT"
APP_PID=$!

# ---- OpenFGA store, model, tuples ---------------------------------------------------------
FGA_URL="http://127.0.0.1:$FGA_PORT"
wait_for "OpenFGA /healthz" 30 "$FGA_PID" http_ok "$FGA_URL/healthz"
seed_out="$(python3 "$REPO/scripts/openfga-seed.py" "$FGA_URL" mcp-server \
    "$REPO/deploy/openfga/model.json" "$REPO/deploy/openfga/demo-tuples.json")" \
    || { FAILED=1; die "loading the OpenFGA model and tuples failed"; }
STORE_ID="$(sed -n 's/^STORE_ID=//p' <<< "$seed_out")"
wait_for "the demo app" 10 "$APP_PID" http_ok "http://127.0.0.1:$APP_PORT/"
wait_for "Keycloak realm $REALM" 180 "$KC_PID" http_ok "$KC_WELL_KNOWN"

# ---- authz-sidecar ------------------------------------------------------------------------
start sidecar env -u AUTH_PUBLIC_KEY_URL -u KEYCLOAK_SERVER_URL -u KEYCLOAK_REALM \
    -u JWT_ISSUER -u JWT_AUDIENCE -u API_KEYS_FILE -u CORS_ORIGINS -u CORS_ALLOWED_ORIGINS \
    -u OPENFGA_STORE_NAME -u OPENFGA_MODEL_ID -u OPENFGA_API_TOKEN -u AUTHZ_CONFIG \
    KEYCLOAK_URL="$KC_URL" OPENFGA_API_URL="$FGA_URL" OPENFGA_STORE_ID="$STORE_ID" \
    AUTHZ_SHUTDOWN_DELAY="${AUTHZ_SHUTDOWN_DELAY:-0s}" \
    "$SIDECAR" serve --config "$REPO/deploy/local/sidecar-stack.yaml" \
    --grpc-addr "127.0.0.1:$GRPC_PORT" --ops-addr "127.0.0.1:$OPS_PORT"
SIDECAR_PID=$!
wait_for "authz-sidecar /readyz" 30 "$SIDECAR_PID" http_ok "http://127.0.0.1:$OPS_PORT/readyz"

# ---- Envoy: deploy/envoy/envoy.yaml with the stack's ports, listener on loopback ----------
python3 - "$REPO/deploy/envoy/envoy.yaml" "$STACK_DIR/envoy.yaml" \
    "0.0.0.0:8080=127.0.0.1:$ENVOY_PORT" "127.0.0.1:9901=127.0.0.1:$ENVOY_ADMIN_PORT" \
    "127.0.0.1:9191=127.0.0.1:$GRPC_PORT" "127.0.0.1:8000=127.0.0.1:$APP_PORT" <<'PY' \
    || { FAILED=1; die "cannot render deploy/envoy/envoy.yaml for the stack"; }
import sys
src, dst, *subs = sys.argv[1:]
text = open(src).read()
for s in subs:
    (old_host, old_port), (new_host, new_port) = (x.rsplit(":", 1) for x in s.split("="))
    old = f"address: {old_host}, port_value: {old_port} "
    if text.count(old) != 1:
        sys.exit(f"{src}: expected exactly one '{old.strip()}', found {text.count(old)}")
    text = text.replace(old, f"address: {new_host}, port_value: {new_port} ")
open(dst, "w").write(text)
PY
start envoy "$ENVOY" -c "$STACK_DIR/envoy.yaml" --disable-hot-restart --log-level warn
ENVOY_PID=$!
wait_for "Envoy" 30 "$ENVOY_PID" http_ok "http://127.0.0.1:$ENVOY_ADMIN_PORT/ready"

# ---- tokens, keys, and what to try --------------------------------------------------------
TOKEN_URL="$KC_URL/realms/$REALM/protocol/openid-connect/token"
token() { # USER PASSWORD, or a service-account client id and secret with --client
    local out
    if [ "$1" = --client ]; then
        out="$(curl -fsS "$TOKEN_URL" -d grant_type=client_credentials -d "client_id=$2" -d "client_secret=$3")"
    else
        out="$(curl -fsS "$TOKEN_URL" -d grant_type=password -d client_id=mcp-server \
            -d "client_secret=$KC_CLIENT_SECRET" -d "username=$1" -d "password=$2")"
    fi
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])' <<< "$out"
}
ALICE="$(token alice alice123)" || { FAILED=1; die "no token for alice from $TOKEN_URL"; }
BOB="$(token bob bob123)" || { FAILED=1; die "no token for bob from $TOKEN_URL"; }
SVC="$(token --client svc-reporter test-only-svc-reporter-secret)" || { FAILED=1; die "no token for svc-reporter"; }
API_KEY=mcpkey_test_local_alice   # demo key, deploy/local/api-keys.yaml

{
    printf '# source this file: the local stack started by scripts/dev-stack.sh\n'
    printf 'export ENVOY=%q\n' "http://127.0.0.1:$ENVOY_PORT"
    printf 'export SIDECAR_GRPC=%q SIDECAR_OPS=%q\n' "127.0.0.1:$GRPC_PORT" "http://127.0.0.1:$OPS_PORT"
    printf 'export KEYCLOAK=%q OPENFGA=%q STORE_ID=%q\n' "$KC_URL" "$FGA_URL" "$STORE_ID"
    printf 'export ALICE=%q\nexport BOB=%q\nexport SVC=%q\nexport API_KEY=%q\n' "$ALICE" "$BOB" "$SVC" "$API_KEY"
    printf '# tokens last 5 minutes: ALICE=$(token alice alice123); SVC=$(token --client svc-reporter test-only-svc-reporter-secret)\n'
    printf 'TOKEN_URL=%q KC_CLIENT_SECRET=%q\n' "$TOKEN_URL" "$KC_CLIENT_SECRET"
    declare -f token
} > "$STACK_DIR/stack.env"

cat <<EOF

authz-sidecar dev stack is up. Ctrl-C stops everything.

  Envoy     http://127.0.0.1:$ENVOY_PORT  -> authz-sidecar 127.0.0.1:$GRPC_PORT -> demo app 127.0.0.1:$APP_PORT (echoes the request)
  sidecar   http://127.0.0.1:$OPS_PORT/metrics  /readyz
  Keycloak  $KC_URL  (admin console: admin/admin; realm $REALM: alice/alice123, bob/bob123)
  OpenFGA   $FGA_URL  store mcp-server = $STORE_ID
  logs      $LOGS

In another shell:

  source $STACK_DIR/stack.env      # ENVOY, ALICE, BOB, SVC (tokens, 5 min), API_KEY; token() for new ones

  curl -i \$ENVOY/public/hello                                                  # 200, public route
  curl -i \$ENVOY/api/agents                                                    # 401, no credentials
  curl -i \$ENVOY/api/agents -H "authorization: Bearer \$ALICE"                  # 200, the app sees x-auth-subject: user:alice
  curl -i \$ENVOY/api/agents -H "x-api-key: \$API_KEY"                           # 200, x-auth-method: api_key
  curl -i \$ENVOY/api/agents -H "authorization: Bearer \$SVC"                    # 200, service_principal:svc-reporter
  curl -i \$ENVOY/admin/users -H "authorization: Bearer \$ALICE"                 # 403, role admin required
  curl -i -X POST \$ENVOY/tools/agent_chat/execute -H "authorization: Bearer \$ALICE"  # 200, tuple user:alice executor tool:agent_chat
  curl -i -X POST \$ENVOY/tools/agent_chat/execute -H "authorization: Bearer \$BOB"    # 403, bob is not executor
  curl -i -X POST \$ENVOY/tools/search/execute -H "authorization: Bearer \$ALICE"      # 200, via group /acme -> organization:acme
  curl -i \$ENVOY/conversations/demo -H "authorization: Bearer \$BOB"            # 200, bob is viewer
  curl -i -X PUT \$ENVOY/conversations/demo -H "authorization: Bearer \$BOB"     # 403, not editor

Tokens:
  ALICE=$ALICE
  BOB=$BOB
  SVC=$SVC
  API_KEY=$API_KEY
EOF
touch "$STACK_DIR/ready"

# Run until Ctrl-C / SIGTERM (the traps stop everything), or until a component dies.
while :; do
    for i in "${!PIDS[@]}"; do
        if ! alive "${PIDS[$i]}"; then
            FAILED=1
            die "${NAMES[$i]} exited unexpectedly; log: $LOGS/${NAMES[$i]}.log"
        fi
    done
    sleep 1
done
