#!/usr/bin/env bash
# Our text model against llama.cpp on the same GGUF, same machine, same
# threads, same run. llama.cpp comes from the source vendored in the PyPI
# sdist of llama-cpp-python (this machine reaches PyPI, not GitHub), built
# once into ~/.cache/companion-worker/peers for x86-64-v3 (AVX2, FMA, F16C,
# BMI2; no AVX-512): the level our release build's kernels run at (candle's
# and gemm's runtime-dispatched AVX2/FMA paths), so neither side gets an
# instruction set the other lacks, and the peer runs on any x86-64-v3 CPU
# (a GGML_NATIVE build died with "Illegal instruction" on this machine).
#
#   benches/compare_llama_cpp.sh [single] [PROMPT_TOKENS] [GEN_TOKENS] [THREADS]
#       llama-bench's prompt processing and generation (after the prompt,
#       `-d`; and with an empty context, llama-bench's default) vs
#       text_bench, in ROUNDS (3) interleaved rounds, and ours with candle's
#       kernels (QUANT_KERNEL=candle: Q4_1 re-quantized to Q8_0) for reference
#   benches/compare_llama_cpp.sh batched [PROMPT_TOKENS] [GEN_TOKENS] [THREADS]
#       llama-batched-bench at batch 1 and 8 vs ours: 1 and 8 jobs with
#       different prompts submitted at once to the continuous-batching
#       engine (text_bench jobs), generated tokens over the whole run
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=single
if [ "${1:-}" = single ] || [ "${1:-}" = batched ]; then MODE=$1; shift; fi
PP=${1:-128}
TG=${2:-$([ "$MODE" = batched ] && echo 128 || echo 32)}
THREADS=${3:-$(nproc)}
PEERS=${PEERS_DIR:-$HOME/.cache/companion-worker/peers}
ISA="x86-64-v3 (AVX2 FMA F16C BMI2, no AVX-512)"
mkdir -p "$PEERS"

command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }

SRC=$(ls -d "$PEERS"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | tail -1 || true)
if [ -z "$SRC" ]; then
  # The newest sdist, through pip (the operator's index configuration).
  DL=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$DL" llama-cpp-python >&2
  SDIST=$(ls "$DL"/llama_cpp_python-*.tar.gz | tail -1)
  NAME=$(basename "$SDIST")
  echo "unpacking $NAME" >&2
  tar -xzf "$SDIST" -C "$PEERS"
  rm -rf "$DL"
  SRC="$PEERS/${NAME%.tar.gz}/vendor/llama.cpp"
fi
BUILD="$SRC/build-x86-64-v3"
if [ ! -x "$BUILD/bin/llama-bench" ] || [ ! -x "$BUILD/bin/llama-batched-bench" ]; then
  echo "building llama.cpp for $ISA" >&2
  cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$BUILD" --target llama-bench llama-batched-bench -j "$THREADS" >/dev/null
fi

cargo build --release -p benches --bin text_bench >/dev/null 2>&1
# The GGUF: one place (benches::model_path, as the worker resolves it) for
# both sides.
MODEL=$(./target/release/text_bench path)
export TEXT_MODEL="$MODEL"
echo "model: $MODEL; $THREADS threads; llama.cpp built for $ISA" >&2

if [ "$MODE" = single ]; then
  # Both sides in turn, ROUNDS times (this machine's speed drifts by 10-20%
  # over a minute; the medians of interleaved rounds hold still). llama.cpp's
  # generation runs after a PP-token prompt (`-d`), as ours does (the same
  # context for attention); ours samples each token as well, llama-bench
  # does not.
  ROUNDS=${ROUNDS:-3}
  LLAMA_PP=(); LLAMA_TG=(); LLAMA_TG0=(); OURS=(); OURS0=()
  for _ in $(seq "$ROUNDS"); do
    LLAMA_PP+=("$("$BUILD/bin/llama-bench" -m "$MODEL" -p "$PP" -n 0 -t "$THREADS" -r 3 -o json 2>/dev/null)")
    LLAMA_TG+=("$("$BUILD/bin/llama-bench" -m "$MODEL" -p 0 -n "$TG" -d "$PP" -t "$THREADS" -r 3 -o json 2>/dev/null)")
    OURS+=("$(./target/release/text_bench "$PP" "$TG" 1 3 2>/dev/null)")
    # llama-bench's default tg: an empty context; ours: the shortest prompt.
    LLAMA_TG0+=("$("$BUILD/bin/llama-bench" -m "$MODEL" -p 0 -n "$TG" -t "$THREADS" -r 3 -o json 2>/dev/null)")
    OURS0+=("$(./target/release/text_bench 1 "$TG" 1 3 2>/dev/null)")
  done
  OURS_3=$(./target/release/text_bench "$PP" "$TG" 3 3 2>/dev/null)
  CANDLE=$(QUANT_KERNEL=candle ./target/release/text_bench "$PP" "$TG" 1 1 2>/dev/null)
  python3 - "$ISA" "$ROUNDS" "$OURS_3" "$CANDLE" "${LLAMA_PP[@]}" "${LLAMA_TG[@]}" "${OURS[@]}" "${LLAMA_TG0[@]}" "${OURS0[@]}" <<'PY'
