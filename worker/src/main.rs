//! `worker`: pulls chat jobs from Redis (or an in-process queue), assembles
//! prompts, runs the text model, writes results. See `worker --help`.

/// mimalloc: the request path allocates and frees many small buffers
/// across threads (glibc's malloc was ~15% of the CPU of the pipeline
/// overhead bench).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod chat;
mod config;
mod handlers;
mod image;
mod memory;
mod runtime;
mod serve;
mod speech;
mod stream;
mod video;

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use pipeline::envelope::RequestError;
use pipeline::inprocess::memory_queue;
use pipeline::queue::Outcome;
use pipeline::{JobKind, RunRequest};

use crate::config::{Cli, Command, WorkerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // ONNX Runtime logs every session step at info: keep it to warnings.
            tracing_subscriber::EnvFilter::try_from_env("LOG")
                .unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    tracing::info!(config = ?cli.config.masked(), "worker starting");
    pipeline::jobs::chat::set_max_audio_bytes(cli.config.max_audio_bytes);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve::serve(cli.config).await,
        Command::Run { job, kind, seed } => {
            let kind = JobKind::parse(&kind).ok_or_else(|| {
                anyhow::anyhow!("--kind {kind:?}: expected one of {}", JobKind::names())
            })?;
            run_embedded(cli.config, kind, &job, seed).await
        }
        Command::FetchModels => {
            // Every default model: the text model, Whisper (converted once),
            // ONNX Runtime, espeak-ng data and the Piper voices.
            let path = cli.config.resolve_text_model().await?;
            println!("{}", path.display());
            if cli.config.stt_backend == "whisper" {
                let dir = models::speech::whisper::resolve_whisper(
                    &cli.config.whisper_model,
                    &cli.config.models_dir(),
                )
                .await?;
                println!("{}", dir.display());
            }
            if cli.config.image_model.trim().is_empty() {
                let dir =
                    models::image::ensure_default_image_model(&cli.config.models_dir()).await?;
                println!("{}", dir.display());
            } else if cli.config.image_model.trim() != "none" {
                let dir = models::image::resolve_image_model(
                    &cli.config.image_model,
                    &cli.config.models_dir(),
                )
                .await?;
                println!("{}", dir.display());
            }
            if cli.config.video_model.trim().is_empty() {
                let dir =
                    models::video::ensure_default_video_model(&cli.config.models_dir()).await?;
                println!("{}", dir.display());
            } else if cli.config.video_model.trim() != "none" {
                let dir = models::video::resolve_video_model(
                    &cli.config.video_model,
                    &cli.config.models_dir(),
                )
                .await?;
                println!("{}", dir.display());
            }
            if cli.config.tts_backend == "piper" {
                let voices = cli.config.voice_registry().await?;
                for id in voices.ids() {
                    voices.voice(Some(&id)).await?;
                    println!("voice {id}");
                }
            }
            Ok(())
        }
        Command::GenerateImage {
            model,
            prompt,
            negative_prompt,
            width,
            height,
            steps,
            guidance_scale,
            seed,
            num_images,
            latents,
            out,
        } => {
            let mut cfg = cli.config;
            if let Some(m) = model {
                cfg.image_model = m;
            }
            let service = cfg
                .image_service(&[JobKind::Image])
                .await?
                .expect("the image kind was asked for");
            let sd = service.model().await.map_err(|e| anyhow::anyhow!(e.0))?;
            let format = out
                .extension()
                .and_then(|e| e.to_str())
                .and_then(models::image::encode::ImageFormat::parse)
                .ok_or_else(|| anyhow::anyhow!("--out must end in .png, .webp or .jpg"))?;
            let latents = latents
                .map(|p| -> anyhow::Result<candle_core::Tensor> {
                    let l = models::image::pipeline::read_latents(&p, &service.device)?;
                    // A file with more latents than images: the first ones.
                    Ok(l.narrow(0, 0, num_images.min(l.dim(0)?))?)
                })
                .transpose()?;
            let side = sd.default_side();
            let (w, h) = match &latents {
                Some(l) => {
                    let (_, _, lh, lw) = l.dims4()?;
                    let f = sd.vae_scale_factor();
                    (width.unwrap_or(lw * f), height.unwrap_or(lh * f))
                }
                None => (width.unwrap_or(side), height.unwrap_or(side)),
            };
            let req = models::image::ImageRequest {
                prompt,
                negative_prompt,
                width: w,
                height: h,
                steps: steps.unwrap_or(cfg.image_steps as usize),
                guidance_scale: guidance_scale.unwrap_or(cfg.image_guidance),
                seeds: (0..num_images as u64).map(|i| seed + i).collect(),
                latents,
            };
            let bar = indicatif::ProgressBar::new(req.steps as u64);
            let started = std::time::Instant::now();
            let images = tokio::task::block_in_place(|| {
                sd.generate(&req, &mut |step, _| {
                    bar.set_position(step as u64);
                    true
                })
            })?;
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            for (i, img) in images.iter().enumerate() {
                let path = if i == 0 {
                    out.clone()
                } else {
                    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
                    let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("png");
                    out.with_file_name(format!("{stem}-{i}.{ext}"))
                };
                let bytes = models::image::encode::encode(img, format)?;
                std::fs::write(&path, &bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!(
                    "{} ({}x{}, {} steps, seed {})",
                    path.display(),
                    img.width,
                    img.height,
                    req.steps,
                    req.seeds[i]
                );
            }
            println!("gen {secs:.2} s");
            Ok(())
        }
        Command::GenerateVideo {
            model,
            prompt,
            negative_prompt,
            image,
            num_frames,
            width,
            height,
            fps,
            steps,
            guidance_scale,
            seed,
            latents,
            frames_dir,
            out,
        } => {
            let mut cfg = cli.config;
            if let Some(m) = model {
                cfg.video_model = m;
            }
            // No image model needed here: the first frame is a file or none.
            cfg.image_model = "none".into();
            let service = cfg
                .video_service(&[JobKind::Video])
                .await?
                .expect("the video kind was asked for");
            let wan = service.model().await.map_err(|e| anyhow::anyhow!(e.0))?;
            let latents = latents
                .map(|p| models::image::pipeline::read_latents(&p, &service.device))
                .transpose()?;
            let (mut w, mut h, mut n) = (
                width.unwrap_or(cfg.video_width as usize),
                height.unwrap_or(cfg.video_height as usize),
                num_frames.unwrap_or(cfg.video_frames as usize),
            );
            if let Some(l) = &latents {
                // The size follows the latents unless given.
                if let [_, _, f, lh, lw] = l.dims() {
                    let s = wan.spatial_factor();
                    w = width.unwrap_or(lw * s);
                    h = height.unwrap_or(lh * s);
                    n = num_frames.unwrap_or((f - 1) * wan.temporal_factor() + 1);
                }
            }
            let first = image
                .map(|p| -> anyhow::Result<models::image::RgbImage> {
                    let bytes =
                        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                    video::decode_reference(&bytes, w as u32, h as u32)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
                })
                .transpose()?;
            let req = models::video::VideoRequest {
                prompt,
                negative_prompt,
                width: w,
                height: h,
                num_frames: n,
                steps: steps.unwrap_or(cfg.video_steps as usize),
                guidance_scale: guidance_scale.unwrap_or(cfg.video_guidance),
                seed,
                latents,
                image: first,
            };
            let fps = fps.unwrap_or(cfg.video_fps);
            let bar = indicatif::ProgressBar::new(
                (req.steps + (n - 1) / wan.temporal_factor() + 1) as u64,
            );
            let started = std::time::Instant::now();
            let mut denoised = None;
            let frames = tokio::task::block_in_place(|| {
                wan.generate(&req, &mut |stage| {
                    if let models::video::Stage::Denoise { done, total } = stage {
                        if done == total {
                            denoised = Some(started.elapsed().as_secs_f64());
                        }
                    }
                    bar.inc(1);
                    true
                })
            })?;
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            let denoise = denoised.unwrap_or(secs);
            if let Some(dir) = &frames_dir {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                for (i, f) in frames.iter().enumerate() {
                    let bytes =
                        models::image::encode::encode(f, models::image::encode::ImageFormat::Png)?;
                    std::fs::write(dir.join(format!("{i:05}.png")), bytes)?;
                }
            }
            let mp4 = models::video::mp4::encode_mp4(&frames, fps as f64)?;
            std::fs::write(&out, &mp4.bytes)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{} ({}x{}, {} frames at {fps} fps, {:.2} s, {} steps, seed {seed})",
                out.display(),
                w,
                h,
                frames.len(),
                mp4.duration_s(),
                req.steps
            );
            println!("denoise {denoise:.2} s, decode {:.2} s", secs - denoise);
            println!("gen {secs:.2} s");
            Ok(())
        }
        Command::RenderPrompt { job, explain, seed } => {
            let engine = cli.config.chat_engine().await?;
            let input = read_job_input(&job)?;
            let job =
                pipeline::ChatRespondJob::parse(&input).map_err(|e| anyhow::anyhow!("{e}"))?;
            let prepared =
                engine.prepare(&job, seed, chrono::Utc::now().fixed_offset(), &|| false)?;
            print!("{}", prepared.prompt);
            if explain {
                println!("\n---\n{}", prepared.report.explain());
            }
            Ok(())
        }
    }
}

