//! The video job: the image job's context and prompts, the first frame
//! (made by the image model, or the skin's reference image fetched through
//! the outbound guard), the Wan run with progress, H.264/MP4 and the
//! poster, uploads, the user-media record and the delivery message.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use models::image::encode::{encode, ImageFormat};
use models::image::RgbImage;
use models::video::{Stage, VideoRequest, Wan};
use pipeline::jobs::image::UserMedia;
use pipeline::jobs::video::{VideoFile, VideoJob, VideoOutput};
use pipeline::media_store::{media_key, MediaStore};
use pipeline::outbound::OutboundGuard;
use pipeline::platform::{NewMessage, PlatformClient};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::chat::JobError;

/// The most bytes a reference image may have.
pub const MAX_REFERENCE_BYTES: usize = 20 << 20;
/// The most pixels a reference image may decode to.
pub const MAX_REFERENCE_PIXELS: u64 = 40_000_000;

/// What the video kind needs beside the job: the model (loaded on the
/// first video job), the image service for generated first frames, where
/// videos go, defaults.
pub struct VideoService {
    pub model_dir: PathBuf,
    pub device: candle_core::Device,
    pub dtype: candle_core::DType,
    pub defaults: VideoDefaults,
    pub store: Arc<MediaStore>,
    /// Makes `first_frame_source: generate` frames (None: no image model).
    pub image: Option<Arc<crate::image::ImageService>>,
    model: tokio::sync::OnceCell<Arc<Wan>>,
}

/// Values a job may leave out.
#[derive(Debug, Clone, Copy)]
pub struct VideoDefaults {
    pub steps: u32,
    pub guidance: f64,
    pub frames: u32,
    pub fps: u32,
    pub width: u32,
    pub height: u32,
}

impl VideoService {
    pub fn new(
        model_dir: PathBuf,
        device: candle_core::Device,
        dtype: candle_core::DType,
        defaults: VideoDefaults,
        store: MediaStore,
        image: Option<Arc<crate::image::ImageService>>,
    ) -> Self {
        Self {
            model_dir,
            device,
            dtype,
            defaults,
            store: Arc::new(store),
            image,
            model: tokio::sync::OnceCell::new(),
        }
    }

    /// The model, loaded once.
    pub async fn model(&self) -> Result<Arc<Wan>, JobError> {
        self.model
            .get_or_try_init(|| async {
                let (dir, device, dtype) = (self.model_dir.clone(), self.device.clone(), self.dtype);
                let started = std::time::Instant::now();
                let wan = tokio::task::spawn_blocking(move || Wan::load(&dir, &device, dtype))
                    .await
                    .map_err(|e| JobError::new(format!("loading the video model: {e}")))?
                    .map_err(|e| {
                        JobError::new(format!(
                            "loading the video model {}: {e}",
                            self.model_dir.display()
                        ))
                    })?;
                tracing::info!(dir = %self.model_dir.display(), ms = started.elapsed().as_millis() as u64,
                    image_to_video = wan.supports_image(), "video model loaded");
                Ok(Arc::new(wan))
            })
            .await
            .cloned()
    }
}

