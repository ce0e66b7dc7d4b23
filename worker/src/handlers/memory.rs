//! The memory condense job: the scratchpad within `max_words`.

use pipeline::jobs::memory::{MemoryCondenseJob, MemoryCondenseOutput};

use super::{blocking, Handler, RunCtx};
use crate::chat::{JobError, Usage};

pub struct MemoryHandler;

impl Handler for MemoryHandler {
    type Job = MemoryCondenseJob;

    async fn run(
        job: MemoryCondenseJob,
        ctx: RunCtx,
    ) -> Result<(MemoryCondenseOutput, Usage), JobError> {
        let engine = ctx.services.engine.clone();
        blocking(move || crate::memory::condense(&engine, &job, ctx.seed, &|| ctx.cancelled()))
            .await
    }
}
