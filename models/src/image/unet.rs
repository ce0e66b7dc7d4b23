//! The conditional UNet, following diffusers' `unet_2d_condition.py`
//! (`UNet2DConditionModel`) with candle-transformers' blocks (its
//! `unet_2d_blocks`, the same structure as diffusers' `unet_2d_blocks.py`).
//! The top level is ours because candle's lacks SDXL's added conditioning
//! (`addition_embed_type: "text_time"`: pooled text embedding and
//! size/crop ids through `add_time_proj` and `add_embedding`) and takes its
//! sizes from presets instead of `unet/config.json`.

use candle_core::{Module, Result, Tensor};
use candle_nn as nn;
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::*;

use super::config::UNetConfig;
use crate::ModelError;

enum Down {
    Basic(DownBlock2D),
    CrossAttn(CrossAttnDownBlock2D),
}

enum Up {
    Basic(UpBlock2D),
    CrossAttn(CrossAttnUpBlock2D),
}

/// SDXL's extra conditioning.
struct AddedCond {
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
}

pub struct UNet {
    conv_in: nn::Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    added: Option<AddedCond>,
    down_blocks: Vec<Down>,
    mid_block: UNetMidBlock2DCrossAttn,
    up_blocks: Vec<Up>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2d,
    n_blocks: usize,
    pub config: UNetConfig,
}

impl UNet {
    pub fn new(vs: nn::VarBuilder, config: UNetConfig) -> std::result::Result<Self, ModelError> {
        config.check()?;
        let c = &config;
        let n = c.block_out_channels.len();
        let heads = c.heads()?;
        let layers = c.transformer_layers()?;
        let cross = c.cross_attention_dim();
        let per_block = c.layers_per_block();
        let ch0 = c.block_out_channels[0];
        let time_embed_dim = ch0 * 4;
        let conv3 = nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = nn::conv2d(c.in_channels, ch0, 3, conv3, vs.pp("conv_in"))?;
        let time_proj = Timesteps::new(ch0, c.flip_sin_to_cos, c.freq_shift);
        let time_embedding = TimestepEmbedding::new(vs.pp("time_embedding"), ch0, time_embed_dim)?;
        let added = match c.addition_embed_type.as_deref() {
            Some("text_time") => {
                let dim = c.addition_time_embed_dim.unwrap_or_default();
                let input = c.projection_class_embeddings_input_dim.unwrap_or_default();
                Some(AddedCond {
                    add_time_proj: Timesteps::new(dim, c.flip_sin_to_cos, c.freq_shift),
                    add_embedding: TimestepEmbedding::new(
                        vs.pp("add_embedding"),
                        input,
                        time_embed_dim,
                    )?,
                })
            }
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out = ch0;
        for i in 0..n {
            let input = out;
            out = c.block_out_channels[i];
            let cfg = DownBlock2DConfig {
                num_layers: per_block,
                resnet_eps: c.norm_eps,
                resnet_groups: c.norm_num_groups,
                add_downsample: i + 1 < n,
                downsample_padding: c.downsample_padding,
                ..Default::default()
            };
            let vb = vs.pp("down_blocks").pp(i);
            down_blocks.push(if c.down_block_types[i] == "CrossAttnDownBlock2D" {
                Down::CrossAttn(CrossAttnDownBlock2D::new(
                    vb,
                    input,
                    out,
                    Some(time_embed_dim),
                    false,
                    CrossAttnDownBlock2DConfig {
                        downblock: cfg,
                        attn_num_head_channels: heads[i],
                        cross_attention_dim: cross,
                        sliced_attention_size: None,
                        use_linear_projection: c.use_linear_projection,
                        transformer_layers_per_block: layers[i],
                    },
                )?)
            } else {
                Down::Basic(DownBlock2D::new(vb, input, out, Some(time_embed_dim), cfg)?)
            });
        }

        let last = c.block_out_channels[n - 1];
        let mid_block = UNetMidBlock2DCrossAttn::new(
            vs.pp("mid_block"),
            last,
            Some(time_embed_dim),
            false,
            UNetMidBlock2DCrossAttnConfig {
                resnet_eps: c.norm_eps,
                output_scale_factor: c.mid_block_scale_factor,
                cross_attn_dim: cross,
                attn_num_head_channels: heads[n - 1],
                resnet_groups: Some(c.norm_num_groups),
                use_linear_projection: c.use_linear_projection,
                transformer_layers_per_block: layers[n - 1],
                ..Default::default()
            },
        )?;

        let mut up_blocks = Vec::with_capacity(n);
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut out = rev[0];
        for i in 0..n {
            let prev = out;
            out = rev[i];
            let input = rev[(i + 1).min(n - 1)];
            let block = n - 1 - i;
            let cfg = UpBlock2DConfig {
                num_layers: per_block + 1,
                resnet_eps: c.norm_eps,
                resnet_groups: c.norm_num_groups,
                add_upsample: i + 1 < n,
                ..Default::default()
            };
            let vb = vs.pp("up_blocks").pp(i);
            up_blocks.push(if c.up_block_types[i] == "CrossAttnUpBlock2D" {
                Up::CrossAttn(CrossAttnUpBlock2D::new(
                    vb,
                    input,
                    prev,
                    out,
                    Some(time_embed_dim),
                    false,
                    CrossAttnUpBlock2DConfig {
                        upblock: cfg,
                        attn_num_head_channels: heads[block],
                        cross_attention_dim: cross,
                        sliced_attention_size: None,
                        use_linear_projection: c.use_linear_projection,
                        transformer_layers_per_block: layers[block],
                    },
                )?)
            } else {
                Up::Basic(UpBlock2D::new(
                    vb,
                    input,
                    prev,
                    out,
                    Some(time_embed_dim),
                    cfg,
                )?)
            });
        }

        let conv_norm_out =
            nn::group_norm(c.norm_num_groups, ch0, c.norm_eps, vs.pp("conv_norm_out"))?;
        let conv_out = nn::conv2d(ch0, c.out_channels, 3, conv3, vs.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            added,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            n_blocks: n,
            config,
        })
    }

