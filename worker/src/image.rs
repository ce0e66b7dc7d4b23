//! The image job: context (inline or from the platform), the prompt (built
//! from skin + category + character, or written by the text model for
//! `generation_mode`), the Stable Diffusion run with progress, uploads, the
//! user-media records and the delivery message.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use models::image::encode::{encode, ImageFormat};
use models::image::{ImageRequest, StableDiffusion};
use models::SamplingParams;
use pipeline::jobs::image::{GeneratedImage, ImageJob, ImageOutput, UserMedia};
use pipeline::media_store::{media_key, MediaStore};
use pipeline::platform::{NewMessage, PlatformClient};
use prompts::media::{self, ImageCharacter, NsfwLevel, Style};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::chat::{ChatEngine, JobError, Usage};

/// What the image kind needs beside the job: the model (loaded on the first
/// image job), where images go, defaults.
pub struct ImageService {
    pub model_dir: PathBuf,
    pub device: candle_core::Device,
    pub dtype: candle_core::DType,
    pub default_steps: u32,
    pub default_guidance: f64,
    pub store: Arc<MediaStore>,
    model: tokio::sync::OnceCell<Arc<StableDiffusion>>,
}

impl ImageService {
    pub fn new(
        model_dir: PathBuf,
        device: candle_core::Device,
        dtype: candle_core::DType,
        default_steps: u32,
        default_guidance: f64,
        store: MediaStore,
    ) -> Self {
        Self {
            model_dir,
            device,
            dtype,
            default_steps,
            default_guidance,
            store: Arc::new(store),
            model: tokio::sync::OnceCell::new(),
        }
    }

    /// The model, loaded once.
    pub async fn model(&self) -> Result<Arc<StableDiffusion>, JobError> {
        self.model
            .get_or_try_init(|| async {
                let (dir, device, dtype) = (self.model_dir.clone(), self.device.clone(), self.dtype);
                let started = std::time::Instant::now();
                let sd = tokio::task::spawn_blocking(move || StableDiffusion::load(&dir, &device, dtype))
                    .await
                    .map_err(|e| JobError::new(format!("loading the image model: {e}")))?
                    .map_err(|e| {
                        JobError::new(format!(
                            "loading the image model {}: {e}",
                            self.model_dir.display()
                        ))
                    })?;
                tracing::info!(dir = %self.model_dir.display(), ms = started.elapsed().as_millis() as u64, family = ?sd.family, "image model loaded");
                Ok(Arc::new(sd))
            })
            .await
            .cloned()
    }
}

/// The context an image prompt is built from.
#[derive(Debug, Default)]
pub struct ImageContext {
    pub skin: Option<Value>,
    pub character: Value,
    pub persona_style: Option<String>,
    pub recent: Vec<String>,
}

/// Inline context wins; what is missing is fetched from the platform (as
/// the job's tenant) when the job names it.
pub async fn gather_context(
    job: &ImageJob,
    platform: impl Fn() -> Result<PlatformClient, JobError>,
    history: usize,
) -> Result<ImageContext, JobError> {
    let fetch_err = |what: &str, e: pipeline::platform::PlatformError| {
        JobError::new(format!("fetching the {what} from the platform failed: {e}"))
    };
    let skin = match (&job.skin, &job.skin_id) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(id)) => Some(
            platform()?
                .get(&format!("/v1/skins/{}", encode_segment(id)), None)
                .await
                .map_err(|e| fetch_err("skin", e))?,
        ),
        (None, None) => None,
    };
    let character = match (&job.activity, &job.activity_id, &job.activity_instance_id) {
        (Some(a), _, _) => a.clone(),
        (None, Some(id), _) => platform()?
            .get(&format!("/v1/activities/{}", encode_segment(id)), None)
            .await
            .map_err(|e| fetch_err("activity", e))?,
        (None, None, Some(id)) => {
            // The image fields live on the activity the instance was made
            // from; the instance's own fields are the fallback.
            let client = platform()?;
            let instance = client
                .get(&format!("/v1/instances/{}", encode_segment(id)), None)
                .await
                .map_err(|e| fetch_err("instance", e))?;
            match instance["activity_id"]
                .as_str()
                .filter(|a| pipeline::platform::is_valid_id(a))
            {
                Some(activity) => client
                    .get(&format!("/v1/activities/{activity}"), None)
                    .await
                    .map_err(|e| fetch_err("activity", e))?,
                None => instance,
            }
        }
        _ => json!({}),
    };
    let persona_style = match &job.persona {
        Some(p) => p["style_preference"].as_str().map(String::from),
        None if job.activity_instance_id.is_some() => platform()?
            .default_persona()
            .await
            .map_err(|e| fetch_err("persona", e))?
            .and_then(|p| p.style_preference),
        None => None,
    };
    let mut recent = Vec::new();
    if job.generation_mode.is_some() {
        recent = match (&job.messages, &job.activity_instance_id) {
            (Some(m), _) => m.clone(),
            (None, Some(id)) => platform()?
                .recent_messages(id, history)
                .await
                .map_err(|e| fetch_err("recent messages", e))?
                .into_iter()
                .filter_map(|m| m.content.map(|c| format!("{}: {c}", m.role)))
                .collect(),
            (None, None) => Vec::new(),
        };
    }
    Ok(ImageContext {
        skin,
        character,
        persona_style,
        recent,
    })
}

