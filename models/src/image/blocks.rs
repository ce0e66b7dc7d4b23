//! The UNet's and the VAE decoder's building blocks, following diffusers
//! file for file: `ResnetBlock2D` (`models/resnet.py`), `Downsample2D`
//! (`downsampling.py`), `Upsample2D` (`upsampling.py`), and from
//! `unets/unet_2d_blocks.py` `DownBlock2D`, `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`,
//! `UNetMidBlock2D` and `UpDecoderBlock2D`.
//!
//! Every convolution is a [`FrameConv`] (the batch as frames): on the CPU in
//! f32 one band-wise im2col + matrix product (MKL's where linked), 2–4×
//! candle's conv2d at these shapes; elsewhere candle's conv2d with the same
//! weights. The attention modules are in [`super::attention`].

use candle_core::{DType, Device, Module, Result as R, Tensor, D};
use candle_nn::{self as nn, VarBuilder};
use rayon::prelude::*;

use super::attention::{Transformer2D, VaeAttention};
use crate::blas::with_cpu_slice;
use crate::conv::FrameConv;
use crate::ops::{affine, silu_in_place, upsample2x};

/// A square-kernel `nn.Conv2d` of the checkpoint (with bias) as a
/// [`FrameConv`] over the batch.
pub(crate) fn conv2d(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> R<FrameConv> {
    let w = vb.get((cout, cin, k, k), "weight")?.unsqueeze(2)?;
    let b = vb.get(cout, "bias")?;
    FrameConv::new(&w, Some(b), 1, stride, pad)
}

/// `nn.GroupNorm` (affine), followed by SiLU where the block has it. On
/// the CPU in f32 it is one pass for the statistics and one that
/// normalises, scales and shifts (and applies SiLU with MKL's vector exp
/// where linked), per (image, group), the groups in parallel, reading the
/// input in place; candle's group norm and silu make about ten passes over
/// the tensor, which at the VAE's full-resolution layers costs more than
/// the convolutions around them. Elsewhere it is candle's `GroupNorm`
/// (and `silu`).
pub(crate) struct GroupNorm {
    norm: nn::GroupNorm,
    cpu: Option<(Vec<f32>, Vec<f32>)>,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNorm {
    /// Group norm then SiLU.
    pub(crate) fn silu(groups: usize, ch: usize, eps: f64, vb: VarBuilder) -> R<Self> {
        Self::build(groups, ch, eps, vb, true)
    }

    /// Group norm alone.
    pub(crate) fn new(groups: usize, ch: usize, eps: f64, vb: VarBuilder) -> R<Self> {
        Self::build(groups, ch, eps, vb, false)
    }

    fn build(groups: usize, ch: usize, eps: f64, vb: VarBuilder, silu: bool) -> R<Self> {
        let norm = nn::group_norm(groups, ch, eps, vb.clone())?;
        let weight = vb.get(ch, "weight")?;
        let cpu = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            Some((
                weight.to_vec1::<f32>()?,
                vb.get(ch, "bias")?.to_vec1::<f32>()?,
            ))
        } else {
            None
        };
        Ok(Self {
            norm,
            cpu,
            groups,
            eps,
            silu,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> R<Tensor> {
        let (Some((weight, bias)), Device::Cpu, DType::F32) = (&self.cpu, x.device(), x.dtype())
        else {
            let y = self.norm.forward(x)?;
            return if self.silu { nn::ops::silu(&y) } else { Ok(y) };
        };
        let dims = x.dims().to_vec();
        let c = dims[1];
        let per_channel: usize = dims[2..].iter().product();
        let cg = c / self.groups;
        let mut out = vec![0f32; x.elem_count()];
        let eps = self.eps;
        let x = x.contiguous()?;
        with_cpu_slice(&x, |src| {
            out.par_chunks_mut(cg * per_channel)
                .zip(src.par_chunks(cg * per_channel))
                .enumerate()
                .for_each(|(i, (dst, block))| {
                    let g = i % self.groups;
                    let (mut sum, mut sq) = (0f64, 0f64);
                    for chunk in block.chunks(4096) {
                        let (s, q) = sum_and_squares(chunk);
                        sum += s as f64;
                        sq += q as f64;
                    }
                    let len = block.len() as f64;
                    let mean = sum / len;
                    let var = (sq / len - mean * mean).max(0.0);
                    let rstd = 1.0 / (var + eps).sqrt();
                    for (k, (out, plane)) in dst
                        .chunks_mut(per_channel)
                        .zip(block.chunks(per_channel))
                        .enumerate()
                    {
                        let ch = g * cg + k;
                        let scale = (weight[ch] as f64 * rstd) as f32;
                        let shift = (bias[ch] as f64 - mean * weight[ch] as f64 * rstd) as f32;
                        affine(out, plane, scale, shift);
                        if self.silu {
                            silu_in_place(out);
                        }
                    }
                })
        })?;
        Tensor::from_vec(out, dims, &Device::Cpu)
    }
}

/// `(Σ x, Σ x²)` with 16 running sums (so the loop vectorises).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn sum_and_squares(x: &[f32]) -> (f32, f32) {
    let (mut s, mut q) = ([0f32; 16], [0f32; 16]);
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            s[i] += c[i];
            q[i] += c[i] * c[i];
        }
    }
    let rest = chunks.remainder();
    (
        s.iter().sum::<f32>() + rest.iter().sum::<f32>(),
        q.iter().sum::<f32>() + rest.iter().map(|v| v * v).sum::<f32>(),
    )
}

/// `ResnetBlock2D` with `time_embedding_norm="default"` and the default
/// shortcut rule (a 1x1 conv when the channel count changes).
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: FrameConv,
    time_emb_proj: Option<nn::Linear>,
    norm2: GroupNorm,
    conv2: FrameConv,
    conv_shortcut: Option<FrameConv>,
    output_scale_factor: f64,
}

