//! The conditional UNet, following diffusers' `unet_2d_condition.py`
//! (`UNet2DConditionModel`) with our blocks ([`super::blocks`], diffusers'
//! `unet_2d_blocks.py` with every convolution a [`crate::conv::FrameConv`]).
//! The whole model is ours because candle's lacks SDXL's added conditioning
//! (`addition_embed_type: "text_time"`: pooled text embedding and
//! size/crop ids through `add_time_proj` and `add_embedding`), takes its
//! sizes from presets instead of `unet/config.json`, and convolves through
//! candle's CPU conv2d.

use candle_core::{Module, Result, Tensor};
use candle_nn as nn;
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};

use super::blocks::{conv2d, AttnCfg, DownBlock, GroupNorm, MidBlockCrossAttn, ResnetCfg, UpBlock};
use super::config::UNetConfig;
use crate::conv::FrameConv;
use crate::ModelError;

/// SDXL's extra conditioning.
struct AddedCond {
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
}

pub struct UNet {
    conv_in: FrameConv,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    added: Option<AddedCond>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlockCrossAttn,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: FrameConv,
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
        let conv_in = conv2d(vs.pp("conv_in"), c.in_channels, ch0, 3, 1, 1)?;
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
        let resnet = ResnetCfg {
            eps: c.norm_eps,
            groups: c.norm_num_groups,
            temb_channels: Some(time_embed_dim),
            output_scale_factor: 1.0,
        };
        let attn = |i: usize| AttnCfg {
            heads: heads[i],
            cross_attention_dim: cross,
            use_linear_projection: c.use_linear_projection,
            layers: layers[i],
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out = ch0;
        for i in 0..n {
            let input = out;
            out = c.block_out_channels[i];
            let cross_attn = c.down_block_types[i] == "CrossAttnDownBlock2D";
            down_blocks.push(DownBlock::new(
                vs.pp("down_blocks").pp(i),
                input,
                out,
                per_block,
                resnet,
                cross_attn.then(|| attn(i)),
                (i + 1 < n).then_some(c.downsample_padding),
            )?);
        }

        let last = c.block_out_channels[n - 1];
        let mid_block = MidBlockCrossAttn::new(
            vs.pp("mid_block"),
            last,
            ResnetCfg {
                output_scale_factor: c.mid_block_scale_factor,
                ..resnet
            },
            attn(n - 1),
        )?;

        let mut up_blocks = Vec::with_capacity(n);
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut out = rev[0];
        for i in 0..n {
            let prev = out;
            out = rev[i];
            let input = rev[(i + 1).min(n - 1)];
            let cross_attn = c.up_block_types[i] == "CrossAttnUpBlock2D";
            up_blocks.push(UpBlock::new(
                vs.pp("up_blocks").pp(i),
                input,
                prev,
                out,
                per_block + 1,
                resnet,
                cross_attn.then(|| attn(n - 1 - i)),
                i + 1 < n,
            )?);
        }

        let conv_norm_out =
            GroupNorm::silu(c.norm_num_groups, ch0, c.norm_eps, vs.pp("conv_norm_out"))?;
        let conv_out = conv2d(vs.pp("conv_out"), ch0, c.out_channels, 3, 1, 1)?;
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
            let (next, r) = block.forward(&xs, Some(&emb), Some(encoder_hidden_states))?;
            res.extend(r);
            xs = next;
        }
        // 4. mid
        let mut xs = self
            .mid_block
            .forward(&xs, Some(&emb), encoder_hidden_states)?;
        // 5. up
        let mut upsample_size = None;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let n_res = block.resnets.len();
            let r = res.split_off(res.len() - n_res);
            if i + 1 < self.n_blocks && forward_upsample_size {
                let (_, _, h, w) = res.last().expect("a skip connection").dims4()?;
                upsample_size = Some((h, w));
            }
            xs = block.forward(
                &xs,
                &r,
                Some(&emb),
                upsample_size,
                Some(encoder_hidden_states),
            )?;
        }
        // 6. post-process
        let xs = self.conv_norm_out.forward(&xs)?;
        self.conv_out.forward(&xs)
    }
}
