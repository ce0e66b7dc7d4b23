//! The image job: prompts from context, Stable Diffusion with progress,
//! uploads, user-media records, delivery to the instance (see
//! `crate::image`).

use std::sync::atomic::Ordering;

use pipeline::jobs::image::{ImageJob, ImageOutput};

use super::{blocking, Handler, RunCtx};
use crate::chat::{JobError, Usage};
use crate::image::{build_prompts, deliver, gather_context, job_seed, ImageRun};

pub struct ImageHandler;

impl Handler for ImageHandler {
    type Job = ImageJob;

    async fn run(job: ImageJob, ctx: RunCtx) -> Result<(ImageOutput, Usage), JobError> {
        let service = ctx
            .services
            .image
            .clone()
            .ok_or_else(|| JobError::new("this worker has no image model (IMAGE_MODEL)"))?;
        let model = service.model().await?;
        let context =
            gather_context(&job, || ctx.platform(), ctx.services.history_messages).await?;
        let seed = job_seed(&job, ctx.seed);
        let (job, (prompt, negative, usage)) = {
            let engine = ctx.services.engine.clone();
            let cancel = ctx.cancel.clone();
            blocking(move || {
                let mut usage = Usage::default();
                let cancelled = || cancel.load(Ordering::Relaxed);
                let prompts = build_prompts(&job, &context, &engine, seed, &cancelled, &mut usage)?;
                Ok((job, (prompts.0, prompts.1, usage)))
            })
            .await?
        };
        tracing::info!(prompt = %prompt, negative = %negative, seed, "image prompt");
        let (req, images) = {
            let (job, service, model) = (job.clone(), service.clone(), model.clone());
            let (cancel, progress_tx) = (ctx.cancel.clone(), ctx.progress.clone());
            let (job_id, tenant) = (ctx.job_id.clone(), ctx.tenant.clone());
            let (prompt, negative) = (prompt.clone(), negative.clone());
            blocking(move || {
                let run = ImageRun {
                    service: &service,
                    job: &job,
                    job_id: &job_id,
                    tenant: &tenant,
                    seed,
                    prompt,
                    negative_prompt: negative,
                };
                run.generate(&model, &mut |step, steps| {
                    let _ = progress_tx.send(serde_json::json!({"step": step, "steps": steps}));
                    !cancel.load(Ordering::Relaxed)
                })
            })
            .await?
        };
        // Nothing leaves the worker once the job is no longer this run's.
        ctx.check_lease().await?;
        let run = ImageRun {
            service: &service,
            job: &job,
            job_id: &ctx.job_id,
            tenant: &ctx.tenant,
            seed,
            prompt,
            negative_prompt: negative,
        };
        let store = ctx.media.clone().unwrap_or_else(|| service.store.clone());
        let mut output = run.upload(&store, &req, images).await?;
        if job.activity_instance_id.is_some() {
            ctx.check_lease().await?;
            output.message = deliver(&ctx.platform()?, &job, &ctx.job_id, &output).await?;
        }
        Ok((output, usage))
    }
}
