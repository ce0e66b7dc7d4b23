//! The streamed chat job: context from the platform, the reply streamed,
//! both messages saved once (see `crate::stream`).

use pipeline::jobs::chat_stream::{ChatStreamJob, ChatStreamOutput};

use super::{Handler, RunCtx};
use crate::chat::{JobError, Usage};
use crate::stream::StreamRun;

pub struct ChatStreamHandler;

impl Handler for ChatStreamHandler {
    type Job = ChatStreamJob;

    async fn run(job: ChatStreamJob, ctx: RunCtx) -> Result<(ChatStreamOutput, Usage), JobError> {
        let s = &ctx.services;
        StreamRun {
            engine: s.engine.clone(),
            platform: ctx.platform()?,
            history_messages: s.history_messages,
            memory_max_words: s.memory_max_words,
            job_id: ctx.job_id.clone(),
            job,
            seed: ctx.seed,
            clock: ctx.clock,
            cancel: ctx.cancel.clone(),
            deltas: ctx.deltas.clone(),
            media: ctx.media.clone(),
            fence: ctx.fence.clone(),
        }
        .run()
        .await
    }
}
