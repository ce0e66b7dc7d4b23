//! One handler per job kind behind one trait, one context struct with what
//! a run needs, and the table from kind to handler ([`run`]).
//!
//! A handler gets its kind's typed job (parsed once, when the worker read
//! the record) and returns its kind's typed output; the runtime around it
//! (`serve.rs`, or the embedded mode) owns leases, timeouts, the token
//! stream and the result.

mod chat;
mod chat_stream;
mod echo;
mod image;
mod memory;
mod video;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, FixedOffset};
use pipeline::platform::PlatformClient;
use pipeline::queue::{LeaseGuard, Outcome};
use pipeline::{Job, JobContract, JobKind};
use tokio::sync::mpsc::UnboundedSender;

use crate::chat::{ChatEngine, JobError, Usage};

/// What every run may use, shared by all runs of a worker.
pub struct Services {
    pub engine: Arc<ChatEngine>,
    /// The platform API (context by id, message saves), when configured.
    pub platform: Option<PlatformClient>,
    /// Each tenant's platform key: a run calls the platform as its tenant.
    pub platform_keys: std::collections::HashMap<String, String>,
    /// Recent messages a streamed chat's prompt reads.
    pub history_messages: usize,
    /// Words of memory scratchpad a streamed chat's prompt includes.
    pub memory_max_words: u32,
    /// The image model and media store (None: this worker serves no image
    /// jobs).
    pub image: Option<Arc<crate::image::ImageService>>,
    /// The video model (None: this worker serves no video jobs).
    pub video: Option<Arc<crate::video::VideoService>>,
    /// The guard for URLs callers name (`OUTBOUND_ALLOW`).
    pub outbound: pipeline::outbound::OutboundGuard,
}

/// What a run adds to its job's token stream, in the order sent: the text
/// of a sentence goes out before the audio that speaks it.
#[derive(Debug)]
pub enum StreamItem {
    /// New text of an option.
    Text(usize, String),
    /// A spoken chunk of the reply.
    Audio(pipeline::queue::AudioChunk),
}

/// One run of one job.
pub struct RunCtx {
    pub job_id: String,
    /// The tenant that submitted the job (its platform credentials).
    pub tenant: String,
    /// Sampling seed (from the job id, so a re-run repeats the text).
    pub seed: u64,
    /// The job's clock: its submission time.
    pub clock: DateTime<FixedOffset>,
    /// Set when the run must stop (cancel, timeout, lost lease, drain).
    pub cancel: Arc<AtomicBool>,
    /// Text deltas by option and spoken chunks, for the job's token stream.
    pub deltas: UnboundedSender<StreamItem>,
    /// Progress (`{step, steps}`) of a media job, for `/status` and the
    /// stream.
    pub progress: UnboundedSender<serde_json::Value>,
    /// The caller's own bucket for this job's media (RunPod's `s3Config`).
    pub media: Option<Arc<pipeline::media_store::MediaStore>>,
    /// The run's lease (None in the embedded mode): writes outside Redis
    /// (platform saves, uploads) check it first.
    pub fence: Option<LeaseGuard>,
    pub services: Arc<Services>,
}

impl RunCtx {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Fails the run when another run holds the job now (or it was
    /// cancelled): nothing more leaves the worker.
    pub async fn check_lease(&self) -> Result<(), JobError> {
        let Some(fence) = &self.fence else {
            return Ok(());
        };
        match fence.holds().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(JobError::new(
                "this run no longer holds the job (taken over or cancelled): nothing delivered",
            )),
            Err(e) => Err(JobError::new(format!("checking the job's lease: {e}"))),
        }
    }

    /// The platform client calling with this run's tenant's key.
    pub fn platform(&self) -> Result<PlatformClient, JobError> {
        let platform = self.services.platform.as_ref().ok_or_else(|| {
            JobError::new("this job needs the platform API: set PLATFORM_URL on the worker")
        })?;
        let key = self.services.platform_keys.get(&self.tenant).ok_or_else(|| {
            JobError::new(
                "no platform key for this job's tenant: set PLATFORM_API_KEYS (tenant:key) on the worker",
            )
        })?;
        Ok(platform.with_key(key))
    }
}

/// A kind's handler.
pub trait Handler {
    type Job: JobContract;
    fn run(
        job: Self::Job,
        ctx: RunCtx,
    ) -> impl Future<Output = Result<(<Self::Job as JobContract>::Output, Usage), JobError>> + Send;
}

/// The kinds this worker's models can serve: the text kinds always, image
/// and video when their models are configured (never `echo`, which
/// `WORKER_KINDS` must name).
pub fn served_kinds(image: bool, video: bool) -> Vec<JobKind> {
    JobKind::ALL
        .into_iter()
        .filter(|k| image || *k != JobKind::Image)
        .filter(|k| video || *k != JobKind::Video)
        .collect()
}

/// The table: runs `job` with its kind's handler.
pub async fn run(job: Job, ctx: RunCtx) -> (Outcome, Usage) {
    match job {
        Job::Chat(job) => finish::<chat::ChatHandler>(*job, ctx).await,
        Job::Memory(job) => finish::<memory::MemoryHandler>(job, ctx).await,
        Job::ChatStream(job) => finish::<chat_stream::ChatStreamHandler>(*job, ctx).await,
        Job::Image(job) => finish::<image::ImageHandler>(*job, ctx).await,
        Job::Video(job) => finish::<video::VideoHandler>(*job, ctx).await,
        Job::Echo(job) => finish::<echo::EchoHandler>(job, ctx).await,
    }
}

async fn finish<H: Handler>(job: H::Job, ctx: RunCtx) -> (Outcome, Usage) {
    match H::run(job, ctx).await {
        Ok((output, usage)) => (
            Outcome::Completed(serde_json::to_value(output).expect("output serializes")),
            usage,
        ),
        Err(e) => (Outcome::Failed(e.0), Usage::default()),
    }
}

/// Runs blocking model work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, JobError> + Send + 'static,
) -> Result<T, JobError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| JobError::new(format!("the job's model task stopped: {e}")))?
}
