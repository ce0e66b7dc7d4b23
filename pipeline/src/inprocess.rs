//! An in-process queue for the embedded mode: no Redis, one process, jobs
//! handed to a worker task through a channel and answered through another.
//! Jobs stay typed: nothing is serialized in-process.

use tokio::sync::{mpsc, oneshot};

use crate::queue::Outcome;
use crate::Job;

/// A job in the in-process queue.
pub struct MemoryJob {
    pub id: String,
    pub job: Job,
    done: oneshot::Sender<Outcome>,
}

impl MemoryJob {
    pub fn finish(self, outcome: Outcome) {
        // The submitter may have given up waiting; nothing to do then.
        let _ = self.done.send(outcome);
    }
}

/// The submitting side.
#[derive(Clone)]
pub struct MemoryQueue {
    tx: mpsc::UnboundedSender<MemoryJob>,
}

/// The consuming side.
pub struct MemoryConsumer {
    rx: mpsc::UnboundedReceiver<MemoryJob>,
}

pub fn memory_queue() -> (MemoryQueue, MemoryConsumer) {
    let (tx, rx) = mpsc::unbounded_channel();
    (MemoryQueue { tx }, MemoryConsumer { rx })
}

impl MemoryQueue {
    /// Queues a job; the receiver yields its outcome.
    pub fn submit(&self, job: Job) -> (String, oneshot::Receiver<Outcome>) {
        let id = uuid::Uuid::new_v4().to_string();
        let (done, rx) = oneshot::channel();
        let job = MemoryJob {
            id: id.clone(),
            job,
            done,
        };
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job) {
            job.finish(Outcome::Failed("the in-process worker has stopped".into()));
        }
        (id, rx)
    }
}

impl MemoryConsumer {
    /// The next job; None once every submitter is gone.
    pub async fn next(&mut self) -> Option<MemoryJob> {
        self.rx.recv().await
    }
}
