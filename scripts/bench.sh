#!/usr/bin/env bash
# Load benchmark of envoy.service.auth.v3.Authorization/Check, the RPC Envoy calls for every
# request. It MEASURES and prints; it never compares a time against a threshold. The only
# failures are setup failures (a tool missing, a process not starting, or a scenario that did
# not get the decisions it was built for: then its numbers would describe something else).
#
#   scripts/bench.sh                      # everything, ~6-8 minutes on 2 cores
#   BENCH_OPENFGA=0 scripts/bench.sh      # only the local (JWT / API key / deny) scenarios
#   BENCH_N=5000 BENCH_RATE_N=3000 scripts/bench.sh   # a quicker pass
#   BENCH_BIN=target/release/authz-sidecar scripts/bench.sh   # no cargo build
# Knobs (environment): BENCH_N BENCH_C BENCH_CONNECTIONS BENCH_RATE BENCH_RATE_N BENCH_SERIAL_N
# BENCH_WARMUP BENCH_TIMEOUT BENCH_RUN_LIMIT BENCH_OPENFGA BENCH_NOLOG BENCH_OUT BENCH_BIN.
#
# What runs (everything on 127.0.0.1, free ports, started and stopped by this script by PID):
#   1. cargo build --release; the binary is copied into the output directory so that a rebuild
#      by someone else in the same tree cannot change it mid-run.
#   2. sidecar with deploy/local/sidecar.yaml (JWT from the local JWKS, API keys file, rules):
#        jwt-allow      GET /api/agents, Bearer token minted once (`token mint`): token cache hit
#        apikey-allow   GET /api/agents, x-api-key: mcpkey_test_local_alice
#        deny-nocreds   GET /api/agents, no credentials: 401
#   3. the same config with LOG_LEVEL=warn (no decision log line), jwt-allow only: the cost of
#      the per-check log line.
#   4. `openfga run --datastore-engine memory`, a store with deploy/openfga/model.json, tuples,
#      and the sidecar with deploy/local/sidecar-openfga.yaml:
#        fga-cached     POST /tools/agent_chat/execute (tuple user:alice executor tool:agent_chat):
#                       every check answered by the decision cache              (store: 1 tuple)
#        fga-miss-deny  POST /tools/<unique>/execute, no tuple: every check is a cache miss and
#                       one OpenFGA /check that denies (403)                    (store: 1 tuple)
#        fga-miss-allow POST /tools/<unique>/execute, a tuple written for each: a miss and an
#                       OpenFGA /check that allows                  (store: one tuple a request)
#        fga-miss-deny-big  fga-miss-deny against that big store (the memory engine scans the
#                       whole store on every read: this shows what the store size costs)
#
# Each scenario gets a warm-up (not reported), then three load shapes with ghz:
#   serial  -c 1 --connections 1 -n BENCH_SERIAL_N        round-trip latency, no queueing
#   rate    -r BENCH_RATE -c BENCH_C --connections ... -n BENCH_RATE_N   latency at a fixed rate
#   max     -c BENCH_C --connections BENCH_CONNECTIONS -n BENCH_N        throughput, closed loop
# Fixed request counts; each request times out after BENCH_TIMEOUT (ghz -t) and each ghz run is
# killed after BENCH_RUN_LIMIT seconds (then the script stops with an error). Not ghz -x: in
# ghz v0.121.0 -x makes it ignore -n and run for the whole duration.
#
# For every run: ghz p50/p90/p99/max/rps; the sidecar's CPU time (utime+stime from /proc,
# 10 ms ticks) per check, and OpenFGA's; ghz's own CPU time (/usr/bin/time); "other CPU": busy
# CPU seconds of the whole machine (/proc/stat) minus those three, i.e. what other people's
# builds and tests took meanwhile (the script's own python helper adds ~0.1 s); the load
# average (it counts threads, including ours); the sidecar's decision and decision-cache
# counters from /metrics (the check that the scenario did what it says); the time inside the
# sidecar per check (latency_us of the decision log lines; without the log, the bucket bounds
# of the /metrics histogram); the sidecar's RSS (VmRSS, VmHWM) after the run, and each
# process's RSS and total CPU before it is stopped.
#
# ghz runs on the same machine as the sidecar: on a small machine the client is usually the
# bottleneck, so read rps together with "sidecar CPU per check".
#
# Output: a table on stdout, and in BENCH_OUT (default target/bench/<UTC time>/): summary.md,
# results.jsonl, every ghz JSON report, the process logs.
#
# Needs: cargo, python3, curl; ghz and openfga in ${AUTHZ_TOOLS_DIR:-target/tools}/bin
# (installed with scripts/install-tools.sh if missing).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
TOOLS="${AUTHZ_TOOLS_DIR:-$REPO/target/tools}"
GHZ="$TOOLS/bin/ghz"
OPENFGA_BIN="$TOOLS/bin/openfga"

