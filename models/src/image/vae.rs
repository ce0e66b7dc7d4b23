//! The decoding half of diffusers' `AutoencoderKL`
//! (`models/autoencoders/autoencoder_kl.py`: `post_quant_conv` and
//! `Decoder` of `autoencoders/vae.py`, with `UNetMidBlock2D` and
//! `UpDecoderBlock2D` of `unets/unet_2d_blocks.py`, `ResnetBlock2D` of
//! `resnet.py`, `Upsample2D` of `upsampling.py`), file for file.
//!
//! The blocks are [`super::blocks`]' (convolutions as [`FrameConv`]s). Only
//! the decoder's weights are loaded: the pipelines never encode.

use candle_core::{Result as R, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{conv2d, GroupNorm, MidBlock2D, ResnetCfg, UpDecoderBlock2D};
use super::config::VaeConfig;
use crate::conv::FrameConv;

/// `AutoencoderKL.decode`: `post_quant_conv`, then the `Decoder`.
pub struct VaeDecoder {
    post_quant_conv: Option<FrameConv>,
    conv_in: FrameConv,
    mid_block: MidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: FrameConv,
}

impl VaeDecoder {
    /// `vb` at the VAE's weights (`decoder.*`, `post_quant_conv.*`).
    pub fn new(vb: VarBuilder, c: &VaeConfig) -> R<Self> {
        let latent = c.latent_channels;
        let groups = c.norm_num_groups;
        let r = ResnetCfg {
            eps: 1e-6,
            groups,
            temb_channels: None,
            output_scale_factor: 1.0,
        };
        let post_quant_conv = if c.use_post_quant_conv {
            Some(conv2d(vb.pp("post_quant_conv"), latent, latent, 1, 1, 0)?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let chans: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let top = chans[0];
        let conv_in = conv2d(vb.pp("conv_in"), latent, top, 3, 1, 1)?;
        let mid_block = MidBlock2D::new(vb.pp("mid_block"), top, r, c.mid_block_add_attention)?;
        let mut up_blocks = Vec::with_capacity(chans.len());
        let mut prev = top;
        for (i, &out) in chans.iter().enumerate() {
            let last = i + 1 == chans.len();
            up_blocks.push(UpDecoderBlock2D::new(
                vb.pp(format!("up_blocks.{i}")),
                prev,
                out,
                c.layers_per_block + 1,
                r,
                !last,
            )?);
            prev = out;
        }
        let bottom = c.block_out_channels[0];
        Ok(Self {
            post_quant_conv,
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::silu(groups, bottom, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(vb.pp("conv_out"), bottom, 3, 3, 1, 1)?,
        })
    }

    /// Latents `(N, latent_channels, h, w)` (already divided by the scaling
    /// factor) → images `(N, 3, h·f, w·f)` in [-1, 1] (not clamped).
    pub fn decode(&self, z: &Tensor) -> R<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid_block.forward(&x)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        let x = self.conv_norm_out.forward(&x)?;
        self.conv_out.forward(&x)
    }
}
