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

use super::cpu_ops;

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

/// Whether the CPU kernels of [`super::q4`] and [`super::q8`] run where
/// they can (the default); `QUANT_KERNEL=candle` (or the older
/// `Q8_KERNEL=candle`) keeps candle's own kernels, for comparison.
fn our_kernels() -> bool {
    ["QUANT_KERNEL", "Q8_KERNEL"]
        .iter()
        .all(|k| std::env::var(k).map(|v| v != "candle").unwrap_or(true))
}

/// A weight matrix: candle's quantized matmul, or on x86 CPUs our kernels:
/// Q4_1 on its 4-bit weights (candle's is scalar code, see [`super::q4`]),
/// and Q8_0 a few rows at a time with AVX-512 VNNI where candle has only its
/// one-row-at-a-time path (same numbers, see [`super::q8`]).
enum Linear {
    Candle(QMatMul),
    Q8(super::q8::Q8Matrix),
    Q4(super::q4::Q4Matrix),
}

impl Linear {
    fn new(t: QTensor, device: &Device, ours: bool) -> Result<Self> {
        if device.is_cpu() && ours {
            match t.dtype() {
                GgmlDType::Q4_1 => {
                    if let Some(m) = super::q4::Q4Matrix::from_qtensor(&t)? {
                        return Ok(Self::Q4(m));
                    }
                }
                GgmlDType::Q8_0 => {
                    let candle_has_a_fast_path =
                        t.shape().dims().last().is_some_and(|k| k % 256 == 0);
                    if !candle_has_a_fast_path && super::q8::available() {
                        if let Some(m) = super::q8::Q8Matrix::from_qtensor(&t)? {
                            return Ok(Self::Q8(m));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Self::Candle(QMatMul::from_qtensor(t)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => m.forward(x),
            Self::Q8(m) => m.forward(x),
            Self::Q4(m) => m.forward(x),
        }
    }

    /// `rows` rows of f32 on the CPU times the transposed matrix.
    fn forward_vec(&self, xs: &[f32], rows: usize) -> Result<Vec<f32>> {
        match self {
            Self::Q4(m) => Ok(m.matmul(&super::q4::QuantizedRows::new(xs, rows, m.k()))),
            Self::Q8(m) => Ok(m.matmul_f32(xs, rows)),
            Self::Candle(m) => {
                let x = Tensor::from_slice(xs, (rows, xs.len() / rows.max(1)), &Device::Cpu)?;
                m.forward(&x)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()
            }
        }
    }
}

/// Projections that read the same input (q, k and v; gate and up): one
/// matrix of all their rows when our kernels run them all (the input is
/// quantized once and the thread pool woken once), apart otherwise.
enum Projections {
    Fused(Linear, Vec<usize>),
    Apart(Vec<Linear>),
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Self {
        // All of one of our kinds: their rows as one matrix.
        macro_rules! fuse {
            ($variant:ident, $ty:ty) => {
                if parts.iter().all(|l| matches!(l, Linear::$variant(_))) {
                    let ms: Vec<$ty> = parts
                        .into_iter()
                        .map(|l| match l {
                            Linear::$variant(m) => m,
                            _ => unreachable!("checked above"),
                        })
                        .collect();
                    let sizes = ms.iter().map(|m| m.n()).collect();
                    let m = <$ty>::concat(ms).expect("projections of one input share k");
                    return Self::Fused(Linear::$variant(m), sizes);
                }
            };
        }
        fuse!(Q4, super::q4::Q4Matrix);
        fuse!(Q8, super::q8::Q8Matrix);
        Self::Apart(parts)
    }

    /// Each projection of `rows` rows of f32 on the CPU, in order.
    fn forward_vec(&self, xs: &[f32], rows: usize) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::Apart(parts) => parts.iter().map(|p| p.forward_vec(xs, rows)).collect(),
            Self::Fused(w, sizes) => {
                let y = w.forward_vec(xs, rows)?;
                let total: usize = sizes.iter().sum();
                let mut parts: Vec<Vec<f32>> =
                    sizes.iter().map(|n| Vec::with_capacity(rows * n)).collect();
                for row in y.chunks_exact(total) {
                    let mut offset = 0;
                    for (part, &n) in parts.iter_mut().zip(sizes) {
                        part.extend_from_slice(&row[offset..offset + n]);
                        offset += n;
                    }
                }
                Ok(parts)
            }
        }
    }

    /// Each projection of `x`, in order.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Apart(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Self::Fused(w, sizes) => {
                let y = w.forward(x)?;
                let mut offset = 0;
                sizes
                    .iter()
                    .map(|&n| {
                        let part = y.narrow(candle_core::D::Minus1, offset, n);
                        offset += n;
                        part
                    })
                    .collect()
            }
        }
    }
}

