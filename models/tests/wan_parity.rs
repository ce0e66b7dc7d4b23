//! The Wan port against diffusers itself: tiny random checkpoints built
//! with diffusers' and transformers' own classes and `save_pretrained` (a
//! Wan 2.1-style text-to-video one and a Wan 2.2 TI2V-style one with the
//! residual, patched VAE), the same initial latents on both sides, 1 and 3
//! steps, with and without guidance, text-to-video and image-to-video:
//! every decoded frame differs by at most 2/255 per channel. The UMT5
//! tokenizer's ids equal transformers' (slow SentencePiece and fast). The
//! reference runs in ~/.cache/companion-worker/diffusers-venv (scripts/setup
//! installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device};
use models::image::encode::{decode, encode, ImageFormat};
use models::image::RgbImage;
use models::video::umt5::WanTokenizer;
use models::video::{VideoRequest, Wan};
use serde_json::{json, Value};

fn python() -> PathBuf {
    std::env::var_os("DIFFUSERS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/companion-worker/diffusers-venv/bin/python")
        })
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/video/wan_ref.py")
}

fn run_ref(args: &[&str], dir: &Path, stdin: Option<&Value>) -> String {
    use std::io::Write;
    let mut child = Command::new(python())
        .arg(script())
        .args(args)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the diffusers venv's python (scripts/setup installs it)");
    let input = stdin.map(|v| v.to_string()).unwrap_or_default();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "wan_ref.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn make(variant: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(python())
        .arg(script())
        .arg("make")
        .arg(dir.path())
        .arg(variant)
        .output()
        .expect("the diffusers venv's python");
    assert!(
        status.status.success(),
        "wan_ref.py make: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    dir
}

fn frames_in(dir: &Path) -> Vec<RgbImage> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| decode(&std::fs::read(p).unwrap()).unwrap())
        .collect()
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

/// A smooth colour picture with some structure, as a first frame.
fn first_frame(w: usize, h: usize) -> RgbImage {
    let mut pixels = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            pixels.push((x * 255 / w) as u8);
            pixels.push((y * 255 / h) as u8);
            pixels.push((((x / 8 + y / 8) % 2) * 200 + 20) as u8);
        }
    }
    RgbImage {
        width: w,
        height: h,
        pixels,
    }
}

fn check(dir: &Path, cases: &[Value]) {
    let wan = Wan::load(dir, &Device::Cpu, DType::F32).unwrap();
    let mut ref_cases = Vec::new();
    let mut ours = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let mut req = VideoRequest {
            prompt: c["prompt"].as_str().unwrap().into(),
            negative_prompt: c["negative_prompt"].as_str().map(String::from),
            width: c["width"].as_u64().unwrap() as usize,
            height: c["height"].as_u64().unwrap() as usize,
            num_frames: c["num_frames"].as_u64().unwrap() as usize,
            steps: c["steps"].as_u64().unwrap() as usize,
            guidance_scale: c["guidance_scale"].as_f64().unwrap(),
            seed: i as u64 + 7,
            latents: None,
            image: None,
        };
        let latents = wan.seeded_latents(&req).unwrap();
        let lpath = dir.join(format!("latents-{i}.safetensors"));
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("latents".to_string(), latents.clone())]),
            &lpath,
        )
        .unwrap();
        req.latents = Some(latents);
        let mut rc = c.clone();
        rc["latents"] = json!(lpath);
        rc["frames_dir"] = json!(dir.join(format!("ref-{i}")));
        if c["image"].as_bool() == Some(true) {
            let img = first_frame(req.width, req.height);
            let p = dir.join(format!("first-{i}.png"));
            std::fs::write(&p, encode(&img, ImageFormat::Png).unwrap()).unwrap();
            rc["image"] = json!(p);
            req.image = Some(img);
        }
        ref_cases.push(rc);
        let mut stages = Vec::new();
        let frames = wan
            .generate(&req, &mut |s| {
                stages.push(s);
                true
            })
            .unwrap();
        assert_eq!(frames.len(), req.num_frames);
        assert_eq!(
            stages.len(),
            req.steps + (req.num_frames - 1) / 4 + 1,
            "{stages:?}"
        );
        ours.push(frames);
    }
    run_ref(&["run"], dir, Some(&json!(ref_cases)));
    for (i, frames) in ours.iter().enumerate() {
        let reference = frames_in(&dir.join(format!("ref-{i}")));
        assert_eq!(reference.len(), frames.len(), "case {i}");
        let worst = frames
            .iter()
            .zip(&reference)
            .map(|(a, b)| max_diff(a, b))
            .max()
            .unwrap();
        eprintln!("case {i}: {} frames, max |diff| {worst}/255", frames.len());
        assert!(
            worst <= 2,
            "case {i} ({}): max |diff| {worst}/255",
            cases[i]
        );
        // The frames are not flat: the comparison means something.
        let f = &frames[frames.len() - 1];
        let (lo, hi) = f
            .pixels
            .iter()
            .fold((255u8, 0u8), |(l, h), p| (l.min(*p), h.max(*p)));
        assert!(hi - lo > 20, "case {i}: a flat frame");
    }
}

