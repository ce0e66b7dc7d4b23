//! The config files of a Wan checkpoint in diffusers' folder layout, read
//! as diffusers and transformers read them: every shape comes from here. A
//! field that would change the computation in a way this port does not
//! implement is refused at load with its file, field and value.

use serde::Deserialize;
use serde_json::Value;

use crate::ModelError;

fn refuse(file: &str, field: &str, value: impl std::fmt::Debug, why: &str) -> ModelError {
    ModelError::Format(format!(
        "{file}: {field} = {value:?} is not supported ({why})"
    ))
}

/// `model_index.json` of a Wan pipeline.
#[derive(Debug, Clone, Deserialize)]
pub struct WanIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// Wan 2.2 TI2V: per-token timesteps, the first frame's latents given.
    #[serde(default)]
    pub expand_timesteps: bool,
    #[serde(default)]
    pub boundary_ratio: Option<f64>,
    #[serde(default)]
    pub transformer_2: Option<Value>,
    #[serde(default)]
    pub image_encoder: Option<Value>,
}

fn is_component(v: &Option<Value>) -> bool {
    v.as_ref()
        .and_then(|v| v.get(0))
        .is_some_and(|x| !x.is_null())
}

impl WanIndex {
    pub fn check(&self) -> Result<(), ModelError> {
        const F: &str = "model_index.json";
        if !matches!(
            self.class_name.as_str(),
            "WanPipeline" | "WanImageToVideoPipeline"
        ) {
            return Err(refuse(
                F,
                "_class_name",
                &self.class_name,
                "WanPipeline or WanImageToVideoPipeline",
            ));
        }
        if self.boundary_ratio.is_some() || is_component(&self.transformer_2) {
            return Err(refuse(
                F,
                "boundary_ratio / transformer_2",
                self.boundary_ratio,
                "two-expert Wan 2.2 A14B checkpoints are not ported; use Wan 2.2 TI2V 5B or Wan 2.1",
            ));
        }
        if is_component(&self.image_encoder) {
            return Err(refuse(
                F,
                "image_encoder",
                "CLIPVisionModel",
                "Wan 2.1 I2V's CLIP image conditioning is not ported; image-to-video uses a TI2V checkpoint",
            ));
        }
        Ok(())
    }
}

fn default_patch() -> [usize; 3] {
    [1, 2, 2]
}
fn default_eps6() -> f64 {
    1e-6
}
fn default_freq() -> usize {
    256
}
fn default_rope_len() -> usize {
    1024
}
fn default_true() -> bool {
    true
}

/// `transformer/config.json` (`WanTransformer3DModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct TransformerConfig {
    #[serde(default = "default_patch")]
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub text_dim: usize,
    #[serde(default = "default_freq")]
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    #[serde(default = "default_true")]
    pub cross_attn_norm: bool,
    #[serde(default = "default_eps6")]
    pub eps: f64,
    #[serde(default)]
    pub image_dim: Option<usize>,
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    #[serde(default = "default_rope_len")]
    pub rope_max_seq_len: usize,
    #[serde(default)]
    pub pos_embed_seq_len: Option<usize>,
}

impl TransformerConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
    pub fn check(&self) -> Result<(), ModelError> {
        const F: &str = "transformer/config.json";
        if self.image_dim.is_some() || self.added_kv_proj_dim.is_some() {
            return Err(refuse(
                F,
                "image_dim / added_kv_proj_dim",
                self.image_dim.or(self.added_kv_proj_dim),
                "Wan 2.1 I2V's image cross-attention is not ported",
            ));
        }
        if !self.attention_head_dim.is_multiple_of(2) || self.attention_head_dim < 6 {
            return Err(refuse(
                F,
                "attention_head_dim",
                self.attention_head_dim,
                "rotary embeddings need an even size of at least 6",
            ));
        }
        if self.patch_size.contains(&0) || self.num_layers == 0 || self.num_attention_heads == 0 {
            return Err(refuse(
                F,
                "patch_size",
                self.patch_size,
                "sizes must be > 0",
            ));
        }
        Ok(())
    }
}

fn default_base_dim() -> usize {
    96
}
fn default_z_dim() -> usize {
    16
}
fn default_dim_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn default_two() -> usize {
    2
}
fn default_temporal() -> Vec<bool> {
    vec![false, true, true]
}
fn default_three() -> usize {
    3
}
fn default_four() -> usize {
    4
}
fn default_eight() -> usize {
    8
}
fn default_mean() -> Vec<f64> {
    vec![
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
        0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ]
}
fn default_std() -> Vec<f64> {
    vec![
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
        1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ]
}

