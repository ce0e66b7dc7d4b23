"""The reference for the Wan port: diffusers itself.

    wan_ref.py make DIR VARIANT
        Builds a tiny random Wan checkpoint with diffusers' and transformers'
        own classes and save_pretrained (real tensor names and config files)
        into DIR. VARIANT: wan21 (Wan 2.1-style text-to-video: 16-channel
        VAE without patching), ti2v (Wan 2.2 TI2V-style: the residual
        48-channel VAE with 2x2 patching, expand_timesteps, image-to-video by
        first-frame latents), mid (a wider Wan 2.1-style one for the bench).
        The tokenizer is a SentencePiece unigram model trained here (no hub
        access) in UMT5's layout: <pad>=0, </s>=1, <unk>=2, saved by
        transformers' T5TokenizerFast (tokenizer.json) as Wan's is.

    wan_ref.py run DIR < cases.json
        For each case {"prompt", "negative_prompt", "steps", "guidance_scale",
        "num_frames", "width", "height", "latents", "image"?, "frames_dir"}
        runs WanPipeline (or WanImageToVideoPipeline when "image" is given)
        from DIR with the case's initial latents and writes every decoded
        frame as DIR/frames_dir/00000.png, ... Prints {"seconds": [...]}.

    wan_ref.py tokens DIR < prompts.json
        Prints the ids transformers' slow (SentencePiece) T5Tokenizer and the
        fast one give each prompt as the Wan pipeline calls them (padding to
        max_length, truncation, </s> added), max_length from the prompt list.
"""

import json
import os
import sys
import time

import torch

CORPUS = [
    "a girl with silver hair walks through a neon city at night",
    "a knight in golden armor rides a horse across the snowy mountains",
    "the cat sleeps on a warm windowsill while rain falls outside",
    "slow motion waves crash on the rocky beach at sunset",
    "a smiling woman waves at the camera in a sunny park",
    "cinematic close up of a man drinking coffee in a busy cafe",
    "two friends laugh and dance under colorful festival lights",
    "a dragon flies over a medieval castle surrounded by clouds",
    "she turns her head slowly and her red dress moves in the wind",
    "the robot opens its eyes and looks around the quiet laboratory",
    "Bright colors, overexposed, static, blurred details, subtitles, worst quality",
    "low quality, JPEG compression residue, ugly, incomplete, extra fingers",
    "The quick brown fox jumps over the lazy dog. 0123456789!?",
    "Luna, Aria, Kai, Mira and Zed meet at the old lighthouse by the sea",
]


def train_tokenizer(out_dir):
    import sentencepiece as spm
    from transformers import T5Tokenizer, T5TokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w") as f:
        for _ in range(20):
            for line in CORPUS:
                f.write(line + "\n")
    prefix = os.path.join(out_dir, "spiece")
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        vocab_size=180,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        character_coverage=1.0,
        minloglevel=2,
    )
    os.remove(corpus)
    slow = T5Tokenizer(vocab_file=prefix + ".model", extra_ids=0, legacy=True)
    tok_dir = os.path.join(out_dir, "tokenizer")
    slow.save_pretrained(tok_dir)
    # add_prefix_space: SentencePiece's own "▁" in front, as umt5-xxl's
    # tokenizer.json has it (prepend_scheme "always").
    fast = T5TokenizerFast(
        vocab_file=os.path.join(tok_dir, "spiece.model"), extra_ids=0, legacy=True, add_prefix_space=True
    )
    fast.save_pretrained(tok_dir)
    os.remove(prefix + ".model")
    os.remove(prefix + ".vocab")
    return fast