fn encode_segment(id: &str) -> String {
    // Ids are checked against the id rule at parse time; nothing to escape.
    id.to_string()
}

fn nsfw_level(level: u8) -> NsfwLevel {
    match level {
        0 => NsfwLevel::Safe,
        1 => NsfwLevel::Suggestive,
        _ => NsfwLevel::Explicit,
    }
}

/// The prompts: skin + persona style, the category, the character's image
/// fields, the job's own positive/negative prompts, and for
/// `generation_mode` the text model's scene.
pub fn build_prompts(
    job: &ImageJob,
    ctx: &ImageContext,
    engine: &ChatEngine,
    seed: u64,
    cancelled: &dyn Fn() -> bool,
    usage: &mut Usage,
) -> Result<(String, String), JobError> {
    let scene = write_scene(job, ctx, engine, seed, cancelled, usage)?;
    image_prompts(job, ctx, scene.as_deref(), seed)
}

/// For `generation_mode`: the scene the text model writes from the chat.
pub fn write_scene(
    job: &ImageJob,
    ctx: &ImageContext,
    engine: &ChatEngine,
    seed: u64,
    cancelled: &dyn Fn() -> bool,
    usage: &mut Usage,
) -> Result<Option<String>, JobError> {
    if job.generation_mode.is_none() {
        return Ok(None);
    }
    let category = media::category(&job.category).map_err(|e| JobError::new(e.to_string()))?;
    let character =
        ImageCharacter::from_activity(&ctx.character).map_err(|e| JobError::new(e.to_string()))?;
    let turns = media::image_prompt_request(
        &character,
        category,
        nsfw_level(job.nsfw_level),
        &ctx.recent,
    );
    let params = SamplingParams {
        temperature: 0.7,
        max_new_tokens: 60,
        seed,
        ..SamplingParams::default()
    };
    let answer = engine.complete(&turns, &params, cancelled, usage)?;
    let scene = media::clean_generated_prompt(&answer, 300);
    tracing::info!(scene = %scene, "the text model wrote the scene");
    Ok(Some(scene))
}

fn join_prompt(a: Option<&str>, b: &str) -> String {
    match a {
        Some(a) if !b.is_empty() => format!("{}, {b}", a.trim()),
        Some(a) => a.trim().to_string(),
        None => b.to_string(),
    }
}

/// The image prompts from the context, and the scene when one was written.
pub fn image_prompts(
    job: &ImageJob,
    ctx: &ImageContext,
    scene: Option<&str>,
    seed: u64,
) -> Result<(String, String), JobError> {
    let category = media::category(&job.category).map_err(|e| JobError::new(e.to_string()))?;
    let character =
        ImageCharacter::from_activity(&ctx.character).map_err(|e| JobError::new(e.to_string()))?;
    let skin_style = ctx
        .skin
        .as_ref()
        .and_then(|s| s["style"].as_str())
        .and_then(Style::parse);
    let persona_style = ctx.persona_style.as_deref().and_then(Style::parse);
    let style = media::choose_style(skin_style, persona_style);
    let nsfw = nsfw_level(job.nsfw_level);
    let base = match scene {
        Some(scene) => media::merge_generated(&character, style, category, nsfw, scene, seed),
        None => media::image_prompt(&character, style, category, nsfw, seed),
    };
    Ok((
        join_prompt(job.positive_prompt.as_deref(), &base.positive),
        join_prompt(job.negative_prompt.as_deref(), &base.negative),
    ))
}

/// The video prompts: the character's (nsfw) video prompt with the
/// category's motion, the scene when one was written, the job's own
/// prompts; the negative as the image's.
pub fn video_prompts(
    job: &ImageJob,
    ctx: &ImageContext,
    scene: Option<&str>,
    seed: u64,
) -> Result<(String, String), JobError> {
    let category = media::category(&job.category).map_err(|e| JobError::new(e.to_string()))?;
    let character =
        ImageCharacter::from_activity(&ctx.character).map_err(|e| JobError::new(e.to_string()))?;
    let motion = media::video_prompt(&character, category, nsfw_level(job.nsfw_level));
    let base = match scene {
        Some(scene) if !motion.is_empty() => format!("{scene}, {motion}"),
        Some(scene) => scene.to_string(),
        None => motion,
    };
    let (_, negative) = image_prompts(job, ctx, scene, seed)?;
    Ok((join_prompt(job.positive_prompt.as_deref(), &base), negative))
}

/// Everything after the prompts: the run, uploads, records, delivery.
pub struct ImageRun<'a> {
    pub service: &'a ImageService,
    pub job: &'a ImageJob,
    pub job_id: &'a str,
    pub tenant: &'a str,
    pub seed: u64,
    pub prompt: String,
    pub negative_prompt: String,
}