/// `vae/config.json` (`AutoencoderKLWan`, the Wan 2.1 and 2.2 variants).
#[derive(Debug, Clone, Deserialize)]
pub struct WanVaeConfig {
    #[serde(default = "default_base_dim")]
    pub base_dim: usize,
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "default_z_dim")]
    pub z_dim: usize,
    #[serde(default = "default_dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "default_two")]
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    #[serde(default = "default_temporal")]
    pub temperal_downsample: Vec<bool>,
    #[serde(default = "default_mean")]
    pub latents_mean: Vec<f64>,
    #[serde(default = "default_std")]
    pub latents_std: Vec<f64>,
    #[serde(default)]
    pub is_residual: bool,
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
    #[serde(default = "default_four")]
    pub scale_factor_temporal: usize,
    #[serde(default = "default_eight")]
    pub scale_factor_spatial: usize,
}

impl WanVaeConfig {
    pub fn check(&self) -> Result<(), ModelError> {
        const F: &str = "vae/config.json";
        if self.dim_mult.is_empty() || self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            return Err(refuse(
                F,
                "temperal_downsample",
                &self.temperal_downsample,
                "needs one entry fewer than dim_mult",
            ));
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            return Err(refuse(
                F,
                "latents_mean / latents_std",
                (self.latents_mean.len(), self.latents_std.len()),
                "need z_dim entries each",
            ));
        }
        let p = self.patch_size.unwrap_or(1);
        if self.in_channels != 3 * p * p || self.out_channels != 3 * p * p {
            return Err(refuse(
                F,
                "in_channels / out_channels",
                (self.in_channels, self.out_channels),
                "RGB video, 3 x patch_size^2 channels",
            ));
        }
        let downs = self.temperal_downsample.iter().filter(|t| **t).count();
        if 1 << downs != self.scale_factor_temporal
            || (1 << self.temperal_downsample.len()) * p != self.scale_factor_spatial
        {
            return Err(refuse(
                F,
                "scale_factor_temporal / scale_factor_spatial",
                (self.scale_factor_temporal, self.scale_factor_spatial),
                "must follow temperal_downsample and patch_size",
            ));
        }
        Ok(())
    }
}

fn default_buckets() -> usize {
    32
}
fn default_distance() -> usize {
    128
}
fn default_gated_gelu() -> String {
    "gated-gelu".into()
}

/// `text_encoder/config.json` (transformers' `UMT5EncoderModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct Umt5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps6")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_gated_gelu")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub model_type: Option<String>,
}

impl Umt5Config {
    /// Whether the feed-forward is gated, and its activation.
    pub fn feed_forward(&self) -> Result<(bool, candle_nn::Activation), ModelError> {
        use candle_nn::Activation;
        let (gated, act) = match self.feed_forward_proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            _ => (false, self.feed_forward_proj.as_str()),
        };
        // transformers maps T5's "gated-gelu" to gelu_new (tanh).
        let act = match act {
            "gelu" | "gelu_new" => Activation::NewGelu,
            "relu" => Activation::Relu,
            "silu" => Activation::Silu,
            other => {
                return Err(refuse(
                    "text_encoder/config.json",
                    "feed_forward_proj",
                    other,
                    "gated-gelu, gelu, relu or silu",
                ))
            }
        };
        Ok((gated, act))
    }

    pub fn check(&self) -> Result<(), ModelError> {
        if self.model_type.as_deref().is_some_and(|m| m != "umt5") {
            return Err(refuse(
                "text_encoder/config.json",
                "model_type",
                &self.model_type,
                "Wan's text encoder is UMT5 (a relative attention bias per layer)",
            ));
        }
        self.feed_forward().map(|_| ())
    }
}

fn default_train_steps() -> usize {
    1000
}
fn default_one() -> f64 {
    1.0
}
fn default_bh2() -> String {
    "bh2".into()
}
fn default_flow() -> String {
    "flow_prediction".into()
}
fn default_zero() -> String {
    "zero".into()
}

/// `scheduler/scheduler_config.json` of a Wan checkpoint: UniPC with flow
/// sigmas (what Wan 2.1 and 2.2 ship) or flow-matching Euler.
#[derive(Debug, Clone, Deserialize)]
pub struct FlowSchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_two")]
    pub solver_order: usize,
    #[serde(default = "default_flow")]
    pub prediction_type: String,
    #[serde(default = "default_true")]
    pub predict_x0: bool,
    #[serde(default = "default_bh2")]
    pub solver_type: String,
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
    #[serde(default)]
    pub use_flow_sigmas: Option<bool>,
    #[serde(default = "default_one")]
    pub flow_shift: f64,
    /// FlowMatchEulerDiscreteScheduler's name for the shift.
    #[serde(default)]
    pub shift: Option<f64>,
    #[serde(default = "default_zero")]
    pub final_sigmas_type: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    #[serde(default)]
    pub solver_p: Option<Value>,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub stochastic_sampling: bool,
}
