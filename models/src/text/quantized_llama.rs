//! Quantized llama (GGUF) with the KV cache held outside the weights, so one
//! prompt can be prefilled once and its cache shared by N sampled sequences.
//!
//! Follows candle-transformers' `quantized_llama` (interleaved RoPE for the
//! llama family, whose GGUF q/k weights llama.cpp permutes; NEOX RoPE for the
//! families llama.cpp marks so), but the weights are immutable and every
//! forward pass takes a [`KvCache`] whose batch dimension can grow from 1 to N
//! after the prefill and shrink as sequences finish.

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct Config {
    pub architecture: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_embd: usize,
    pub head_dim: usize,
    pub context_length: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f64,
    pub rope_is_neox: bool,
}

impl Config {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".into());
        let get = |k: &str| -> Result<&gguf_file::Value> {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata lacks {arch}.{k}")))
        };
        if get("expert_count").and_then(|v| v.to_u32()).unwrap_or(0) > 1 {
            candle_core::bail!("mixture-of-experts GGUF models are not supported yet");
        }
        let n_head = get("attention.head_count")?.to_u32()? as usize;
        let n_embd = get("embedding_length")?.to_u32()? as usize;
        let head_dim = get("rope.dimension_count")
            .and_then(|v| v.to_u32())
            .map(|v| v as usize)
            .unwrap_or(n_embd / n_head);
        Ok(Self {
            rope_is_neox: matches!(
                arch.as_str(),
                "qwen2" | "qwen3" | "phi3" | "stablelm" | "olmo2"
            ),
            n_layer: get("block_count")?.to_u32()? as usize,
            n_head,
            n_kv_head: get("attention.head_count_kv")?.to_u32()? as usize,
            n_embd,
            head_dim,
            context_length: get("context_length")
                .and_then(|v| v.to_u32())
                .unwrap_or(4096) as usize,
            rope_freq_base: get("rope.freq_base")
                .and_then(|v| v.to_f32())
                .unwrap_or(10000.),
            rms_norm_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            architecture: arch,
        })
    }
}

struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    w_gate: QMatMul,
    w_down: QMatMul,
    w_up: QMatMul,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

/// Per-layer keys and values, shaped `(batch, n_kv_head, seq, head_dim)`.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        Self {
            layers: vec![None; n_layer],
        }
    }

    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Repeats a batch-1 cache `n` times: the shared prefill becomes the start
    /// of `n` sequences.
    pub fn expand(&self, n: usize) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| Ok((k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?)))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// Keeps only the batch rows in `rows` (sequences still generating).
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        let Some(device) = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.device().clone())
        else {
            return Ok(self.clone());
        };
        let idx = Tensor::new(rows, &device)?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| Ok((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?)))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}