N="${BENCH_N:-20000}"
C="${BENCH_C:-50}"
CONNS="${BENCH_CONNECTIONS:-4}"
RATE="${BENCH_RATE:-1000}"
RATE_N="${BENCH_RATE_N:-10000}"
SERIAL_N="${BENCH_SERIAL_N:-1000}"
WARMUP="${BENCH_WARMUP:-2000}"
TIMEOUT="${BENCH_TIMEOUT:-5s}"          # ghz per-request timeout (-t)
RUN_LIMIT="${BENCH_RUN_LIMIT:-300}"    # seconds: hard bound on one ghz run (a setup failure)
WITH_OPENFGA="${BENCH_OPENFGA:-1}"
WITH_NOLOG="${BENCH_NOLOG:-1}"
OUT="${BENCH_OUT:-$REPO/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
: > "$OUT/processes.md"

say() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

# ---- processes: every one this script starts is recorded here and stopped on exit ------------
PIDS=()
stop_pid() {
    local pid=$1 _
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Stops one recorded process now and forgets it.
stop_recorded() {
    local pid=$1 rest=() p
    stop_pid "$pid"
    for p in "${PIDS[@]}"; do
        [ "$p" = "$pid" ] || rest+=("$p")
    done
    PIDS=("${rest[@]}")
}

command -v python3 >/dev/null || die "python3 is required"
command -v curl >/dev/null || die "curl is required"
command -v cargo >/dev/null || die "cargo is required"

# ---- the python helper: ports, /proc, /metrics, OpenFGA API, ghz JSON --------------------------
HELPER="$OUT/bench_helper.py"
cat > "$HELPER" <<'PY'
import json, os, re, socket, sys, time, urllib.error, urllib.request

def freeport():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); print(p)

def wait_http(url, timeout="30"):
    deadline = time.time() + float(timeout)
    last = ""
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as e:  # not up yet, or 503 while not ready
            last = str(e)
        time.sleep(0.1)
    sys.exit(f"{url} not ready after {timeout}s: {last}")

def proc_sample(pid):
    """CPU seconds (utime+stime) and RSS/HWM in KiB of one process; null when gone."""
    tck = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tck
        mem = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "Threads"):
                    mem[k] = int(v.split()[0])
        return {"cpu_s": cpu, "rss_kib": mem.get("VmRSS"), "hwm_kib": mem.get("VmHWM"),
                "threads": mem.get("Threads")}
    except (FileNotFoundError, ProcessLookupError):
        return None

