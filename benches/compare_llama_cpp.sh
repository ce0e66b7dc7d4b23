#!/usr/bin/env bash
# Our text model against llama.cpp's llama-bench on the same GGUF, same
# machine, same run. llama.cpp comes from the source vendored in the PyPI
# sdist of llama-cpp-python (this machine reaches PyPI, not GitHub), built
# once into ~/.cache/companion-worker/peers.
#
#   benches/compare_llama_cpp.sh [PROMPT_TOKENS] [GEN_TOKENS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
PP=${1:-128}
TG=${2:-32}
THREADS=${3:-$(nproc)}
PEERS=${PEERS_DIR:-$HOME/.cache/companion-worker/peers}
mkdir -p "$PEERS"

command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }

LLAMA_BENCH=$(ls "$PEERS"/llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-bench 2>/dev/null | tail -1 || true)
if [ -z "$LLAMA_BENCH" ]; then
  # The newest sdist, through pip (the operator's index configuration).
  DL=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$DL" llama-cpp-python >&2
  SDIST=$(ls "$DL"/llama_cpp_python-*.tar.gz | tail -1)
  NAME=$(basename "$SDIST")
  echo "unpacking $NAME" >&2
  tar -xzf "$SDIST" -C "$PEERS"
  rm -rf "$DL"
  SRC="$PEERS/${NAME%.tar.gz}/vendor/llama.cpp"
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$SRC/build" --target llama-bench -j "$THREADS" >/dev/null
  LLAMA_BENCH="$SRC/build/bin/llama-bench"
fi

cargo build --release -p benches --bin text_bench >/dev/null 2>&1
MODEL=$(cargo run --release -q -p worker -- fetch-models 2>/dev/null)

echo "model: $MODEL; pp $PP tokens, tg $TG tokens, $THREADS threads" >&2
LLAMA_JSON=$("$LLAMA_BENCH" -m "$MODEL" -p "$PP" -n "$TG" -t "$THREADS" -r 3 -o json 2>/dev/null)
OURS_1=$(./target/release/text_bench "$PP" "$TG" 1 3 2>/dev/null)
OURS_3=$(./target/release/text_bench "$PP" "$TG" 3 3 2>/dev/null)
OURS_1_F=$(CPU_REPACK=false ./target/release/text_bench "$PP" "$TG" 1 2 2>/dev/null)

python3 - "$LLAMA_JSON" "$OURS_1" "$OURS_3" "$OURS_1_F" <<'PY'
import json, sys
llama = json.loads(sys.argv[1])
ours1, ours3, plain = (json.loads(a) for a in sys.argv[2:5])
pp = next(r["avg_ts"] for r in llama if r["n_prompt"] > 0 and r["n_gen"] == 0)
tg = next(r["avg_ts"] for r in llama if r["n_gen"] > 0 and r["n_prompt"] == 0)
rows = [
    ("prompt processing tok/s", pp, ours1["pp_tok_s"], plain["pp_tok_s"]),
    ("generation tok/s (1 sequence)", tg, ours1["tg_tok_s"], plain["tg_tok_s"]),
]
print(f"{'':34} {'llama.cpp':>10} {'ours':>10} {'ours/llama':>10} {'no repack':>10}")
for name, l, o, p in rows:
    print(f"{name:34} {l:10.1f} {o:10.1f} {o / l:10.2f} {p:10.1f}")
print(f"{'generation tok/s, 3 options':34} {'':>10} {ours3['tg_tok_s']:10.1f}")
print(f"job time, 1 option vs 3 options: {ours1['seconds_per_job']:.2f} s vs {ours3['seconds_per_job']:.2f} s "
      f"({ours3['seconds_per_job'] / ours1['seconds_per_job']:.2f}x)")
PY
