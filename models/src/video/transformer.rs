//! diffusers' `WanTransformer3DModel` (`transformer_wan.py`): patch
//! embedding, 3-D rotary positions, the time/text condition embedder,
//! DiT blocks with adaptive-LayerNorm modulation, self-attention with
//! RMS-normed queries and keys, text cross-attention, GELU-tanh
//! feed-forward, and the output projection back to latent patches.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{layer_norm, linear, LayerNorm, LayerNormConfig, Linear, VarBuilder};

use super::config::TransformerConfig;
use crate::ModelError;

/// LayerNorm computed in f32 (diffusers' FP32LayerNorm), optionally affine.
struct Fp32LayerNorm {
    affine: Option<LayerNorm>,
    eps: f64,
}

impl Fp32LayerNorm {
    fn plain(eps: f64) -> Self {
        Self { affine: None, eps }
    }

    fn affine(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        let cfg = LayerNormConfig {
            eps,
            ..Default::default()
        };
        Ok(Self {
            affine: Some(layer_norm(dim, cfg, vb)?),
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let y = match &self.affine {
            Some(ln) => ln.forward(&xf)?,
            None => {
                let mean = xf.mean_keepdim(D::Minus1)?;
                let c = xf.broadcast_sub(&mean)?;
                let var = c.sqr()?.mean_keepdim(D::Minus1)?;
                c.broadcast_div(&(var + self.eps)?.sqrt()?)?
            }
        };
        y.to_dtype(dtype)
    }
}

/// torch.nn.RMSNorm over the last dimension, with a weight.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }
}

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, dim: usize, heads: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            to_q: linear(dim, dim, vb.pp("to_q"))?,
            to_k: linear(dim, dim, vb.pp("to_k"))?,
            to_v: linear(dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            norm_q: RmsNorm::new(vb.pp("norm_q"), dim, eps)?,
            norm_k: RmsNorm::new(vb.pp("norm_k"), dim, eps)?,
            heads,
            head_dim: dim / heads,
        })
    }

    /// `x` (b, n, dim) attends to `context` (b, m, dim) or itself; rotary
    /// (cos, sin) `(n, head_dim/2)` on queries and keys for self-attention.
    fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        rope: Option<&(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let ctx = context.unwrap_or(x);
        let m = ctx.dim(1)?;
        let q = self.norm_q.forward(&self.to_q.forward(x)?)?;
        let k = self.norm_k.forward(&self.to_k.forward(ctx)?)?;
        let v = self.to_v.forward(ctx)?;
        let heads = |t: Tensor, len: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, len, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let mut q = heads(q, n)?;
        let mut k = heads(k, m)?;
        let v = heads(v, m)?;
        if let Some((cos, sin)) = rope {
            q = candle_nn::rotary_emb::rope_i(&q, cos, sin)?;
            k = candle_nn::rotary_emb::rope_i(&k, cos, sin)?;
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = crate::attention::sdpa(&q, &k, &v, scale)?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?;
        self.to_out.forward(&out)
    }
}

struct Block {
    norm1: Fp32LayerNorm,
    attn1: Attention,
    norm2: Option<Fp32LayerNorm>,
    attn2: Attention,
    ffn_in: Linear,
    ffn_out: Linear,
    norm3: Fp32LayerNorm,
    /// (1, 6, dim)
    scale_shift_table: Tensor,
}

impl Block {
    fn new(vb: VarBuilder, c: &TransformerConfig) -> candle_core::Result<Self> {
        let dim = c.inner_dim();
        Ok(Self {
            norm1: Fp32LayerNorm::plain(c.eps),
            attn1: Attention::new(vb.pp("attn1"), dim, c.num_attention_heads, c.eps)?,
            norm2: if c.cross_attn_norm {
                Some(Fp32LayerNorm::affine(vb.pp("norm2"), dim, c.eps)?)
            } else {
                None
            },
            attn2: Attention::new(vb.pp("attn2"), dim, c.num_attention_heads, c.eps)?,
            ffn_in: linear(dim, c.ffn_dim, vb.pp("ffn.net.0.proj"))?,
            ffn_out: linear(c.ffn_dim, dim, vb.pp("ffn.net.2"))?,
            norm3: Fp32LayerNorm::plain(c.eps),
            scale_shift_table: vb.get((1, 6, dim), "scale_shift_table")?,
        })
    }

