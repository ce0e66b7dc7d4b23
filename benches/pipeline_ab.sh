#!/usr/bin/env bash
# Interleaved A/B of the pipeline (shim → Redis → worker → callback, no-op
# `echo` jobs at CLIENTS clients): where each build's CPU goes per job.
#
#   benches/pipeline_ab.sh DIR_A DIR_B [ROUNDS] [SECONDS] [CLIENTS]
#
# DIR_A and DIR_B hold `api-shim`, `worker` and `overhead_load` (copies of
# two release builds' target/release, or the same folder twice with
# WORKER_ENV_A / WORKER_ENV_B set: e.g. WORKER_ENV_B="TOKIO_WORKER_THREADS=1").
# WORKERS (2) worker processes with SLOTS (32) echo slots each. Each round
# runs A then B on a fresh redis-server; per run it prints jobs/s, p50/p99
# and the CPU time (user + system, /proc) per job of Redis, the shim, the
# workers and the load generator. This machine's speed drifts by up to a
# third within minutes: compare rounds, not runs far apart.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${1:?usage: benches/pipeline_ab.sh DIR_A DIR_B [ROUNDS] [SECONDS] [CLIENTS]}
B=${2:?usage: benches/pipeline_ab.sh DIR_A DIR_B [ROUNDS] [SECONDS] [CLIENTS]}
ROUNDS=${3:-3}
SECS=${4:-6}
CLIENTS=${5:-64}
WORKERS=${WORKERS:-2}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
SLOTS=${SLOTS:-32}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# CPU seconds (user + system) of each pid.
cpu_of() { for p in "$@"; do awk '{printf "%s ", ($14 + $15) / 100}' "/proc/$p/stat"; done; }

one_run() {
  local label=$1 dir=$2 worker_env=$3
  local rp sp pids=()
  rp=$(free_port); sp=$(free_port)
  redis-server --port "$rp" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
  until redis-cli -p "$rp" ping >/dev/null 2>&1; do sleep 0.05; done
  REDIS_URL="redis://127.0.0.1:$rp" LOG=warn SHIM_BIND="127.0.0.1:$sp" \
    SHIM_API_KEYS="default:bench-key" WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" \
    ECHO_KIND=true OUTBOUND_ALLOW="127.0.0.0/8" RATE_LIMIT_PER_S=0 \
    "$dir/api-shim" >/dev/null 2>&1 & pids+=($!)
  for i in $(seq "$WORKERS"); do
    # shellcheck disable=SC2086
    env $worker_env REDIS_URL="redis://127.0.0.1:$rp" LOG=warn WORKER_KINDS=echo \
      WORKER_CONCURRENCY="echo=$SLOTS" WORKER_NAME="echo-$i" \
      "$dir/worker" >/dev/null 2>&1 & pids+=($!)
  done
  local base="http://127.0.0.1:$sp" live=0
  until [ "$live" -ge "$WORKERS" ]; do
    sleep 0.1
    live=$(curl -s "$base/health" | python3 -c 'import json,sys; w=json.load(sys.stdin)["workers"]; print(w["idle"]+w["running"])' 2>/dev/null || echo 0)
  done
  local before after summary
  before=$(cpu_of "${pids[@]}")
  # The load generator's own CPU from its rusage.
  summary=$(python3 - "$dir/overhead_load" "$base" "$CLIENTS" "$SECS" <<'PY'
import json, resource, subprocess, sys
exe, base, clients, secs = sys.argv[1:]
p = subprocess.run([exe, base, "bench-key", clients, secs], capture_output=True, text=True)
if p.returncode != 0:
    sys.exit(p.stderr)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
s = json.loads(p.stderr.strip().splitlines()[-1])
s["load_cpu_s"] = r.ru_utime + r.ru_stime
print(json.dumps(s))
PY
)
  after=$(cpu_of "${pids[@]}")
  kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true
  python3 - "$label" "$summary" "$before" "$after" <<'PY'
import json, sys
label, summary, before, after = sys.argv[1:]
s = json.loads(summary)
n = s["jobs"]
used = [b - a for a, b in zip(map(float, before.split()), map(float, after.split()))]
redis, shim, workers = used[0], used[1], sum(used[2:])
us = lambda sec: sec * 1e6 / n
total = redis + shim + workers + s["load_cpu_s"]
print(f"{label}  {s['jobs_per_s']:7.0f} jobs/s  p50 {s['p50_ms']:5.2f} ms  p99 {s['p99_ms']:6.2f} ms"
      f"  | CPU µs/job: Redis {us(redis):5.1f}  shim {us(shim):5.1f}  workers {us(workers):5.1f}"
      f"  load {us(s['load_cpu_s']):5.1f}  all {us(total):5.1f}"
      f"  | callbacks {s['callbacks']}/{n}")
PY
}

echo "A: $A ${WORKER_ENV_A:-}"
echo "B: $B ${WORKER_ENV_B:-}"
echo "$WORKERS workers × $SLOTS echo slots, $CLIENTS clients, $SECS s per run, $ROUNDS rounds, $(nproc) cores"
for _ in $(seq "$ROUNDS"); do
  one_run A "$A" "${WORKER_ENV_A:-}"
  one_run B "$B" "${WORKER_ENV_B:-}"
done
