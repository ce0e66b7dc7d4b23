//! CLIP's tokenizer, built from open-clip-torch's BPE file (fetched from its
//! PyPI wheel with `pip download`), gives the same ids as transformers'
//! `CLIPTokenizer` on the same file, prompt for prompt (the reference runs
//! in ~/.cache/companion-worker/venv, installed by scripts/setup).

use models::image::clip_tokenizer::{ClipTokenizer, CONTEXT_LENGTH, DEFAULT_CLIP_BPE};

fn models_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var_os("HOME").unwrap())
        .join(".cache/companion-worker/models")
}

#[tokio::test]
async fn ids_equal_transformers_clip_tokenizer() {
    let bpe = models::registry::resolve_model(DEFAULT_CLIP_BPE, &models_dir())
        .await
        .unwrap();
    let ours = ClipTokenizer::from_bpe_gz(&bpe).unwrap();
    assert_eq!(ours.vocab_size(), 49_408);
    let long = "masterpiece, best quality, ".repeat(20);
    let prompts = vec![
        "a photo of a cat",
        "Hello, World!  It's 3 AM",
        "portrait of a young woman with long red hair, freckles, soft light, 85mm, f/1.8",
        "A cyberpunk city at night -- neon signs; rain (wet streets) [highly detailed]",
        "CAFÉ au lait, naïve façade, über-cool",
        "she'll say they've won't we'd I'm you're",
        "1girl, solo, smile, looking_at_viewer, 4k, 8k uhd",
        "  leading and trailing   spaces\tand\ttabs\n",
        "emoji 🙂 and symbols © ® ™ ± ½",
        "日本の桜 and 中文",
        long.as_str(),
    ];
    let reference = reference_ids(&bpe, &prompts);
    for (prompt, want) in prompts.iter().zip(&reference) {
        let got = ours.encode(prompt).unwrap();
        assert_eq!(&got, want, "{prompt:?}");
        assert!(got.len() <= CONTEXT_LENGTH);
    }
    // The long prompt is cut to the context, its end token kept.
    let cut = ours.encode(&long).unwrap();
    assert_eq!(cut.len(), CONTEXT_LENGTH);
    assert_eq!(*cut.last().unwrap(), ours.end_token());
    let padded = ours.encode_padded("a cat", 0).unwrap();
    assert_eq!(padded.len(), CONTEXT_LENGTH);
    assert_eq!(&padded[..4], &[49406, 320, 2368, 49407]);
}

fn reference_ids(bpe: &std::path::Path, prompts: &[&str]) -> Vec<Vec<u32>> {
    use std::io::Write;
    let python = std::path::PathBuf::from(std::env::var_os("HOME").unwrap())
        .join(".cache/companion-worker/venv/bin/python");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/image/clip_tokens.py");
    let mut child = std::process::Command::new(&python)
        .arg(&script)
        .arg(bpe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/setup installs it)", python.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(prompts).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