    /// `modulation` is `(t, 6, dim)`: one row per token (t = n) or one for
    /// all (t = 1).
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        modulation: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        let m = modulation.broadcast_add(&self.scale_shift_table)?;
        let part = |i: usize| m.narrow(1, i, 1).and_then(|t| t.squeeze(1)); // (t, dim)
        let (shift, scale, gate) = (part(0)?, part(1)?, part(2)?);
        let (c_shift, c_scale, c_gate) = (part(3)?, part(4)?, part(5)?);
        let modulate =
            |h: &Tensor, shift: &Tensor, scale: &Tensor| -> candle_core::Result<Tensor> {
                h.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
            };
        let h = modulate(&self.norm1.forward(x)?, &shift, &scale)?;
        let a = self.attn1.forward(&h, None, Some(rope))?;
        let x = (x + a.broadcast_mul(&gate)?)?;
        let h = match &self.norm2 {
            Some(n) => n.forward(&x)?,
            None => x.clone(),
        };
        let a = self.attn2.forward(&h, Some(context), None)?;
        let x = (x + a)?;
        let h = modulate(&self.norm3.forward(&x)?, &c_shift, &c_scale)?;
        let f = self.ffn_out.forward(&self.ffn_in.forward(&h)?.gelu()?)?;
        x + f.broadcast_mul(&c_gate)?
    }
}

/// The Wan DiT.
pub struct WanTransformer {
    pub config: TransformerConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    time_1: Linear,
    time_2: Linear,
    time_proj: Linear,
    text_1: Linear,
    text_2: Linear,
    blocks: Vec<Block>,
    norm_out: Fp32LayerNorm,
    proj_out: Linear,
    /// (1, 2, dim)
    scale_shift_table: Tensor,
    /// (rope_max_seq_len, head_dim) cos and sin tables, each axis's part
    /// side by side (repeat-interleaved, as diffusers keeps them).
    freqs_cos: Tensor,
    freqs_sin: Tensor,
}