/// What every resnet of a block shares.
#[derive(Clone, Copy)]
pub(crate) struct ResnetCfg {
    pub eps: f64,
    pub groups: usize,
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn new(vb: VarBuilder, cin: usize, cout: usize, c: ResnetCfg) -> R<Self> {
        Ok(Self {
            norm1: GroupNorm::silu(c.groups, cin, c.eps, vb.pp("norm1"))?,
            conv1: conv2d(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: match c.temb_channels {
                Some(t) => Some(nn::linear(t, cout, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: GroupNorm::silu(c.groups, cout, c.eps, vb.pp("norm2"))?,
            conv2: conv2d(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(conv2d(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor: c.output_scale_factor,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> R<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&nn::ops::silu(temb)?)?;
            h = h.broadcast_add(&t.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D` with a conv (stride 2); `padding == 0` pads one zero row
/// and column at the end first, as diffusers does.
struct Downsample2D {
    conv: FrameConv,
    padding: usize,
}

impl Downsample2D {
    fn new(vb: VarBuilder, ch: usize, padding: usize) -> R<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), ch, ch, 3, 2, padding)?,
            padding,
        })
    }

    fn forward(&self, x: &Tensor) -> R<Tensor> {
        if self.padding == 0 {
            let x = x
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D` with a conv: nearest ×2 (or to the skip connection's size),
/// then a 3x3 conv.
pub(crate) struct Upsample2D {
    conv: FrameConv,
}

impl Upsample2D {
    pub(crate) fn new(vb: VarBuilder, ch: usize) -> R<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), ch, ch, 3, 1, 1)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> R<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        let up = if (oh, ow) == (2 * h, 2 * w) {
            upsample2x(x)?
        } else {
            x.upsample_nearest2d(oh, ow)?
        };
        self.conv.forward(&up)
    }
}

/// The cross-attention settings of a block's transformers.
#[derive(Clone, Copy)]
pub(crate) struct AttnCfg {
    pub heads: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub layers: usize,
}

fn transformer(vb: VarBuilder, ch: usize, groups: usize, a: AttnCfg) -> R<Transformer2D> {
    Transformer2D::new(
        vb,
        ch,
        a.heads,
        groups,
        a.cross_attention_dim,
        a.layers,
        a.use_linear_projection,
    )
}

/// `layers` resnets, the first from `cin` channels, the rest `cout` → `cout`.
fn resnets(
    vb: &VarBuilder,
    cin: usize,
    cout: usize,
    layers: usize,
    r: ResnetCfg,
) -> R<Vec<ResnetBlock2D>> {
    (0..layers)
        .map(|i| {
            let c = if i == 0 { cin } else { cout };
            ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), c, cout, r)
        })
        .collect()
}

/// A cross-attention block's `attentions`: one transformer per resnet.
fn transformers(
    vb: &VarBuilder,
    ch: usize,
    layers: usize,
    groups: usize,
    attn: Option<AttnCfg>,
) -> R<Vec<Transformer2D>> {
    match attn {
        Some(a) => (0..layers)
            .map(|i| transformer(vb.pp(format!("attentions.{i}")), ch, groups, a))
            .collect(),
        None => Ok(Vec::new()),
    }
}

/// `DownBlock2D` and `CrossAttnDownBlock2D` (with `attentions`).
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// `downsample`: `Some(padding)` to end with a `Downsample2D`.
    pub(crate) fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        layers: usize,
        r: ResnetCfg,
        attn: Option<AttnCfg>,
        downsample: Option<usize>,
    ) -> R<Self> {
        let resnets = resnets(&vb, cin, cout, layers, r)?;
        let attentions = transformers(&vb, cout, layers, r.groups, attn)?;
        let downsampler = match downsample {
            Some(padding) => Some(Downsample2D::new(vb.pp("downsamplers.0"), cout, padding)?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// → (output, the skip connections it adds).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: Option<&Tensor>,
        context: Option<&Tensor>,
    ) -> R<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
            states.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            states.push(x.clone());
        }
        Ok((x, states))
    }
}

/// `UpBlock2D` and `CrossAttnUpBlock2D` (with `attentions`).
pub(crate) struct UpBlock {
    pub(crate) resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `cin`: the matching down block's input channels (the last skip's),
    /// `prev`: the channels coming up from below.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vb: VarBuilder,
        cin: usize,
        prev: usize,
        cout: usize,
        layers: usize,
        r: ResnetCfg,
        attn: Option<AttnCfg>,
        upsample: bool,
    ) -> R<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let skip = if i + 1 == layers { cin } else { cout };
                let below = if i == 0 { prev } else { cout };
                ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), below + skip, cout, r)
            })
            .collect::<R<Vec<_>>>()?;
        let attentions = transformers(&vb, cout, layers, r.groups, attn)?;
        let upsampler = if upsample {
            Some(Upsample2D::new(vb.pp("upsamplers.0"), cout)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// `skips`: this block's skip connections, the last one first used.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: Option<&Tensor>,
        upsample_size: Option<(usize, usize)>,
        context: Option<&Tensor>,
    ) -> R<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - i - 1];
            x = Tensor::cat(&[&x, skip], 1)?;
            x = resnet.forward(&x, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}

