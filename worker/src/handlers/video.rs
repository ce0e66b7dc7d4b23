//! The video job: context and prompts as the image job's, the first frame
//! (generated or the skin's reference), Wan with progress, MP4 + poster,
//! uploads, the user-media record, delivery (see `crate::video`).

use std::sync::atomic::Ordering;

use models::video::Stage;
use pipeline::jobs::video::{FirstFrame, VideoJob, VideoOutput};
use serde_json::json;

use super::{blocking, Handler, RunCtx};
use crate::chat::{JobError, Usage};
use crate::image::{gather_context, image_prompts, job_seed, video_prompts, write_scene, ImageRun};
use crate::video::{deliver, fetch_reference, generate, reference_url, request, upload, Finished};

pub struct VideoHandler;

impl Handler for VideoHandler {
    type Job = VideoJob;

    async fn run(job: VideoJob, ctx: RunCtx) -> Result<(VideoOutput, Usage), JobError> {
        let service = ctx
            .services
            .video
            .clone()
            .ok_or_else(|| JobError::new("this worker has no video model (VIDEO_MODEL)"))?;
        let model = service.model().await?;
        let context =
            gather_context(&job.base, || ctx.platform(), ctx.services.history_messages).await?;
        let seed = job_seed(&job.base, ctx.seed);
        let (job, context, (prompt, negative, image_prompt, usage)) = {
            let engine = ctx.services.engine.clone();
            let cancel = ctx.cancel.clone();
            blocking(move || {
                let mut usage = Usage::default();
                let cancelled = || cancel.load(Ordering::Relaxed);
                let scene =
                    write_scene(&job.base, &context, &engine, seed, &cancelled, &mut usage)?;
                let (prompt, negative) =
                    video_prompts(&job.base, &context, scene.as_deref(), seed)?;
                let image = image_prompts(&job.base, &context, scene.as_deref(), seed)?;
                Ok((job, context, (prompt, negative, image, usage)))
            })
            .await?
        };
        tracing::info!(prompt = %prompt, negative = %negative, seed, "video prompt");
        let mut req = request(&job, &service.defaults, &prompt, &negative, seed, None);
        let fps = job.fps.unwrap_or(service.defaults.fps);
        model
            .check(&req)
            .map_err(|e| JobError::new(format!("invalid input: {e}")))?;

        // The first frame.
        let first = match job.first_frame_source {
            FirstFrame::Reference => {
                if !model.supports_image() {
                    return Err(JobError::new(
                        "first_frame_source reference needs an image-to-video checkpoint (Wan 2.2 TI2V); this worker's VIDEO_MODEL does text-to-video only",
                    ));
                }
                let url =
                    reference_url(context.skin.as_ref(), job.reference_image_type.as_deref())?;
                Some(
                    fetch_reference(
                        &ctx.services.outbound,
                        &url,
                        req.width as u32,
                        req.height as u32,
                    )
                    .await?,
                )
            }
            FirstFrame::Generate if model.supports_image() => {
                let image = service.image.clone().ok_or_else(|| {
                    JobError::new(
                        "first_frame_source generate needs an image model on the worker (IMAGE_MODEL)",
                    )
                })?;
                let sd = image.model().await?;
                let mut image_job = job.base.clone();
                image_job.width = Some(req.width as u32);
                image_job.height = Some(req.height as u32);
                image_job.num_options = 1;
                let (cancel, progress_tx) = (ctx.cancel.clone(), ctx.progress.clone());
                let (job_id, tenant) = (ctx.job_id.clone(), ctx.tenant.clone());
                let (_, mut frames) = blocking(move || {
                    let run = ImageRun {
                        service: &image,
                        job: &image_job,
                        job_id: &job_id,
                        tenant: &tenant,
                        seed,
                        prompt: image_prompt.0,
                        negative_prompt: image_prompt.1,
                    };
                    run.generate(&sd, &mut |step, steps| {
                        let _ = progress_tx
                            .send(json!({"stage": "first_frame", "step": step, "steps": steps}));
                        !cancel.load(Ordering::Relaxed)
                    })
                })
                .await?;
                Some(frames.remove(0))
            }
            // A text-to-video checkpoint makes every frame itself.
            FirstFrame::Generate => None,
        };
        req.image = first;

        let frames = {
            let (model, req) = (model.clone(), req.clone());
            let (cancel, progress_tx) = (ctx.cancel.clone(), ctx.progress.clone());
            blocking(move || {
                generate(&model, &req, &mut |stage| {
                    let event = match stage {
                        Stage::Denoise { done, total } => {
                            json!({"stage": "denoise", "step": done, "steps": total})
                        }
                        Stage::Decode { done, total } => {
                            json!({"stage": "decode", "step": done, "steps": total})
                        }
                    };
                    let _ = progress_tx.send(event);
                    !cancel.load(Ordering::Relaxed)
                })
            })
            .await?
        };
        let _ = ctx
            .progress
            .send(json!({"stage": "encode", "step": 0, "steps": 1}));
        // Nothing leaves the worker once the job is no longer this run's.
        ctx.check_lease().await?;
        let store = ctx.media.clone().unwrap_or_else(|| service.store.clone());
        let mut output = upload(
            &store,
            Finished {
                job: &job,
                job_id: &ctx.job_id,
                tenant: &ctx.tenant,
                req: &req,
                fps,
            },
            frames,
        )
        .await?;
        if job.base.activity_instance_id.is_some() {
            ctx.check_lease().await?;
            output.message = deliver(&ctx.platform()?, &job, &ctx.job_id, &output).await?;
        }
        Ok((output, usage))
    }
}