impl WanTransformer {
    pub fn new(vb: VarBuilder, config: &TransformerConfig) -> Result<Self, ModelError> {
        config.check()?;
        let c = config;
        let dim = c.inner_dim();
        let [pt, ph, pw] = c.patch_size;
        let patch = pt * ph * pw;
        let ce = vb.pp("condition_embedder");
        let patch_weight = vb
            .get((dim, c.in_channels, pt, ph, pw), "patch_embedding.weight")?
            .reshape((dim, c.in_channels * patch))?
            .t()?
            .contiguous()?;
        let blocks = (0..c.num_layers)
            .map(|i| Block::new(vb.pp(format!("blocks.{i}")), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (freqs_cos, freqs_sin) = rope_tables(c, vb.device())?;
        Ok(Self {
            config: c.clone(),
            patch_weight,
            patch_bias: vb.get(dim, "patch_embedding.bias")?,
            time_1: linear(c.freq_dim, dim, ce.pp("time_embedder.linear_1"))?,
            time_2: linear(dim, dim, ce.pp("time_embedder.linear_2"))?,
            time_proj: linear(dim, dim * 6, ce.pp("time_proj"))?,
            text_1: linear(c.text_dim, dim, ce.pp("text_embedder.linear_1"))?,
            text_2: linear(dim, dim, ce.pp("text_embedder.linear_2"))?,
            blocks,
            norm_out: Fp32LayerNorm::plain(c.eps),
            proj_out: linear(dim, c.out_channels() * patch, vb.pp("proj_out"))?,
            scale_shift_table: vb.get((1, 2, dim), "scale_shift_table")?,
            freqs_cos,
            freqs_sin,
        })
    }

    /// Sinusoidal timestep features (diffusers' `Timesteps` with
    /// flip_sin_to_cos and no shift): `(n, freq_dim)`.
    fn timestep_features(&self, t: &[f32], device: &Device) -> candle_core::Result<Tensor> {
        let half = self.config.freq_dim / 2;
        let mut v = Vec::with_capacity(t.len() * half * 2);
        for &ts in t {
            let args: Vec<f32> = (0..half)
                .map(|i| {
                    let e = (-(10000f32.ln()) * i as f32 / half as f32).exp();
                    ts * e
                })
                .collect();
            v.extend(args.iter().map(|a| a.cos()));
            v.extend(args.iter().map(|a| a.sin()));
        }
        Tensor::from_vec(v, (t.len(), half * 2), device)
    }

    /// The rotary (cos, sin) of every token, `(n, head_dim/2)` each: each
    /// axis's columns of the tables at the token's position, side by side,
    /// then every other column (diffusers' `freqs[..., 0::2]`).
    fn rope(&self, frames: usize, h: usize, w: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let d = self.config.attention_head_dim;
        let sizes = [d - 2 * (d / 3), d / 3, d / 3];
        let n = frames * h * w;
        let build = |table: &Tensor| -> candle_core::Result<Tensor> {
            let mut parts = Vec::new();
            let mut offset = 0;
            for (axis, (&size, len)) in sizes.iter().zip([frames, h, w]).enumerate() {
                let t = table.narrow(1, offset, size)?.narrow(0, 0, len)?;
                let shape = match axis {
                    0 => (len, 1, 1, size),
                    1 => (1, len, 1, size),
                    _ => (1, 1, len, size),
                };
                parts.push(
                    t.reshape(shape)?
                        .broadcast_as((frames, h, w, size))?
                        .contiguous()?,
                );
                offset += size;
            }
            Tensor::cat(&parts, 3)?
                .reshape((n, d / 2, 2))?
                .narrow(2, 0, 1)?
                .squeeze(2)?
                .contiguous()
        };
        Ok((build(&self.freqs_cos)?, build(&self.freqs_sin)?))
    }

    /// Projects the text encoder's states `(b, m, text_dim)` once per run
    /// (the condition embedder's text half).
    pub fn embed_text(&self, states: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.text_1.forward(states)?.gelu()?;
        self.text_2.forward(&h)
    }

    /// One denoising call. `latents` `(C, F, H, W)` (one video), `context`
    /// from [`Self::embed_text`] `(1, m, dim)`, `timesteps` one value per
    /// latent frame (equal for text-to-video; the first 0 for TI2V's
    /// given first frame). Returns the flow prediction `(C_out, F, H, W)`.
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let (ch, f, h, w) = latents.dims4()?;
        let [pt, ph, pw] = c.patch_size;
        if f % pt != 0 || h % ph != 0 || w % pw != 0 {
            return Err(ModelError::Invalid(format!(
                "latents {f}x{h}x{w} do not divide into {pt}x{ph}x{pw} patches"
            )));
        }
        let (fp, hp, wp) = (f / pt, h / ph, w / pw);
        if fp.max(hp).max(wp) > c.rope_max_seq_len {
            return Err(ModelError::Invalid(format!(
                "{fp}x{hp}x{wp} patches exceed rope_max_seq_len {}",
                c.rope_max_seq_len
            )));
        }
        if timesteps.len() != f {
            return Err(ModelError::Invalid(format!(
                "{} timesteps for {f} latent frames",
                timesteps.len()
            )));
        }
        let dtype = self.patch_bias.dtype();
        let device = latents.device();
        let n = fp * hp * wp;
        let dim = c.inner_dim();
        // Patchify: (C, F', pt, H', ph, W', pw) → (F', H', W', C, pt, ph, pw).
        let x = latents
            .to_dtype(dtype)?
            .reshape(vec![ch, fp, pt, hp, ph, wp, pw])?
            .permute(vec![1, 3, 5, 0, 2, 4, 6])?
            .contiguous()?
            .reshape((n, ch * pt * ph * pw))?;
        let x = x
            .matmul(&self.patch_weight)?
            .broadcast_add(&self.patch_bias)?
            .unsqueeze(0)?;
        let rope = self.rope(fp, hp, wp)?;
        let rope = (rope.0.to_dtype(dtype)?, rope.1.to_dtype(dtype)?);

        // Time embeddings: one per distinct timestep, gathered per token.
        let mut distinct: Vec<f32> = Vec::new();
        let mut frame_of: Vec<u32> = Vec::with_capacity(fp);
        for i in 0..fp {
            let t = timesteps[i * pt];
            let k = match distinct.iter().position(|d| *d == t) {
                Some(k) => k,
                None => {
                    distinct.push(t);
                    distinct.len() - 1
                }
            };
            frame_of.push(k as u32);
        }
        let feats = self.timestep_features(&distinct, device)?;
        // The time embedder stays in f32 (diffusers keeps it there).
        let temb = self
            .time_2
            .forward(
                &self
                    .time_1
                    .forward(&feats.to_dtype(self.time_1.weight().dtype())?)?
                    .silu()?,
            )?
            .to_dtype(DType::F32)?;
        let proj = self
            .time_proj
            .forward(&temb.to_dtype(dtype)?.silu()?)?
            .to_dtype(DType::F32)?
            .reshape((distinct.len(), 6, dim))?;
        let (temb, proj) = if distinct.len() == 1 {
            (temb, proj)
        } else {
            let idx: Vec<u32> = frame_of
                .iter()
                .flat_map(|k| std::iter::repeat_n(*k, hp * wp))
                .collect();
            let idx = Tensor::from_vec(idx, n, device)?;
            (temb.index_select(&idx, 0)?, proj.index_select(&idx, 0)?)
        };
        let proj = proj.to_dtype(dtype)?;

        let mut x = x;
        for b in &self.blocks {
            x = b.forward(&x, context, &proj, &rope)?;
        }
        // Output modulation from the un-projected time embedding.
        let table = self.scale_shift_table.to_dtype(DType::F32)?;
        let ss = temb.unsqueeze(1)?.broadcast_add(&table)?; // (t, 2, dim)
        let shift = ss.narrow(1, 0, 1)?.squeeze(1)?.to_dtype(dtype)?;
        let scale = ss.narrow(1, 1, 1)?.squeeze(1)?.to_dtype(dtype)?;
        let x = self
            .norm_out
            .forward(&x)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(&shift)?;
        let x = self.proj_out.forward(&x)?; // (1, n, C_out * patch)
        let co = c.out_channels();
        let out = x
            .reshape(vec![fp, hp, wp, pt, ph, pw, co])?
            .permute(vec![6, 0, 3, 1, 4, 2, 5])?
            .contiguous()?
            .reshape((co, f, h, w))?;
        Ok(out.to_dtype(DType::F32)?)
    }
}

/// diffusers' `WanRotaryPosEmbed` tables: for the time, height and width
/// axes `get_1d_rotary_pos_embed(dim, max_len, 10000, use_real=True,
/// repeat_interleave_real=True)` in float64, side by side, then f32.
fn rope_tables(c: &TransformerConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let d = c.attention_head_dim;
    let hw = 2 * (d / 6);
    let td = d - 2 * hw;
    let len = c.rope_max_seq_len;
    let mut cos = vec![0f32; len * d];
    let mut sin = vec![0f32; len * d];
    let mut offset = 0;
    for dim in [td, hw, hw] {
        for pos in 0..len {
            for i in 0..dim / 2 {
                let freq = 1.0 / 10000f64.powf((2 * i) as f64 / dim as f64);
                let a = pos as f64 * freq;
                for j in 0..2 {
                    cos[pos * d + offset + 2 * i + j] = a.cos() as f32;
                    sin[pos * d + offset + 2 * i + j] = a.sin() as f32;
                }
            }
        }
        offset += dim;
    }
    Ok((
        Tensor::from_vec(cos, (len, d), device)?,
        Tensor::from_vec(sin, (len, d), device)?,
    ))
}