#[test]
fn wan21_text_to_video_matches_diffusers() {
    let dir = make("wan21");
    let base = json!({"prompt": "a girl with silver hair walks through a neon city at night",
        "width": 32, "height": 32, "num_frames": 9});
    let mut cases = Vec::new();
    for (steps, guidance, negative) in [
        (1, 1.0, None),
        (3, 1.0, None),
        (3, 5.0, Some("low quality, blurred")),
    ] {
        let mut c = base.clone();
        c["steps"] = json!(steps);
        c["guidance_scale"] = json!(guidance);
        if let Some(n) = negative {
            c["negative_prompt"] = json!(n);
        }
        cases.push(c);
    }
    check(dir.path(), &cases);
}

#[test]
fn wan22_ti2v_image_and_text_to_video_match_diffusers() {
    let dir = make("ti2v");
    let base = json!({"prompt": "she turns her head slowly &amp; smiles",
        "width": 64, "height": 64, "num_frames": 9});
    let mut cases = Vec::new();
    for (steps, guidance, image) in [(1, 1.0, true), (3, 4.0, true), (3, 1.0, false)] {
        let mut c = base.clone();
        c["steps"] = json!(steps);
        c["guidance_scale"] = json!(guidance);
        c["image"] = json!(image);
        cases.push(c);
    }
    check(dir.path(), &cases);
}

#[test]
fn umt5_tokenizer_ids_equal_transformers() {
    let dir = make("wan21");
    let prompts = [
        "a girl with silver hair walks through a neon city at night",
        "  Luna   waves\tat the camera  ",
        "The quick brown fox jumps over the lazy dog. 0123456789!?",
        "unseen wörds: café, naïve, Ωmega",
        "",
        "knight knight knight knight knight knight knight knight knight knight knight knight",
    ];
    let max_length = 16;
    let out = run_ref(
        &["tokens"],
        dir.path(),
        Some(&json!({"prompts": prompts, "max_length": max_length})),
    );
    let reference: Vec<Value> = serde_json::from_str(&out).unwrap();
    let tok = WanTokenizer::from_dir(&dir.path().join("tokenizer")).unwrap();
    for (p, r) in prompts.iter().zip(&reference) {
        let mut ids = tok.encode(p, max_length).unwrap();
        ids.resize(max_length, 0);
        let fast: Vec<u32> = serde_json::from_value(r["fast"].clone()).unwrap();
        let slow: Vec<u32> = serde_json::from_value(r["slow"].clone()).unwrap();
        // transformers tokenizes the cleaned prompt in the pipeline; these
        // prompts are already clean apart from whitespace, which both the
        // SentencePiece normaliser and prompt_clean collapse.
        assert_eq!(ids, fast, "{p:?} (fast)");
        assert_eq!(ids, slow, "{p:?} (slow)");
    }
}
