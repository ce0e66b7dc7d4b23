//! Text-to-image with a Stable Diffusion checkpoint in diffusers' folder
//! layout, following `pipeline_stable_diffusion.py` (SD 1.x/2.x, SD-Turbo)
//! and `pipeline_stable_diffusion_xl.py` (SDXL, SDXL-Turbo): prompt
//! encoding, classifier-free guidance, the denoising loop, VAE decoding
//! and the image post-processing, step for step.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::Distribution;

use super::clip_text::ClipTextModel;
use super::clip_tokenizer::{ClipTokenizer, CONTEXT_LENGTH};
use super::config::{
    read_json, ClipTextConfig, ModelIndex, SchedulerConfig, TokenizerConfig, UNetConfig, VaeConfig,
};
use super::scheduler::{Kind, SchedulerSpec};
use super::unet::UNet;
use super::vae::VaeDecoder;
use crate::ModelError;

/// Which pipeline a checkpoint is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// One CLIP encoder (SD 1.x, 2.x, SD-Turbo).
    StableDiffusion,
    /// Two encoders, pooled embedding and size conditioning (SDXL).
    StableDiffusionXl,
}

/// The largest side accepted, in pixels.
pub const MAX_SIDE: usize = 2048;
/// The most images one run makes.
pub const MAX_IMAGES: usize = 4;
/// The most denoising steps one run takes.
pub const MAX_STEPS: usize = 100;
/// The largest guidance scale accepted.
pub const MAX_GUIDANCE: f64 = 30.0;

/// What one run makes.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// One seed per image: image i's initial latents (and, for Euler
    /// ancestral, its noise) come from `seeds[i]` alone.
    pub seeds: Vec<u64>,
    /// Initial latents `[n, C, H/f, W/f]` instead of drawing them (as
    /// diffusers' `latents=`).
    pub latents: Option<Tensor>,
}

/// One decoded image, RGB8, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

struct Encoder {
    tokenizer: ClipTokenizer,
    pad: u32,
    model: ClipTextModel,
}

impl Encoder {
    fn load(
        dir: &Path,
        tok: &str,
        enc: &str,
        with_projection: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let tokenizer = ClipTokenizer::from_dir(&dir.join(tok))?;
        let tc: TokenizerConfig = read_json(&dir.join(tok).join("tokenizer_config.json"))?;
        let pad = match tc.pad_token() {
            Some(p) => tokenizer.token_id(&p).ok_or_else(|| {
                ModelError::Format(format!("{tok}: pad token {p:?} is not in the vocabulary"))
            })?,
            None => tokenizer.end_token(),
        };
        let config: ClipTextConfig = read_json(&dir.join(enc).join("config.json"))?;
        if config.max_position_embeddings < CONTEXT_LENGTH {
            return Err(ModelError::Format(format!(
                "{enc}/config.json: max_position_embeddings {} < {CONTEXT_LENGTH}",
                config.max_position_embeddings
            )));
        }
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(ModelError::Format(format!(
                "{tok} has {} tokens, {enc} embeds {}",
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let vb = weights(&dir.join(enc), "model", dtype, device)?;
        let model = ClipTextModel::new(vb, &config, with_projection)?;
        Ok(Self {
            tokenizer,
            pad,
            model,
        })
    }

    fn ids(&self, text: &str, device: &Device) -> Result<Tensor, ModelError> {
        let ids = self.tokenizer.encode_padded(text, self.pad)?;
        Ok(Tensor::from_vec(ids, (1, CONTEXT_LENGTH), device)?)
    }
}

/// The safetensors file of one component (`NAME.safetensors`, or its
/// fp16/bf16 variant).
fn weights(
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, ModelError> {
    let candidates = [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
        format!("{stem}.bf16.safetensors"),
    ];
    let file = candidates
        .iter()
        .map(|c| dir.join(c))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            ModelError::Io(format!(
                "{}: none of {} found (only safetensors weights are read)",
                dir.display(),
                candidates.join(", ")
            ))
        })?;
    // SAFETY: the file is a model checkpoint that is not modified while the
    // worker runs (memory-mapped as candle and diffusers load them).
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(&[file], dtype, device)? })
}

