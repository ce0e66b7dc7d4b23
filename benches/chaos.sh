#!/usr/bin/env bash
# The long chaos run: 300 jobs of mixed kinds through 3 workers, a worker
# killed (-9) every 5 s and restarted, one stalled past its lease, one Redis
# restart (AOF on), one callback receiver outage. Prints the figures.
#
#   benches/chaos.sh [JOBS] [KILL_EVERY_MS] [MAX_NEW_TOKENS]
#
# MAX_NEW_TOKENS (default: the worker's) shortens replies so that 300 jobs
# fit in minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup
cargo build --workspace --bins
CHAOS_JOBS=${1:-300} CHAOS_KILL_EVERY_MS=${2:-5000} CHAOS_MAX_NEW_TOKENS=${3:-} \
  cargo test --workspace --test chaos -- --nocapture 2>&1 | grep -E "^chaos:|test result|panicked"