struct Layer {
    /// q, k, v.
    qkv: Projections,
    wo: Linear,
    /// gate, up.
    gate_up: Projections,
    w_down: Linear,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

impl Layer {
    /// `down(silu(gate(x)) * up(x))`.
    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let parts = self.gate_up.forward(x)?;
        let h = (candle_nn::ops::silu(&parts[0])? * &parts[1])?;
        self.w_down.forward(&h)
    }

    /// The same on `rows` rows of f32 on the CPU.
    fn mlp_vec(&self, xs: &[f32], rows: usize) -> Result<Vec<f32>> {
        let h = match &self.gate_up {
            Projections::Fused(w, sizes) if sizes.len() == 2 && sizes[0] == sizes[1] => {
                let y = w.forward_vec(xs, rows)?;
                let mut h = vec![0f32; rows * sizes[0]];
                cpu_ops::silu_gate(&y, sizes[0], &mut h);
                h
            }
            p => {
                let mut parts = p.forward_vec(xs, rows)?;
                let up = parts.pop().expect("gate and up");
                let mut gate = parts.pop().expect("gate and up");
                crate::ops::silu_in_place(&mut gate);
                for (g, u) in gate.iter_mut().zip(&up) {
                    *g *= u;
                }
                gate
            }
        };
        self.w_down.forward_vec(&h, rows)
    }
}

/// One sequence's keys and values: per layer, `(n_kv_head, capacity,
/// head_dim)` buffers written in place as tokens arrive (no copy of the
/// history per token); the first `len` positions are filled. The capacity is
/// what the sequence reserved (prompt plus reply); a sequence that outgrows
/// it gets a larger buffer. On the CPU the buffers are plain vectors the
/// forward pass writes and reads directly; elsewhere tensors on the device.
pub struct SeqCache {
    kv: Kv,
    len: usize,
    capacity: usize,
}

enum Kv {
    Tensors(Vec<(Tensor, Tensor)>),
    Cpu {
        layers: Vec<(Vec<f32>, Vec<f32>)>,
        heads: usize,
        head_dim: usize,
    },
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
        let kv = match &self.kv {
            Kv::Tensors(layers) => Kv::Tensors(
                layers
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
                    .collect::<Result<_>>()?,
            ),
            &Kv::Cpu {
                ref layers,
                heads,
                head_dim,
            } => {
                let copy = |from: &[f32]| {
                    let mut to = vec![0f32; heads * capacity * head_dim];
                    for h in 0..heads {
                        let (src, dst) = (h * self.capacity * head_dim, h * capacity * head_dim);
                        to[dst..dst + len * head_dim]
                            .copy_from_slice(&from[src..src + len * head_dim]);
                    }
                    to
                };
                Kv::Cpu {
                    layers: layers.iter().map(|(k, v)| (copy(k), copy(v))).collect(),
                    heads,
                    head_dim,
                }
            }
        };
        Ok(Self { kv, len, capacity })
    }

    /// Bytes the buffers hold.
    pub fn bytes(&self) -> usize {
        match &self.kv {
            Kv::Tensors(layers) => layers
                .iter()
                .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
                .sum(),
            Kv::Cpu { layers, .. } => layers
                .iter()
                .map(|(k, v)| (k.len() + v.len()) * std::mem::size_of::<f32>())
                .sum(),
        }
    }
}

