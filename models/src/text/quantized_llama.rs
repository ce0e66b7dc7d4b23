//! Quantized llama (GGUF) with the KV cache held outside the weights: one
//! cache per sequence, so a prompt is prefilled once and copied to N sampled
//! sequences, and sequences of different jobs decode together in one batch.
//!
//! Follows candle-transformers' `quantized_llama` (interleaved RoPE for the
//! llama family, whose GGUF q/k weights llama.cpp permutes; NEOX RoPE for the
//! families llama.cpp marks so), but the weights are immutable and every
//! forward pass takes the [`SeqCache`] of each row it runs.

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

/// A weight matrix: candle's quantized matmul, or on CPUs with AVX-512 VNNI
/// our few-rows Q8_0 kernel where candle has only its one-row-at-a-time
/// path (same numbers, see [`super::q8`]).
enum Linear {
    Candle(QMatMul),
    Q8(super::q8::Q8Matrix),
}

impl Linear {
    fn new(t: QTensor, device: &Device) -> Result<Self> {
        let candle_has_a_fast_path = t.shape().dims().last().is_some_and(|k| k % 256 == 0);
        if device.is_cpu()
            && t.dtype() == GgmlDType::Q8_0
            && !candle_has_a_fast_path
            && std::env::var("Q8_KERNEL")
                .map(|v| v != "candle")
                .unwrap_or(true)
            && super::q8::available()
        {
            if let Some(m) = super::q8::Q8Matrix::from_qtensor(&t)? {
                return Ok(Self::Q8(m));
            }
        }
        Ok(Self::Candle(QMatMul::from_qtensor(t)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => m.forward(x),
            Self::Q8(m) => m.forward(x),
        }
    }
}

struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    w_gate: Linear,
    w_down: Linear,
    w_up: Linear,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

/// One sequence's keys and values: per layer, `(1, n_kv_head, capacity,
/// head_dim)` buffers written in place as tokens arrive (no copy of the
/// history per token); the first `len` positions are filled. The capacity is
/// what the sequence reserved (prompt plus reply); a sequence that outgrows
/// it gets a larger buffer.
pub struct SeqCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl SeqCache {
    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A new cache of `capacity` tokens holding this one's first `len`
    /// tokens (a shared prefill handed to an option, or a cached prefix).
    pub fn copy_prefix(&self, len: usize, capacity: usize) -> Result<Self> {
        if len > self.len || len > capacity {
            candle_core::bail!("copying {len} tokens of a {}-token cache", self.len);
        }
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                let (_, h, _, d) = k.dims4()?;
                let nk = Tensor::zeros((1, h, capacity, d), k.dtype(), k.device())?;
                let nv = Tensor::zeros((1, h, capacity, d), v.dtype(), v.device())?;
                if len > 0 {
                    nk.slice_set(&k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok((nk, nv))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len,
            capacity,
        })
    }