def metrics(ops):
    """The sidecar's decision counters, cache and OpenFGA counters and check histogram."""
    with urllib.request.urlopen(f"http://{ops}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {"decisions": {}, "backend": {}, "hist": {}}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        labels = {}
        if "{" in name:
            base, _, rest = name.partition("{")
            for part in rest.rstrip("}").split(","):
                if "=" in part:
                    k, _, v = part.partition("=")
                    labels[k] = v.strip('"')
        else:
            base = name
        v = float(value)
        if base == "authz_sidecar_decisions_total":
            # decision/code/credential, summed over status and rule; an allow's error="none"
            # reads as the code "ok" (older builds: a `code` label).
            code = labels.get("code") or {"none": "ok"}.get(labels.get("error"), labels.get("error"))
            key = f'{labels["decision"]}/{code}/{labels.get("credential", labels.get("method"))}'
            out["decisions"][key] = out["decisions"].get(key, 0) + v
        elif base == "authz_sidecar_backend":
            out["backend"][labels["name"]] = v
        elif base.startswith("authz_sidecar_decision_cache_"):
            name = base[len("authz_sidecar_decision_cache_"):].removesuffix("_total")
            out["backend"]["cache_size" if name == "entries" else f"cache_{name}"] = v
        elif base == "authz_sidecar_openfga_requests_total" and labels.get("endpoint") in ("check", "batch_check"):
            for name in ["openfga_requests"] + (["openfga_errors"] if labels.get("outcome") != "ok" else []):
                out["backend"][name] = out["backend"].get(name, 0) + v
        elif base == "authz_sidecar_check_duration_seconds_bucket":
            out["hist"][labels["le"]] = v
    return out

def cpu_busy():
    """Machine-wide busy CPU seconds so far (every state but idle and iowait), /proc/stat."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")

def snapshot(path, ops, log, *pids):
    snap = {"t": time.time(), "load": open("/proc/loadavg").read().split()[:3],
            "log": log, "log_size": os.path.getsize(log), "cpu_busy_s": cpu_busy(),
            "metrics": metrics(ops), "procs": {p: proc_sample(p) for p in pids}}
    json.dump(snap, open(path, "w"))

def api(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {base}{path}: HTTP {e.code}: {e.read().decode(errors='replace')[:300]}")

def fga_setup(base, name, model_file, tuples_file):
    """Creates a store with the model and writes the tuples (one `user relation object` a
    line) in batches of 100 (OpenFGA's default limit per write). Prints the store id."""
    store = api(base, "POST", "/stores", {"name": name})["id"]
    model = api(base, "POST", f"/stores/{store}/authorization-models",
                json.load(open(model_file)))["authorization_model_id"]
    tuples = [l.split() for l in open(tuples_file) if l.strip()]
    for i in range(0, len(tuples), 100):
        keys = [{"user": u, "relation": r, "object": o} for u, r, o in tuples[i:i + 100]]
        api(base, "POST", f"/stores/{store}/write",
            {"writes": {"tuple_keys": keys}, "authorization_model_id": model})
    print(store)

def hist_quantile(before, after, q):
    """Upper bound of the histogram bucket holding quantile q of the checks in between."""
    def le(k):
        return float("inf") if k == "+Inf" else float(k)
    keys = sorted(after, key=le)
    total = after["+Inf"] - before.get("+Inf", 0)
    if total <= 0:
        return None
    for k in keys:
        if after[k] - before.get(k, 0) >= q * total:
            return k
    return "+Inf"

def log_latency(log, start, end):
    """p50/p99/max of latency_us in the decision log lines written between two offsets: the
    time from the Check handler's start to its decision, per check (no gRPC, no client)."""
    with open(log, "rb") as f:
        f.seek(start)
        chunk = f.read(end - start).decode(errors="replace")
    vals = sorted(int(m) for m in re.findall(r"latency_us=(\d+)", chunk))
    if not vals:
        return None
    q = lambda p: vals[min(len(vals) - 1, int(p * len(vals)))]
    return {"n": len(vals), "p50": q(0.5), "p99": q(0.99), "max": vals[-1]}

def record(scenario, shape, cmd, ghz_json, before_f, after_f, ghz_time_f, expect,
           sidecar_pid, fga_pid, results):
    g = json.load(open(ghz_json))
    b, a = json.load(open(before_f)), json.load(open(after_f))
    ms = lambda ns: ns / 1e6
    dist = {int(d["percentage"]): ms(d["latency"]) for d in g.get("latencyDistribution") or []}
    count = g["count"]
    dd = {k: v - b["metrics"]["decisions"].get(k, 0) for k, v in a["metrics"]["decisions"].items()}
    dd = {k: int(v) for k, v in dd.items() if v}
    bk = {k: int(v - b["metrics"]["backend"].get(k, 0)) for k, v in a["metrics"]["backend"].items()}
    def cpu_delta(pid):
        if not pid:
            return None
        pb, pa = b["procs"].get(pid), a["procs"].get(pid)
        if not pb or not pa:
            return None
        return pa["cpu_s"] - pb["cpu_s"]
    sc, fc = cpu_delta(sidecar_pid), cpu_delta(fga_pid)
    ghz_cpu = None
    if ghz_time_f and os.path.exists(ghz_time_f):
        try:
            u, s, _ = open(ghz_time_f).read().split()[-3:]
            ghz_cpu = float(u) + float(s)
        except ValueError:
            pass
    busy = a["cpu_busy_s"] - b["cpu_busy_s"]
    ours = sum(v for v in (sc, fc, ghz_cpu) if v is not None)
    ok = (g.get("statusCodeDistribution") or {}).get("OK", 0)
    side = a["procs"].get(sidecar_pid) or {}
    row = {
        "scenario": scenario, "shape": shape, "command": cmd,
        "count": count, "ok": ok, "errors": g.get("errorDistribution") or {},
        "rps": g["rps"], "avg_ms": ms(g["average"]), "p50_ms": dist.get(50),
        "p90_ms": dist.get(90), "p99_ms": dist.get(99), "max_ms": ms(g["slowest"]),
        "wall_s": g["total"] / 1e9,
        "sidecar_cpu_s": sc, "sidecar_cpu_us_per_check": sc * 1e6 / count if sc is not None and count else None,
        "openfga_cpu_s": fc, "openfga_cpu_us_per_check": fc * 1e6 / count if fc is not None and count else None,
        "ghz_cpu_s": ghz_cpu,
        # CPU the rest of the machine used meanwhile (other people's builds and tests): busy
        # time from /proc/stat minus sidecar, OpenFGA and ghz; available was wall x nproc.
        "other_cpu_s": max(0.0, busy - ours), "machine_cpu_s": (a["t"] - b["t"]) * os.cpu_count(),
        "log_latency_us": log_latency(a["log"], b["log_size"], a["log_size"]),
        "inside_p50_le_s": hist_quantile(b["metrics"]["hist"], a["metrics"]["hist"], 0.5),
        "inside_p99_le_s": hist_quantile(b["metrics"]["hist"], a["metrics"]["hist"], 0.99),
        "decisions": dd,
        "cache": {k: v for k, v in bk.items() if k.startswith(("cache_", "openfga_")) and k != "cache_size"},
        "cache_size": a["metrics"]["backend"].get("cache_size"),
        "rss_kib": side.get("rss_kib"), "hwm_kib": side.get("hwm_kib"), "threads": side.get("threads"),
        "load_before": b["load"], "load_after": a["load"],
    }
    problems = []
    if ok != count:
        problems.append(f"{count - ok} of {count} RPCs failed: {row['errors']}")
    if dd.get(expect, 0) != count:
        problems.append(f"expected {count} decisions {expect}, got {dd}")
    row["problems"] = problems
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
    print(f"  {scenario:17} {shape:6} n={count:<6} rps={g['rps']:8.0f}  p50={f(row['p50_ms'])} "
          f"p90={f(row['p90_ms'])} p99={f(row['p99_ms'])} max={f(row['max_ms'])} ms  "
          f"sidecar {f(row['sidecar_cpu_us_per_check'], 1)} us/check"
          + (f"  openfga {f(row['openfga_cpu_us_per_check'], 1)} us/check" if fc is not None else "")
          + f"  other {row['other_cpu_s']:.1f}/{row['machine_cpu_s']:.0f} cpu-s  load {' '.join(a['load'])}", file=sys.stderr)
    if problems:
        sys.exit(f"scenario {scenario}/{shape} did not do what it is built for: {'; '.join(problems)}")

def check_decisions(before_f, after_f, expect, count):
    count = int(count)
    b, a = json.load(open(before_f)), json.load(open(after_f))
    dd = {k: int(v - b["metrics"]["decisions"].get(k, 0)) for k, v in a["metrics"]["decisions"].items()}
    dd = {k: v for k, v in dd.items() if v}
    if dd.get(expect, 0) != count:
        sys.exit(f"warm-up: expected {count} decisions {expect}, got {dd}")

def proc_line(label, pid, out):
    """One line about a process before it is stopped: RSS, peak RSS, total CPU time."""
    p = proc_sample(pid)
    if p:
        with open(out, "a") as f:
            f.write(f"- {label} (pid {pid}) before stop: RSS {p['rss_kib']} KiB, peak {p['hwm_kib']} KiB, "
                    f"CPU {p['cpu_s']:.2f} s, {p['threads']} threads\n")

def report(results, out_md, header_file, procs_file):
    rows = [json.loads(l) for l in open(results) if l.strip()]
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
    us = lambda s: "-" if s is None else ("> 1 s" if s == "+Inf" else f"≤ {float(s) * 1e6:g}")
    def inside(r):
        l = r.get("log_latency_us")
        if l:
            return f"{l['p50']} / {l['p99']} / {l['max']}"
        # No decision log (LOG_LEVEL=warn): the /metrics histogram's bucket bounds.
        return f"{us(r['inside_p50_le_s'])} / {us(r['inside_p99_le_s'])} / - (histogram)"
    lines = [open(header_file).read().rstrip(), "",
             "| scenario | shape | n | rps | p50 ms | p90 ms | p99 ms | max ms | sidecar CPU µs/check | OpenFGA CPU µs/check | ghz CPU s | other CPU s | in sidecar µs p50 / p99 / max | load avg after |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['shape']} | {r['count']} | {r['rps']:.0f} | {f(r['p50_ms'])} | {f(r['p90_ms'])} | "
            f"{f(r['p99_ms'])} | {f(r['max_ms'])} | {f(r['sidecar_cpu_us_per_check'], 1)} | "
            f"{f(r['openfga_cpu_us_per_check'], 1)} | {f(r['ghz_cpu_s'])} | "
            f"{r['other_cpu_s']:.1f} of {r['machine_cpu_s']:.0f} | "
            f"{inside(r)} | {' '.join(r['load_after'])} |")
    lines += ["", "Decisions and cache counters per run (deltas from the sidecar's /metrics):", ""]
    for r in rows:
        cache = ", ".join(f"{k}={v}" for k, v in sorted(r["cache"].items()) if v) or "-"
        lines.append(f"- {r['scenario']}/{r['shape']}: decisions {r['decisions']}; {cache}; "
                     f"sidecar RSS {r['rss_kib']} KiB (peak {r['hwm_kib']} KiB, {r['threads']} threads)")
    if os.path.exists(procs_file):
        lines += ["", "Processes (`/proc/PID/status` VmRSS/VmHWM, utime+stime):", "",
                  open(procs_file).read().rstrip()]
    lines += ["", "Commands (run from the output directory; the port is the one of that run):", ""]
    for r in rows:
        lines.append(f"- {r['scenario']}/{r['shape']}: `{r['command']}`")
    text = "\n".join(lines) + "\n"
    open(out_md, "w").write(text)
    print(text)

if __name__ == "__main__":
    fn = globals()[sys.argv[1].replace("-", "_")]
    fn(*sys.argv[2:])
PY
helper() { python3 "$HELPER" "$@"; }

# ---- tools and binary ---------------------------------------------------------------------------
if [ ! -x "$GHZ" ]; then
    say "ghz missing: scripts/install-tools.sh ghz"
    scripts/install-tools.sh ghz >&2
fi
if [ "$WITH_OPENFGA" = 1 ] && [ ! -x "$OPENFGA_BIN" ]; then
    say "openfga missing: scripts/install-tools.sh openfga"
    scripts/install-tools.sh openfga >&2
fi

BIN="$OUT/authz-sidecar"
COMMIT_BEFORE="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "${BENCH_BIN:-}" ]; then
    say "using BENCH_BIN=$BENCH_BIN (no build)"
    cp "$BENCH_BIN" "$BIN"
else
    say "cargo build --release --locked --bin authz-sidecar"
    cargo build --release --locked --bin authz-sidecar >&2
    cp target/release/authz-sidecar "$BIN"
fi

TIME_BIN=""
if [ -x /usr/bin/time ]; then TIME_BIN=/usr/bin/time; fi

# ---- machine and build facts ----------------------------------------------------------------------
COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
DIRTY="$(git status --porcelain --untracked-files=no 2>/dev/null | awk '{print $2}' | tr '\n' ' ' | sed 's/ $//')"
if [ -n "$DIRTY" ]; then DIRTY=" (uncommitted changes in: $DIRTY)"; fi
{
    echo "## Run $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "- commit: $COMMIT$DIRTY"
    if [ "$COMMIT" != "$COMMIT_BEFORE" ]; then echo "- note: HEAD moved from $COMMIT_BEFORE during the build"; fi
    echo "- machine: $(nproc) CPUs, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
    if [ -n "${BENCH_BIN:-}" ]; then echo "- binary: BENCH_BIN=$BENCH_BIN, not built by this run (the commit above may not be its source)"; fi
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- rustc: $(rustc --version 2>/dev/null); release profile from Cargo.toml"
    echo "- tools (${TOOLS#"$REPO"/}/versions.stamp): $(grep -E '^(ghz|openfga)=' "$TOOLS/versions.stamp" 2>/dev/null | tr '\n' ' ')"
    echo "- load shapes: serial = -c 1 --connections 1 -n $SERIAL_N; rate = -r $RATE -c $C --connections $CONNS -n $RATE_N; max = -c $C --connections $CONNS -n $N; each -t $TIMEOUT, after a $WARMUP-request warm-up"
} > "$OUT/header.md"
cat "$OUT/header.md" >&2

TOKEN="$("$BIN" token mint --sub alice --roles admin --ttl 2h)"
API_KEY=mcpkey_test_local_alice

GHZ_BASE=(--insecure --import-paths proto --proto envoy/service/auth/v3/external_auth.proto
          --call envoy.service.auth.v3.Authorization/Check)

# A CheckRequest as Envoy sends it (JSON form). $1 method, $2 path, $3 header JSON object body.
check_json() {
    printf '{"attributes":{"source":{"address":{"socketAddress":{"address":"127.0.0.1","portValue":40000}}},"request":{"http":{"id":"{{.RequestNumber}}","method":"%s","path":"%s","host":"app.local","scheme":"http","protocol":"HTTP/1.1","headers":{%s}}}}}\n' "$1" "$2" "$3"
}
H_JWT="\"authorization\":\"Bearer $TOKEN\",\"x-request-id\":\"{{.RequestNumber}}\""
H_KEY="\"x-api-key\":\"$API_KEY\",\"x-request-id\":\"{{.RequestNumber}}\""
H_NONE="\"x-request-id\":\"{{.RequestNumber}}\""

# Starts the sidecar; sets SIDECAR_PID, GRPC, OPS. $1 label, $2 config, rest: env assignments.
start_sidecar() {
    local label=$1 config=$2
    shift 2
    local gport oport
    gport=$(helper freeport)
    oport=$(helper freeport)
    GRPC="127.0.0.1:$gport"
    OPS="127.0.0.1:$oport"
    env "$@" "$BIN" serve --config "$config" --grpc-addr "$GRPC" --ops-addr "$OPS" \
        > "$OUT/sidecar-$label.log" 2>&1 &
    SIDECAR_PID=$!
    SIDECAR_LABEL=$label
    SIDECAR_LOG="$OUT/sidecar-$label.log"
    PIDS+=("$SIDECAR_PID")
    helper wait-http "http://$OPS/readyz" 30 || { tail -n 20 "$OUT/sidecar-$label.log" >&2; die "sidecar ($label) not ready"; }
    say "sidecar ($label) pid $SIDECAR_PID grpc $GRPC ops $OPS"
}

# $1 scenario, $2 expected decision label (decision/code/method), $3 data file with @SHAPE@ where
# per-shape values go (objects that must differ between runs), $4 sidecar pid, $5 openfga pid.
run_scenario() {
    local name=$1 expect=$2 template=$3 spid=$4 fpid=${5:-}
    local shape data args cmd json timef
    local pids=("$spid")
    [ -n "$fpid" ] && pids+=("$fpid")
    for shape in warmup serial rate max; do
        data="$OUT/$name-$shape.json"
        sed "s/@SHAPE@/$shape/g" "$template" > "$data"
        case $shape in
            warmup) args=(-c "$C" --connections "$CONNS" -n "$WARMUP") ;;
            serial) args=(-c 1 --connections 1 -n "$SERIAL_N") ;;
            rate)   args=(-r "$RATE" -c "$C" --connections "$CONNS" -n "$RATE_N") ;;
            max)    args=(-c "$C" --connections "$CONNS" -n "$N") ;;
        esac
        json="$OUT/$name-$shape.ghz.json"
        timef="$OUT/$name-$shape.time"
        args+=(-t "$TIMEOUT")
        cmd="ghz ${GHZ_BASE[*]} -D $(basename "$data") ${args[*]} --format json $GRPC"
        helper snapshot "$OUT/before.json" "$OPS" "$SIDECAR_LOG" "${pids[@]}"
        if [ -n "$TIME_BIN" ]; then
            "$TIME_BIN" -f '%U %S %M' -o "$timef" timeout "$RUN_LIMIT" "$GHZ" "${GHZ_BASE[@]}" \
                -D "$data" "${args[@]}" --format json -o "$json" "$GRPC" \
                || die "ghz $name/$shape failed or ran longer than ${RUN_LIMIT}s"
        else
            timeout "$RUN_LIMIT" "$GHZ" "${GHZ_BASE[@]}" -D "$data" "${args[@]}" --format json -o "$json" "$GRPC" \
                || die "ghz $name/$shape failed or ran longer than ${RUN_LIMIT}s"
            timef=""
        fi
        # Let the last checks finish before /metrics is read.
        sleep 0.5
        helper snapshot "$OUT/after.json" "$OPS" "$SIDECAR_LOG" "${pids[@]}"
        if [ "$shape" = warmup ]; then
            helper check-decisions "$OUT/before.json" "$OUT/after.json" "$expect" "$WARMUP"
        else
            helper record "$name" "$shape" "$cmd" "$json" "$OUT/before.json" "$OUT/after.json" \
                "$timef" "$expect" "$spid" "$fpid" "$RESULTS"
        fi
    done
}