/// The job's seed: its own, else one drawn from the job id (a re-run draws
/// the same), kept within 2^53 so every JSON client reads it exactly.
pub fn job_seed(job: &ImageJob, run_seed: u64) -> u64 {
    job.seed.unwrap_or(run_seed & ((1u64 << 53) - 1))
}

/// The generation id: the job's own, else the job id.
pub fn generation_id(job: &ImageJob, job_id: &str) -> String {
    job.generation_id
        .clone()
        .unwrap_or_else(|| job_id.to_string())
}

impl ImageRun<'_> {
    /// Runs the model (blocking: call off the async threads).
    pub fn generate(
        &self,
        model: &StableDiffusion,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(ImageRequest, Vec<models::image::RgbImage>), JobError> {
        let side = model.default_side();
        let req = ImageRequest {
            prompt: self.prompt.clone(),
            negative_prompt: Some(self.negative_prompt.clone()),
            width: self.job.width.map(|w| w as usize).unwrap_or(side),
            height: self.job.height.map(|h| h as usize).unwrap_or(side),
            steps: self.job.steps.unwrap_or(self.service.default_steps) as usize,
            guidance_scale: self
                .job
                .guidance_scale
                .unwrap_or(self.service.default_guidance),
            seeds: (0..self.job.num_options as u64)
                .map(|i| self.seed.wrapping_add(i))
                .collect(),
            latents: None,
        };
        let started = std::time::Instant::now();
        let images = model.generate(&req, progress).map_err(|e| match e {
            models::ModelError::Cancelled => JobError::new("cancelled"),
            models::ModelError::Invalid(m) => JobError::new(format!("invalid input: {m}")),
            other => JobError::new(format!("image generation failed: {other}")),
        })?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            steps = req.steps,
            images = images.len(),
            width = req.width,
            height = req.height,
            "images generated"
        );
        Ok((req, images))
    }

    /// Encodes and uploads each image; the records and output.
    pub async fn upload(
        &self,
        store: &MediaStore,
        req: &ImageRequest,
        images: Vec<models::image::RgbImage>,
    ) -> Result<ImageOutput, JobError> {
        let format = ImageFormat::parse(&self.job.format).unwrap_or(ImageFormat::Png);
        let now = Utc::now();
        let generation_id = generation_id(self.job, self.job_id);
        let mut out_images = Vec::with_capacity(images.len());
        let mut media_records = Vec::with_capacity(images.len());
        for (i, img) in images.iter().enumerate() {
            let seed = req.seeds[i];
            let bytes = tokio::task::block_in_place(|| encode(img, format))
                .map_err(|e| JobError::new(e.to_string()))?;
            let sha256 = hex(&Sha256::digest(&bytes));
            let name = format!("image-{i}.{}", format.extension());
            let key = media_key(self.tenant, now, self.job_id, &name);
            let size = bytes.len() as u64;
            let stored = store
                .put(&key, bytes, format.content_type())
                .await
                .map_err(|e| JobError::new(format!("uploading image {i} failed: {e}")))?;
            // Stable ids: a re-run of the job names the same media.
            let media_id = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("{}/{i}", self.job_id).as_bytes(),
            );
            let record_id = uuid::Uuid::new_v5(&media_id, b"user_media");
            media_records.push(UserMedia {
                id: record_id.to_string(),
                media_id: media_id.to_string(),
                media_type: "image".into(),
                cdn_url: stored.url.clone(),
                relation_type: "generated".into(),
                is_favorite: false,
                created_at: now.to_rfc3339_opts(SecondsFormat::Millis, true),
                user_id: self.job.user_id.clone(),
            });
            out_images.push(GeneratedImage {
                cdn_url: stored.url,
                sha256,
                bytes: size,
                width: img.width as u32,
                height: img.height as u32,
                seed,
                content_type: format.content_type().into(),
            });
        }
        Ok(ImageOutput {
            generation_id,
            seed: self.seed,
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: req.width as u32,
            height: req.height as u32,
            steps: req.steps as u32,
            guidance_scale: req.guidance_scale,
            images: out_images,
            media: media_records,
            message: None,
        })
    }
}

/// Delivers the first image to the instance as a message, once (the
/// idempotency key is the job's).
pub async fn deliver(
    platform: &PlatformClient,
    job: &ImageJob,
    job_id: &str,
    output: &ImageOutput,
) -> Result<Option<Value>, JobError> {
    let Some(instance) = &job.activity_instance_id else {
        return Ok(None);
    };
    let Some(first) = output.images.first() else {
        return Ok(None);
    };
    let saved = platform
        .create_message(
            instance,
            &NewMessage {
                role: "assistant",
                medium: "image",
                content: &first.cdn_url,
                skin_id: job.skin_id.as_deref(),
                partial: false,
            },
            &format!("{job_id}:image"),
        )
        .await
        .map_err(|e| JobError::new(format!("delivering the image to the instance failed: {e}")))?;
    Ok(Some(saved))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
