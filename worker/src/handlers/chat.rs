//! The chat job (seed 003): character prompt, N options from one prefill,
//! audio messages transcribed, the reply spoken when asked.

use std::sync::atomic::Ordering;

use pipeline::jobs::chat::{ChatRespondJob, ChatRespondOutput};

use super::{blocking, Handler, RunCtx, StreamItem};
use crate::chat::{JobError, Usage};

pub struct ChatHandler;

impl Handler for ChatHandler {
    type Job = ChatRespondJob;

    async fn run(job: ChatRespondJob, ctx: RunCtx) -> Result<(ChatRespondOutput, Usage), JobError> {
        let engine = ctx.services.engine.clone();
        blocking(move || {
            let deltas = ctx.deltas.clone();
            engine.respond(
                &job,
                &crate::chat::ChatRun {
                    job_id: &ctx.job_id,
                    seed: ctx.seed,
                    clock: ctx.clock,
                    job_store: ctx.media.as_deref(),
                },
                &|| ctx.cancel.load(Ordering::Relaxed),
                &mut |i, d| {
                    let _ = deltas.send(StreamItem::Text(i, d.to_string()));
                },
            )
        })
        .await
    }
}
