//! Text-to-video and image-to-video with a Wan checkpoint in diffusers'
//! folder layout, following `pipeline_wan.py` (`WanPipeline`) and
//! `pipeline_wan_i2v.py` (`WanImageToVideoPipeline` with
//! `expand_timesteps`, as Wan 2.2 TI2V runs it: the first frame's latents
//! given, its timestep 0) step for step.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::Distribution;

use super::config::{FlowSchedulerConfig, TransformerConfig, Umt5Config, WanIndex, WanVaeConfig};
use super::scheduler::UniPc;
use super::transformer::WanTransformer;
use super::umt5::{Umt5Encoder, WanTokenizer};
use super::vae::WanVae;
use crate::image::config::read_json;
use crate::image::RgbImage;
use crate::ModelError;

/// The text length the Wan pipeline pads prompt embeddings to.
pub const MAX_SEQUENCE_LENGTH: usize = 512;
/// The most frames one run makes.
pub const MAX_FRAMES: usize = 241;
/// The largest side accepted, in pixels.
pub const MAX_SIDE: usize = 1280;
/// The most denoising steps one run takes.
pub const MAX_STEPS: usize = 100;
/// The largest guidance scale accepted.
pub const MAX_GUIDANCE: f64 = 30.0;

/// What one run makes.
#[derive(Debug, Clone)]
pub struct VideoRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    /// 4k + 1 frames.
    pub num_frames: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// The initial latents come from this seed alone.
    pub seed: u64,
    /// Initial latents `[1, C, F', H/f, W/f]` instead of drawing them (as
    /// diffusers' `latents=`).
    pub latents: Option<Tensor>,
    /// Image-to-video: the first frame, already `width` x `height`.
    pub image: Option<RgbImage>,
}

/// Where a run is, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// After denoising step `done` of `total`.
    Denoise { done: usize, total: usize },
    /// After decoding latent frame `done` of `total`.
    Decode { done: usize, total: usize },
}

/// A loaded Wan pipeline.
pub struct Wan {
    pub index: WanIndex,
    tokenizer: WanTokenizer,
    text: Umt5Encoder,
    pub transformer: WanTransformer,
    pub vae: WanVae,
    scheduler: FlowSchedulerConfig,
    device: Device,
    dtype: DType,
}

fn weights(dir: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, ModelError> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::Io(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "safetensors")
                && !p.to_string_lossy().contains(".fp16.")
                && !p.to_string_lossy().contains(".bf16.")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Io(format!(
            "{}: no safetensors weights (only safetensors are read)",
            dir.display()
        )));
    }
    // SAFETY: checkpoint files are not modified while the worker runs
    // (memory-mapped as candle and diffusers load them).
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? })
}