    /// Whether this UNet takes SDXL's added conditioning.
    pub fn wants_added_cond(&self) -> bool {
        self.added.is_some()
    }

    /// One denoising pass. `added`: SDXL's `(text_embeds [b, d],
    /// time_ids [b, 6])`.
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let device = xs.device();
        let up_factor = 1usize << (self.n_blocks - 1);
        let forward_upsample_size = h % up_factor != 0 || w % up_factor != 0;
        let xs = if self.config.center_input_sample {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs.clone()
        };
        // 1. time
        let t = (Tensor::ones(b, candle_core::DType::F32, device)? * timestep)?;
        let emb = self.time_proj.forward(&t)?.to_dtype(xs.dtype())?;
        let mut emb = self.time_embedding.forward(&emb)?;
        if let Some(a) = &self.added {
            let (text_embeds, time_ids) = added.ok_or_else(|| {
                candle_core::Error::Msg("this UNet needs text_embeds and time_ids".into())
            })?;
            let ids = time_ids.flatten_all()?.to_dtype(candle_core::DType::F32)?;
            let time_embeds = a
                .add_time_proj
                .forward(&ids)?
                .reshape((b, ()))?
                .to_dtype(xs.dtype())?;
            let add = Tensor::cat(&[text_embeds, &time_embeds], 1)?;
            emb = (emb + a.add_embedding.forward(&add)?)?;
        }
        // 2. pre-process
        let xs = self.conv_in.forward(&xs)?;
        // 3. down
        let mut res = vec![xs.clone()];
        let mut xs = xs;
        for block in &self.down_blocks {
            let (next, r) = match block {
                Down::Basic(b) => b.forward(&xs, Some(&emb))?,
                Down::CrossAttn(b) => b.forward(&xs, Some(&emb), Some(encoder_hidden_states))?,
            };
            res.extend(r);
            xs = next;
        }
        // 4. mid
        let mut xs = self
            .mid_block
            .forward(&xs, Some(&emb), Some(encoder_hidden_states))?;
        // 5. up
        let mut upsample_size = None;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let n_res = match block {
                Up::Basic(b) => b.resnets.len(),
                Up::CrossAttn(b) => b.upblock.resnets.len(),
            };
            let r = res.split_off(res.len() - n_res);
            if i + 1 < self.n_blocks && forward_upsample_size {
                let (_, _, h, w) = res.last().expect("a skip connection").dims4()?;
                upsample_size = Some((h, w));
            }
            xs = match block {
                Up::Basic(b) => b.forward(&xs, &r, Some(&emb), upsample_size)?,
                Up::CrossAttn(b) => b.forward(
                    &xs,
                    &r,
                    Some(&emb),
                    upsample_size,
                    Some(encoder_hidden_states),
                )?,
            };
        }
        // 6. post-process
        let xs = nn::ops::silu(&self.conv_norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}
