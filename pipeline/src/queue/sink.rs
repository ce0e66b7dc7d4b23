//! The producer side as an apalis [`TaskSink`]: Rust services that feed the
//! queue directly (rather than through the shim's HTTP routes) push typed
//! [`RunRequest`]s with `push`/`push_bulk`/`push_stream`, the same records
//! the shim writes. Workers read through the Streams consumer (the worker's
//! apalis backend), so this sink yields no tasks of its own.
//!
//! [`TaskSink`]: apalis_core::backend::TaskSink

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use apalis_core::backend::codec::Codec;
use apalis_core::backend::finalize::Durable;
use apalis_core::backend::{Backend, BackendConfig, WireFormatBackend};
use apalis_core::task::Task;
use apalis_core::worker::context::WorkerContext;

use super::RedisQueue;
use crate::{PipelineError, RunRequest};

type Flush = Pin<Box<dyn Future<Output = Result<Vec<String>, PipelineError>> + Send>>;

/// Tasks pushed before a flush are written together; a sink holds at most
/// this many before it writes them.
const BUFFER: usize = 256;

/// The codec of [`JobSink`]: a request is already typed and checked, so it
/// travels as it is (the queue stores its input).
#[derive(Clone, Copy, Debug, Default)]
pub struct TypedRequest;

impl Codec<RunRequest> for TypedRequest {
    type Error = std::convert::Infallible;
    type Compact = RunRequest;

    fn encode(&self, val: &RunRequest) -> Result<RunRequest, Self::Error> {
        Ok(val.clone())
    }

    fn decode(&self, val: &RunRequest) -> Result<RunRequest, Self::Error> {
        Ok(val.clone())
    }
}

/// Pushes jobs into the queue under one owner (the tenant whose API key
/// would have submitted them).
pub struct JobSink {
    queue: RedisQueue,
    owner: String,
    buffer: Vec<RunRequest>,
    flushing: Option<Flush>,
    enqueued: Vec<String>,
}

impl JobSink {
    pub fn new(queue: &RedisQueue, owner: &str) -> Self {
        Self {
            queue: queue.clone(),
            owner: owner.to_string(),
            buffer: Vec::new(),
            flushing: None,
            enqueued: Vec::new(),
        }
    }

    /// The ids of the jobs written so far, in the order they were pushed.
    pub fn enqueued(&self) -> &[String] {
        &self.enqueued
    }
}

impl futures::Sink<Task<RunRequest>> for JobSink {
    type Error = PipelineError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.buffer.len() >= BUFFER {
            return self.poll_flush(cx);
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, item: Task<RunRequest>) -> Result<(), Self::Error> {
        self.buffer.push(item.args);
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            if let Some(flushing) = self.flushing.as_mut() {
                let written = futures::ready!(flushing.as_mut().poll(cx));
                self.flushing = None;
                self.enqueued.extend(written?);
            }
            if self.buffer.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let batch = std::mem::take(&mut self.buffer);
            let (queue, owner) = (self.queue.clone(), self.owner.clone());
            // In order, one after another: a failure leaves the jobs after
            // it unwritten (and unreported), never written twice.
            self.flushing = Some(Box::pin(async move {
                let mut ids = Vec::with_capacity(batch.len());
                for req in &batch {
                    ids.push(queue.enqueue(req, &owner).await?.id);
                }
                Ok(ids)
            }));
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll_flush(cx)
    }
}

impl Backend for JobSink {
    type Task = Task<RunRequest>;
    type Error = PipelineError;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// A producer: no tasks come out of it.
    fn poll_next(
        &mut self,
        _cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        Poll::Ready(None)
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        futures::Sink::poll_close(Pin::new(self), cx)
    }
}

impl BackendConfig for JobSink {
    type Args = RunRequest;
    type Id = apalis_core::task::task_id::RandomId;
    type Kind = Durable;
    type Config = ();
    /// Never run as a worker's backend: no middleware.
    type Layer = ();

    fn config(&self) -> &Self::Config {
        &()
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> Self::Layer {}
}

impl WireFormatBackend for JobSink {
    type Codec = TypedRequest;
    type Compact = RunRequest;

    fn codec(&self) -> &Self::Codec {
        &TypedRequest
    }
}
