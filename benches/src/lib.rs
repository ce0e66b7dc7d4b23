//! Shared set-up of the benchmarks: the default model and prompts of a given
//! length.

use std::path::PathBuf;

use models::registry::{resolve_model, DEFAULT_TEXT_MODEL};
use models::{GgufChatModel, LoadOptions, TextGeneration};

/// The model named by `TEXT_MODEL` (default: SmolLM2-135M-Instruct Q4_1),
/// fetched into `MODELS_DIR` like the worker does.
pub fn model_path() -> PathBuf {
    let spec = std::env::var("TEXT_MODEL").unwrap_or_else(|_| DEFAULT_TEXT_MODEL.into());
    let dir = std::env::var_os("MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/companion-worker/models")
        });
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(resolve_model(&spec, &dir))
        .expect("model resolves")
}

pub fn load_model() -> GgufChatModel {
    let options = LoadOptions {
        cpu_repack: std::env::var("CPU_REPACK")
            .map(|v| v != "false")
            .unwrap_or(true),
    };
    GgufChatModel::load(&model_path(), &candle_device(), options).expect("model loads")
}

fn candle_device() -> models::device::Device {
    models::device::select_device(&std::env::var("DEVICE").unwrap_or_else(|_| "cpu".into()))
        .expect("device")
}

/// A plain-text prompt of at least `tokens` tokens for `model`.
pub fn prompt_of(model: &dyn TextGeneration, tokens: usize) -> String {
    const SENTENCE: &str =
        "The little cafe on the corner serves coffee, tea and warm bread every morning. ";
    let mut text = String::new();
    while model.count_tokens(&text).expect("tokenizes") < tokens {
        text.push_str(SENTENCE);
    }
    text
}
