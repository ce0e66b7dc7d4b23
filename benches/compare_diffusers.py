"""Runs diffusers (tests/image/diffusers_ref.py run) and our worker
(`worker generate-image`) on one checkpoint with the same latents, each in
its own process, and prints a table: wall time per run (model load
excluded for diffusers, included for ours), peak RSS, and the largest
pixel difference. Used by benches/compare_diffusers.sh."""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from PIL import Image

CKPT, WORKER = sys.argv[1], sys.argv[2]
PY = sys.executable
REF = os.path.join(os.path.dirname(__file__), "..", "tests", "image", "diffusers_ref.py")
PROMPT = "portrait of a knight in silver armour, dramatic light"


def peak_rss_mb(cmd, stdin=None, env=None):
    """Runs cmd in a fresh process via a tiny wrapper; returns (stdout, seconds, peak RSS MB)."""
    wrapper = (
        "import resource, subprocess, sys, time;"
        "t = time.perf_counter();"
        "p = subprocess.run(sys.argv[1:], stdin=sys.stdin, capture_output=True, text=True);"
        "dt = time.perf_counter() - t;"
        "sys.stderr.write(p.stderr);"
        "print(p.stdout);"
        "print('WRAP', dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)"
    )
    p = subprocess.run([PY, "-c", wrapper] + cmd, input=stdin, capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    _, dt, rss, rc = lines[-1].split()
    if int(rc) != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"{cmd[0]} failed")
    return "\n".join(lines[:-1]), float(dt), int(rss) / 1024


def main():
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for steps, n in [(1, 1), (4, 1), (1, 4)]:
            ref_png = os.path.join(d, f"ref-{steps}-{n}.png")
            case = [{"prompt": PROMPT, "steps": steps, "guidance_scale": 0.0, "num_images": n, "out": ref_png}]
            out, ref_wall, ref_rss = peak_rss_mb([PY, REF, "run", CKPT], stdin=json.dumps(case))
            ref_secs = json.loads(out.strip().splitlines()[-1])["seconds"][0]
            ours_png = os.path.join(d, f"ours-{steps}-{n}.png")
            t = time.perf_counter()
            out, ours_wall, ours_rss = peak_rss_mb(
                [WORKER, "generate-image", "--model", CKPT, "--prompt", PROMPT, "--steps", str(steps),
                 "--guidance-scale", "0", "--latents", os.path.join(CKPT, "latents.safetensors"),
                 "--num-images", str(n), "--out", ours_png],
                env={**os.environ, "LOG": "warn"},
            )
            # ours: the generation time the CLI reports (load excluded).
            ours_secs = float(out.strip().splitlines()[-1].split()[1])
            a, b = Image.open(ref_png).convert("RGB"), Image.open(ours_png).convert("RGB")
            diff = max(abs(x - y) for pa, pb in zip(a.getdata(), b.getdata()) for x, y in zip(pa, pb))
            rows.append((steps, n, ref_secs, ours_secs, ref_rss, ours_rss, diff, a.size))
    print(f"checkpoint: {CKPT}")
    print("| steps | options | size | diffusers s | ours s | ours / diffusers speed | diffusers peak RSS MB | ours peak RSS MB | max pixel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for steps, n, r, o, rr, orr, diff, size in rows:
        print(f"| {steps} | {n} | {size[0]}x{size[1]} | {r:.2f} | {o:.2f} | {r / o:.2f}x | {rr:.0f} | {orr:.0f} | {diff}/255 |")


if __name__ == "__main__":
    main()
