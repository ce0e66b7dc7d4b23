#!/usr/bin/env bash
# Text decode speed on a GPU, in two halves so the GPU host builds nothing:
#
#   benches/gpu.sh build   here (no GPU needed): the CUDA 13.0 toolkit from
#                          PyPI wheels (../shared/tools/cuda-build-env.sh),
#                          `gpu_bench` built with the cuda feature, stripped,
#                          into target/gpu/gpu_bench (candle and the text
#                          model only: no ONNX Runtime, no S3, no HTTP)
#   benches/gpu.sh run     on the GPU host, from the repository root with
#                          target/gpu carried there: finds the CUDA 13
#                          libraries (PyTorch's nvidia wheels or the system's)
#                          and runs gpu_bench on random-weight checkpoints of
#                          SmolLM2-135M and Llama-3.2-1B shape built in memory
#
# It prints, per shape, batch-1, batch-8 and num_options=3 decode tokens/s
# and the memory-bandwidth bound at batch 1 (GPU_BANDWIDTH_GBS, default 3350
# for an H100 SXM). Extra arguments go to gpu_bench ([SHAPE] [STEPS]).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
shift || true
case "$MODE" in
  build)
    cargo fetch --quiet
    eval "$(bash ../shared/tools/cuda-build-env.sh)"
    CARGO_TARGET_DIR=target/cuda cargo build --release -p benches --bin gpu_bench --no-default-features --features models/cuda
    mkdir -p target/gpu
    strip -o target/gpu/gpu_bench target/cuda/release/gpu_bench
    echo "target/gpu/gpu_bench: $(( $(stat -c %s target/gpu/gpu_bench) / 1000000 )) MB stripped"
    ;;
  run)
    BIN=target/gpu/gpu_bench
    [ -x "$BIN" ] || { echo "no $BIN: run 'benches/gpu.sh build' where Rust is, then carry target/gpu" >&2; exit 1; }
    NV=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null || true)
    if [ -n "$NV" ] && [ -d "$NV/nvidia/cu13/lib" ]; then
      export LD_LIBRARY_PATH="$NV/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    DEVICE=${DEVICE:-cuda} "$BIN" "$@"
    ;;
  *)
    echo "usage: benches/gpu.sh build | run [SHAPE] [STEPS]" >&2
    exit 2
    ;;
esac
