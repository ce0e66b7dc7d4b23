//! The config files of a checkpoint in diffusers' folder layout, read as
//! diffusers and transformers read them: every shape comes from here. A
//! field that would change the computation in a way this port does not
//! implement is refused at load with its file, field and value.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::ModelError;

/// Reads and parses one JSON config file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))
}

/// `model_index.json`: which pipeline, and its parts.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
}

/// An `int` or a per-block list (diffusers expands an int to every block).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<usize>, ModelError> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(ModelError::Format(format!(
                "unet/config.json: {field} has {} entries for {n} blocks",
                v.len()
            ))),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_silu() -> String {
    "silu".into()
}
fn default_default() -> String {
    "default".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_three() -> usize {
    3
}
fn default_one_usize() -> usize {
    1
}

/// `unet/config.json` (diffusers' `UNet2DConditionModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default)]
    pub only_cross_attention: Value,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock,
    #[serde(default = "default_one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "default_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock,
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "default_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub attention_type: Option<String>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Value>,
}

fn refuse(file: &str, field: &str, value: impl std::fmt::Debug) -> ModelError {
    ModelError::Format(format!(
        "{file}: {field} = {value:?} is not supported by this Stable Diffusion port"
    ))
}

impl UNetConfig {
    /// Refuses what the port does not compute.
    pub fn check(&self) -> Result<(), ModelError> {
        let f = "unet/config.json";
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(ModelError::Format(format!(
                "{f}: block_out_channels, down_block_types and up_block_types must have the same non-zero length"
            )));
        }
        for (i, d) in self.down_block_types.iter().enumerate() {
            let up = &self.up_block_types[n - 1 - i];
            let mirrored = matches!(
                (d.as_str(), up.as_str()),
                ("DownBlock2D", "UpBlock2D") | ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
            );
            if !mirrored {
                return Err(refuse(f, "down_block_types/up_block_types", (d, up)));
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return Err(refuse(f, "mid_block_type", m));
            }
        }
        if !(self.only_cross_attention.is_null() || self.only_cross_attention == Value::Bool(false))
        {
            return Err(refuse(
                f,
                "only_cross_attention",
                &self.only_cross_attention,
            ));
        }
        if let PerBlock::Each(v) = &self.layers_per_block {
            if v.iter().any(|x| *x != v[0]) {
                return Err(refuse(f, "layers_per_block", v));
            }
        }
        if let PerBlock::Each(v) = &self.cross_attention_dim {
            if v.iter().any(|x| *x != v[0]) {
                return Err(refuse(f, "cross_attention_dim", v));
            }
        }
        if self.act_fn != "silu" {
            return Err(refuse(f, "act_fn", &self.act_fn));
        }
        // candle-transformers' DownBlock2D and UpBlock2D normalize with 32
        // groups whatever the config says (every published checkpoint uses
        // 32): another count would compute something else.
        if self.norm_num_groups != 32 {
            return Err(refuse(f, "norm_num_groups", self.norm_num_groups));
        }
        if self.encoder_hid_dim.is_some() {
            return Err(refuse(f, "encoder_hid_dim", self.encoder_hid_dim));
        }
        if self.dual_cross_attention {
            return Err(refuse(f, "dual_cross_attention", true));
        }
        if self.class_embed_type.is_some() {
            return Err(refuse(f, "class_embed_type", &self.class_embed_type));
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_none()
                    || self.projection_class_embeddings_input_dim.is_none() =>
            {
                return Err(ModelError::Format(format!(
                    "{f}: addition_embed_type text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim"
                )));
            }
            Some("text_time") => {}
            Some(other) => return Err(refuse(f, "addition_embed_type", other)),
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(refuse(
                f,
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(refuse(f, "time_embedding_type", &self.time_embedding_type));
        }
        if self.time_cond_proj_dim.is_some() {
            return Err(refuse(f, "time_cond_proj_dim", self.time_cond_proj_dim));
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            return Err(refuse(
                f,
                "conv_in_kernel/conv_out_kernel",
                (self.conv_in_kernel, self.conv_out_kernel),
            ));
        }
        if let Some(a) = &self.attention_type {
            if a != "default" {
                return Err(refuse(f, "attention_type", a));
            }
        }
        if self
            .reverse_transformer_layers_per_block
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err(refuse(f, "reverse_transformer_layers_per_block", "set"));
        }
        Ok(())
    }