impl Wan {
    /// Loads every part of the checkpoint in `dir` (the VAE's encoder too
    /// when the checkpoint does image-to-video).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        crate::device::cpu_math_init();
        let index: WanIndex = read_json(&dir.join("model_index.json"))?;
        index.check()?;
        let scheduler: FlowSchedulerConfig =
            read_json(&dir.join("scheduler/scheduler_config.json"))?;
        UniPc::check(&scheduler)?;
        let tcfg: TransformerConfig = read_json(&dir.join("transformer/config.json"))?;
        let vcfg: WanVaeConfig = read_json(&dir.join("vae/config.json"))?;
        vcfg.check()?;
        let ecfg: Umt5Config = read_json(&dir.join("text_encoder/config.json"))?;
        if tcfg.text_dim != ecfg.d_model {
            return Err(ModelError::Format(format!(
                "transformer text_dim {} != text_encoder d_model {}",
                tcfg.text_dim, ecfg.d_model
            )));
        }
        if tcfg.in_channels != vcfg.z_dim || tcfg.out_channels() != vcfg.z_dim {
            return Err(ModelError::Format(format!(
                "transformer in/out channels {}/{} != vae z_dim {} (Wan 2.1 I2V's channel-concatenated conditioning is not ported)",
                tcfg.in_channels,
                tcfg.out_channels(),
                vcfg.z_dim
            )));
        }
        let tokenizer = WanTokenizer::from_dir(&dir.join("tokenizer"))?;
        if tokenizer.vocab_size() > ecfg.vocab_size {
            return Err(ModelError::Format(format!(
                "tokenizer has {} tokens, text_encoder embeds {}",
                tokenizer.vocab_size(),
                ecfg.vocab_size
            )));
        }
        // The text encoder stays f32 on CPU; on GPU it runs in `dtype`.
        let text = Umt5Encoder::new(weights(&dir.join("text_encoder"), dtype, device)?, &ecfg)?;
        let transformer =
            WanTransformer::new(weights(&dir.join("transformer"), dtype, device)?, &tcfg)?;
        let vae = WanVae::new(
            weights(&dir.join("vae"), dtype, device)?,
            &vcfg,
            index.expand_timesteps,
        )?;
        Ok(Self {
            index,
            tokenizer,
            text,
            transformer,
            vae,
            scheduler,
            device: device.clone(),
            dtype,
        })
    }

    /// Whether the checkpoint animates a given first frame (Wan 2.2 TI2V).
    pub fn supports_image(&self) -> bool {
        self.index.expand_timesteps
    }

    /// Width and height must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        self.vae.config.scale_factor_spatial * self.transformer.config.patch_size[1]
    }

    pub fn spatial_factor(&self) -> usize {
        self.vae.config.scale_factor_spatial
    }

    pub fn temporal_factor(&self) -> usize {
        self.vae.config.scale_factor_temporal
    }

    pub fn latent_channels(&self) -> usize {
        self.vae.config.z_dim
    }

    /// The latent shape of a request: `(C, F', H', W')`.
    pub fn latent_shape(&self, req: &VideoRequest) -> (usize, usize, usize, usize) {
        let s = self.spatial_factor();
        (
            self.latent_channels(),
            (req.num_frames - 1) / self.temporal_factor() + 1,
            req.height / s,
            req.width / s,
        )
    }

    /// Standard normal latents `(1, C, F', H', W')` from a seed (ChaCha20:
    /// the same on every machine).
    pub fn seeded_latents(&self, req: &VideoRequest) -> Result<Tensor, ModelError> {
        let (c, f, h, w) = self.latent_shape(req);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(req.seed);
        let v: Vec<f32> = (0..c * f * h * w)
            .map(|_| rand_distr::StandardNormal.sample(&mut rng))
            .collect();
        Ok(Tensor::from_vec(v, (1, c, f, h, w), &self.device)?)
    }

    /// Checks a request against the model's bounds.
    pub fn check(&self, req: &VideoRequest) -> Result<(), ModelError> {
        let m = self.size_multiple();
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if v < m || v > MAX_SIDE || v % m != 0 {
                return Err(ModelError::Invalid(format!(
                    "{name} must be a multiple of {m} from {m} to {MAX_SIDE}"
                )));
            }
        }
        let tf = self.temporal_factor();
        if req.num_frames == 0
            || req.num_frames > MAX_FRAMES
            || !(req.num_frames - 1).is_multiple_of(tf)
        {
            return Err(ModelError::Invalid(format!(
                "num_frames must be {tf}k+1 from 1 to {MAX_FRAMES}"
            )));
        }
        if req.steps == 0 || req.steps > MAX_STEPS {
            return Err(ModelError::Invalid(format!(
                "steps must be from 1 to {MAX_STEPS}"
            )));
        }
        if !(0.0..=MAX_GUIDANCE).contains(&req.guidance_scale) {
            return Err(ModelError::Invalid(format!(
                "guidance_scale must be from 0 to {MAX_GUIDANCE}"
            )));
        }
        let (_, f, h, w) = self.latent_shape(req);
        let p = self.transformer.config.patch_size;
        let most = self.transformer.config.rope_max_seq_len;
        if f / p[0] > most || h / p[1] > most || w / p[2] > most {
            return Err(ModelError::Invalid(format!(
                "{} frames at {}x{} exceed this model's {most} positions per axis",
                req.num_frames, req.width, req.height
            )));
        }
        if let Some(img) = &req.image {
            if !self.supports_image() {
                return Err(ModelError::Invalid(
                    "this checkpoint does text-to-video only (image-to-video needs a Wan 2.2 TI2V checkpoint)".into(),
                ));
            }
            if img.width != req.width || img.height != req.height {
                return Err(ModelError::Invalid(format!(
                    "the first frame is {}x{}, the video {}x{}",
                    img.width, img.height, req.width, req.height
                )));
            }
        }
        Ok(())
    }

    /// The prompt's embeddings as the transformer takes them: UMT5 states
    /// of its tokens, zeros to [`MAX_SEQUENCE_LENGTH`], then projected.
    fn encode_prompt(&self, prompt: &str) -> Result<Tensor, ModelError> {
        let ids = self.tokenizer.encode(prompt, MAX_SEQUENCE_LENGTH)?;
        let states = self.text.forward(&ids, &self.device)?;
        let n = states.dim(1)?;
        let d = states.dim(2)?;
        let states = if n < MAX_SEQUENCE_LENGTH {
            let zeros = Tensor::zeros(
                (1, MAX_SEQUENCE_LENGTH - n, d),
                states.dtype(),
                &self.device,
            )?;
            Tensor::cat(&[&states, &zeros], 1)?
        } else {
            states
        };
        Ok(self.transformer.embed_text(&states.to_dtype(self.dtype)?)?)
    }

    /// Makes the frames. `progress` is called after each denoising step
    /// and each decoded latent frame; returning `false` cancels the run.
    pub fn generate(
        &self,
        req: &VideoRequest,
        progress: &mut dyn FnMut(Stage) -> bool,
    ) -> Result<Vec<RgbImage>, ModelError> {
        self.check(req)?;
        let (c, f, h, w) = self.latent_shape(req);
        let latents = match &req.latents {
            Some(l) => {
                if l.dims() != [1, c, f, h, w] {
                    return Err(ModelError::Invalid(format!(
                        "latents have shape {:?}, this model and size need [1, {c}, {f}, {h}, {w}]",
                        l.dims()
                    )));
                }
                l.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            None => self.seeded_latents(req)?,
        };
        let mut latents = latents.squeeze(0)?;
        let cfg = req.guidance_scale > 1.0;
        let cond = self.encode_prompt(&req.prompt)?;
        let uncond = if cfg {
            Some(self.encode_prompt(req.negative_prompt.as_deref().unwrap_or(""))?)
        } else {
            None
        };
        // TI2V: the first frame's latents, kept fixed (timestep 0).
        let first = match &req.image {
            Some(img) => {
                let frame =
                    Tensor::from_vec(img.pixels.clone(), (img.height, img.width, 3), &self.device)?
                        .permute((2, 0, 1))?
                        .to_dtype(DType::F32)?;
                let frame = (frame / 255.0)?.affine(2.0, -1.0)?.unsqueeze(0)?;
                Some(self.vae.encode(&frame)?)
            }
            None => None,
        };
        let with_first = |l: &Tensor| -> Result<Tensor, ModelError> {
            Ok(match &first {
                Some(c0) if f > 1 => Tensor::cat(&[c0, &l.narrow(1, 1, f - 1)?], 1)?,
                Some(c0) => c0.clone(),
                None => l.clone(),
            })
        };
        let mut sched = UniPc::new(&self.scheduler, req.steps)?;
        let timesteps = sched.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = with_first(&latents)?;
            let ts: Vec<f32> = (0..f)
                .map(|k| {
                    if k == 0 && first.is_some() {
                        0.0
                    } else {
                        t as f32
                    }
                })
                .collect();
            let pred = self.transformer.forward(&input, &ts, &cond)?;
            let pred = match &uncond {
                Some(u) => {
                    let un = self.transformer.forward(&input, &ts, u)?;
                    (&un + ((pred - &un)? * req.guidance_scale)?)?
                }
                None => pred,
            };
            latents = sched.step(&pred, &latents)?;
            if !progress(Stage::Denoise { done: i + 1, total }) {
                return Err(ModelError::Cancelled);
            }
        }
        let latents = with_first(&latents)?;
        let mut frames = Vec::with_capacity(req.num_frames);
        let mut decoded = 0;
        let mut cancelled = false;
        self.vae.decode(&latents, |chunk| {
            let chunk = ((chunk / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
            let chunk = (chunk * 255.0)?.round()?.to_dtype(DType::U8)?;
            let (t, _, hh, ww) = chunk.dims4()?;
            for k in 0..t {
                frames.push(RgbImage {
                    width: ww,
                    height: hh,
                    pixels: chunk
                        .get(k)?
                        .permute((1, 2, 0))?
                        .flatten_all()?
                        .to_vec1::<u8>()?,
                });
            }
            decoded += 1;
            if !progress(Stage::Decode {
                done: decoded,
                total: f,
            }) {
                cancelled = true;
                return Err(ModelError::Cancelled);
            }
            Ok(())
        })?;
        debug_assert!(!cancelled);
        frames.truncate(req.num_frames);
        Ok(frames)
    }
}
