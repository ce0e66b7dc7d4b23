//! The worker runtime on apalis-core: our Redis Streams consumer is an
//! apalis [`Backend`], each slot is an apalis `Worker` built with
//! `WorkerBuilder` and tower layers (a concurrency limit, so a job is only
//! claimed when the slot is free), and the service runs one leased job
//! (`serve::run_lease`: fencing, hard execution timeout, panics caught,
//! drain and hand-back).
//!
//! apalis-core pulls a task only after both the backend and the service are
//! ready (`CallAll`), so with `ConcurrencyLimitLayer::new(n)` a slot claims
//! its next job — which spends an attempt and starts the lease — only when
//! one of its `n` runs is free. Redis errors never reach apalis: the backend
//! waits them out with backoff (a worker must not stop on a Redis restart).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::task::Task;
use apalis_core::worker::context::WorkerContext;
use pipeline::queue::{is_unavailable, Consumer, Lease};
use pipeline::PipelineError;

type Read = Pin<Box<dyn Future<Output = (Consumer, Result<Option<Lease>, PipelineError>)> + Send>>;

/// Our queue consumer as an apalis backend: each task is a claimed run.
pub struct StreamsBackend {
    consumer: Option<Consumer>,
    /// Where the consumer goes when the worker closes the backend, so the
    /// slot can hand back what it read and leave the worker list.
    closed: Option<tokio::sync::oneshot::Sender<Consumer>>,
    reading: Option<Read>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    backoff: Duration,
    block: Duration,
}

impl StreamsBackend {
    /// `block`: how long one read waits for a job before looking again.
    pub fn new(
        consumer: Consumer,
        block: Duration,
        closed: tokio::sync::oneshot::Sender<Consumer>,
    ) -> Self {
        Self {
            consumer: Some(consumer),
            closed: Some(closed),
            reading: None,
            pause: None,
            backoff: Duration::from_millis(100),
            block,
        }
    }
}

/// The error type apalis wants; never produced (Redis errors are waited out).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(String);

impl Backend for StreamsBackend {
    type Task = Task<Lease>;
    type Error = BackendError;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.pause = None;
            }
            if self.reading.is_none() {
                if worker.is_shutting_down() {
                    return Poll::Ready(None);
                }
                let mut consumer = self.consumer.take().expect("a consumer between reads");
                let block = self.block;
                self.reading = Some(Box::pin(async move {
                    let next = consumer.next(block).await;
                    (consumer, next)
                }));
            }
            let read = self.reading.as_mut().expect("set above");
            let Poll::Ready((consumer, next)) = read.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            self.reading = None;
            self.consumer = Some(consumer);
            match next {
                Ok(Some(lease)) => {
                    self.backoff = Duration::from_millis(100);
                    return Poll::Ready(Some(Ok(Task::new(lease))));
                }
                Ok(None) => continue,
                Err(e) => {
                    if is_unavailable(&e) {
                        tracing::warn!(error = %e, "reading the queue failed (Redis unavailable); retrying");
                    } else {
                        tracing::error!(error = %e, "reading the queue failed; retrying");
                    }
                    self.pause = Some(Box::pin(tokio::time::sleep(self.backoff)));
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn poll_close(
        &mut self,
        _cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        // A read still in flight is dropped: an entry it read but did not
        // claim is taken over by another worker after the lease window
        // (no attempt spent).
        self.reading = None;
        if let (Some(consumer), Some(closed)) = (self.consumer.take(), self.closed.take()) {
            let _ = closed.send(consumer);
        }
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for StreamsBackend {
    type Args = Lease;
    type Id = apalis_core::task::task_id::RandomId;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = tower::layer::util::Identity;

    fn config(&self) -> &Self::Config {
        &()
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> Self::Layer {
        tower::layer::util::Identity::new()
    }
}
