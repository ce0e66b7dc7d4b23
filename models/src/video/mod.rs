//! Text-to-video and image-to-video: a Wan 2.x port (the
//! `WanTransformer3DModel` DiT, the causal 3-D `AutoencoderKLWan` of Wan
//! 2.1 and 2.2, the UMT5 text encoder and tokenizer, UniPC with flow
//! sigmas) that loads checkpoints in diffusers' folder layout, the H.264 /
//! MP4 encoder, and a random-weight checkpoint for the offline default.

pub mod config;
pub mod mp4;
pub mod pipeline;
pub mod random;
pub mod scheduler;
pub mod transformer;
pub mod umt5;
pub mod vae;

pub use pipeline::{Stage, VideoRequest, Wan};

use std::path::{Path, PathBuf};

use crate::image::config::read_json;
use crate::ModelError;

/// The components a Wan checkpoint has, each with its config and weights.
const COMPONENTS: &[(&str, &str, &str)] = &[
    ("text_encoder", "config.json", "model"),
    ("transformer", "config.json", "diffusion_pytorch_model"),
    ("vae", "config.json", "diffusion_pytorch_model"),
];

/// The checkpoint folder `VIDEO_MODEL` names: empty for the random default
/// that `worker fetch-models` writes into `models_dir`, a local folder, or
/// a hub repo id (`Wan-AI/Wan2.2-TI2V-5B-Diffusers`) whose files (sharded
/// weights included) are fetched into `models_dir/hf`.
pub async fn resolve_video_model(spec: &str, models_dir: &Path) -> Result<PathBuf, ModelError> {
    let spec = spec.trim();
    if spec.is_empty() {
        let dir = models_dir.join(random::DEFAULT_VIDEO_MODEL_NAME);
        if dir.join("model_index.json").is_file() {
            return Ok(dir);
        }
        return Err(ModelError::Io(format!(
            "the default video model is not in {} yet: run `worker fetch-models`",
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
    let index = fetch(&repo, spec, "model_index.json").await?;
    fetch(&repo, spec, "scheduler/scheduler_config.json").await?;
    fetch(&repo, spec, "tokenizer/tokenizer.json").await?;
    for (component, config, stem) in COMPONENTS {
        fetch(&repo, spec, &format!("{component}/{config}")).await?;
        let single = format!("{component}/{stem}.safetensors");
        if repo.get(&single).await.is_ok() {
            continue;
        }
        // Sharded: the index names every shard.
        let listing = fetch(
            &repo,
            spec,
            &format!("{component}/{stem}.safetensors.index.json"),
        )
        .await?;
        let listed: serde_json::Value = read_json(&listing)?;
        let mut shards: Vec<String> = listed["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for shard in shards {
            fetch(&repo, spec, &format!("{component}/{shard}")).await?;
        }
    }
    Ok(index
        .parent()
        .expect("a fetched file has a folder")
        .to_path_buf())
}

async fn fetch(
    repo: &hf_hub::api::tokio::ApiRepo,
    spec: &str,
    name: &str,
) -> Result<PathBuf, ModelError> {
    repo.get(name)
        .await
        .map_err(|e| ModelError::Fetch(format!("{spec}:{name} from the hub: {e}")))
}

/// Writes the random default checkpoint into `models_dir` unless it is
/// there; returns its folder.
pub async fn ensure_default_video_model(models_dir: &Path) -> Result<PathBuf, ModelError> {
    let dir = models_dir.join(random::DEFAULT_VIDEO_MODEL_NAME);
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let target = dir.clone();
    tokio::task::spawn_blocking(move || random::write_random_checkpoint(&target, 0))
        .await
        .map_err(|e| ModelError::Io(e.to_string()))??;
    Ok(dir)
}
