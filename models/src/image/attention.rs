//! The attention modules of the UNet and the VAE, following diffusers:
//! `Transformer2DModel` (`models/transformers/transformer_2d.py`, the
//! continuous-input case), `BasicTransformerBlock` and `FeedForward`
//! (`attention.py`, layer norms and GEGLU with the exact GELU of
//! `activations.py`), and `Attention` with `AttnProcessor2_0`
//! (`attention_processor.py`), including the VAE mid-block's one-head form
//! with its group norm, residual and output rescale. The attention itself
//! is [`crate::attention::sdpa`] (banded on the CPU, no score matrix held).

use candle_core::{Module, Result as R, Tensor, D};
use candle_nn::{self as nn, VarBuilder};
use rayon::prelude::*;

use super::blocks::{conv2d, GroupNorm};
use crate::attention::sdpa;
use crate::blas::{with_cpu_slice, Linear};
use crate::conv::FrameConv;

/// `Attention` without its norm: projections, heads, sdpa, `to_out.0`.
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

/// A `(dim_in → dim_out)` linear, `weight` either 2-D or a 1x1 conv's.
fn linear(vb: VarBuilder, dim_in: usize, dim_out: usize, bias: bool) -> R<Linear> {
    let w = match vb.get((dim_out, dim_in), "weight") {
        Ok(w) => w,
        Err(_) => vb
            .get((dim_out, dim_in, 1, 1), "weight")?
            .reshape((dim_out, dim_in))?,
    };
    let b = if bias {
        Some(vb.get(dim_out, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

impl Attention {
    /// `names`: the query, key, value and output projections' keys.
    fn new(
        vb: &VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        dim_head: usize,
        qkv_bias: bool,
        names: [&str; 4],
    ) -> R<Self> {
        let inner = heads * dim_head;
        Ok(Self {
            to_q: linear(vb.pp(names[0]), query_dim, inner, qkv_bias)?,
            to_k: linear(vb.pp(names[1]), context_dim, inner, qkv_bias)?,
            to_v: linear(vb.pp(names[2]), context_dim, inner, qkv_bias)?,
            to_out: linear(vb.pp(names[3]), inner, query_dim, true)?,
            heads,
        })
    }

    /// `x` `(b, n, query_dim)` attends to `context` `(b, m, context_dim)`
    /// or to itself.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> R<Tensor> {
        let (b, n, _) = x.dims3()?;
        let ctx = context.unwrap_or(x);
        let m = ctx.dim(1)?;
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let inner = q.dim(2)?;
        let (h, d) = (self.heads, inner / self.heads);
        let o = if h == 1 {
            sdpa(&q, &k, &v, 1.0 / (d as f64).sqrt())?
        } else {
            let split = |t: &Tensor, len: usize| -> R<Tensor> {
                t.reshape((b, len, h, d))?.transpose(1, 2)?.contiguous()
            };
            sdpa(
                &split(&q, n)?,
                &split(&k, m)?,
                &split(&v, m)?,
                1.0 / (d as f64).sqrt(),
            )?
            .transpose(1, 2)?
            .reshape((b, n, inner))?
        };
        self.to_out.forward(&o)
    }
}

/// `FeedForward` with `GEGLU`: `proj` to twice the inner width, the first
/// half times GELU(second half), then the output linear.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> R<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: linear(vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            out: linear(vb.pp("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> R<Tensor> {
        let h = self.proj.forward(x)?;
        let inner = h.dim(D::Minus1)? / 2;
        self.out.forward(&geglu(&h, inner)?)
    }
}

/// GEGLU on `h` `(…, 2·inner)`: `h[.., :inner] · GELU(h[.., inner:])`
/// with the exact (erf) GELU. On the CPU in f32 one pass per row (MKL's
/// vector erf where linked); elsewhere candle's ops.
fn geglu(h: &Tensor, inner: usize) -> R<Tensor> {
    if !(h.device().is_cpu() && h.dtype() == candle_core::DType::F32) {
        let (a, gate) = (
            h.narrow(D::Minus1, 0, inner)?,
            h.narrow(D::Minus1, inner, inner)?,
        );
        return a * gate.gelu_erf()?;
    }
    let h = h.contiguous()?;
    let mut shape = h.dims().to_vec();
    *shape.last_mut().expect("rank >= 1") = inner;
    let rows = h.elem_count() / (2 * inner).max(1);
    let mut out = vec![0f32; rows * inner];
    with_cpu_slice(&h, |hs| {
        out.par_chunks_mut(inner)
            .zip(hs.par_chunks(2 * inner))
            .for_each(|(o, hr)| {
                let (a, g) = hr.split_at(inner);
                crate::ops::gelu_chunk(o, g);
                for (ov, av) in o.iter_mut().zip(a) {
                    *ov *= av;
                }
            })
    })?;
    Tensor::from_vec(out, shape, &candle_core::Device::Cpu)
}

/// `BasicTransformerBlock` (layer norms, self-attention, cross-attention,
/// GEGLU feed-forward, each with its residual).
struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, context_dim: usize) -> R<Self> {
        let names = ["to_q", "to_k", "to_v", "to_out.0"];
        let d = dim / heads;
        Ok(Self {
            norm1: nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(&vb.pp("attn1"), dim, dim, heads, d, false, names)?,
            norm2: nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(&vb.pp("attn2"), dim, context_dim, heads, d, false, names)?,
            norm3: nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    /// Without a context the cross-attention attends to the tokens
    /// themselves, as diffusers' does.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> R<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, context)? + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// The input and output projections: 1x1 convolutions on the feature map
/// or linears on the tokens (`use_linear_projection`).
enum Proj {
    Conv(FrameConv),
    Linear(Linear),
}

/// `Transformer2DModel` on a `(b, c, h, w)` map: group norm, projection
/// in, `layers` transformer blocks over the `h·w` tokens, projection out,
/// residual.
pub(crate) struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    pub(crate) fn new(
        vb: VarBuilder,
        ch: usize,
        heads: usize,
        groups: usize,
        context_dim: usize,
        layers: usize,
        linear_projection: bool,
    ) -> R<Self> {
        let proj = |name: &str| -> R<Proj> {
            Ok(if linear_projection {
                Proj::Linear(linear(vb.pp(name), ch, ch, true)?)
            } else {
                Proj::Conv(conv2d(vb.pp(name), ch, ch, 1, 1, 0)?)
            })
        };
        let blocks = (0..layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    ch,
                    heads,
                    context_dim,
                )
            })
            .collect::<R<_>>()?;
        Ok(Self {
            norm: GroupNorm::new(groups, ch, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> R<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: &Tensor| t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous();
        let to_map = |t: &Tensor| t.transpose(1, 2)?.reshape((b, c, h, w));
        let norm = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Proj::Conv(p) => to_tokens(&p.forward(&norm)?)?,
            Proj::Linear(p) => p.forward(&to_tokens(&norm)?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward(&to_map(&t)?.contiguous()?)?,
            Proj::Linear(p) => to_map(&p.forward(&t)?)?,
        };
        out + x
    }
}

/// The VAE mid-block's `Attention`: group norm, one head over the `h·w`
/// positions, residual, divided by `rescale_output_factor`.
pub(crate) struct VaeAttention {
    norm: GroupNorm,
    attn: Attention,
    rescale: f64,
}

impl VaeAttention {
    pub(crate) fn new(vb: VarBuilder, ch: usize, groups: usize, eps: f64, rescale: f64) -> R<Self> {
        // Checkpoints from before diffusers 0.15 name the projections
        // `query`, `key`, `value`, `proj_attn`.
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        Ok(Self {
            norm: GroupNorm::new(groups, ch, eps, vb.pp("group_norm"))?,
            attn: Attention::new(&vb, ch, ch, 1, ch, true, names)?,
            rescale,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> R<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let o = self.attn.forward(&t, None)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        (o + x)? / self.rescale
    }
}