/// What the CPU forward pass reads besides the weight matrices: the norms'
/// weights and the rotary tables as plain vectors.
struct CpuParts {
    attn_norms: Vec<Vec<f32>>,
    ffn_norms: Vec<Vec<f32>>,
    out_norm: Vec<f32>,
    /// `(context_length, head_dim / 2)`.
    cos: Vec<f32>,
    sin: Vec<f32>,
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
    /// On the CPU: the forward pass on plain vectors.
    cpu: Option<CpuParts>,
}

impl QuantizedLlama {
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        cpu_repack: bool,
    ) -> Result<Self> {
        Self::from_gguf_with(ct, reader, device, cpu_repack, our_kernels())
    }

    /// [`Self::from_gguf`] with the CPU matrix kernels chosen: ours where
    /// they run (`ours`), or candle's everywhere.
    #[doc(hidden)]
    pub fn from_gguf_with<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        cpu_repack: bool,
        ours: bool,
    ) -> Result<Self> {
        let config = Config::from_gguf(ct)?;
        let mut tensor = |name: &str| -> Result<QTensor> {
            let t = ct.tensor(reader, name, device)?;
            repack_for_cpu(t, device, cpu_repack, ours)
        };
        // A norm's weights, as candle's RmsNorm and (on the CPU) a vector.
        let norm_of = |t: QTensor, norms: &mut Vec<Vec<f32>>| -> Result<RmsNorm> {
            if device.is_cpu() {
                norms.push(t.dequantize(device)?.flatten_all()?.to_vec1()?);
            }
            RmsNorm::from_qtensor(t, config.rms_norm_eps)
        };
        let (mut attn_norms, mut ffn_norms, mut out_norm) = (vec![], vec![], vec![]);
        let embd_q = tensor("token_embd.weight")?;
        let embeddings = Embedding::new(embd_q.dequantize(device)?, config.n_embd);
        let norm = norm_of(tensor("output_norm.weight")?, &mut out_norm)?;
        // Models with tied embeddings (SmolLM2) have no output.weight.
        let output = match tensor("output.weight") {
            Ok(t) => t,
            Err(_) => embd_q,
        };
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut q = |suffix: &str| -> Result<Linear> {
                Linear::new(tensor(&format!("blk.{i}.{suffix}.weight"))?, device, ours)
            };
            let qkv = Projections::new(vec![q("attn_q")?, q("attn_k")?, q("attn_v")?]);
            let wo = q("attn_output")?;
            let gate_up = Projections::new(vec![q("ffn_gate")?, q("ffn_up")?]);
            let w_down = q("ffn_down")?;
            layers.push(Layer {
                qkv,
                wo,
                gate_up,
                w_down,
                attn_norm: norm_of(
                    tensor(&format!("blk.{i}.attn_norm.weight"))?,
                    &mut attn_norms,
                )?,
                ffn_norm: norm_of(tensor(&format!("blk.{i}.ffn_norm.weight"))?, &mut ffn_norms)?,
            });
        }
        let (cos, sin) = rope_tables(&config, device)?;
        let cpu = match device.is_cpu() {
            true => Some(CpuParts {
                attn_norms,
                ffn_norms,
                out_norm: out_norm.pop().unwrap_or_default(),
                cos: cos.flatten_all()?.to_vec1()?,
                sin: sin.flatten_all()?.to_vec1()?,
            }),
            false => None,
        };
        Ok(Self {
            cpu,
            output: Linear::new(output, device, ours)?,
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
        if self.cpu.is_some() {
            let size = c.n_kv_head * capacity * c.head_dim;
            let layers = (0..c.n_layer)
                .map(|_| (vec![0f32; size], vec![0f32; size]))
                .collect();
            return Ok(SeqCache {
                kv: Kv::Cpu {
                    layers,
                    heads: c.n_kv_head,
                    head_dim: c.head_dim,
                },
                len: 0,
                capacity,
            });
        }
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
            kv: Kv::Tensors(layers),
            len: 0,
            capacity,
        })
    }

    /// The same model with the tensor forward pass on the CPU as well (the
    /// one GPUs run): for checking the CPU pass against it.
    #[doc(hidden)]
    pub fn without_cpu_path(mut self) -> Self {
        self.cpu = None;
        self
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
        if let Some(cpu) = &self.cpu {
            return self.forward_cpu(cpu, tokens, seq, caches);
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
            x = (layer.mlp(&h)? + x1)?;
        }
        for cache in caches.iter_mut() {
            cache.len += seq;
        }
        let last = x.narrow(1, seq - 1, 1)?.squeeze(1)?;
        let last = self.norm.forward(&last)?;
        self.output.forward(&last)?.to_dtype(DType::F32)
    }

    /// [`Self::forward_rows`] on the CPU, on plain vectors: the matrix
    /// products by our kernels (or candle's), everything between them by
    /// [`cpu_ops`], the keys and values written straight into each row's
    /// buffers. A decode step's attention runs one task per (row, query
    /// head) on candle's thread pool; a prefill chunk's by sgemm per head.
    fn forward_cpu(
        &self,
        cpu: &CpuParts,
        tokens: &[u32],
        seq: usize,
        caches: &mut [&mut SeqCache],
    ) -> Result<Tensor> {
        let c = &self.config;
        let (rows, n, d, hd) = (caches.len(), tokens.len(), c.n_embd, c.head_dim);
        let (nh, nkv) = (c.n_head, c.n_kv_head);
        let n_rep = nh / nkv;
        let (qd, kvd, half) = (nh * hd, nkv * hd, hd / 2);
        let eps = c.rms_norm_eps as f32;
        let scale = 1. / (hd as f32).sqrt();
        let mut x = vec![0f32; n * d];
        crate::blas::with_cpu_slice(self.embeddings.embeddings(), |table| {
            let vocab = table.len() / d;
            for (row, &t) in x.chunks_exact_mut(d).zip(tokens) {
                let t = t as usize;
                if t >= vocab {
                    candle_core::bail!("token {t} is outside the vocabulary of {vocab}");
                }
                row.copy_from_slice(&table[t * d..(t + 1) * d]);
            }
            Ok(())
        })??;
        let mut h = vec![0f32; n * d];
        let mut y = vec![0f32; n * qd];
        for (li, layer) in self.layers.iter().enumerate() {
            cpu_ops::rms_norm(&x, &cpu.attn_norms[li], eps, &mut h);
            let mut qkv = layer.qkv.forward_vec(&h, n)?;
            let v = qkv.pop().expect("q, k, v");
            let mut k = qkv.pop().expect("q, k, v");
            let mut q = qkv.pop().expect("q, k, v");
            for (r, cache) in caches.iter_mut().enumerate() {
                let cap = cache.capacity;
                let Kv::Cpu { layers, .. } = &mut cache.kv else {
                    candle_core::bail!("a device cache in the CPU forward pass");
                };
                let (kc, vc) = &mut layers[li];
                for i in 0..seq {
                    let (row, p) = (r * seq + i, cache.len + i);
                    let (cos, sin) = (
                        &cpu.cos[p * half..(p + 1) * half],
                        &cpu.sin[p * half..(p + 1) * half],
                    );
                    cpu_ops::rope(&mut q[row * qd..(row + 1) * qd], cos, sin, c.rope_is_neox);
                    let kr = &mut k[row * kvd..(row + 1) * kvd];
                    cpu_ops::rope(kr, cos, sin, c.rope_is_neox);
                    let vr = &v[row * kvd..(row + 1) * kvd];
                    for g in 0..nkv {
                        let at = (g * cap + p) * hd;
                        kc[at..at + hd].copy_from_slice(&kr[g * hd..(g + 1) * hd]);
                        vc[at..at + hd].copy_from_slice(&vr[g * hd..(g + 1) * hd]);
                    }
                }
            }
            if seq == 1 {
                // One task per (row, query head), each on its own slice of y.
                let kv: Vec<(&[f32], &[f32], usize, usize)> = caches
                    .iter()
                    .map(|cache| match &cache.kv {
                        Kv::Cpu { layers, .. } => {
                            let (kc, vc) = &layers[li];
                            (kc.as_slice(), vc.as_slice(), cache.capacity, cache.len + 1)
                        }
                        Kv::Tensors(_) => unreachable!("checked above"),
                    })
                    .collect();
                let out = crate::blas::SendPtr(y.as_mut_ptr());
                let q = &q;
                candle_core::utils::barrier_pool().execute_chunked(rows * nh, |tasks| {
                    let out = &out;
                    let mut scores = Vec::new();
                    for task in tasks {
                        let (r, head) = (task / nh, task % nh);
                        let (kc, vc, cap, t) = kv[r];
                        let g = head / n_rep;
                        let (kh, vh) = (&kc[g * cap * hd..], &vc[g * cap * hd..]);
                        scores.resize(t, 0.);
                        let at = r * qd + head * hd;
                        // SAFETY: each task writes its own `hd` values of y.
                        let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(at), hd) };
                        cpu_ops::attend_one(
                            &q[at..at + hd],
                            &kh[..t * hd],
                            &vh[..t * hd],
                            hd,
                            scale,
                            &mut scores,
                            o,
                        );
                    }
                });
            } else {
                let cache = &caches[0];
                let (pos, cap) = (cache.len, cache.capacity);
                let Kv::Cpu { layers, .. } = &cache.kv else {
                    unreachable!("checked above")
                };
                let (kc, vc) = &layers[li];
                let t = pos + seq;
                let mut scores = vec![0f32; seq * t];
                for head in 0..nh {
                    let g = head / n_rep;
                    let (kh, vh) = (&kc[g * cap * hd..], &vc[g * cap * hd..]);
                    cpu_ops::attend_causal(
                        &q[head * hd..],
                        qd,
                        &kh[..t * hd],
                        &vh[..t * hd],
                        hd,
                        pos,
                        seq,
                        scale,
                        &mut scores,
                        &mut y[head * hd..],
                        qd,
                    );
                }
            }
            let o = layer.wo.forward_vec(&y, n)?;
            cpu_ops::add_in_place(&mut x, &o);
            cpu_ops::rms_norm(&x, &cpu.ffn_norms[li], eps, &mut h);
            let m = layer.mlp_vec(&h, n)?;
            cpu_ops::add_in_place(&mut x, &m);
        }
        for cache in caches.iter_mut() {
            cache.len += seq;
        }
        let mut last = Vec::with_capacity(rows * d);
        for r in 0..rows {
            last.extend_from_slice(&x[(r * seq + seq - 1) * d..(r * seq + seq) * d]);
        }
        let mut normed = vec![0f32; rows * d];
        cpu_ops::rms_norm(&last, &cpu.out_norm, eps, &mut normed);
        let logits = self.output.forward_vec(&normed, rows)?;
        let vocab = logits.len() / rows;
        Tensor::from_vec(logits, (rows, vocab), &Device::Cpu)
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
        let qkv = layer.qkv.forward(x)?;
        let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
            y.reshape((rows, seq, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let rope = if c.rope_is_neox {
            candle_nn::rotary_emb::rope
        } else {
            candle_nn::rotary_emb::rope_i
        };
        let q = rope(&heads(&qkv[0], c.n_head)?, cos, sin)?;
        let k = rope(&heads(&qkv[1], c.n_kv_head)?, cos, sin)?;
        let v = heads(&qkv[2], c.n_kv_head)?;
        let n_rep = c.n_head / c.n_kv_head;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mut ys = Vec::with_capacity(rows);
        for (r, cache) in caches.iter_mut().enumerate() {
            let pos = cache.len;
            let Kv::Tensors(layers) = &cache.kv else {
                candle_core::bail!("a CPU cache in the tensor forward pass");
            };
            let (kc, vc) = &layers[index];
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
/// of the original quantization step), for twice the memory of Q4. Q4_1
/// stays as it is on x86 CPUs with AVX2, where [`super::q4`] runs it.
fn repack_for_cpu(t: QTensor, device: &Device, allowed: bool, ours: bool) -> Result<QTensor> {
    let slow = match t.dtype() {
        GgmlDType::Q4_1 => !(ours && super::q4::available()),
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => true,
        _ => false,
    };
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