    /// Bytes the buffers hold.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

pub struct QuantizedLlama {
    pub config: Config,
    embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
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
            let mut q = |suffix: &str| -> Result<Linear> {
                Linear::new(tensor(&format!("blk.{i}.{suffix}.weight"))?, device)
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
            output: Linear::new(output, device)?,
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

    /// An empty cache with room for `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> Result<SeqCache> {
        let c = &self.config;
        let capacity = capacity.max(1);
        let layers = (0..c.n_layer)
            .map(|_| {
                let shape = (1, c.n_kv_head, capacity, c.head_dim);
                Ok((
                    Tensor::zeros(shape, DType::F32, &self.device)?,
                    Tensor::zeros(shape, DType::F32, &self.device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(SeqCache {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Runs `tokens` after what `cache` holds and returns the logits of
    /// the last position, `(1, vocab)`, in f32.
    pub fn forward(&self, tokens: &[u32], cache: &mut SeqCache) -> Result<Tensor> {
        self.forward_rows(tokens, tokens.len(), &mut [cache])
    }

    /// One forward pass over several sequences at once: row `r` runs
    /// `tokens[r * seq..(r + 1) * seq]` after what `caches[r]` holds (each
    /// at its own position). The projections and the MLP run as one
    /// batched matmul over every row; attention runs per row against that
    /// row's cache. Every row's numbers are the same whatever the other
    /// rows are (the quantized matmul computes each output row on its own),
    /// so a sequence samples the same tokens alone or in a batch. Several
    /// rows take one token each (`seq == 1`). Returns `(rows, vocab)`, the
    /// logits of each row's last position, in f32.
    pub fn forward_rows(
        &self,
        tokens: &[u32],
        seq: usize,
        caches: &mut [&mut SeqCache],
    ) -> Result<Tensor> {
        let rows = caches.len();
        if rows == 0 || seq == 0 || tokens.len() != rows * seq {
            candle_core::bail!("{} tokens for {rows} rows of {seq}", tokens.len());
        }
        if rows > 1 && seq > 1 {
            candle_core::bail!("batched rows take one token each");
        }
        let c = &self.config;
        for cache in caches.iter_mut() {
            let need = cache.len + seq;
            if need > c.context_length {
                candle_core::bail!(
                    "prompt and reply need {need} tokens, the model's context holds {}",
                    c.context_length
                );
            }
            if need > cache.capacity {
                **cache = cache.copy_prefix(cache.len, need.max(cache.capacity * 2))?;
            }
        }
        let (cos, sin) = if rows == 1 {
            let pos = caches[0].len;
            (self.cos.narrow(0, pos, seq)?, self.sin.narrow(0, pos, seq)?)
        } else {
            let pos: Vec<u32> = caches.iter().map(|c| c.len as u32).collect();
            let pos = Tensor::new(pos.as_slice(), &self.device)?;
            let half = self.cos.dim(1)?;
            (
                self.cos.index_select(&pos, 0)?.reshape((rows, 1, half))?,
                self.sin.index_select(&pos, 0)?.reshape((rows, 1, half))?,
            )
        };
        let mask = if seq > 1 {
            Some(causal_mask(seq, caches[0].len, &self.device)?)
        } else {
            None
        };
        let input = Tensor::new(tokens, &self.device)?.reshape((rows, seq))?;
        let mut x = self.embeddings.forward(&input)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let h = self.attention(layer, i, &h, mask.as_ref(), &cos, &sin, caches, seq)?;
            let x1 = (h + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let h = layer.w_down.forward(&(gate * layer.w_up.forward(&h)?)?)?;
            x = (h + x1)?;
        }
        for cache in caches.iter_mut() {
            cache.len += seq;
        }
        let last = x.narrow(1, seq - 1, 1)?.squeeze(1)?;
        let last = self.norm.forward(&last)?;
        self.output.forward(&last)?.to_dtype(DType::F32)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        mask: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut SeqCache],
        seq: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let rows = caches.len();
        let heads = |w: &Linear, n: usize| -> Result<Tensor> {
            w.forward(x)?
                .reshape((rows, seq, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let rope = if c.rope_is_neox {
            candle_nn::rotary_emb::rope
        } else {
            candle_nn::rotary_emb::rope_i
        };
        let q = rope(&heads(&layer.wq, c.n_head)?, cos, sin)?;
        let k = rope(&heads(&layer.wk, c.n_kv_head)?, cos, sin)?;
        let v = heads(&layer.wv, c.n_kv_head)?;
        let n_rep = c.n_head / c.n_kv_head;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mut ys = Vec::with_capacity(rows);
        for (r, cache) in caches.iter_mut().enumerate() {
            let pos = cache.len;
            let (kc, vc) = &cache.layers[index];
            kc.slice_set(&k.narrow(0, r, 1)?.contiguous()?, 2, pos)?;
            vc.slice_set(&v.narrow(0, r, 1)?.contiguous()?, 2, pos)?;
            let total = pos + seq;
            let kr = kc.narrow(2, 0, total)?;
            let vr = vc.narrow(2, 0, total)?;
            // Grouped-query attention without copying the keys: the
            // `n_rep` query heads of one key head are rows of one matmul.
            let qr = q
                .narrow(0, r, 1)?
                .reshape((1, c.n_kv_head, n_rep * seq, c.head_dim))?;
            let att = (qr.matmul(&kr.t()?)? * scale)?;
            let att = match mask {
                Some(m) => att
                    .reshape((1, c.n_kv_head, n_rep, seq, total))?
                    .broadcast_add(m)?
                    .reshape((1, c.n_kv_head, n_rep * seq, total))?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att
                .matmul(&vr)?
                .reshape((1, c.n_head, seq, c.head_dim))?
                .transpose(1, 2)?
                .reshape((1, seq, c.n_head * c.head_dim))?;
            ys.push(y);
        }
        let y = if rows == 1 {
            ys.pop().expect("one row")
        } else {
            Tensor::cat(&ys, 0)?
        };
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