import json, statistics, sys
isa, rounds = sys.argv[1], int(sys.argv[2])
ours3, candle = json.loads(sys.argv[3]), json.loads(sys.argv[4])
rest = sys.argv[5:]
lpp = [json.loads(a)[0]["avg_ts"] for a in rest[:rounds]]
ltg = [json.loads(a)[0]["avg_ts"] for a in rest[rounds:2 * rounds]]
ours = [json.loads(a) for a in rest[2 * rounds:3 * rounds]]
ltg0 = [json.loads(a)[0]["avg_ts"] for a in rest[3 * rounds:4 * rounds]]
ours0 = [json.loads(a) for a in rest[4 * rounds:]]
med = statistics.median
print(f"llama.cpp built for {isa}; medians of {rounds} interleaved rounds")
rows = [
    ("prompt processing tok/s", lpp, [o["pp_tok_s"] for o in ours], candle["pp_tok_s"]),
    ("generation tok/s (1 sequence)", ltg, [o["tg_tok_s"] for o in ours], candle["tg_tok_s"]),
    ("  same, empty context", ltg0, [o["tg_tok_s"] for o in ours0], None),
]
print(f"{'':34} {'llama.cpp':>10} {'ours':>10} {'ours/llama':>10} {'candle (Q8_0 repack)':>21}")
for name, l, o, c in rows:
    c = f"{c:21.1f}" if c is not None else ""
    print(f"{name:34} {med(l):10.1f} {med(o):10.1f} {med(o) / med(l):10.2f} {c}")
    print(f"{'  rounds':34} {' '.join(f'{v:.0f}' for v in l):>10} {' '.join(f'{v:.0f}' for v in o):>10}")
print(f"{'generation tok/s, 3 options':34} {'':>10} {ours3['tg_tok_s']:10.1f}")
one = med([o["seconds_per_job"] for o in ours])
print(f"job time, 1 option vs 3 options: {one:.2f} s vs {ours3['seconds_per_job']:.2f} s "
      f"({ours3['seconds_per_job'] / one:.2f}x)")
PY
else
  LLAMA_MD=$("$BUILD/bin/llama-batched-bench" -m "$MODEL" -c $(( (PP + TG) * 8 + 64 )) -b 2048 -ub 512 \
    -npp "$PP" -ntg "$TG" -npl 1,8 -t "$THREADS" 2>/dev/null)
  OURS_8=$(./target/release/text_bench jobs "$PP" "$TG" 8 2>/dev/null)
  OURS_1=$(./target/release/text_bench jobs "$PP" "$TG" 1 2>/dev/null)
  OURS_OPT=$(./target/release/text_bench "$PP" "$TG" 8 1 2>/dev/null)
  python3 - "$LLAMA_MD" "$OURS_1" "$OURS_8" "$OURS_OPT" "$ISA" "$PP" "$TG" <<'PY'
import json, sys
md, ours1, ours8, opt8 = sys.argv[1], *(json.loads(a) for a in sys.argv[2:5])
pp, tg = int(sys.argv[6]), int(sys.argv[7])
rows = {}
for line in md.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    # |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
    if len(cells) >= 10 and cells[0].isdigit():
        b = int(cells[2])
        # generation tok/s while decoding, and generated tokens over the
        # whole run (prefills included), as ours is measured
        rows[b] = (float(cells[7]), b * tg / float(cells[8]))
print(f"llama.cpp built for {sys.argv[5]}; {pp}-token prompts, {tg} generated tokens each")
print(f"{'aggregate generation tok/s':44} {'llama.cpp':>10} {'ours':>10} {'ours/llama':>10}")
for b, ours in ((1, ours1), (8, ours8)):
    s_tg, e2e = rows[b]
    print(f"{f'{b} job(s) at once, over the whole run':44} {e2e:10.1f} {ours['tg_tok_s_e2e']:10.1f} {ours['tg_tok_s_e2e'] / e2e:10.2f}")
    print(f"{f'  llama.cpp while decoding only (S_TG)':44} {s_tg:10.1f}")
print(f"{'ours: one job, 8 options (one prefill)':44} {'':>10} {opt8['tg_tok_s']:10.1f}")
print(f"ours, 8 jobs: mean batch {ours8['mean_batch_rows']:.1f} rows, {ours8['seconds']:.1f} s")
PY
fi
