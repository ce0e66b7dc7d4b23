#!/usr/bin/env bash
# The pipeline's own overhead: no-op `echo` jobs through shim → Redis →
# worker → result → signed callback (`/v2/echo/runsync` with a webhook),
# p50/p99 latency and jobs/s at 1 and 64 clients, against Celery and RQ
# (PyPI) doing the same no-op on the same redis-server in the same run.
#
#   [PROFILE=release|dev] benches/pipeline_overhead.sh [WORKERS] [SECONDS]
#
# WORKERS (default 2): worker processes, each with 32 echo slots; Celery
# runs as many prefork processes and RQ as many workers.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${1:-2}
SECONDS_PER_RUN=${2:-10}
PEER="$HOME/.cache/companion-worker/peer-venv"
"$PEER/bin/python" -c "import celery, redis, rq" 2>/dev/null \
  || "$PEER/bin/pip" install -q "celery[redis]==5.5.3" "rq==2.6.1"
# PROFILE=release (default) or dev (the tests' build, our crates at opt-level 0).
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build -q --release --workspace --bins; BIN=target/release
else
  cargo build -q --workspace --bins; BIN=target/debug
fi
"./$BIN/worker" fetch-models >/dev/null 2>&1

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RP=$(free_port); SP=$(free_port)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null' EXIT
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
REDIS_URL="redis://127.0.0.1:$RP"
until redis-cli -p "$RP" ping >/dev/null 2>&1; do sleep 0.05; done

KEY=bench-key
export REDIS_URL LOG=warn
SHIM_BIND="127.0.0.1:$SP" SHIM_API_KEYS="default:$KEY" \
  WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" ECHO_KIND=true \
  OUTBOUND_ALLOW="127.0.0.0/8" RATE_LIMIT_PER_S=0 \
  "./$BIN/api-shim" >/dev/null 2>&1 & pids+=($!)
for i in $(seq "$WORKERS"); do
  WORKER_KINDS=echo WORKER_CONCURRENCY=echo=32 WORKER_NAME="echo-$i" \
    "./$BIN/worker" >/dev/null 2>&1 & pids+=($!)
done
BASE="http://127.0.0.1:$SP"
live() { curl -s "$BASE/health" | python3 -c 'import json,sys; w=json.load(sys.stdin)["workers"]; print(w["idle"]+w["running"])' 2>/dev/null || echo 0; }
until [ "$(live)" -ge "$WORKERS" ]; do sleep 0.1; done

echo "workers: $WORKERS ours (32 echo slots each) / $WORKERS Celery prefork / $WORKERS RQ; ${SECONDS_PER_RUN} s per run; $PROFILE build; everything on this machine's $(nproc) cores"
echo "| system | clients | jobs/s | p50 ms | p99 ms | Redis CPU µs/job | callbacks |"
echo "|---|---|---|---|---|---|---|"
# Redis's own CPU time (user + system) per job: the one part of the
# pipeline that does not scale out with more shims and workers, so
# 1,000,000 / it bounds jobs/s on one Redis whatever else is added.
redis_cpu() { redis-cli -p "$RP" info cpu | awk -F: '/used_cpu_(sys|user):/ {s += $2} END {printf "%.6f", s}'; }
TMP=$(mktemp -d)
for c in 1 64; do
  c0=$(redis_cpu)
  "./$BIN/overhead_load" "$BASE" "$KEY" "$c" "$SECONDS_PER_RUN" 2>"$TMP/summary" >"$TMP/row"
  c1=$(redis_cpu)
  python3 - "$TMP/summary" "$TMP/row" "$c0" "$c1" <<'PY'
import json, sys
jobs = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["jobs"]
row = open(sys.argv[2]).read().strip().split(" | ")
us = (float(sys.argv[4]) - float(sys.argv[3])) * 1e6 / jobs
print(" | ".join(row[:-1] + [f"{us:.0f}", row[-1]]))
PY
done
rm -rf "$TMP"
kill "${pids[@]:1}" 2>/dev/null || true
redis-cli -p "$RP" flushall >/dev/null
"$PEER/bin/python" benches/pipeline_overhead_peers.py "$REDIS_URL" "$WORKERS" "$SECONDS_PER_RUN"