def make(out_dir, variant):
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = train_tokenizer(out_dir)
    vocab = len(tokenizer)
    d_model = 64 if variant == "mid" else 32
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab,
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        )
    ).eval()
    if variant == "ti2v":
        vae = AutoencoderKLWan(
            base_dim=4,
            decoder_base_dim=6,
            z_dim=48,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            latents_mean=[0.05 * (i % 7) for i in range(48)],
            latents_std=[1.0 + 0.1 * (i % 5) for i in range(48)],
        )
        channels = 48
    elif variant == "mid":
        vae = AutoencoderKLWan(
            base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
            temperal_downsample=[False, True, True], attn_scales=[],
        )
        channels = 16
    else:
        vae = AutoencoderKLWan(
            base_dim=6, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        channels = 16
    heads, head_dim, layers = (4, 32, 4) if variant == "mid" else (2, 12, 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=channels,
        out_channels=channels,
        text_dim=d_model,
        freq_dim=256,
        ffn_dim=2 * heads * head_dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    with torch.no_grad():
        # Random weights make the text barely matter; scale the
        # cross-attention keys so another prompt makes another video.
        for name, p in transformer.named_parameters():
            if ".attn2.to_k." in name:
                p.mul_(8.0)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=5.0 if variant == "ti2v" else 3.0,
        solver_order=2,
    )
    if variant == "ti2v":
        pipe = WanImageToVideoPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            image_processor=None,
            image_encoder=None,
            transformer=transformer,
            expand_timesteps=True,
        )
    else:
        pipe = WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
        )
    pipe.save_pretrained(out_dir)
    if variant == "ti2v":
        # Wan 2.2 TI2V's model_index names WanPipeline; the I2V pipeline is
        # chosen by the caller. Keep expand_timesteps as the real one has it.
        path = os.path.join(out_dir, "model_index.json")
        index = json.load(open(path))
        index["_class_name"] = "WanPipeline"
        index.pop("image_encoder", None)
        index.pop("image_processor", None)
        json.dump(index, open(path, "w"), indent=2)


def frames_to_png(frames, out_dir):
    from PIL import Image
    import numpy as np

    os.makedirs(out_dir, exist_ok=True)
    for i, f in enumerate(frames):
        arr = (np.clip(f, 0.0, 1.0) * 255.0).round().astype("uint8")
        Image.fromarray(arr).save(os.path.join(out_dir, "%05d.png" % i))


def run(model_dir):
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from safetensors.torch import load_file
    from PIL import Image

    cases = json.load(sys.stdin)
    index = json.load(open(os.path.join(model_dir, "model_index.json")))
    t2v = i2v = None
    seconds = []
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
    for case in cases:
        latents = load_file(case["latents"])["latents"]
        kwargs = dict(
            prompt=case["prompt"],
            negative_prompt=case.get("negative_prompt") or None,
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance_scale"],
            num_frames=case["num_frames"],
            width=case["width"],
            height=case["height"],
            latents=latents,
            output_type="np",
        )
        start = time.time()
        if case.get("image"):
            if i2v is None:
                i2v = WanImageToVideoPipeline.from_pretrained(
                    model_dir, image_encoder=None, image_processor=None,
                    expand_timesteps=index.get("expand_timesteps", False),
                )
            image = Image.open(case["image"]).convert("RGB")
            out = i2v(image=image, **kwargs).frames[0]
        else:
            if t2v is None:
                t2v = WanPipeline.from_pretrained(model_dir)
            out = t2v(**kwargs).frames[0]
        seconds.append(time.time() - start)
        frames_to_png(out, case["frames_dir"])
    print(json.dumps({"seconds": seconds}))


def tokens(model_dir):
    from transformers import T5Tokenizer, T5TokenizerFast

    prompts = json.load(sys.stdin)
    tok_dir = os.path.join(model_dir, "tokenizer")
    slow = T5Tokenizer.from_pretrained(tok_dir, legacy=True)
    fast = T5TokenizerFast.from_pretrained(tok_dir)
    out = []
    for p in prompts["prompts"]:
        n = prompts["max_length"]
        kw = dict(padding="max_length", max_length=n, truncation=True, add_special_tokens=True)
        out.append({"slow": slow(p, **kw).input_ids, "fast": fast(p, **kw).input_ids})
    print(json.dumps(out))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], sys.argv[3])
    elif cmd == "run":
        run(sys.argv[2])
    elif cmd == "tokens":
        tokens(sys.argv[2])
    else:
        sys.exit("usage: wan_ref.py make DIR VARIANT | run DIR | tokens DIR")
