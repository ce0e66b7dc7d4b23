//! CTranslate2 Whisper checkpoints (`model.bin`) converted once to the
//! Hugging Face tensor names candle's Whisper loads (`model.encoder.…`,
//! `model.decoder.…`), saved as safetensors with an HF-style `config.json`.
//!
//! The `model.bin` layout (CTranslate2's `models/model.cc`, format version
//! 6): `u32 version`, `u16`-length-prefixed NUL-terminated spec name, `u32`
//! spec revision, `u32` variable count, then per variable: name, `u8` rank,
//! `u32` dims, `u8` dtype, `u32` byte count, raw little-endian data; then
//! `u32` alias count and (alias, target) name pairs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::ModelError;

fn bad(why: impl std::fmt::Display) -> ModelError {
    ModelError::Format(format!("CTranslate2 model.bin: {why}"))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| bad(format!("truncated at byte {}", self.pos)))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, ModelError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ModelError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String, ModelError> {
        let n = self.u16()? as usize;
        let raw = self.take(n)?;
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        String::from_utf8(raw.to_vec()).map_err(|_| bad("a name is not UTF-8"))
    }
}

/// The variables of a CTranslate2 model, as f32 tensors on the CPU (int8
/// weights dequantized with their `weight_scale`).
pub struct Ct2Model {
    pub spec: String,
    pub vars: HashMap<String, Tensor>,
}

impl Ct2Model {
    pub fn parse(bytes: &[u8]) -> Result<Self, ModelError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let version = r.u32()?;
        if !(5..=6).contains(&version) {
            return Err(bad(format!("format version {version} (5 or 6 expected)")));
        }
        let spec = r.string()?;
        let _revision = r.u32()?;
        let count = r.u32()?;
        let mut vars = HashMap::new();
        let mut raw_int8: HashMap<String, Tensor> = HashMap::new();
        for _ in 0..count {
            let name = r.string()?;
            let rank = r.u8()? as usize;
            let dims = (0..rank)
                .map(|_| r.u32().map(|d| d as usize))
                .collect::<Result<Vec<_>, _>>()?;
            let dtype = r.u8()?;
            let nbytes = r.u32()? as usize;
            let data = r.take(nbytes)?;
            let shape: Vec<usize> = if dims.is_empty() { vec![1] } else { dims };
            let numel: usize = shape.iter().product();
            let (dt, width) = match dtype {
                0 => (DType::F32, 4),
                1 => (DType::U8, 1), // int8, reinterpreted below
                2 => continue,       // int16 scalars (num_heads, …): not needed
                3 => continue,       // int32
                4 => (DType::F16, 2),
                5 => (DType::BF16, 2),
                other => return Err(bad(format!("{name}: unknown dtype {other}"))),
            };
            if numel * width != nbytes {
                return Err(bad(format!("{name}: {nbytes} bytes for shape {shape:?}")));
            }
            if dtype == 1 && (numel == 1 || !name.ends_with("weight")) {
                continue; // int8 flags (pre_norm, activation, …)
            }
            if dtype == 1 {
                // i8 → f32 without an i8 dtype in candle: offset-binary trick.
                let vals: Vec<f32> = data.iter().map(|&b| b as i8 as f32).collect();
                let t = Tensor::from_vec(vals, shape, &Device::Cpu)?;
                raw_int8.insert(name, t);
                continue;
            }
            let t =
                Tensor::from_raw_buffer(data, dt, &shape, &Device::Cpu)?.to_dtype(DType::F32)?;
            vars.insert(name, t);
        }
        for (name, q) in raw_int8 {
            let scale_name = name
                .strip_suffix("weight")
                .map(|p| format!("{p}weight_scale"))
                .ok_or_else(|| bad(format!("{name}: int8 tensor that is not a weight")))?;
            let scale = vars
                .get(&scale_name)
                .ok_or_else(|| bad(format!("{name}: int8 weight without {scale_name}")))?;
            let rows = q.dim(0)?;
            let w = q.broadcast_div(&scale.reshape((rows, 1))?)?;
            vars.insert(name, w);
        }
        Ok(Self { spec, vars })
    }

    fn get(&self, name: &str) -> Result<&Tensor, ModelError> {
        self.vars
            .get(name)
            .ok_or_else(|| bad(format!("no variable {name}")))
    }

    fn count_layers(&self, prefix: &str) -> usize {
        (0..)
            .take_while(|i| {
                self.vars
                    .contains_key(&format!("{prefix}/layer_{i}/ffn/linear_0/weight"))
            })
            .count()
    }
}