/// A job file holds either the RunPod body (`{"input": {...}}`) or the input.
fn read_job_input(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&raw).with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(match v.get("input") {
        Some(input) => input.clone(),
        None => v,
    })
}

/// The embedded default: no Redis, no S3. The job goes through an in-process
/// queue to an in-process worker (the same handlers as the Redis worker) and
/// the output is printed.
async fn run_embedded(
    cfg: WorkerConfig,
    kind: JobKind,
    path: &std::path::Path,
    seed: u64,
) -> anyhow::Result<()> {
    let input = read_job_input(path)?;
    let body = serde_json::json!({ "input": input }).to_string();
    let request = RunRequest::parse(kind, body.as_bytes()).map_err(|e| match e {
        RequestError::Malformed(e) | RequestError::Invalid(e) => {
            anyhow::anyhow!("invalid job: {e}")
        }
    })?;
    let services = Arc::new(handlers::Services {
        engine: Arc::new(cfg.chat_engine().await?),
        platform: cfg.platform_client()?,
        platform_keys: cfg.platform_keys()?,
        history_messages: cfg.history_messages,
        memory_max_words: cfg.memory_max_words,
        image: cfg.image_service(&[kind]).await?,
        video: cfg.video_service(&[kind]).await?,
        outbound: cfg.outbound_guard()?,
    });
    let (queue, mut consumer) = memory_queue();
    let worker = tokio::spawn(async move {
        while let Some(queued) = consumer.next().await {
            let (deltas, _) = tokio::sync::mpsc::unbounded_channel();
            let (progress, _) = tokio::sync::mpsc::unbounded_channel();
            let ctx = handlers::RunCtx {
                job_id: queued.id.clone(),
                // The embedded mode runs the operator's own job.
                tenant: pipeline::DEFAULT_TENANT.to_string(),
                seed,
                clock: chrono::Utc::now().fixed_offset(),
                cancel: Arc::default(),
                deltas,
                progress,
                media: None,
                fence: None,
                services: services.clone(),
            };
            let (outcome, _) = handlers::run(queued.job.clone(), ctx).await;
            queued.finish(outcome);
        }
    });
    let (id, done) = queue.submit(request.job);
    tracing::info!(job = %id, "queued in-process");
    let outcome = done.await.context("the in-process worker stopped")?;
    drop(queue);
    worker.await?;
    match outcome {
        Outcome::Completed(output) => {
            println!("{}", serde_json::to_string_pretty(&output)?);
            Ok(())
        }
        Outcome::Failed(e) | Outcome::TimedOut(e) => anyhow::bail!("job {id} failed: {e}"),
    }
}