# ---- 1. local config: JWT, API key, deny ------------------------------------------------------------
start_sidecar local deploy/local/sidecar.yaml
check_json GET /api/agents "$H_JWT" > "$OUT/jwt-allow.tmpl"
check_json GET /api/agents "$H_KEY" > "$OUT/apikey-allow.tmpl"
check_json GET /api/agents "$H_NONE" > "$OUT/deny-nocreds.tmpl"
run_scenario jwt-allow allow/ok/jwt "$OUT/jwt-allow.tmpl" "$SIDECAR_PID"
run_scenario apikey-allow allow/ok/api_key "$OUT/apikey-allow.tmpl" "$SIDECAR_PID"
run_scenario deny-nocreds deny/unauthenticated/none "$OUT/deny-nocreds.tmpl" "$SIDECAR_PID"
helper proc-line "sidecar $SIDECAR_LABEL" "$SIDECAR_PID" "$OUT/processes.md"
stop_recorded "$SIDECAR_PID"

# ---- 2. the same without the per-check decision log line ------------------------------------------------
if [ "$WITH_NOLOG" = 1 ]; then
    start_sidecar local-nolog deploy/local/sidecar.yaml LOG_LEVEL=warn
    run_scenario jwt-allow-nolog allow/ok/jwt "$OUT/jwt-allow.tmpl" "$SIDECAR_PID"
    helper proc-line "sidecar $SIDECAR_LABEL" "$SIDECAR_PID" "$OUT/processes.md"
    stop_recorded "$SIDECAR_PID"
