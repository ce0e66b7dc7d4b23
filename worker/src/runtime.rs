//! The worker runtime on apalis-core: our Redis Streams consumer is an
//! apalis [`Backend`], each slot is an apalis `Worker` built with
//! `WorkerBuilder` and tower layers (a span per run, a concurrency limit so
//! a job is only claimed when the slot is free), all slots run under one
//! apalis `Monitor`, and the service runs one leased job
//! (`serve::run_lease`: fencing, hard execution timeout, panics caught,
//! drain and hand-back).
//!
//! apalis-core pulls a task only after both the backend and the service are
//! ready (`CallAll`), so with `ConcurrencyLimitLayer::new(n)` a slot claims
//! its next job — which spends an attempt and starts the lease — only when
//! one of its `n` runs is free. Redis errors never reach apalis: the backend
//! waits them out with backoff (a worker must not stop on a Redis restart).
//! The backend owns the slot's consumer: it joins the worker list on the
//! first poll (Redis may not be up yet), heartbeats while the worker lives,
//! and on close — which apalis calls only once no run is in flight — hands
//! back what it read and leaves the worker list.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::task::Task;
use apalis_core::worker::context::WorkerContext;
use pipeline::queue::{is_unavailable, Consumer, Lease, RedisQueue, RunControl};
use pipeline::{JobKind, PipelineError};
use tracing::Instrument;

type Read = Pin<Box<dyn Future<Output = (Consumer, Result<Option<Lease>, PipelineError>)> + Send>>;
type Joining = Pin<Box<dyn Future<Output = Result<Consumer, PipelineError>> + Send>>;
type Closing = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One claimed run, as apalis hands it to the service: the lease and the
/// consumer's handle for settling it.
pub struct Claimed {
    pub lease: Lease,
    pub control: RunControl,
}

/// Our queue consumer as an apalis backend: each task is a claimed run.
pub struct StreamsBackend {
    queue: RedisQueue,
    kinds: Vec<JobKind>,
    name: String,
    consumer: Option<Consumer>,
    joining: Option<Joining>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    reading: Option<Read>,
    closing: Option<Closing>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    backoff: Duration,
    block: Duration,
}

impl StreamsBackend {
    /// A consumer of `kinds` named `name`; `block`: how long one read waits
    /// for a job before looking again.
    pub fn new(queue: RedisQueue, kinds: Vec<JobKind>, name: String, block: Duration) -> Self {
        Self {
            queue,
            kinds,
            name,
            consumer: None,
            joining: None,
            heartbeat: None,
            reading: None,
            closing: None,
            pause: None,
            backoff: Duration::from_millis(100),
            block,
        }
    }

    fn wait_out(&mut self, what: &str, e: &PipelineError) {
        if is_unavailable(e) {
            tracing::warn!(error = %e, "{what} failed (Redis unavailable); retrying");
        } else {
            tracing::error!(error = %e, "{what} failed; retrying");
        }
        self.pause = Some(Box::pin(tokio::time::sleep(self.backoff)));
        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
    }
}

/// The error type apalis wants; never produced (Redis errors are waited out).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(String);

impl Backend for StreamsBackend {
    type Task = Task<Claimed>;
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
            if self.reading.is_none() && worker.is_shutting_down() {
                return Poll::Ready(None);
            }
            if self.consumer.is_none() && self.reading.is_none() {
                let joining = self.joining.get_or_insert_with(|| {
                    let (queue, kinds, name) =
                        (self.queue.clone(), self.kinds.clone(), self.name.clone());
                    Box::pin(async move { queue.consumer(&kinds, &name).await })
                });
                let Poll::Ready(joined) = joining.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                self.joining = None;
                match joined {
                    Ok(consumer) => {
                        let kinds: Vec<&str> = self.kinds.iter().map(|k| k.as_str()).collect();
                        tracing::info!(worker = %self.name, ?kinds, "waiting for jobs");
                        self.heartbeat = Some(consumer.spawn_heartbeat());
                        self.consumer = Some(consumer);
                        self.backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        self.wait_out("joining the worker list", &e);
                        continue;
                    }
                }
            }
            if self.reading.is_none() {
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
            let control = consumer.control();
            self.consumer = Some(consumer);
            match next {
                Ok(Some(lease)) => {
                    self.backoff = Duration::from_millis(100);
                    return Poll::Ready(Some(Ok(Task::new(Claimed { lease, control }))));
                }
                Ok(None) => continue,
                Err(e) => self.wait_out("reading the queue", &e),
            }
        }
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        let closing = self.closing.get_or_insert_with(|| {
            // A read still in flight is dropped: an entry it read but did
            // not claim is taken over by another worker after the lease
            // window (no attempt spent).
            self.reading = None;
            self.joining = None;
            if let Some(heartbeat) = self.heartbeat.take() {
                heartbeat.abort();
            }
            let (consumer, queue, name) =
                (self.consumer.take(), self.queue.clone(), self.name.clone());
            Box::pin(async move {
                let left = match consumer {
                    Some(mut consumer) => consumer.deregister().await,
                    None => queue.deregister_worker(&name).await,
                };
                if let Err(e) = left {
                    tracing::warn!(error = %e, "leaving the worker list failed (the entry expires by itself)");
                }
            })
        });
        closing.as_mut().poll(cx).map(Ok)
    }
}

impl BackendConfig for StreamsBackend {
    type Args = Claimed;
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

/// A tower layer that runs each claimed job inside a `job` span (id, kind,
/// attempt, lease token), so every log line of a run names its job.
#[derive(Clone, Copy, Default)]
pub struct TraceRunsLayer;

impl<S> tower::Layer<S> for TraceRunsLayer {
    type Service = TraceRuns<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceRuns(inner)
    }
}

#[derive(Clone)]
pub struct TraceRuns<S>(S);

impl<S> tower::Service<Task<Claimed>> for TraceRuns<S>
where
    S: tower::Service<Task<Claimed>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, task: Task<Claimed>) -> Self::Future {
        let lease = &task.args.lease;
        let span = tracing::info_span!(
            "job",
            id = %lease.record.id,
            kind = lease.record.kind.as_str(),
            attempt = lease.attempt,
            run = lease.run,
        );
        self.0.call(task).instrument(span)
    }
}
