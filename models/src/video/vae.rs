//! diffusers' `AutoencoderKLWan` (`autoencoder_kl_wan.py`), both variants:
//! Wan 2.1's (16 latent channels, 8x spatial) and Wan 2.2's residual one
//! (48 channels, 2x2 patching, 16x spatial). Causal 3-D convolutions keep
//! the last two frames of every layer's input in a feature cache, so the
//! decoder runs one latent frame at a time and the encoder one chunk of
//! four frames at a time, exactly as diffusers does: memory is bounded by
//! a chunk, not the clip.
//!
//! Tensors are one video laid out `(T, C, H, W)` (time first), so every
//! per-frame operation is a batched 2-D one.

use candle_core::{DType, Module, Tensor};
use candle_nn::{conv2d, Conv2d, VarBuilder};

use crate::conv::FrameConv;

use super::config::WanVaeConfig;
use crate::ModelError;

type R<T> = candle_core::Result<T>;

/// One cache slot per causal convolution, in call order.
#[derive(Clone)]
enum Slot {
    Empty,
    /// diffusers' "Rep": the temporal upsampler has seen the first chunk.
    Rep,
    Frames(Tensor),
}

/// diffusers' `feat_cache` / `feat_idx`.
pub struct FeatCache {
    slots: Vec<Slot>,
    idx: usize,
}

impl FeatCache {
    fn new() -> Self {
        Self {
            slots: Vec::new(),
            idx: 0,
        }
    }

    fn start_chunk(&mut self) {
        self.idx = 0;
    }

    fn take(&mut self) -> (usize, Slot) {
        let i = self.idx;
        if self.slots.len() <= i {
            self.slots.push(Slot::Empty);
        }
        self.idx += 1;
        (i, self.slots[i].clone())
    }
}

/// `WanCausalConv3d`: zero padding in front in time (none behind), the
/// cached frames taking the padding's place; the convolution itself is a
/// [`FrameConv`] over the frames.
struct CausalConv3d {
    conv: FrameConv,
    pad_t: usize,
}

impl CausalConv3d {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: (usize, usize, usize),
        stride_t: usize,
        padding: (usize, usize),
    ) -> R<Self> {
        let (kt, kh, kw) = k;
        let w = vb.get((cout, cin, kt, kh, kw), "weight")?;
        let b = vb.get(cout, "bias")?;
        Ok(Self {
            conv: FrameConv::new(&w, Some(b), stride_t, 1, padding.1)?,
            pad_t: 2 * padding.0,
        })
    }

    /// `x` `(T, C, H, W)`; `cache` frames in front of it (diffusers'
    /// `cache_x`), used when the layer pads in time.
    fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> R<Tensor> {
        let mut x = x.clone();
        let mut pad = self.pad_t;
        if let (Some(c), true) = (cache, self.pad_t > 0) {
            pad = pad.saturating_sub(c.dim(0)?);
            x = Tensor::cat(&[c, &x], 0)?;
        }
        if pad > 0 {
            let (_, c, h, w) = x.dims4()?;
            let zeros = Tensor::zeros((pad, c, h, w), x.dtype(), x.device())?;
            x = Tensor::cat(&[&zeros, &x], 0)?;
        }
        self.conv.forward(&x)
    }

    /// The cached call every causal convolution site makes in diffusers:
    /// keep the input's last two frames (with the previous chunk's last
    /// frame in front when this one has a single frame) for the next chunk.
    fn cached(&self, x: &Tensor, cache: Option<&mut FeatCache>) -> R<Tensor> {
        let Some(cache) = cache else {
            return self.forward(x, None);
        };
        let (i, prev) = cache.take();
        let t = x.dim(0)?;
        let mut keep = x.narrow(0, t.saturating_sub(2), t.min(2))?;
        let prev = match prev {
            Slot::Frames(p) => Some(p),
            _ => None,
        };
        if keep.dim(0)? < 2 {
            if let Some(p) = &prev {
                let last = p.narrow(0, p.dim(0)? - 1, 1)?;
                keep = Tensor::cat(&[&last, &keep], 0)?;
            }
        }
        let out = self.forward(x, prev.as_ref())?;
        cache.slots[i] = Slot::Frames(keep);
        Ok(out)
    }
}

