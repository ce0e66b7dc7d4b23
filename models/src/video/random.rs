//! A random-weight Wan 2.2 TI2V-style checkpoint of the real architecture
//! (`WanTransformer3DModel`, the residual 48-channel `AutoencoderKLWan`
//! with 2x2 patching, `UMT5EncoderModel`, UniPC with flow sigmas), small,
//! in diffusers' folder layout, deterministic from a seed. It is what
//! `worker fetch-models` installs as the offline default: its videos are
//! noise, but every code path of a real checkpoint (text-to-video and
//! image-to-video) runs on it. No UMT5 vocabulary can be fetched offline,
//! so its tokenizer is a character-level unigram in T5's layout.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use serde_json::{json, Value};

use super::config::{TransformerConfig, Umt5Config, WanVaeConfig};
use super::transformer::WanTransformer;
use super::umt5::Umt5Encoder;
use super::vae::WanVae;
use crate::image::random::{fill, write};
use crate::ModelError;

/// The default's name under `MODELS_DIR` (changes when its shapes do).
pub const DEFAULT_VIDEO_MODEL_NAME: &str = "wan22-ti2v-random-tiny-v1";

fn transformer_config() -> Value {
    json!({
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": "0.35.2",
        "patch_size": [1, 2, 2],
        "num_attention_heads": 4,
        "attention_head_dim": 16,
        "in_channels": 48,
        "out_channels": 48,
        "text_dim": 64,
        "freq_dim": 256,
        "ffn_dim": 128,
        "num_layers": 2,
        "cross_attn_norm": true,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": null,
        "added_kv_proj_dim": null,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": null
    })
}

fn vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKLWan",
        "_diffusers_version": "0.35.2",
        "base_dim": 8,
        "decoder_base_dim": 8,
        "z_dim": 48,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [false, true, true],
        "dropout": 0.0,
        "is_residual": true,
        "in_channels": 12,
        "out_channels": 12,
        "patch_size": 2,
        "scale_factor_temporal": 4,
        "scale_factor_spatial": 16,
        "latents_mean": vec![0.0; 48],
        "latents_std": vec![1.0; 48]
    })
}

fn text_config() -> Value {
    json!({
        "architectures": ["UMT5EncoderModel"],
        "model_type": "umt5",
        "vocab_size": 192,
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": true,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": false
    })
}

/// T5's layout (<pad> 0, </s> 1, <unk> 2), then every printable ASCII
/// character and the word-start marker, SentencePiece-style.
fn tokenizer() -> Result<tokenizers::Tokenizer, ModelError> {
    use tokenizers::models::unigram::Unigram;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    let mut vocab: Vec<(String, f64)> = ["<pad>", "</s>", "<unk>"]
        .iter()
        .map(|t| (t.to_string(), 0.0))
        .collect();
    vocab.push(("\u{2581}".into(), -2.0));
    for c in (b'!'..=b'~').map(char::from) {
        vocab.push((c.to_string(), -3.0));
        vocab.push((format!("\u{2581}{c}"), -3.5));
    }
    let model =
        Unigram::from(vocab, Some(2), false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Metaspace::new(
        '\u{2581}',
        PrependScheme::Always,
        true,
    )));
    tok.with_decoder(Some(tokenizers::decoders::metaspace::Metaspace::new(
        '\u{2581}',
        PrependScheme::Always,
        true,
    )));
    Ok(tok)
}

/// Writes the random checkpoint into `dir` (created; replaced when
/// present).
pub fn write_random_checkpoint(dir: &Path, seed: u64) -> Result<(), ModelError> {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    write(
        &tmp.join("model_index.json"),
        &json!({
            "_class_name": "WanPipeline",
            "_diffusers_version": "0.35.2",
            "boundary_ratio": null,
            "expand_timesteps": true,
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "transformer_2": [null, null],
            "vae": ["diffusers", "AutoencoderKLWan"]
        }),
    )?;
    write(
        &tmp.join("scheduler/scheduler_config.json"),
        &json!({
            "_class_name": "UniPCMultistepScheduler",
            "_diffusers_version": "0.35.2",
            "num_train_timesteps": 1000,
            "solver_order": 2,
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": true,
            "flow_shift": 5.0,
            "predict_x0": true,
            "solver_type": "bh2",
            "lower_order_final": true,
            "final_sigmas_type": "zero",
            "timestep_spacing": "linspace"
        }),
    )?;
    let tok = tokenizer()?;
    std::fs::create_dir_all(tmp.join("tokenizer")).map_err(|e| ModelError::Io(e.to_string()))?;
    tok.save(tmp.join("tokenizer/tokenizer.json"), true)
        .map_err(|e| ModelError::Io(e.to_string()))?;
    write(
        &tmp.join("tokenizer/tokenizer_config.json"),
        &json!({"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 512}),
    )?;

    let cpu = Device::Cpu;
    let tc = text_config();
    write(&tmp.join("text_encoder/config.json"), &tc)?;
    let parsed: Umt5Config = serde_json::from_value(tc).expect("the text config");
    let map = VarMap::new();
    Umt5Encoder::new(VarBuilder::from_varmap(&map, DType::F32, &cpu), &parsed)?;
    fill(&map, &mut rng)?;
    map.save(tmp.join("text_encoder/model.safetensors"))?;

    let xc = transformer_config();
    write(&tmp.join("transformer/config.json"), &xc)?;
    let parsed: TransformerConfig = serde_json::from_value(xc).expect("the transformer config");
    let map = VarMap::new();
    WanTransformer::new(VarBuilder::from_varmap(&map, DType::F32, &cpu), &parsed)?;
    fill(&map, &mut rng)?;
    map.save(tmp.join("transformer/diffusion_pytorch_model.safetensors"))?;

    let vc = vae_config();
    write(&tmp.join("vae/config.json"), &vc)?;
    let parsed: WanVaeConfig = serde_json::from_value(vc).expect("the vae config");
    let map = VarMap::new();
    WanVae::new(
        VarBuilder::from_varmap(&map, DType::F32, &cpu),
        &parsed,
        true,
    )?;
    fill(&map, &mut rng)?;
    map.save(tmp.join("vae/diffusion_pytorch_model.safetensors"))?;

    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| ModelError::Io(format!("{}: {e}", dir.display())))?;
    Ok(())
}