/// The skin's reference image URL of `kind` (`reference_images[kind]`, or
/// `cover_photo_url` for `cover`, the default).
pub fn reference_url(skin: Option<&Value>, kind: Option<&str>) -> Result<String, JobError> {
    let skin = skin.ok_or_else(|| {
        JobError::new("first_frame_source reference needs a skin (skin_id or skin)")
    })?;
    let kind = kind.unwrap_or("cover");
    let found = if kind == "cover" {
        skin["cover_photo_url"].as_str()
    } else {
        skin["reference_images"][kind].as_str()
    };
    match found.filter(|u| !u.trim().is_empty()) {
        Some(u) => Ok(u.to_string()),
        None => {
            let mut have: Vec<String> = skin["reference_images"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(_, v)| v.as_str().is_some_and(|s| !s.is_empty()))
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default();
            if skin["cover_photo_url"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
            {
                have.push("cover".into());
            }
            Err(JobError::new(format!(
                "the skin has no reference image {kind:?} (it has: {})",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )))
        }
    }
}

/// Fetches a reference image through the outbound guard (no redirects,
/// refused addresses, at most [`MAX_REFERENCE_BYTES`]), decodes JPEG / PNG
/// / WebP (at most [`MAX_REFERENCE_PIXELS`]), and resizes and
/// center-crops it to `width` x `height`.
pub async fn fetch_reference(
    guard: &OutboundGuard,
    url: &str,
    width: u32,
    height: u32,
) -> Result<RgbImage, JobError> {
    let shown = pipeline::outbound::redact_url(url);
    let parsed = guard
        .check_url(url)
        .map_err(|e| JobError::new(format!("the reference image URL {shown} is refused: {e}")))?;
    let client = guard
        .client(std::time::Duration::from_secs(30))
        .map_err(|e| JobError::new(format!("the reference image client: {e}")))?;
    let resp = client.get(parsed).send().await.map_err(|e| {
        JobError::new(format!(
            "fetching the reference image {shown} failed: {}",
            error_chain(&e)
        ))
    })?;
    if !resp.status().is_success() {
        return Err(JobError::new(format!(
            "fetching the reference image {shown} failed: HTTP {}",
            resp.status()
        )));
    }
    if resp
        .content_length()
        .is_some_and(|n| n as usize > MAX_REFERENCE_BYTES)
    {
        return Err(JobError::new(format!(
            "the reference image {shown} is larger than {MAX_REFERENCE_BYTES} bytes"
        )));
    }
    let mut bytes = Vec::new();
    let mut resp = resp;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| JobError::new(format!("reading the reference image {shown} failed: {e}")))?
    {
        if bytes.len() + chunk.len() > MAX_REFERENCE_BYTES {
            return Err(JobError::new(format!(
                "the reference image {shown} is larger than {MAX_REFERENCE_BYTES} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    tokio::task::block_in_place(|| decode_reference(&bytes, width, height))
        .map_err(|e| JobError::new(format!("the reference image {shown}: {e}")))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Decodes a JPEG / PNG / WebP reference within the pixel limit, then
/// resize + center-crop to fill `width` x `height`.
pub fn decode_reference(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, String> {
    models::image::encode::decode_to_fill(bytes, width, height, MAX_REFERENCE_PIXELS)
}

/// The video request from the job, its prompts and the service defaults.
pub fn request(
    job: &VideoJob,
    defaults: &VideoDefaults,
    prompt: &str,
    negative: &str,
    seed: u64,
    first: Option<RgbImage>,
) -> VideoRequest {
    VideoRequest {
        prompt: prompt.to_string(),
        negative_prompt: Some(negative.to_string()),
        width: job.base.width.unwrap_or(defaults.width) as usize,
        height: job.base.height.unwrap_or(defaults.height) as usize,
        num_frames: job.num_frames.unwrap_or(defaults.frames) as usize,
        steps: job.base.steps.unwrap_or(defaults.steps) as usize,
        guidance_scale: job.base.guidance_scale.unwrap_or(defaults.guidance),
        seed,
        latents: None,
        image: first,
    }
}

/// Runs the model (blocking: call off the async threads); `progress` gets
/// each stage and returns false to cancel.
pub fn generate(
    model: &Wan,
    req: &VideoRequest,
    progress: &mut dyn FnMut(Stage) -> bool,
) -> Result<Vec<RgbImage>, JobError> {
    let started = std::time::Instant::now();
    let frames = model.generate(req, progress).map_err(|e| match e {
        models::ModelError::Cancelled => JobError::new("cancelled"),
        models::ModelError::Invalid(m) => JobError::new(format!("invalid input: {m}")),
        other => JobError::new(format!("video generation failed: {other}")),
    })?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        steps = req.steps,
        frames = frames.len(),
        width = req.width,
        height = req.height,
        image_to_video = req.image.is_some(),
        "video generated"
    );
    Ok(frames)
}

/// What the uploads need to know about the run.
pub struct Finished<'a> {
    pub job: &'a VideoJob,
    pub job_id: &'a str,
    pub tenant: &'a str,
    pub req: &'a VideoRequest,
    pub fps: u32,
}

/// Encodes the MP4 and the poster, uploads both, and builds the output.
pub async fn upload(
    store: &MediaStore,
    run: Finished<'_>,
    frames: Vec<RgbImage>,
) -> Result<VideoOutput, JobError> {
    let fps = run.fps;
    let (mp4, poster) = tokio::task::block_in_place(|| {
        let mp4 = models::video::mp4::encode_mp4(&frames, fps as f64)?;
        let poster = encode(&frames[0], ImageFormat::Jpeg)?;
        Ok::<_, models::ModelError>((mp4, poster))
    })
    .map_err(|e| JobError::new(format!("encoding the video failed: {e}")))?;
    let now = Utc::now();
    let put = |name: &'static str, bytes: Vec<u8>, content_type: &'static str| {
        let key = media_key(run.tenant, now, run.job_id, name);
        async move {
            let sha256 = hex(&Sha256::digest(&bytes));
            let size = bytes.len() as u64;
            let stored = store
                .put(&key, bytes, content_type)
                .await
                .map_err(|e| JobError::new(format!("uploading {name} failed: {e}")))?;
            Ok::<_, JobError>(VideoFile {
                cdn_url: stored.url,
                sha256,
                bytes: size,
                content_type: content_type.into(),
            })
        }
    };
    let duration_s = mp4.duration_s();
    let video = put("video.mp4", mp4.bytes, "video/mp4").await?;
    let poster = put("poster.jpg", poster, "image/jpeg").await?;
    // Stable ids: a re-run of the job names the same media.
    let media_id = uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("{}/video", run.job_id).as_bytes(),
    );
    let record_id = uuid::Uuid::new_v5(&media_id, b"user_media");
    let media = vec![UserMedia {
        id: record_id.to_string(),
        media_id: media_id.to_string(),
        media_type: "video".into(),
        cdn_url: video.cdn_url.clone(),
        relation_type: "generated".into(),
        is_favorite: false,
        created_at: now.to_rfc3339_opts(SecondsFormat::Millis, true),
        user_id: run.job.base.user_id.clone(),
    }];
    Ok(VideoOutput {
        generation_id: run
            .job
            .base
            .generation_id
            .clone()
            .unwrap_or_else(|| run.job_id.to_string()),
        seed: run.req.seed,
        prompt: run.req.prompt.clone(),
        negative_prompt: run.req.negative_prompt.clone().unwrap_or_default(),
        width: run.req.width as u32,
        height: run.req.height as u32,
        fps,
        num_frames: frames.len() as u32,
        duration_s,
        steps: run.req.steps as u32,
        guidance_scale: run.req.guidance_scale,
        first_frame_source: run.job.first_frame_source,
        video,
        poster,
        media,
        message: None,
    })
}

/// Delivers the video to the instance as a message, once (the idempotency
/// key is the job's).
pub async fn deliver(
    platform: &PlatformClient,
    job: &VideoJob,
    job_id: &str,
    output: &VideoOutput,
) -> Result<Option<Value>, JobError> {
    let Some(instance) = &job.base.activity_instance_id else {
        return Ok(None);
    };
    let saved = platform
        .create_message(
            instance,
            &NewMessage {
                role: "assistant",
                medium: "video",
                content: &output.video.cdn_url,
                skin_id: job.base.skin_id.as_deref(),
                partial: false,
            },
            &format!("{job_id}:video"),
        )
        .await
        .map_err(|e| JobError::new(format!("delivering the video to the instance failed: {e}")))?;
    Ok(Some(saved))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
