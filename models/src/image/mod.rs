//! Text-to-image: a Stable Diffusion port (SD 1.x/2.x/Turbo and SDXL) that
//! loads checkpoints in diffusers' folder layout, CLIP's real tokenizer,
//! the image encoders, and a random-weight checkpoint of the real
//! architecture for the offline default.

pub mod attention;
pub mod blocks;
pub mod clip_text;
pub mod clip_tokenizer;
pub mod config;
pub mod encode;
pub mod pipeline;
pub mod random;
pub mod scheduler;
pub mod unet;
pub mod vae;

pub use pipeline::{Family, ImageRequest, RgbImage, StableDiffusion};

use std::path::{Path, PathBuf};

use crate::ModelError;

/// The files of a diffusers checkpoint the pipeline reads, per component.
const COMPONENT_FILES: &[(&str, &[&str])] = &[
    ("scheduler", &["scheduler_config.json"]),
    (
        "tokenizer",
        &["vocab.json", "merges.txt", "tokenizer_config.json"],
    ),
    (
        "tokenizer_2",
        &["vocab.json", "merges.txt", "tokenizer_config.json"],
    ),
    ("text_encoder", &["config.json", "model.safetensors"]),
    ("text_encoder_2", &["config.json", "model.safetensors"]),
    (
        "unet",
        &["config.json", "diffusion_pytorch_model.safetensors"],
    ),
    (
        "vae",
        &["config.json", "diffusion_pytorch_model.safetensors"],
    ),
];

/// The checkpoint folder `IMAGE_MODEL` names: empty for the random default
/// that `worker fetch-models` writes into `models_dir`, a local folder, or
/// a hub repo id (`stabilityai/sd-turbo`) whose files are fetched into
/// `models_dir/hf`.
pub async fn resolve_image_model(spec: &str, models_dir: &Path) -> Result<PathBuf, ModelError> {
    let spec = spec.trim();
    if spec.is_empty() {
        let dir = models_dir.join(random::DEFAULT_IMAGE_MODEL_NAME);
        if dir.join("model_index.json").is_file() {
            return Ok(dir);
        }
        return Err(ModelError::Io(format!(
            "the default image model is not in {} yet: run `worker fetch-models`",
            dir.display()
        )));
    }
    let local = PathBuf::from(spec);
    if local.join("model_index.json").is_file() {
        return Ok(local);
    }
    if local.exists() || spec.starts_with('/') || spec.starts_with('.') {
        return Err(ModelError::Io(format!(
            "{spec}: not a diffusers checkpoint folder (no model_index.json)"
        )));
    }
    let api = hf_hub::api::tokio::ApiBuilder::new()
        .with_cache_dir(models_dir.join("hf"))
        .with_progress(true)
        .build()
        .map_err(|e| ModelError::Fetch(e.to_string()))?;
    let repo = api.model(spec.to_string());
    let index = repo
        .get("model_index.json")
        .await
        .map_err(|e| ModelError::Fetch(format!("{spec}:model_index.json from the hub: {e}")))?;
    let listed: serde_json::Value = config::read_json(&index)?;
    for (component, files) in COMPONENT_FILES {
        if listed
            .get(component)
            .is_none_or(|v| v.get(0).is_none_or(|x| x.is_null()))
        {
            continue;
        }
        for file in *files {
            let name = format!("{component}/{file}");
            if let Err(e) = repo.get(&name).await {
                // Some repos ship only the fp16 variant of the weights.
                let variant = name.replace(".safetensors", ".fp16.safetensors");
                if name == variant || repo.get(&variant).await.is_err() {
                    return Err(ModelError::Fetch(format!(
                        "{spec}:{name} from the hub: {e}"
                    )));
                }
            }
        }
    }
    Ok(index
        .parent()
        .expect("a fetched file has a folder")
        .to_path_buf())
}

/// Writes the random default checkpoint into `models_dir` unless it is
/// there; returns its folder.
pub async fn ensure_default_image_model(models_dir: &Path) -> Result<PathBuf, ModelError> {
    let dir = models_dir.join(random::DEFAULT_IMAGE_MODEL_NAME);
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let bpe = crate::registry::resolve_model(clip_tokenizer::DEFAULT_CLIP_BPE, models_dir).await?;
    let text = clip_tokenizer::read_bpe_gz(&bpe)?;
    let target = dir.clone();
    tokio::task::spawn_blocking(move || random::write_random_checkpoint(&target, &text, 0))
        .await
        .map_err(|e| ModelError::Io(e.to_string()))??;
    Ok(dir)
}
