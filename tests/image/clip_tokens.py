"""transformers' CLIPTokenizer on CLIP's BPE file (the one open-clip-torch
ships): prints the ids of each prompt read from stdin (a JSON list), as a
JSON list of lists, for tests/tests/image_tokenizer.rs.

    clip_tokens.py BPE_GZ < prompts.json
"""

import gzip
import json
import os
import sys
import tempfile

from transformers import CLIPTokenizer


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer(bpe_gz, pad_token="<|endoftext|>"):
    """transformers' CLIPTokenizer on CLIP's BPE file: the vocabulary and
    merges written as the files it reads (into a temporary folder)."""
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    vocab = bytes_to_unicode()
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), pad_token=pad_token, model_max_length=77
    )


def main():
    tok = clip_tokenizer(sys.argv[1])
    prompts = json.load(sys.stdin)
    ids = [tok(p, truncation=True, max_length=77)["input_ids"] for p in prompts]
    json.dump(ids, sys.stdout)


if __name__ == "__main__":
    main()
