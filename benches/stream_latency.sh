#!/usr/bin/env bash
# Streamed chat latency at the shim (time to first byte, gaps between
# chunks) with the default model, next to the model's own per-token time
# (text_bench); then spoken replies (`generate_audio`, Server-Sent Events):
# how long after a sentence's text its audio arrives, with the default
# Piper voice. All release builds on this machine, in one run.
#   benches/stream_latency.sh [RUNS] [REPLY_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-10}
TOKENS=${2:-48}
cargo build --release -p api-shim -p worker -p benches >/dev/null 2>&1
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RP=$(free_port); SP=$(free_port); PP=$(free_port)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
redis-server --port "$RP" --save "" --appendonly no >/dev/null & pids+=($!)
python3 benches/stream_latency.py platform "$PP" & pids+=($!)
for _ in $(seq 100); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.1; done
export REDIS_URL=redis://127.0.0.1:$RP SHIM_API_KEYS=bench WEBHOOK_SECRET=whsec_YmVuY2gtYmVuY2gtYmVuY2g= LOG=warn
SHIM_BIND=127.0.0.1:$SP ./target/release/api-shim & pids+=($!)
WORKER_ENV="PLATFORM_URL=http://127.0.0.1:$PP PLATFORM_API_KEYS=default:platform-key MAX_NEW_TOKENS=$TOKENS IGNORE_EOS=true"
wait_idle() { for _ in $(seq 150); do curl -fs "http://127.0.0.1:$SP/health" | grep -q '"idle":1' && return; sleep 0.2; done; }
# Text token by token (WHOLE_SENTENCES=false): the gaps are the model's.
env $WORKER_ENV WHOLE_SENTENCES=false ./target/release/worker & W=$!; pids+=($W)
wait_idle
STREAM=$(python3 benches/stream_latency.py measure "http://127.0.0.1:$SP" bench "$RUNS")
kill "$W"; wait "$W" 2>/dev/null || true
# Spoken replies with the defaults: whole sentences, the default voice.
env $WORKER_ENV ./target/release/worker & pids+=($!)
wait_idle
SPOKEN=$(python3 benches/stream_latency.py spoken "http://127.0.0.1:$SP" bench "$RUNS")
# A prompt about as long as the streamed chat's (~120 tokens).
MODEL=$(./target/release/text_bench 128 "$TOKENS" 1 3 2>/dev/null)
python3 - "$STREAM" "$MODEL" "$SPOKEN" <<'PY'
import json, sys
s, m, a = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
per_token = 1000 / m["tg_tok_s"]
print(f"time to first byte at the shim:  {s['ttfb_ms_mean']:.0f} ms (mean of {s['runs']})")
print(f"gap between chunks:              {s['gap_ms_median']:.1f} ms median, {s['gap_ms_p90']:.1f} ms p90")
print(f"model's own time per token:      {per_token:.1f} ms ({m['tg_tok_s']:.1f} tok/s); prefill of {m['prompt_tokens']} tokens {1000 * m['prompt_tokens'] / m['pp_tok_s']:.0f} ms")
print(f"pipeline's added gap per chunk:  {s['gap_ms_median'] - per_token:+.1f} ms")
print(f"spoken replies ({a['runs']}, {a['chunks']} chunks of {a['chunk_seconds_mean']:.2f} s of speech on average):")
print(f"  first text / first audio:      {a['first_text_ms_mean']:.0f} / {a['first_audio_ms_mean']:.0f} ms after the request (mean)")
print(f"  first audio after its text:    {a['first_audio_after_text_ms_median']:.0f} ms median, {a['first_audio_after_text_ms_max']:.0f} ms max (first chunks: {a['first_chunk_seconds_mean']:.2f} s of speech on average)")
print("  each reply's first chunk:       " + ", ".join(f"{s:.2f} s in {ms} ms" for s, ms in a["first_chunks"]))
print(f"  any chunk after its text:      {a['audio_after_text_ms_median']:.0f} ms median, {a['audio_after_text_ms_p90']:.0f} ms p90")
PY
