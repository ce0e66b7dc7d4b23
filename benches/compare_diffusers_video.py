"""Runs diffusers' WanPipeline (tests/video/wan_ref.py run) and our worker
(`worker generate-video`) on one Wan checkpoint with the same initial
latents, each in its own process, and prints a table: generation time (model
load excluded on both sides), peak RSS of the whole process, and the
largest pixel difference over every frame. A second table shows how our
peak RSS grows with the clip length: the VAE decodes one latent frame at a
time (a causal feature cache carries the last frames), so the decode's
memory is bounded by a chunk, not the clip. Used by
benches/compare_diffusers.sh video."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

CKPT, WORKER = sys.argv[1], sys.argv[2]
PY = sys.executable
REF = os.path.join(os.path.dirname(__file__), "..", "tests", "video", "wan_ref.py")
PROMPT = "a girl with silver hair walks through a neon city at night"
SIDE, STEPS, GUIDANCE = 256, 2, 5.0


def run(cmd, stdin=None, env=None):
    """Runs cmd in a fresh process via a tiny wrapper; returns (stdout, peak RSS MB)."""
    wrapper = (
        "import resource, subprocess, sys;"
        "p = subprocess.run(sys.argv[1:], stdin=sys.stdin, capture_output=True, text=True);"
        "sys.stderr.write(p.stderr);"
        "print(p.stdout);"
        "print('WRAP', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)"
    )
    p = subprocess.run([PY, "-c", wrapper] + cmd, input=stdin, capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    _, rss, rc = lines[-1].split()
    if int(rc) != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"{cmd[0]} failed")
    return "\n".join(lines[:-1]), int(rss) / 1024


def frames(d):
    return [np.asarray(Image.open(os.path.join(d, f)).convert("RGB"), dtype=np.int16)
            for f in sorted(os.listdir(d))]


def ours(d, n, latents, tag):
    out_dir = os.path.join(d, f"ours-{tag}")
    out, rss = run(
        [WORKER, "generate-video", "--model", CKPT, "--prompt", PROMPT, "--negative-prompt", "",
         "--steps", str(STEPS), "--guidance-scale", str(GUIDANCE), "--latents", latents,
         "--frames-dir", out_dir, "--out", os.path.join(d, f"ours-{tag}.mp4")],
        env={**os.environ, "LOG": "warn"},
    )
    secs = float(out.strip().splitlines()[-1].split()[1])
    return out_dir, secs, rss


def latents_for(d, n, channels=16, spatial=8):
    torch.manual_seed(n)
    lat = torch.randn(1, channels, (n - 1) // 4 + 1, SIDE // spatial, SIDE // spatial)
    path = os.path.join(d, f"latents-{n}.safetensors")
    save_file({"latents": lat.contiguous()}, path)
    return path


def main():
    vae = json.load(open(os.path.join(CKPT, "vae", "config.json")))
    ch, sp = vae["z_dim"], vae.get("scale_factor_spatial", 8)
    with tempfile.TemporaryDirectory() as d:
        n = 33
        latents = latents_for(d, n, ch, sp)
        case = [{"prompt": PROMPT, "negative_prompt": "", "steps": STEPS, "guidance_scale": GUIDANCE,
                 "num_frames": n, "width": SIDE, "height": SIDE, "latents": latents,
                 "frames_dir": os.path.join(d, "ref")}]
        out, ref_rss = run([PY, REF, "run", CKPT], stdin=json.dumps(case))
        ref_secs = json.loads(out.strip().splitlines()[-1])["seconds"][0]
        ours_dir, ours_secs, ours_rss = ours(d, n, latents, "33")
        diff = max(int(np.abs(a - b).max()) for a, b in zip(frames(os.path.join(d, "ref")), frames(ours_dir)))
        print(f"checkpoint: {CKPT}")
        print("| frames | size | steps | guidance | diffusers s | ours s | ours / diffusers speed | diffusers peak RSS MB | ours peak RSS MB | max pixel diff |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {n} | {SIDE}x{SIDE} | {STEPS} | {GUIDANCE} | {ref_secs:.2f} | {ours_secs:.2f} | {ref_secs / ours_secs:.2f}x | {ref_rss:.0f} | {ours_rss:.0f} | {diff}/255 |")
        print()
        print("Our peak RSS by clip length (the VAE decodes one latent frame at a time):")
        print("| frames | latent frames | ours s | ours peak RSS MB |")
        print("|---|---|---|---|")
        for m in (9, 33, 65):
            lat = latents if m == n else latents_for(d, m, ch, sp)
            _, s, rss = ours(d, m, lat, str(m))
            print(f"| {m} | {(m - 1) // 4 + 1} | {s:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
