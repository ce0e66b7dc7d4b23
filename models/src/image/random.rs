//! A random-weight Stable Diffusion checkpoint of the real architecture
//! (SD 2.x: `UNet2DConditionModel`, `AutoencoderKL`, OpenCLIP-style
//! `CLIPTextModel`, Euler with trailing spacing as SD-Turbo), small, in
//! diffusers' folder layout, deterministic from a seed. It is what
//! `worker fetch-models` installs as the offline default: its pictures are
//! noise, but every code path of a real checkpoint runs on it.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::Distribution;
use serde_json::{json, Value};

use super::clip_text::ClipTextModel;
use super::clip_tokenizer::vocab_from_bpe;
use super::config::{ClipTextConfig, UNetConfig};
use super::unet::UNet;
use crate::ModelError;

/// The default's name under `MODELS_DIR` (changes when its shapes do).
pub const DEFAULT_IMAGE_MODEL_NAME: &str = "sd2-random-tiny-v1";

fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.35.2",
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": false,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "only_cross_attention": false,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 64,
        "transformer_layers_per_block": 1,
        "attention_head_dim": [2, 4, 4],
        "use_linear_projection": true,
        "upcast_attention": true
    })
}

fn vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.35.2",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 0.18215,
        "force_upcast": true
    })
}

fn text_config() -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 256,
        "projection_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "torch_dtype": "float32"
    })
}

/// Fills every variable of `map` from `rng`, in name order: norm weights 1,
/// biases 0, other tensors uniform in ±1/√fan_in (torch's default init).
pub(crate) fn fill(map: &VarMap, rng: &mut rand_chacha::ChaCha20Rng) -> Result<(), ModelError> {
    let data = map.data().lock().expect("the var map lock");
    let sorted: BTreeMap<_, _> = data.iter().collect();
    for (name, var) in sorted {
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let is_norm = name.contains("norm") || name.ends_with("ln.weight");
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if is_norm {
            vec![1.0; n]
        } else if name.contains("embedding") {
            let d = rand_distr::Normal::new(0.0f32, 0.02).expect("a normal");
            (0..n).map(|_| d.sample(rng)).collect()
        } else {
            let fan_in = (n / shape.dims()[0]).max(1) as f32;
            let bound = 1.0 / fan_in.sqrt();
            let d = rand_distr::Uniform::new_inclusive(-bound, bound);
            (0..n).map(|_| d.sample(rng)).collect()
        };
        var.set(&Tensor::from_vec(values, shape, &Device::Cpu)?)?;
    }
    Ok(())
}

pub(crate) fn write(path: &Path, value: &Value) -> Result<(), ModelError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ModelError::Io(format!("{}: {e}", dir.display())))?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(value).expect("JSON"))
        .map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))
}

/// Saves `map` under diffusers' current tensor names (candle creates the
/// VAE's attention under the legacy `query`/`key`/`value`/`proj_attn`,
/// which it also reads).
fn save(map: &VarMap, path: &Path) -> Result<(), ModelError> {
    let data = map.data().lock().expect("the var map lock");
    let renamed: std::collections::HashMap<String, Tensor> = data
        .iter()
        .map(|(name, var)| {
            let name = name
                .replace(".query.", ".to_q.")
                .replace(".key.", ".to_k.")
                .replace(".value.", ".to_v.")
                .replace(".proj_attn.", ".to_out.0.");
            (name, var.as_tensor().clone())
        })
        .collect();
    candle_core::safetensors::save(&renamed, path)
        .map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))
}

/// Writes the random checkpoint into `dir` (created; replaced when
/// present), with CLIP's real vocabulary from `bpe_text` (open_clip's BPE
/// file).
pub fn write_random_checkpoint(dir: &Path, bpe_text: &str, seed: u64) -> Result<(), ModelError> {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);

    write(
        &tmp.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.35.2",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    write(
        &tmp.join("scheduler/scheduler_config.json"),
        &json!({
            "_class_name": "EulerDiscreteScheduler",
            "_diffusers_version": "0.35.2",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "timestep_spacing": "trailing",
            "steps_offset": 1,
            "interpolation_type": "linear",
            "final_sigmas_type": "zero",
            "timestep_type": "discrete"
        }),
    )?;

    // Tokenizer files as transformers saves them.
    let (vocab, merges) = vocab_from_bpe(bpe_text)?;
    let ids: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    write(&tmp.join("tokenizer/vocab.json"), &Value::Object(ids))?;
    let merges_text = format!("#version: 0.2\n{}\n", merges.join("\n"));
    std::fs::write(tmp.join("tokenizer/merges.txt"), merges_text)
        .map_err(|e| ModelError::Io(e.to_string()))?;
    write(
        &tmp.join("tokenizer/tokenizer_config.json"),
        &json!({
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "!",
            "model_max_length": 77,
            "do_lower_case": true
        }),
    )?;
    write(
        &tmp.join("tokenizer/special_tokens_map.json"),
        &json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!", "unk_token": "<|endoftext|>"}),
    )?;

    // Text encoder.
    let tc = text_config();
    write(&tmp.join("text_encoder/config.json"), &tc)?;
    let parsed: ClipTextConfig = serde_json::from_value(tc).expect("the text config");
    let map = VarMap::new();
    ClipTextModel::new(
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        &parsed,
        false,
    )?;
    fill(&map, &mut rng)?;
    save(&map, &tmp.join("text_encoder/model.safetensors"))?;

    // UNet.
    let uc = unet_config();
    write(&tmp.join("unet/config.json"), &uc)?;
    let parsed: UNetConfig = serde_json::from_value(uc).expect("the unet config");
    let map = VarMap::new();
    UNet::new(
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        parsed,
    )?;
    fill(&map, &mut rng)?;
    save(&map, &tmp.join("unet/diffusion_pytorch_model.safetensors"))?;

    // VAE.
    let vc = vae_config();
    write(&tmp.join("vae/config.json"), &vc)?;
    let map = VarMap::new();
    candle_transformers::models::stable_diffusion::vae::AutoEncoderKL::new(
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        3,
        3,
        candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig {
            block_out_channels: vec![32, 32, 64, 64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            use_quant_conv: true,
            use_post_quant_conv: true,
        },
    )?;
    fill(&map, &mut rng)?;
    save(&map, &tmp.join("vae/diffusion_pytorch_model.safetensors"))?;

    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| ModelError::Io(format!("{}: {e}", dir.display())))?;
    Ok(())
}