/// A loaded text-to-image pipeline.
pub struct StableDiffusion {
    pub family: Family,
    encoders: Vec<Encoder>,
    unet: UNet,
    vae: VaeDecoder,
    vae_config: VaeConfig,
    scheduler: SchedulerSpec,
    force_zeros_for_empty_prompt: bool,
    device: Device,
    dtype: DType,
    pub dir: PathBuf,
}

impl StableDiffusion {
    /// Loads the checkpoint in `dir` (diffusers' layout); `dtype` F32 on
    /// CPU, F16/BF16 on a GPU.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        crate::device::cpu_math_init();
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        let family = match index.class_name.as_str() {
            "StableDiffusionPipeline" => Family::StableDiffusion,
            "StableDiffusionXLPipeline" => Family::StableDiffusionXl,
            other => {
                return Err(ModelError::Format(format!(
                    "model_index.json: pipeline {other:?} is not supported (StableDiffusionPipeline and StableDiffusionXLPipeline are)"
                )))
            }
        };
        let mut encoders = vec![Encoder::load(
            dir,
            "tokenizer",
            "text_encoder",
            false,
            dtype,
            device,
        )?];
        if family == Family::StableDiffusionXl {
            encoders.push(Encoder::load(
                dir,
                "tokenizer_2",
                "text_encoder_2",
                true,
                dtype,
                device,
            )?);
        }
        let unet_config: UNetConfig = read_json(&dir.join("unet").join("config.json"))?;
        let wants_added = unet_config.addition_embed_type.is_some();
        if wants_added != (family == Family::StableDiffusionXl) {
            return Err(ModelError::Format(
                "unet/config.json: addition_embed_type does not match the pipeline".into(),
            ));
        }
        let unet = UNet::new(
            weights(&dir.join("unet"), "diffusion_pytorch_model", dtype, device)?,
            unet_config,
        )?;
        let vae_config: VaeConfig = read_json(&dir.join("vae").join("config.json"))?;
        vae_config.check()?;
        if vae_config.shift_factor.is_some() {
            return Err(ModelError::Format(
                "vae/config.json: shift_factor is not supported".into(),
            ));
        }
        // The VAE runs in f32 when the checkpoint asks for an upcast (SDXL's
        // VAE overflows in f16), as the pipelines do.
        let vae = VaeDecoder::new(
            weights(&dir.join("vae"), "diffusion_pytorch_model", dtype, device)?,
            &vae_config,
        )?;
        let scheduler: SchedulerConfig =
            read_json(&dir.join("scheduler").join("scheduler_config.json"))?;
        let scheduler = SchedulerSpec::new(scheduler)?;
        Ok(Self {
            family,
            encoders,
            unet,
            vae,
            vae_config,
            scheduler,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true),
            device: device.clone(),
            dtype,
            dir: dir.to_path_buf(),
        })
    }

    /// Replaces the sampler (e.g. to compare Euler with DDIM on one
    /// checkpoint).
    pub fn set_scheduler(&mut self, config: SchedulerConfig) -> Result<(), ModelError> {
        self.scheduler = SchedulerSpec::new(config)?;
        Ok(())
    }

    pub fn scheduler_kind(&self) -> Kind {
        self.scheduler.kind()
    }

    /// The VAE's downscale factor.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.scale_factor()
    }

    /// Width and height multiples the model needs.
    pub fn size_multiple(&self) -> usize {
        self.vae_scale_factor()
    }

    /// The default side: the UNet's `sample_size` × the VAE's factor.
    pub fn default_side(&self) -> usize {
        self.unet.config.sample_size.unwrap_or(64) * self.vae_scale_factor()
    }

    pub fn latent_channels(&self) -> usize {
        self.unet.config.in_channels
    }

    /// Standard normal latents for one image from its seed (ChaCha20, so
    /// the same seed gives the same latents on every machine).
    pub fn seeded_latents(
        &self,
        seed: u64,
        width: usize,
        height: usize,
    ) -> Result<Tensor, ModelError> {
        let f = self.vae_scale_factor();
        let shape = (1, self.latent_channels(), height / f, width / f);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let n = shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n)
            .map(|_| rand_distr::StandardNormal.sample(&mut rng))
            .collect();
        Ok(Tensor::from_vec(v, shape, &self.device)?)
    }

    /// Checks a request against the model's bounds.
    pub fn check(&self, req: &ImageRequest) -> Result<(), ModelError> {
        let m = self.size_multiple();
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if v < m * 8 || v > MAX_SIDE || v % m != 0 {
                return Err(ModelError::Invalid(format!(
                    "{name} must be a multiple of {m} from {} to {MAX_SIDE}",
                    m * 8
                )));
            }
        }
        if req.steps == 0 || req.steps > MAX_STEPS {
            return Err(ModelError::Invalid(format!(
                "steps must be 1 to {MAX_STEPS}"
            )));
        }
        if !(0.0..=MAX_GUIDANCE).contains(&req.guidance_scale) {
            return Err(ModelError::Invalid(format!(
                "guidance_scale must be 0 to {MAX_GUIDANCE}"
            )));
        }
        if req.seeds.is_empty() || req.seeds.len() > MAX_IMAGES {
            return Err(ModelError::Invalid(format!("1 to {MAX_IMAGES} images")));
        }
        Ok(())
    }

    /// (hidden states, pooled) for one text, as `encode_prompt` builds them.
    fn encode(&self, text: &str) -> Result<(Tensor, Option<Tensor>), ModelError> {
        match self.family {
            Family::StableDiffusion => {
                let e = &self.encoders[0];
                let out = e.model.forward(&e.ids(text, &self.device)?)?;
                Ok((out.last_hidden_state, None))
            }
            Family::StableDiffusionXl => {
                let mut states = Vec::new();
                let mut pooled = None;
                for e in &self.encoders {
                    let out = e.model.forward(&e.ids(text, &self.device)?)?;
                    states.push(out.penultimate);
                    pooled = Some(out.pooled);
                }
                Ok((Tensor::cat(&states, 2)?, pooled))
            }
        }
    }

    /// Makes the images. `progress(step, steps)` is called after each step;
    /// returning `false` cancels the run.
    pub fn generate(
        &self,
        req: &ImageRequest,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<RgbImage>, ModelError> {
        self.check(req)?;
        let n = req.seeds.len();
        let f = self.vae_scale_factor();
        let latents = match &req.latents {
            Some(l) => {
                let want = (n, self.latent_channels(), req.height / f, req.width / f);
                if l.dims4()? != want {
                    return Err(ModelError::Invalid(format!(
                        "latents have shape {:?}, this model and size need {want:?}",
                        l.dims()
                    )));
                }
                l.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            None => {
                let each = req
                    .seeds
                    .iter()
                    .map(|s| self.seeded_latents(*s, req.width, req.height))
                    .collect::<Result<Vec<_>, _>>()?;
                Tensor::cat(&each, 0)?
            }
        };
        let cfg = req.guidance_scale > 1.0;

        // Prompt embeddings, repeated per image; with guidance the
        // unconditional ones first.
        let (cond, pooled) = self.encode(&req.prompt)?;
        let (mut embeds, mut pooled) = (cond.repeat((n, 1, 1))?, pooled);
        if let Some(p) = &pooled {
            pooled = Some(p.repeat((n, 1))?);
        }
        if cfg {
            let zero_out = self.family == Family::StableDiffusionXl
                && req.negative_prompt.is_none()
                && self.force_zeros_for_empty_prompt;
            let (neg, neg_pooled) = if zero_out {
                (
                    embeds.zeros_like()?,
                    pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
                )
            } else {
                let (u, up) = self.encode(req.negative_prompt.as_deref().unwrap_or(""))?;
                (
                    u.repeat((n, 1, 1))?,
                    up.map(|p| p.repeat((n, 1))).transpose()?,
                )
            };
            embeds = Tensor::cat(&[&neg, &embeds], 0)?;
            if let (Some(p), Some(np)) = (&pooled, &neg_pooled) {
                pooled = Some(Tensor::cat(&[np, p], 0)?);
            }
        }
        let embeds = embeds.to_dtype(self.dtype)?;
        let added = match &pooled {
            Some(p) => {
                let (h, w) = (req.height as f32, req.width as f32);
                let ids = Tensor::new(&[h, w, 0.0, 0.0, h, w], &self.device)?
                    .unsqueeze(0)?
                    .repeat((p.dim(0)?, 1))?;
                Some((p.to_dtype(self.dtype)?, ids))
            }
            None => None,
        };

        let sched = self.scheduler.build(req.steps);
        let mut noise_rngs: Vec<rand_chacha::ChaCha20Rng> = req
            .seeds
            .iter()
            .map(|s| rand_chacha::ChaCha20Rng::seed_from_u64(s.wrapping_add(0x9E37_79B9_7F4A_7C15)))
            .collect();
        let mut latents = (latents * sched.init_noise_sigma)?;
        let steps = sched.timesteps.len();
        for (i, &t) in sched.timesteps.iter().enumerate() {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = sched.scale_model_input(&input, i)?.to_dtype(self.dtype)?;
            let pred = self
                .unet
                .forward(&input, t, &embeds, added.as_ref().map(|(p, ids)| (p, ids)))?
                .to_dtype(DType::F32)?;
            let pred = if cfg {
                let u = pred.narrow(0, 0, n)?;
                let c = pred.narrow(0, n, n)?;
                (&u + ((c - &u)? * req.guidance_scale)?)?
            } else {
                pred
            };
            let noise = if sched.kind == Kind::EulerAncestral {
                let (_, c, h, w) = latents.dims4()?;
                let per = c * h * w;
                let mut v = Vec::with_capacity(n * per);
                for rng in noise_rngs.iter_mut() {
                    v.extend((0..per).map(|_| -> f32 { rand_distr::StandardNormal.sample(rng) }));
                }
                Some(Tensor::from_vec(v, latents.dims4()?, &self.device)?)
            } else {
                None
            };
            latents = sched.step(&pred, i, &latents, noise.as_ref())?;
            if !progress(i + 1, steps) {
                return Err(ModelError::Cancelled);
            }
        }

        // Decode, then (x / 2 + 0.5).clamp(0, 1) × 255, rounded.
        let decode_start = std::time::Instant::now();
        let latents = (latents / self.vae_config.scaling_factor)?.to_dtype(self.dtype)?;
        let images = self.vae.decode(&latents)?.to_dtype(DType::F32)?;
        tracing::debug!(seconds = decode_start.elapsed().as_secs_f64(), "vae decode");
        let images = ((images / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let images = (images * 255.0)?.round()?.to_dtype(DType::U8)?;
        let (_, _, h, w) = images.dims4()?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let pixels = images
                .get(i)?
                .permute((1, 2, 0))?
                .flatten_all()?
                .to_vec1::<u8>()?;
            out.push(RgbImage {
                width: w,
                height: h,
                pixels,
            });
        }
        Ok(out)
    }
}

/// Reads initial latents from a safetensors file (tensor `latents`), as
/// `worker generate-image --latents` takes them.
pub fn read_latents(path: &Path, device: &Device) -> Result<Tensor, ModelError> {
    let mut tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
    tensors
        .remove("latents")
        .ok_or_else(|| ModelError::Format(format!("{}: no tensor named latents", path.display())))
}