/// `UNetMidBlock2DCrossAttn` (one layer): resnet, then per layer
/// transformer + resnet.
pub(crate) struct MidBlockCrossAttn {
    first: ResnetBlock2D,
    rest: Vec<(Transformer2D, ResnetBlock2D)>,
}

impl MidBlockCrossAttn {
    pub(crate) fn new(vb: VarBuilder, ch: usize, r: ResnetCfg, a: AttnCfg) -> R<Self> {
        Ok(Self {
            first: ResnetBlock2D::new(vb.pp("resnets.0"), ch, ch, r)?,
            rest: vec![(
                transformer(vb.pp("attentions.0"), ch, r.groups, a)?,
                ResnetBlock2D::new(vb.pp("resnets.1"), ch, ch, r)?,
            )],
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: Option<&Tensor>, context: &Tensor) -> R<Tensor> {
        let mut x = self.first.forward(x, temb)?;
        for (attn, resnet) in &self.rest {
            x = resnet.forward(&attn.forward(&x, Some(context))?, temb)?;
        }
        Ok(x)
    }
}

/// The VAE's `UNetMidBlock2D` (no time embedding): resnet, then attention
/// (when the checkpoint has it) + resnet.
pub(crate) struct MidBlock2D {
    first: ResnetBlock2D,
    attention: Option<VaeAttention>,
    second: ResnetBlock2D,
}

impl MidBlock2D {
    pub(crate) fn new(vb: VarBuilder, ch: usize, r: ResnetCfg, attention: bool) -> R<Self> {
        let attention = if attention {
            Some(VaeAttention::new(
                vb.pp("attentions.0"),
                ch,
                r.groups,
                r.eps,
                r.output_scale_factor,
            )?)
        } else {
            None
        };
        Ok(Self {
            first: ResnetBlock2D::new(vb.pp("resnets.0"), ch, ch, r)?,
            attention,
            second: ResnetBlock2D::new(vb.pp("resnets.1"), ch, ch, r)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> R<Tensor> {
        let mut x = self.first.forward(x, None)?;
        if let Some(attn) = &self.attention {
            x = attn.forward(&x)?;
        }
        self.second.forward(&x, None)
    }
}

/// The VAE's `UpDecoderBlock2D`: resnets, then `Upsample2D` except in the
/// last block.
pub(crate) struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub(crate) fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        layers: usize,
        r: ResnetCfg,
        upsample: bool,
    ) -> R<Self> {
        let resnets = resnets(&vb, cin, cout, layers, r)?;
        let upsampler = if upsample {
            Some(Upsample2D::new(vb.pp("upsamplers.0"), cout)?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> R<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x, None)?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, None),
            None => Ok(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff as max_diff;

    #[test]
    fn group_norm_and_upsample_match_candle() {
        let dev = Device::Cpu;
        let (c, groups) = (12, 4);
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        vb.get_with_hints(
            c,
            "weight",
            candle_nn::Init::Randn {
                mean: 1.0,
                stdev: 0.3,
            },
        )
        .unwrap();
        vb.get_with_hints(
            c,
            "bias",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.3,
            },
        )
        .unwrap();
        // 37 values per channel: the vectorised sums' remainder too.
        let x = (Tensor::randn(0f32, 2.0, (2, c, 5, 37), &dev).unwrap() + 0.5).unwrap();
        let want = nn::group_norm(groups, c, 1e-5, vb.clone())
            .unwrap()
            .forward(&x)
            .unwrap();
        let plain = GroupNorm::new(groups, c, 1e-5, vb.clone())
            .unwrap()
            .forward(&x)
            .unwrap();
        assert!(max_diff(&plain, &want) < 1e-4);
        let silu = GroupNorm::silu(groups, c, 1e-5, vb)
            .unwrap()
            .forward(&x)
            .unwrap();
        assert!(max_diff(&silu, &nn::ops::silu(&want).unwrap()) < 1e-4);
        let up = upsample2x(&x).unwrap();
        assert_eq!(max_diff(&up, &x.upsample_nearest2d(10, 74).unwrap()), 0.0);
    }
}