/// `WanRMS_norm`: L2-normalise over channels, × sqrt(C) × gamma; on the
/// CPU in f32 one fused pass (with the SiLU that follows it where
/// [`RmsNorm::forward_silu`]), elsewhere candle's ops.
struct RmsNorm {
    gamma: Tensor,
    cpu_gamma: Option<Vec<f32>>,
    scale: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, dim: usize, images: bool) -> R<Self> {
        let gamma = if images {
            vb.get((dim, 1, 1), "gamma")?
        } else {
            vb.get((dim, 1, 1, 1), "gamma")?.reshape((dim, 1, 1))?
        };
        let cpu_gamma = if gamma.device().is_cpu() && gamma.dtype() == DType::F32 {
            Some(gamma.flatten_all()?.to_vec1::<f32>()?)
        } else {
            None
        };
        Ok(Self {
            gamma,
            cpu_gamma,
            scale: (dim as f64).sqrt(),
        })
    }

    fn forward(&self, x: &Tensor) -> R<Tensor> {
        self.run(x, false)
    }

    fn forward_silu(&self, x: &Tensor) -> R<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> R<Tensor> {
        if let (Some(g), true, DType::F32) = (&self.cpu_gamma, x.device().is_cpu(), x.dtype()) {
            return crate::ops::channel_rms_norm(x, g, self.scale as f32, silu);
        }
        let norm = x
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::INFINITY)?;
        let y = (x.broadcast_div(&norm)? * self.scale)?.broadcast_mul(&self.gamma)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> R<Self> {
        Ok(Self {
            norm1: RmsNorm::new(vb.pp("norm1"), cin, false)?,
            conv1: CausalConv3d::new(vb.pp("conv1"), cin, cout, (3, 3, 3), 1, (1, 1))?,
            norm2: RmsNorm::new(vb.pp("norm2"), cout, false)?,
            conv2: CausalConv3d::new(vb.pp("conv2"), cout, cout, (3, 3, 3), 1, (1, 1))?,
            shortcut: if cin != cout {
                Some(CausalConv3d::new(
                    vb.pp("conv_shortcut"),
                    cin,
                    cout,
                    (1, 1, 1),
                    1,
                    (0, 0),
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, mut cache: Option<&mut FeatCache>) -> R<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None)?,
            None => x.clone(),
        };
        let y = self.norm1.forward_silu(x)?;
        let y = self.conv1.cached(&y, cache.as_deref_mut())?;
        let y = self.norm2.forward_silu(&y)?;
        let y = self.conv2.cached(&y, cache)?;
        y + h
    }
}

/// `WanAttentionBlock`: single-head self-attention within each frame.
struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, dim: usize) -> R<Self> {
        Ok(Self {
            norm: RmsNorm::new(vb.pp("norm"), dim, true)?,
            to_qkv: conv2d(dim, dim * 3, 1, Default::default(), vb.pp("to_qkv"))?,
            proj: conv2d(dim, dim, 1, Default::default(), vb.pp("proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> R<Tensor> {
        let (t, c, h, w) = x.dims4()?;
        let qkv = self.to_qkv.forward(&self.norm.forward(x)?)?;
        // (T, 3C, HW) → (T, HW, 3C)
        let qkv = qkv.reshape((t, 3 * c, h * w))?.transpose(1, 2)?;
        let q = qkv.narrow(2, 0, c)?.contiguous()?;
        let k = qkv.narrow(2, c, c)?.contiguous()?;
        let v = qkv.narrow(2, 2 * c, c)?.contiguous()?;
        let o = crate::attention::sdpa(&q, &k, &v, 1.0 / (c as f64).sqrt())?
            .transpose(1, 2)?
            .reshape((t, c, h, w))?;
        self.proj.forward(&o)? + x
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Up2d,
    Up3d,
    Down2d,
    Down3d,
}

/// `WanResample`.
struct Resample {
    mode: Mode,
    conv: FrameConv,
    time_conv: Option<CausalConv3d>,
}

/// A 3x3 conv2d of the checkpoint as a one-frame [`FrameConv`].
fn conv3x3(vb: VarBuilder, cin: usize, cout: usize, stride: usize, pad: usize) -> R<FrameConv> {
    let w = vb.get((cout, cin, 3, 3), "weight")?.unsqueeze(2)?;
    let b = vb.get(cout, "bias")?;
    FrameConv::new(&w, Some(b), 1, stride, pad)
}

impl Resample {
    fn new(vb: VarBuilder, dim: usize, mode: Mode, up_out: usize) -> R<Self> {
        let (conv, time_conv) = match mode {
            Mode::Up2d | Mode::Up3d => {
                let conv = conv3x3(vb.pp("resample.1"), dim, up_out, 1, 1)?;
                let tc = if mode == Mode::Up3d {
                    Some(CausalConv3d::new(
                        vb.pp("time_conv"),
                        dim,
                        dim * 2,
                        (3, 1, 1),
                        1,
                        (1, 0),
                    )?)
                } else {
                    None
                };
                (conv, tc)
            }
            Mode::Down2d | Mode::Down3d => {
                let conv = conv3x3(vb.pp("resample.1"), dim, dim, 2, 0)?;
                let tc = if mode == Mode::Down3d {
                    Some(CausalConv3d::new(
                        vb.pp("time_conv"),
                        dim,
                        dim,
                        (3, 1, 1),
                        2,
                        (0, 0),
                    )?)
                } else {
                    None
                };
                (conv, tc)
            }
        };
        Ok(Self {
            mode,
            conv,
            time_conv,
        })
    }

    fn forward(&self, x: &Tensor, cache: Option<&mut FeatCache>) -> R<Tensor> {
        let mut x = x.clone();
        let mut cache = cache;
        if self.mode == Mode::Up3d {
            if let Some(cache) = cache.as_deref_mut() {
                let tc = self.time_conv.as_ref().expect("upsample3d has a time conv");
                let (i, prev) = cache.take();
                match prev {
                    Slot::Empty => cache.slots[i] = Slot::Rep,
                    prev => {
                        let t = x.dim(0)?;
                        let mut keep = x.narrow(0, t.saturating_sub(2), t.min(2))?;
                        if keep.dim(0)? < 2 {
                            let front = match &prev {
                                Slot::Frames(p) => p.narrow(0, p.dim(0)? - 1, 1)?,
                                _ => keep.zeros_like()?,
                            };
                            keep = Tensor::cat(&[&front, &keep], 0)?;
                        }
                        let y = match &prev {
                            Slot::Frames(p) => tc.forward(&x, Some(p))?,
                            _ => tc.forward(&x, None)?,
                        };
                        cache.slots[i] = Slot::Frames(keep);
                        // (T, 2C, H, W) → (T, 2, C, H, W) → (2T, C, H, W)
                        let (t, c2, h, w) = y.dims4()?;
                        x = y.reshape((t * 2, c2 / 2, h, w))?;
                    }
                }
            }
        }
        x = match self.mode {
            Mode::Up2d | Mode::Up3d => self.conv.forward(&crate::ops::upsample2x(&x)?)?,
            Mode::Down2d | Mode::Down3d => self
                .conv
                .forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?,
        };
        if self.mode == Mode::Down3d {
            if let Some(cache) = cache {
                let tc = self
                    .time_conv
                    .as_ref()
                    .expect("downsample3d has a time conv");
                let (i, prev) = cache.take();
                match prev {
                    Slot::Frames(p) => {
                        let t = x.dim(0)?;
                        let keep = x.narrow(0, t - 1, 1)?;
                        let last = p.narrow(0, p.dim(0)? - 1, 1)?;
                        x = tc.forward(&Tensor::cat(&[&last, &x], 0)?, None)?;
                        cache.slots[i] = Slot::Frames(keep);
                    }
                    _ => cache.slots[i] = Slot::Frames(x.clone()),
                }
            }
        }
        Ok(x)
    }
}

/// `AvgDown3D` on `(T, C, H, W)`.
struct AvgDown {
    out: usize,
    ft: usize,
    fs: usize,
}

impl AvgDown {
    fn forward(&self, x: &Tensor) -> R<Tensor> {
        let (t, c, h, w) = x.dims4()?;
        let pad = (self.ft - t % self.ft) % self.ft;
        let x = if pad > 0 {
            x.pad_with_zeros(0, pad, 0)?
        } else {
            x.clone()
        };
        let t = t + pad;
        let (ft, fs) = (self.ft, self.fs);
        let factor = ft * fs * fs;
        let group = c * factor / self.out;
        // (T', ft, C, H', fs, W', fs) → (T', C, ft, fs, fs, H', W')
        x.reshape(vec![t / ft, ft, c, h / fs, fs, w / fs, fs])?
            .permute(vec![0, 2, 1, 4, 6, 3, 5])?
            .contiguous()?
            .reshape((t / ft, self.out, group, h / fs, w / fs))?
            .mean(2)
    }
}

/// `DupUp3D` on `(T, C, H, W)`.
struct DupUp {
    out: usize,
    ft: usize,
    fs: usize,
}

impl DupUp {
    fn forward(&self, x: &Tensor, first_chunk: bool) -> R<Tensor> {
        let (t, c, h, w) = x.dims4()?;
        let (ft, fs) = (self.ft, self.fs);
        let repeats = self.out * ft * fs * fs / c;
        let x = x
            .unsqueeze(2)?
            .broadcast_as((t, c, repeats, h, w))?
            .contiguous()?
            .reshape(vec![t, self.out, ft, fs, fs, h, w])?
            // → (T, ft, out, H, fs, W, fs)
            .permute(vec![0, 2, 1, 5, 3, 6, 4])?
            .contiguous()?
            .reshape((t * ft, self.out, h * fs, w * fs))?;
        if first_chunk && ft > 1 {
            x.narrow(0, ft - 1, t * ft - (ft - 1))
        } else {
            Ok(x)
        }
    }
}

enum EncLayer {
    Res(ResidualBlock),
    Attn(AttentionBlock),
    Resample(Resample),
    /// Wan 2.2's `WanResidualDownBlock`.
    ResDown {
        resnets: Vec<ResidualBlock>,
        down: Option<Resample>,
        avg: AvgDown,
    },
}

struct MidBlock {
    res0: ResidualBlock,
    attn: AttentionBlock,
    res1: ResidualBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, dim: usize) -> R<Self> {
        Ok(Self {
            res0: ResidualBlock::new(vb.pp("resnets.0"), dim, dim)?,
            attn: AttentionBlock::new(vb.pp("attentions.0"), dim)?,
            res1: ResidualBlock::new(vb.pp("resnets.1"), dim, dim)?,
        })
    }

    fn forward(&self, x: &Tensor, mut cache: Option<&mut FeatCache>) -> R<Tensor> {
        let x = self.res0.forward(x, cache.as_deref_mut())?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x, cache)
    }
}

struct Encoder {
    conv_in: CausalConv3d,
    layers: Vec<EncLayer>,
    mid: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    fn new(vb: VarBuilder, c: &WanVaeConfig) -> R<Self> {
        let dim = c.base_dim;
        let dims: Vec<usize> = std::iter::once(1)
            .chain(c.dim_mult.iter().copied())
            .map(|u| dim * u)
            .collect();
        let conv_in = CausalConv3d::new(
            vb.pp("conv_in"),
            c.in_channels,
            dims[0],
            (3, 3, 3),
            1,
            (1, 1),
        )?;
        let mut layers = Vec::new();
        let mut scale = 1.0f64;
        let last = c.dim_mult.len() - 1;
        let mut k = 0;
        for i in 0..c.dim_mult.len() {
            let (mut cin, cout) = (dims[i], dims[i + 1]);
            let down = vb.pp("down_blocks");
            if c.is_residual {
                let b = down.pp(k);
                k += 1;
                let td = i != last && c.temperal_downsample[i];
                let mut resnets = Vec::new();
                for j in 0..c.num_res_blocks {
                    resnets.push(ResidualBlock::new(b.pp(format!("resnets.{j}")), cin, cout)?);
                    cin = cout;
                }
                let down = if i != last {
                    let mode = if td { Mode::Down3d } else { Mode::Down2d };
                    Some(Resample::new(b.pp("downsampler"), cout, mode, cout)?)
                } else {
                    None
                };
                layers.push(EncLayer::ResDown {
                    resnets,
                    down,
                    avg: AvgDown {
                        out: cout,
                        ft: if td { 2 } else { 1 },
                        fs: if i != last { 2 } else { 1 },
                    },
                });
            } else {
                for _ in 0..c.num_res_blocks {
                    layers.push(EncLayer::Res(ResidualBlock::new(down.pp(k), cin, cout)?));
                    k += 1;
                    if c.attn_scales.contains(&scale) {
                        layers.push(EncLayer::Attn(AttentionBlock::new(down.pp(k), cout)?));
                        k += 1;
                    }
                    cin = cout;
                }
                if i != last {
                    let mode = if c.temperal_downsample[i] {
                        Mode::Down3d
                    } else {
                        Mode::Down2d
                    };
                    layers.push(EncLayer::Resample(Resample::new(
                        down.pp(k),
                        cout,
                        mode,
                        cout,
                    )?));
                    k += 1;
                    scale /= 2.0;
                }
            }
        }
        let out = *dims.last().expect("dims");
        Ok(Self {
            conv_in,
            layers,
            mid: MidBlock::new(vb.pp("mid_block"), out)?,
            norm_out: RmsNorm::new(vb.pp("norm_out"), out, false)?,
            conv_out: CausalConv3d::new(vb.pp("conv_out"), out, c.z_dim * 2, (3, 3, 3), 1, (1, 1))?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> R<Tensor> {
        let mut x = self.conv_in.cached(x, Some(cache))?;
        for layer in &self.layers {
            x = match layer {
                EncLayer::Res(r) => r.forward(&x, Some(cache))?,
                EncLayer::Attn(a) => a.forward(&x)?,
                EncLayer::Resample(r) => r.forward(&x, Some(cache))?,
                EncLayer::ResDown { resnets, down, avg } => {
                    let copy = x.clone();
                    let mut y = x;
                    for r in resnets {
                        y = r.forward(&y, Some(cache))?;
                    }
                    if let Some(d) = down {
                        y = d.forward(&y, Some(cache))?;
                    }
                    (y + avg.forward(&copy)?)?
                }
            };
        }
        let x = self.mid.forward(&x, Some(cache))?;
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.cached(&x, Some(cache))
    }
}

struct UpBlock {
    resnets: Vec<ResidualBlock>,
    up: Option<Resample>,
    dup: Option<DupUp>,
}

struct Decoder {
    conv_in: CausalConv3d,
    mid: MidBlock,
    ups: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    fn new(vb: VarBuilder, c: &WanVaeConfig) -> R<Self> {
        let dim = c.decoder_base_dim.unwrap_or(c.base_dim);
        let mult = &c.dim_mult;
        let dims: Vec<usize> = std::iter::once(*mult.last().expect("dim_mult"))
            .chain(mult.iter().rev().copied())
            .map(|u| dim * u)
            .collect();
        let temporal_up: Vec<bool> = c.temperal_downsample.iter().rev().copied().collect();
        let conv_in = CausalConv3d::new(vb.pp("conv_in"), c.z_dim, dims[0], (3, 3, 3), 1, (1, 1))?;
        let mid = MidBlock::new(vb.pp("mid_block"), dims[0])?;
        let mut ups = Vec::new();
        let last = mult.len() - 1;
        for i in 0..mult.len() {
            let (mut cin, cout) = (dims[i], dims[i + 1]);
            if i > 0 && !c.is_residual {
                cin /= 2;
            }
            let b = vb.pp(format!("up_blocks.{i}"));
            let up_flag = i != last;
            let tu = up_flag && temporal_up[i];
            let mut resnets = Vec::new();
            let mut cur = cin;
            for j in 0..=c.num_res_blocks {
                resnets.push(ResidualBlock::new(b.pp(format!("resnets.{j}")), cur, cout)?);
                cur = cout;
            }
            let mode = if tu { Mode::Up3d } else { Mode::Up2d };
            let (up, dup) = match (up_flag, c.is_residual) {
                (false, _) => (None, None),
                (true, true) => (
                    Some(Resample::new(b.pp("upsampler"), cout, mode, cout)?),
                    Some(DupUp {
                        out: cout,
                        ft: if tu { 2 } else { 1 },
                        fs: 2,
                    }),
                ),
                (true, false) => (
                    Some(Resample::new(b.pp("upsamplers.0"), cout, mode, cout / 2)?),
                    None,
                ),
            };
            ups.push(UpBlock { resnets, up, dup });
        }
        let out = *dims.last().expect("dims");
        Ok(Self {
            conv_in,
            mid,
            ups,
            norm_out: RmsNorm::new(vb.pp("norm_out"), out, false)?,
            conv_out: CausalConv3d::new(
                vb.pp("conv_out"),
                out,
                c.out_channels,
                (3, 3, 3),
                1,
                (1, 1),
            )?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache, first_chunk: bool) -> R<Tensor> {
        let x = self.conv_in.cached(x, Some(cache))?;
        let mut x = self.mid.forward(&x, Some(cache))?;
        for up in &self.ups {
            let copy = x.clone();
            for r in &up.resnets {
                x = r.forward(&x, Some(cache))?;
            }
            if let Some(u) = &up.up {
                x = u.forward(&x, Some(cache))?;
            }
            if let Some(d) = &up.dup {
                x = (x + d.forward(&copy, first_chunk)?)?;
            }
        }
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.cached(&x, Some(cache))
    }
}

/// The Wan VAE.
pub struct WanVae {
    pub config: WanVaeConfig,
    encoder: Option<Encoder>,
    decoder: Decoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    mean: Tensor,
    std: Tensor,
}

impl WanVae {
    /// Loads the decoder, and the encoder when `with_encoder` (image-to-video
    /// encodes the first frame).
    pub fn new(
        vb: VarBuilder,
        config: &WanVaeConfig,
        with_encoder: bool,
    ) -> Result<Self, ModelError> {
        config.check()?;
        let z = config.z_dim;
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let col = |v: &[f64]| -> R<Tensor> {
            Tensor::from_vec(
                v.iter().map(|x| *x as f32).collect::<Vec<_>>(),
                (1, z, 1, 1),
                &device,
            )?
            .to_dtype(dtype)
        };
        Ok(Self {
            encoder: if with_encoder {
                Some(Encoder::new(vb.pp("encoder"), config)?)
            } else {
                None
            },
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv: CausalConv3d::new(vb.pp("quant_conv"), z * 2, z * 2, (1, 1, 1), 1, (0, 0))?,
            post_quant_conv: CausalConv3d::new(
                vb.pp("post_quant_conv"),
                z,
                z,
                (1, 1, 1),
                1,
                (0, 0),
            )?,
            mean: col(&config.latents_mean)?,
            std: col(&config.latents_std)?,
            config: config.clone(),
        })
    }

    fn patch(&self) -> usize {
        self.config.patch_size.unwrap_or(1)
    }

    /// Normalised latents `(C, F, H, W)` (as the transformer sees them) →
    /// frames, calling `emit` with each chunk's frames `(t, 3, H, W)` in
    /// [-1, 1] as soon as it is decoded: one latent frame at a time.
    pub fn decode(
        &self,
        latents: &Tensor,
        mut emit: impl FnMut(Tensor) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let dtype = self.mean.dtype();
        // (C, F, H, W) → (F, C, H, W), then x / (1/std) + mean.
        let z = latents
            .to_dtype(dtype)?
            .permute((1, 0, 2, 3))?
            .contiguous()?;
        let z = z.broadcast_mul(&self.std)?.broadcast_add(&self.mean)?;
        let x = self.post_quant_conv.forward(&z, None)?;
        let mut cache = FeatCache::new();
        for i in 0..x.dim(0)? {
            cache.start_chunk();
            let out = self
                .decoder
                .forward(&x.narrow(0, i, 1)?, &mut cache, i == 0)?;
            let out = unpatchify(&out, self.patch())?.clamp(-1.0, 1.0)?;
            emit(out.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// Frames `(T, 3, H, W)` in [-1, 1] → normalised latents `(C, F', H', W')`
    /// (the posterior's mean, diffusers' `sample_mode="argmax"`).
    pub fn encode(&self, frames: &Tensor) -> Result<Tensor, ModelError> {
        let enc = self
            .encoder
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("this VAE was loaded without its encoder".into()))?;
        let x = patchify(&frames.to_dtype(self.mean.dtype())?, self.patch())?;
        let t = x.dim(0)?;
        let mut cache = FeatCache::new();
        let mut outs = Vec::new();
        let chunks = 1 + (t - 1) / 4;
        for i in 0..chunks {
            cache.start_chunk();
            let part = if i == 0 {
                x.narrow(0, 0, 1)?
            } else {
                let start = 1 + 4 * (i - 1);
                x.narrow(0, start, 4.min(t - start))?
            };
            outs.push(enc.forward(&part, &mut cache)?);
        }
        let h = self.quant_conv.forward(&Tensor::cat(&outs, 0)?, None)?;
        let mu = h.narrow(1, 0, self.config.z_dim)?;
        let normed = mu.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?;
        Ok(normed
            .permute((1, 0, 2, 3))?
            .contiguous()?
            .to_dtype(DType::F32)?)
    }
}

/// diffusers' `patchify` on `(T, C, H, W)`: channel = c·p² + q_w·p + q_h.
fn patchify(x: &Tensor, p: usize) -> R<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (t, c, h, w) = x.dims4()?;
    x.reshape(vec![t, c, h / p, p, w / p, p])?
        .permute(vec![0, 1, 5, 3, 2, 4])?
        .contiguous()?
        .reshape((t, c * p * p, h / p, w / p))
}

/// The inverse of [`patchify`].
fn unpatchify(x: &Tensor, p: usize) -> R<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (t, cp, h, w) = x.dims4()?;
    let c = cp / (p * p);
    x.reshape(vec![t, c, p, p, h, w])?
        .permute(vec![0, 1, 4, 3, 5, 2])?
        .contiguous()?
        .reshape((t, c, h * p, w * p))
}
