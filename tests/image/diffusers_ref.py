"""The reference for the Stable Diffusion port: diffusers itself.

    diffusers_ref.py make DIR FAMILY BPE_GZ
        Builds a tiny random checkpoint of FAMILY (sd2 | sdxl | sd2-mid) with
        diffusers' and transformers' own classes and save_pretrained (real
        tensor names, config files, tokenizer files; CLIP's real vocabulary
        from open_clip's BPE file) into DIR, and DIR/latents.safetensors.

    diffusers_ref.py run DIR < cases.json
        For each case {"prompt", "negative_prompt", "steps", "guidance_scale",
        "scheduler", "out", "latents"?, "width"?, "height"?} runs diffusers'
        pipeline from DIR with the case's initial latents and saves the PNG
        at "out". Prints {"seconds": [...]} (one wall time per case).
"""

import json
import os
import sys
import time

import torch

from clip_tokens import clip_tokenizer


def text_config(hidden, layers, heads, act, projection_dim):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4 - 3,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act=act,
        projection_dim=projection_dim,
    )


def sharpen_cross_attention(unet, scale=8.0):
    # Random cross-attention barely depends on the prompt; scale its keys so
    # a different prompt makes a visibly different image.
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn2.to_k." in name:
                p.mul_(scale)


def make(out_dir, family, bpe_gz):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    sched = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
        prediction_type="epsilon",
    )
    if family in ("sd2", "sd2-mid"):
        from diffusers import StableDiffusionPipeline

        if family == "sd2":
            blocks, heads, cross, hidden, layers = (32, 64), (2, 4), 32, 32, 5
            downs = ("DownBlock2D", "CrossAttnDownBlock2D")
            vae_blocks, sample = [32, 64], 32
        else:
            # SD-Turbo's real UNet and VAE shapes (SD 2.1), a smaller encoder.
            blocks, heads, cross, hidden, layers = (320, 640, 1280, 1280), (5, 10, 20, 20), 1024, 1024, 4
            downs = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
            vae_blocks, sample = [128, 256, 512, 512], 64
        unet = UNet2DConditionModel(
            block_out_channels=blocks,
            layers_per_block=2,
            sample_size=sample,
            in_channels=4,
            out_channels=4,
            down_block_types=downs,
            up_block_types=tuple(
                "CrossAttnUpBlock2D" if d.startswith("CrossAttn") else "UpBlock2D" for d in reversed(downs)
            ),
            cross_attention_dim=cross,
            attention_head_dim=heads,
            use_linear_projection=True,
        )
        sharpen_cross_attention(unet)
        vae = AutoencoderKL(
            block_out_channels=vae_blocks,
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * len(vae_blocks),
            up_block_types=["UpDecoderBlock2D"] * len(vae_blocks),
            latent_channels=4,
            layers_per_block=2 if family == "sd2-mid" else 1,
            sample_size=sample * 2 ** (len(vae_blocks) - 1),
        )
        text_encoder = CLIPTextModel(text_config(hidden, layers, 4 if family == "sd2" else 16, "gelu", 512))
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer(bpe_gz, "!"),
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        f = 2 ** (len(vae_blocks) - 1)
    elif family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        unet = UNet2DConditionModel(
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 24,
            cross_attention_dim=32 + 24,
        )
        sharpen_cross_attention(unet)
        vae = AutoencoderKL(
            block_out_channels=[16, 32, 32],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.13025,
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(text_config(32, 3, 4, "quick_gelu", 32)),
            text_encoder_2=CLIPTextModelWithProjection(text_config(24, 4, 2, "gelu", 24)),
            tokenizer=clip_tokenizer(bpe_gz, "<|endoftext|>"),
            tokenizer_2=clip_tokenizer(bpe_gz, "!"),
            unet=unet,
            scheduler=sched,
            force_zeros_for_empty_prompt=True,
        )
        f = 4
    else:
        raise SystemExit(f"unknown family {family}")
    pipe.save_pretrained(out_dir, safe_serialization=True)
    side = unet.config.sample_size
    g = torch.Generator().manual_seed(1)
    latents = torch.randn((4, 4, side, side), generator=g)
    save_file({"latents": latents}, os.path.join(out_dir, "latents.safetensors"))
    print(json.dumps({"size": side * f}))


def scheduler_for(pipe, name):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    if name in (None, "", "euler"):
        return pipe.scheduler
    cls = {"ddim": DDIMScheduler, "euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler}[name]
    return cls.from_config(pipe.scheduler.config)


def run(ckpt):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
    pipe = DiffusionPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cases = json.load(sys.stdin)
    seconds = []
    for case in cases:
        pipe.scheduler = scheduler_for(pipe, case.get("scheduler"))
        latents_file = case.get("latents") or os.path.join(ckpt, "latents.safetensors")
        latents = load_file(latents_file)["latents"][: case.get("num_images", 1)]
        kwargs = {}
        if case.get("width"):
            kwargs["width"] = case["width"]
            kwargs["height"] = case["height"]
        else:
            f = pipe.vae_scale_factor
            kwargs["height"] = latents.shape[2] * f
            kwargs["width"] = latents.shape[3] * f
        start = time.perf_counter()
        with torch.no_grad():
            images = pipe(
                prompt=case["prompt"],
                negative_prompt=case.get("negative_prompt"),
                num_inference_steps=case["steps"],
                guidance_scale=case["guidance_scale"],
                latents=latents,
                num_images_per_prompt=latents.shape[0],
                output_type="pil",
                **kwargs,
            ).images
        seconds.append(time.perf_counter() - start)
        if case.get("out"):
            images[0].save(case["out"])
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "run":
        run(sys.argv[2])
    else:
        raise SystemExit(__doc__)
