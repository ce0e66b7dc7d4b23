//! The Stable Diffusion port against diffusers itself: tiny random
//! checkpoints built with diffusers' and transformers' own classes and
//! `save_pretrained` (one SD-2.x-style, one SDXL-style with another block
//! count, widths and two encoders), the same initial latents on both sides,
//! 1 and 4 steps, with and without guidance, Euler and DDIM: the decoded
//! images differ by at most 2/255 per channel. The reference runs in
//! ~/.cache/companion-worker/diffusers-venv (scripts/setup installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device};
use models::image::clip_tokenizer::DEFAULT_CLIP_BPE;
use models::image::config::SchedulerConfig;
use models::image::encode::decode;
use models::image::pipeline::read_latents;
use models::image::{ImageRequest, RgbImage, StableDiffusion};
use serde_json::{json, Value};

fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").expect("HOME"))
}

fn python() -> PathBuf {
    std::env::var_os("DIFFUSERS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/companion-worker/diffusers-venv/bin/python"))
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/image/diffusers_ref.py")
}

async fn bpe() -> PathBuf {
    models::registry::resolve_model(
        DEFAULT_CLIP_BPE,
        &home().join(".cache/companion-worker/models"),
    )
    .await
    .expect("CLIP's BPE file")
}

/// Builds a tiny checkpoint of `family` with diffusers into `dir`.
async fn make(dir: &Path, family: &str) {
    let bpe = bpe().await;
    let out = Command::new(python())
        .arg(script())
        .args(["make"])
        .arg(dir)
        .arg(family)
        .arg(&bpe)
        .output()
        .expect("the diffusers venv's python (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "diffusers_ref.py make: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs diffusers on `cases` (each gets an "out" PNG path), returns the
/// images.
fn reference(dir: &Path, cases: &mut [Value]) -> Vec<RgbImage> {
    use std::io::Write;
    for (i, c) in cases.iter_mut().enumerate() {
        c["out"] = json!(dir.join(format!("ref-{i}.png")));
    }
    let mut child = Command::new(python())
        .arg(script())
        .arg("run")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the diffusers venv's python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(cases).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "diffusers_ref.py run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cases
        .iter()
        .map(|c| decode(&std::fs::read(c["out"].as_str().unwrap()).unwrap()).unwrap())
        .collect()
}

fn ours(sd: &mut StableDiffusion, dir: &Path, case: &Value) -> Vec<RgbImage> {
    let mut sched: Value = serde_json::from_slice(
        &std::fs::read(dir.join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    let class = match case["scheduler"].as_str() {
        Some("ddim") => "DDIMScheduler",
        Some("euler_a") => "EulerAncestralDiscreteScheduler",
        _ => "EulerDiscreteScheduler",
    };
    sched["_class_name"] = json!(class);
    let sched: SchedulerConfig = serde_json::from_value(sched).unwrap();
    sd.set_scheduler(sched).unwrap();
    let n = case["num_images"].as_u64().unwrap_or(1) as usize;
    let latents = read_latents(&dir.join("latents.safetensors"), &Device::Cpu)
        .unwrap()
        .narrow(0, 0, n)
        .unwrap();
    let (_, _, h, w) = latents.dims4().unwrap();
    let f = sd.vae_scale_factor();
    let req = ImageRequest {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case["negative_prompt"].as_str().map(String::from),
        width: w * f,
        height: h * f,
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        seeds: (0..n as u64).collect(),
        latents: Some(latents),
    };
    sd.generate(&req, &mut |_, _| true).unwrap()
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    a.pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

async fn check_family(family: &str, mut cases: Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), family).await;
    let refs = reference(dir.path(), &mut cases);
    let mut sd = StableDiffusion::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let mut worst = 0;
    for (case, want) in cases.iter().zip(&refs) {
        let got = ours(&mut sd, dir.path(), case);
        let d = max_diff(&got[0], want);
        eprintln!("{family} {case}: max |Δ| = {d}/255");
        assert!(
            d <= 2,
            "{family} {case}: max pixel difference {d}/255 > 2/255"
        );
        worst = worst.max(d);
        // Not a flat image: the comparison means something.
        let (lo, hi) = got[0]
            .pixels
            .iter()
            .fold((255u8, 0u8), |(lo, hi), p| (lo.min(*p), hi.max(*p)));
        assert!(
            hi - lo > 32,
            "{family}: the image is nearly flat ({lo}..{hi})"
        );
    }
    eprintln!("{family}: worst {worst}/255 over {} cases", cases.len());
}

#[tokio::test]
async fn sd2_style_matches_diffusers() {
    check_family(
        "sd2",
        vec![
            json!({"prompt": "a red fox in the snow", "steps": 1, "guidance_scale": 1.0}),
            json!({"prompt": "a red fox in the snow", "steps": 4, "guidance_scale": 1.0}),
            json!({"prompt": "a red fox in the snow", "negative_prompt": "blurry", "steps": 1, "guidance_scale": 5.0}),
            json!({"prompt": "portrait of a knight", "negative_prompt": "blurry, low quality", "steps": 4, "guidance_scale": 7.5, "num_images": 2}),
            json!({"prompt": "portrait of a knight", "steps": 4, "guidance_scale": 4.0, "scheduler": "ddim"}),
            json!({"prompt": "a lighthouse", "steps": 1, "guidance_scale": 1.0, "scheduler": "ddim"}),
        ],
    )
    .await;
}

#[tokio::test]
async fn sdxl_style_matches_diffusers() {
    check_family(
        "sdxl",
        vec![
            json!({"prompt": "a red fox in the snow", "steps": 1, "guidance_scale": 1.0}),
            json!({"prompt": "a red fox in the snow", "steps": 4, "guidance_scale": 1.0}),
            json!({"prompt": "portrait of a knight", "steps": 4, "guidance_scale": 5.0}),
            json!({"prompt": "portrait of a knight", "negative_prompt": "blurry", "steps": 1, "guidance_scale": 5.0, "num_images": 2}),
        ],
    )
    .await;
}

/// Same seed → same bytes; another seed or another prompt → another
/// image; option i of a batch equals a single run seeded `seed + i`.
#[tokio::test]
async fn seeds_and_prompts_decide_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let bpe = bpe().await;
    let text = models::image::clip_tokenizer::read_bpe_gz(&bpe).unwrap();
    models::image::random::write_random_checkpoint(dir.path(), &text, 7).unwrap();
    let sd = StableDiffusion::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let side = sd.default_side();
    let req = |prompt: &str, seeds: Vec<u64>| ImageRequest {
        prompt: prompt.into(),
        negative_prompt: None,
        width: side,
        height: side,
        steps: 2,
        guidance_scale: 1.0,
        seeds,
        latents: None,
    };
    let a = sd
        .generate(&req("a cat", vec![5]), &mut |_, _| true)
        .unwrap();
    let b = sd
        .generate(&req("a cat", vec![5]), &mut |_, _| true)
        .unwrap();
    assert_eq!(a, b, "same seed, same bytes");
    let c = sd
        .generate(&req("a cat", vec![6]), &mut |_, _| true)
        .unwrap();
    assert_ne!(a[0].pixels, c[0].pixels, "another seed, another image");
    let batch = sd
        .generate(&req("a cat", vec![5, 6]), &mut |_, _| true)
        .unwrap();
    assert!(max_diff(&batch[0], &a[0]) <= 1);
    assert!(max_diff(&batch[1], &c[0]) <= 1);
    assert_eq!((a[0].width, a[0].height), (side, side));
    // Cancelling stops between steps.
    let mut calls = 0;
    let err = sd
        .generate(&req("a cat", vec![5]), &mut |_, _| {
            calls += 1;
            false
        })
        .unwrap_err();
    assert!(matches!(err, models::ModelError::Cancelled));
    assert_eq!(calls, 1);
    // The checkpoint is deterministic from its seed.
    let again = tempfile::tempdir().unwrap();
    models::image::random::write_random_checkpoint(again.path(), &text, 7).unwrap();
    for f in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        assert_eq!(
            std::fs::read(dir.path().join(f)).unwrap(),
            std::fs::read(again.path().join(f)).unwrap(),
            "{f}"
        );
    }
}

/// diffusers loads the random default checkpoint (it is a real diffusers
/// checkpoint) and makes the same image from the same latents.
#[tokio::test]
async fn diffusers_loads_the_random_default() {
    let dir = tempfile::tempdir().unwrap();
    let text = models::image::clip_tokenizer::read_bpe_gz(&bpe().await).unwrap();
    models::image::random::write_random_checkpoint(dir.path(), &text, 7).unwrap();
    let sd = StableDiffusion::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let side = sd.default_side();
    let latents = sd.seeded_latents(3, side, side).unwrap();
    latents
        .save_safetensors("latents", dir.path().join("latents.safetensors"))
        .unwrap();
    let mut cases = vec![json!({"prompt": "a castle", "steps": 2, "guidance_scale": 1.0})];
    let want = reference(dir.path(), &mut cases);
    let mut sd = sd;
    let got = ours(&mut sd, dir.path(), &cases[0]);
    let d = max_diff(&got[0], &want[0]);
    assert!(d <= 2, "max pixel difference {d}/255");
}