/// Converts the CTranslate2 Whisper model in `ct2_dir` (`model.bin`,
/// `config.json`, `tokenizer.json`) into `out_dir` (`model.safetensors`,
/// `config.json`, `tokenizer.json`), atomically.
pub fn convert_whisper(model_bin: &Path, ct2_dir: &Path, out_dir: &Path) -> Result<(), ModelError> {
    let io = |e: std::io::Error| ModelError::Io(e.to_string());
    let mut bytes = Vec::new();
    std::fs::File::open(model_bin)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| ModelError::Io(format!("{}: {e}", model_bin.display())))?;
    let model = Ct2Model::parse(&bytes)?;
    drop(bytes);
    if model.spec != "WhisperSpec" {
        return Err(bad(format!("spec {} is not WhisperSpec", model.spec)));
    }
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, t: Tensor| -> Result<(), ModelError> {
        out.insert(name, t.to_dtype(DType::F16)?.contiguous()?);
        Ok(())
    };
    let d_model = model.get("encoder/conv1/weight")?.dim(0)?;
    let n_mels = model.get("encoder/conv1/weight")?.dim(1)?;
    let enc_layers = model.count_layers("encoder");
    let dec_layers = model.count_layers("decoder");
    let ffn = model.get("encoder/layer_0/ffn/linear_0/weight")?.dim(0)?;
    let (vocab, _) = model.get("decoder/embeddings/weight")?.dims2()?;
    let n_text_ctx = model.get("decoder/position_encodings/encodings")?.dim(0)?;
    let n_audio_ctx = model.get("encoder/position_encodings/encodings")?.dim(0)?;

    let ln = |put: &mut dyn FnMut(String, Tensor) -> Result<(), ModelError>,
              src: &str,
              dst: &str|
     -> Result<(), ModelError> {
        put(
            format!("{dst}.weight"),
            model.get(&format!("{src}/gamma"))?.clone(),
        )?;
        put(
            format!("{dst}.bias"),
            model.get(&format!("{src}/beta"))?.clone(),
        )
    };
    let linear = |put: &mut dyn FnMut(String, Tensor) -> Result<(), ModelError>,
                  src: &str,
                  dst: &str|
     -> Result<(), ModelError> {
        put(
            format!("{dst}.weight"),
            model.get(&format!("{src}/weight"))?.clone(),
        )?;
        put(
            format!("{dst}.bias"),
            model.get(&format!("{src}/bias"))?.clone(),
        )
    };
    // Fused projections are split row-wise; key projections have no bias in
    // Whisper (CTranslate2 stores zeros there).
    let split = |put: &mut dyn FnMut(String, Tensor) -> Result<(), ModelError>,
                 src: &str,
                 dsts: &[&str]|
     -> Result<(), ModelError> {
        let w = model.get(&format!("{src}/weight"))?;
        let b = model.get(&format!("{src}/bias"))?;
        for (i, dst) in dsts.iter().enumerate() {
            put(format!("{dst}.weight"), w.narrow(0, i * d_model, d_model)?)?;
            if !dst.ends_with("k_proj") {
                put(format!("{dst}.bias"), b.narrow(0, i * d_model, d_model)?)?;
            }
        }
        Ok(())
    };

    for (side, layers) in [("encoder", enc_layers), ("decoder", dec_layers)] {
        let hf = format!("model.{side}");
        ln(
            &mut put,
            &format!("{side}/layer_norm"),
            &format!("{hf}.layer_norm"),
        )?;
        put(
            format!("{hf}.embed_positions.weight"),
            model
                .get(&format!("{side}/position_encodings/encodings"))?
                .clone(),
        )?;
        for i in 0..layers {
            let s = format!("{side}/layer_{i}");
            let h = format!("{hf}.layers.{i}");
            ln(
                &mut put,
                &format!("{s}/self_attention/layer_norm"),
                &format!("{h}.self_attn_layer_norm"),
            )?;
            split(
                &mut put,
                &format!("{s}/self_attention/linear_0"),
                &[
                    &format!("{h}.self_attn.q_proj"),
                    &format!("{h}.self_attn.k_proj"),
                    &format!("{h}.self_attn.v_proj"),
                ],
            )?;
            linear(
                &mut put,
                &format!("{s}/self_attention/linear_1"),
                &format!("{h}.self_attn.out_proj"),
            )?;
            if side == "decoder" {
                ln(
                    &mut put,
                    &format!("{s}/attention/layer_norm"),
                    &format!("{h}.encoder_attn_layer_norm"),
                )?;
                linear(
                    &mut put,
                    &format!("{s}/attention/linear_0"),
                    &format!("{h}.encoder_attn.q_proj"),
                )?;
                split(
                    &mut put,
                    &format!("{s}/attention/linear_1"),
                    &[
                        &format!("{h}.encoder_attn.k_proj"),
                        &format!("{h}.encoder_attn.v_proj"),
                    ],
                )?;
                linear(
                    &mut put,
                    &format!("{s}/attention/linear_2"),
                    &format!("{h}.encoder_attn.out_proj"),
                )?;
            }
            ln(
                &mut put,
                &format!("{s}/ffn/layer_norm"),
                &format!("{h}.final_layer_norm"),
            )?;
            linear(&mut put, &format!("{s}/ffn/linear_0"), &format!("{h}.fc1"))?;
            linear(&mut put, &format!("{s}/ffn/linear_1"), &format!("{h}.fc2"))?;
        }
    }
    for conv in ["conv1", "conv2"] {
        linear(
            &mut put,
            &format!("encoder/{conv}"),
            &format!("model.encoder.{conv}"),
        )?;
    }
    put(
        "model.decoder.embed_tokens.weight".into(),
        model.get("decoder/embeddings/weight")?.clone(),
    )?;

    let ct2_config: serde_json::Value = read_json(&ct2_dir.join("config.json"))?;
    let heads = d_model / 64;
    let config = serde_json::json!({
        "model_type": "whisper",
        "converted_from": "ctranslate2",
        "num_mel_bins": n_mels,
        "max_source_positions": n_audio_ctx,
        "max_target_positions": n_text_ctx,
        "d_model": d_model,
        "encoder_attention_heads": heads,
        "decoder_attention_heads": heads,
        "encoder_layers": enc_layers,
        "decoder_layers": dec_layers,
        "encoder_ffn_dim": ffn,
        "decoder_ffn_dim": ffn,
        "vocab_size": vocab,
        "suppress_tokens": ct2_config.get("suppress_ids").cloned().unwrap_or_default(),
        "begin_suppress_tokens": ct2_config.get("suppress_ids_begin").cloned().unwrap_or_default(),
        "lang_ids": ct2_config.get("lang_ids").cloned().unwrap_or_default(),
    });

    let tmp = out_dir.with_extension(format!("part{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;
    candle_core::safetensors::save(&out, tmp.join("model.safetensors"))?;
    std::fs::File::create(tmp.join("config.json"))
        .and_then(|mut f| {
            f.write_all(
                serde_json::to_string_pretty(&config)
                    .expect("json")
                    .as_bytes(),
            )
        })
        .map_err(io)?;
    std::fs::copy(ct2_dir.join("tokenizer.json"), tmp.join("tokenizer.json")).map_err(io)?;
    if let Some(parent) = out_dir.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::rename(&tmp, out_dir).map_err(io)?;
    Ok(())
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))
}