    /// Heads per block: diffusers reads `attention_head_dim` as the number
    /// of heads when `num_attention_heads` is unset (a naming accident it
    /// keeps for compatibility).
    pub fn heads(&self) -> Result<Vec<usize>, ModelError> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }

    pub fn transformer_layers(&self) -> Result<Vec<usize>, ModelError> {
        let n = self.block_out_channels.len();
        match &self.transformer_layers_per_block {
            Some(t) => t.expand(n, "transformer_layers_per_block"),
            None => Ok(vec![1; n]),
        }
    }

    pub fn cross_attention_dim(&self) -> usize {
        match &self.cross_attention_dim {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[0],
        }
    }

    pub fn layers_per_block(&self) -> usize {
        match &self.layers_per_block {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[0],
        }
    }
}

/// `vae/config.json` (diffusers' `AutoencoderKL`).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: Option<usize>,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Value>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    pub fn check(&self) -> Result<(), ModelError> {
        let f = "vae/config.json";
        if self.in_channels != 3 || self.out_channels != 3 {
            return Err(refuse(
                f,
                "in_channels/out_channels",
                (self.in_channels, self.out_channels),
            ));
        }
        if self
            .down_block_types
            .iter()
            .any(|t| t != "DownEncoderBlock2D")
        {
            return Err(refuse(f, "down_block_types", &self.down_block_types));
        }
        if self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D") {
            return Err(refuse(f, "up_block_types", &self.up_block_types));
        }
        if self.act_fn != "silu" {
            return Err(refuse(f, "act_fn", &self.act_fn));
        }
        if self.latents_mean.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(refuse(f, "latents_mean", "set"));
        }
        if !self.mid_block_add_attention {
            return Err(refuse(f, "mid_block_add_attention", false));
        }
        Ok(())
    }

    /// How much smaller the latents are than the image
    /// (`2 ** (len(block_out_channels) - 1)`, as the pipelines say).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn default_ln_eps() -> f64 {
    1e-5
}
fn default_quick_gelu() -> String {
    "quick_gelu".into()
}

/// `text_encoder*/config.json` (transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

/// `tokenizer*/tokenizer_config.json`: only what the pipelines read.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizerConfig {
    #[serde(default)]
    pub pad_token: Option<Value>,
    #[serde(default)]
    pub model_max_length: Option<f64>,
}

impl TokenizerConfig {
    /// The pad token's text (a plain string or an AddedToken object).
    pub fn pad_token(&self) -> Option<String> {
        match &self.pad_token {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(String::from),
            _ => None,
        }
    }
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_linear() -> String {
    "linear".into()
}
fn default_epsilon() -> String {
    "epsilon".into()
}
fn default_leading() -> String {
    "leading".into()
}
fn default_linspace() -> String {
    "linspace".into()
}
fn default_zero() -> String {
    "zero".into()
}
fn default_discrete() -> String {
    "discrete".into()
}

/// `scheduler/scheduler_config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Value>,
    #[serde(default = "default_epsilon")]
    pub prediction_type: String,
    /// diffusers' default differs per scheduler: `None` here, resolved by
    /// the scheduler.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: usize,
    // Euler
    #[serde(default = "default_linear")]
    pub interpolation_type: String,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    #[serde(default = "default_zero")]
    pub final_sigmas_type: String,
    #[serde(default = "default_discrete")]
    pub timestep_type: String,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    // DDIM
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub thresholding: bool,
}

/// Only for tests and the random checkpoint: the default spacing each
/// scheduler class has in diffusers when its config omits it.
pub(crate) fn default_spacing(class: &str) -> String {
    match class {
        "DDIMScheduler" => default_leading(),
        _ => default_linspace(),
    }
}
