//! The echo job: returns its payload (the pipeline's own overhead; off
//! unless `WORKER_KINDS` names `echo`).

use pipeline::jobs::echo::{EchoJob, EchoOutput};

use super::{Handler, RunCtx};
use crate::chat::{JobError, Usage};

pub struct EchoHandler;

impl Handler for EchoHandler {
    type Job = EchoJob;

    async fn run(job: EchoJob, _ctx: RunCtx) -> Result<(EchoOutput, Usage), JobError> {
        Ok((
            EchoOutput {
                payload: job.payload,
            },
            Usage::default(),
        ))
    }
}