fi

# ---- 3. OpenFGA ----------------------------------------------------------------------------------------------
if [ "$WITH_OPENFGA" = 1 ]; then
    fhttp=$(helper freeport)
    fgrpc=$(helper freeport)
    FGA="http://127.0.0.1:$fhttp"
    "$OPENFGA_BIN" run --datastore-engine memory \
        --http-addr "127.0.0.1:$fhttp" --grpc-addr "127.0.0.1:$fgrpc" \
        --metrics-enabled=false --playground-enabled=false --profiler-enabled=false \
        --log-format=text --log-level=warn > "$OUT/openfga.log" 2>&1 &
    FGA_PID=$!
    PIDS+=("$FGA_PID")
    helper wait-http "$FGA/healthz" 30 || { tail -n 20 "$OUT/openfga.log" >&2; die "openfga not ready"; }
    say "openfga pid $FGA_PID http $FGA"

    # Two stores, because the memory engine scans every tuple of a store on each read
    # (pkg/storage/memory/memory.go in OpenFGA v1.18.1), so a check's cost grows with the
    # store's size:
    #   small: the one tuple of the cached route (fga-cached, fga-miss-deny);
    #   big:   that tuple plus one per request of the allow-miss scenario (objects
    #          a<shape><request number>) (fga-miss-allow, and fga-miss-deny-big for the same
    #          deny as above on the big store).
    # Both are written before their sidecar starts. At startup the sidecar's changelog watcher
    # pages through the store's whole changelog to find its end (about 1 s for the big store)
    # and then clears the decision cache: that falls in the warm-up, which is not reported.
    echo "user:alice executor tool:agent_chat" > "$OUT/tuples-small.txt"
    {
        echo "user:alice executor tool:agent_chat"
        for shape in warmup serial rate max; do
            case $shape in
                warmup) n=$WARMUP ;; serial) n=$SERIAL_N ;; rate) n=$RATE_N ;; max) n=$N ;;
            esac
            seq 0 $((n - 1)) | sed "s/^/user:alice executor tool:a$shape/"
        done
    } > "$OUT/tuples-big.txt"
    STORE_SMALL=$(helper fga-setup "$FGA" bench-small deploy/openfga/model.json "$OUT/tuples-small.txt")
    say "openfga: store bench-small $STORE_SMALL, 1 tuple"
    STORE_BIG=$(helper fga-setup "$FGA" bench-big deploy/openfga/model.json "$OUT/tuples-big.txt")
    say "openfga: store bench-big $STORE_BIG, $(wc -l < "$OUT/tuples-big.txt") tuples"

    check_json POST /tools/agent_chat/execute "$H_JWT" > "$OUT/fga-cached.tmpl"
    check_json POST '/tools/a@SHAPE@{{.RequestNumber}}/execute' "$H_JWT" > "$OUT/fga-miss-allow.tmpl"
    check_json POST '/tools/d@SHAPE@{{.RequestNumber}}/execute' "$H_JWT" > "$OUT/fga-miss-deny.tmpl"

    start_sidecar openfga-small deploy/local/sidecar-openfga.yaml \
        OPENFGA_API_URL="$FGA" OPENFGA_STORE_ID="$STORE_SMALL"
    run_scenario fga-cached allow/ok/jwt "$OUT/fga-cached.tmpl" "$SIDECAR_PID" "$FGA_PID"
    run_scenario fga-miss-deny deny/forbidden/jwt "$OUT/fga-miss-deny.tmpl" "$SIDECAR_PID" "$FGA_PID"
    helper proc-line "sidecar $SIDECAR_LABEL" "$SIDECAR_PID" "$OUT/processes.md"
    stop_recorded "$SIDECAR_PID"

    start_sidecar openfga-big deploy/local/sidecar-openfga.yaml \
        OPENFGA_API_URL="$FGA" OPENFGA_STORE_ID="$STORE_BIG"
    run_scenario fga-miss-allow allow/ok/jwt "$OUT/fga-miss-allow.tmpl" "$SIDECAR_PID" "$FGA_PID"
    run_scenario fga-miss-deny-big deny/forbidden/jwt "$OUT/fga-miss-deny.tmpl" "$SIDECAR_PID" "$FGA_PID"
    helper proc-line "sidecar $SIDECAR_LABEL" "$SIDECAR_PID" "$OUT/processes.md"
    stop_recorded "$SIDECAR_PID"
    helper proc-line "openfga" "$FGA_PID" "$OUT/processes.md"
    stop_recorded "$FGA_PID"
fi

helper report "$RESULTS" "$OUT/summary.md" "$OUT/header.md" "$OUT/processes.md"
say "results in $OUT"