pub struct QuantizedLlama {
    pub config: Config,
    embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl QuantizedLlama {
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        cpu_repack: bool,
    ) -> Result<Self> {
        let config = Config::from_gguf(ct)?;
        let mut tensor = |name: &str| -> Result<QTensor> {
            let t = ct.tensor(reader, name, device)?;
            repack_for_cpu(t, device, cpu_repack)
        };
        let embd_q = tensor("token_embd.weight")?;
        let embeddings = Embedding::new(embd_q.dequantize(device)?, config.n_embd);
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, config.rms_norm_eps)?;
        // Models with tied embeddings (SmolLM2) have no output.weight.
        let output = match tensor("output.weight") {
            Ok(t) => t,
            Err(_) => embd_q,
        };
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut q = |suffix: &str| -> Result<QMatMul> {
                QMatMul::from_qtensor(tensor(&format!("blk.{i}.{suffix}.weight"))?)
            };
            let (wq, wk, wv, wo) = (q("attn_q")?, q("attn_k")?, q("attn_v")?, q("attn_output")?);
            let (w_gate, w_down, w_up) = (q("ffn_gate")?, q("ffn_down")?, q("ffn_up")?);
            let eps = config.rms_norm_eps;
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                w_gate,
                w_down,
                w_up,
                attn_norm: RmsNorm::from_qtensor(
                    tensor(&format!("blk.{i}.attn_norm.weight"))?,
                    eps,
                )?,
                ffn_norm: RmsNorm::from_qtensor(tensor(&format!("blk.{i}.ffn_norm.weight"))?, eps)?,
            });
        }
        let (cos, sin) = rope_tables(&config, device)?;
        Ok(Self {
            output: QMatMul::from_qtensor(output)?,
            config,
            embeddings,
            layers,
            norm,
            cos,
            sin,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layer)
    }

    /// Runs `tokens` (`(batch, seq)`, u32) after what `cache` holds and returns
    /// the logits of the last position of each row, `(batch, vocab)`, in f32.
    pub fn forward(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (batch, seq) = tokens.dims2()?;
        let pos = cache.len();
        if pos + seq > self.config.context_length {
            candle_core::bail!(
                "prompt and reply need {} tokens, the model's context holds {}",
                pos + seq,
                self.config.context_length
            );
        }
        let mask = if seq > 1 {
            Some(causal_mask(seq, pos, &self.device)?)
        } else {
            None
        };
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let mut x = self.embeddings.forward(tokens)?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let h = self.attention(layer, &h, mask.as_ref(), &cos, &sin, slot, batch, seq)?;
            let x1 = (h + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let h = layer.w_down.forward(&(gate * layer.w_up.forward(&h)?)?)?;
            x = (h + x1)?;
        }
        let last = x.narrow(1, seq - 1, 1)?.squeeze(1)?;
        let last = self.norm.forward(&last)?;
        self.output.forward(&last)?.to_dtype(DType::F32)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        mask: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        slot: &mut Option<(Tensor, Tensor)>,
        batch: usize,
        seq: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let q = layer
            .wq
            .forward(x)?
            .reshape((batch, seq, c.n_head, c.head_dim))?
            .transpose(1, 2)?;
        let k = layer
            .wk
            .forward(x)?
            .reshape((batch, seq, c.n_kv_head, c.head_dim))?
            .transpose(1, 2)?;
        let v = layer
            .wv
            .forward(x)?
            .reshape((batch, seq, c.n_kv_head, c.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let rope = if c.rope_is_neox {
            candle_nn::rotary_emb::rope
        } else {
            candle_nn::rotary_emb::rope_i
        };
        let q = rope(&q.contiguous()?, cos, sin)?;
        let k = rope(&k.contiguous()?, cos, sin)?;
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((kc, vc)) => (Tensor::cat(&[&kc, &k], 2)?, Tensor::cat(&[&vc, &v], 2)?),
        };
        *slot = Some((k.clone(), v.clone()));
        let n_rep = c.n_head / c.n_kv_head;
        let k = candle_transformers::utils::repeat_kv(k, n_rep)?;
        let v = candle_transformers::utils::repeat_kv(v, n_rep)?;
        let att = (q.matmul(&k.t()?)? / (c.head_dim as f64).sqrt())?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?;
        let y = y
            .transpose(1, 2)?
            .reshape((batch, seq, c.n_head * c.head_dim))?;
        layer.wo.forward(&y)
    }
}

/// candle's CPU kernels have SIMD (AVX2/NEON) dot products for Q4_0, Q8_0
/// and the K-quants, but run Q4_1, Q5_0 and Q5_1 with scalar code, several
/// times slower. On CPU such tensors are re-quantized to Q8_0 at load: 8 bits
/// hold a 4- or 5-bit block's values almost exactly (the error is a fraction
/// of the original quantization step), for twice the memory of Q4.
fn repack_for_cpu(t: QTensor, device: &Device, allowed: bool) -> Result<QTensor> {
    let slow = matches!(
        t.dtype(),
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    );
    let blocks_fit = t
        .shape()
        .dims()
        .last()
        .is_some_and(|d| d % GgmlDType::Q8_0.block_size() == 0);
    if !device.is_cpu() || !slow || !allowed || !blocks_fit {
        return Ok(t);
    }
    QTensor::quantize(&t.dequantize(device)?, GgmlDType::Q8_0)
}

fn rope_tables(c: &Config, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..c.head_dim)
        .step_by(2)
        .map(|i| 1f32 / c.rope_freq_base.powf(i as f32 / c.head_dim as f32))
        .collect();
    let n = theta.len();
    let theta = Tensor::from_vec(theta, (1, n), device)?;
    let positions = Tensor::arange(0, c.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((c.context_length, 1))?;
    let idx_theta = positions.matmul(&theta)?;
    Ok((idx_theta.cos()?, idx_theta.sin()?))
}

/// Additive mask `(seq, pos + seq)`: 0 where a query may attend, -inf after it.
fn causal_mask(seq: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let total = pos + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0. }))
        .collect();
    Tensor::from_vec(mask, (seq, total), device)
}
