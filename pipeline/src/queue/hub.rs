//! One Redis connection for every open token stream of a process: readers
//! ask the hub for a job's events after an entry id, and one task issues a
//! single blocking `XREAD` over every stream someone waits on, handing each
//! reader its own events. A reader that arrives while that read blocks
//! wakes it at once (`CLIENT UNBLOCK` from the shared connection), so a new
//! stream's first tokens are not delayed. Without it, each open SSE or
//! chunked stream held a Redis connection of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::tokens::TokenEvent;
use super::RedisQueue;
use crate::PipelineError;

type Events = Vec<(String, TokenEvent)>;

struct Wait {
    key: String,
    after: String,
    deadline: Instant,
    reply: oneshot::Sender<Result<Events, PipelineError>>,
}

/// A handle on the hub (cheap to clone).
#[derive(Clone)]
pub struct TokenHub {
    queue: RedisQueue,
    requests: mpsc::UnboundedSender<Wait>,
    /// The client id of the hub's connection while its read blocks, else 0.
    blocked: Arc<AtomicI64>,
}

/// The longest one shared read blocks before deadlines are looked at again.
const MAX_BLOCK: Duration = Duration::from_millis(500);

/// A stream entry id as numbers, to compare (`ms-seq`).
fn entry_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

impl TokenHub {
    /// Starts the hub's reading task (its connection is made when the
    /// first reader comes, so Redis need not be up yet).
    pub fn start(queue: &RedisQueue) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        let blocked = Arc::new(AtomicI64::new(0));
        tokio::spawn(run(queue.clone(), rx, blocked.clone()));
        Self {
            queue: queue.clone(),
            requests,
            blocked,
        }
    }

    /// Job `id`'s token events after entry `after` ("0" from the start),
    /// waiting up to `block` for some.
    pub async fn read(
        &self,
        id: &str,
        after: &str,
        block: Duration,
    ) -> Result<Events, PipelineError> {
        let (reply, answer) = oneshot::channel();
        let wait = Wait {
            key: self.queue.keys().tokens(id),
            after: after.to_string(),
            deadline: Instant::now() + block,
            reply,
        };
        self.requests
            .send(wait)
            .map_err(|_| PipelineError::Other("the token hub stopped".into()))?;
        // The hub may be blocked on the streams it knew: wake it so it
        // reads this one too.
        let client = self.blocked.load(Ordering::SeqCst);
        if client != 0 {
            let _: Result<i64, _> = redis::cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(client)
                .query_async(&mut self.queue.connection())
                .await;
        }
        answer
            .await
            .map_err(|_| PipelineError::Other("the token hub stopped".into()))?
    }
}

/// Every waiting reader gets `e` (the shim's readers wait out a Redis
/// restart).
fn fail_all(waiting: &mut Vec<Wait>, e: &PipelineError) {
    for w in waiting.drain(..) {
        let _ = w.reply.send(Err(e.copy()));
    }
}

async fn run(
    queue: RedisQueue,
    mut requests: mpsc::UnboundedReceiver<Wait>,
    blocked: Arc<AtomicI64>,
) {
    let mut waiting: Vec<Wait> = Vec::new();
    let mut client_id: Option<i64> = None;
    let mut connection: Option<redis::aio::ConnectionManager> = None;
    loop {
        if waiting.is_empty() {
            match requests.recv().await {
                Some(w) => waiting.push(w),
                None => return,
            }
        }
        let conn = match &mut connection {
            Some(c) => c,
            None => match queue.blocking_connection().await {
                Ok(c) => connection.insert(c),
                Err(e) => {
                    fail_all(&mut waiting, &e);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            },
        };
        if client_id.is_none() {
            client_id = redis::cmd("CLIENT")
                .arg("ID")
                .query_async::<i64>(conn)
                .await
                .ok();
        }
        // Announce the block before the last look at the queue of readers:
        // one that comes after this look sees the flag and wakes the read.
        blocked.store(client_id.unwrap_or(0), Ordering::SeqCst);
        while let Ok(w) = requests.try_recv() {
            waiting.push(w);
        }
        waiting.retain(|w| !w.reply.is_closed());
        if waiting.is_empty() {
            blocked.store(0, Ordering::SeqCst);
            continue;
        }
        // One read over every stream, from the earliest entry any of its
        // readers has.
        let mut from: HashMap<&str, &str> = HashMap::new();
        for w in &waiting {
            let e = from.entry(w.key.as_str()).or_insert(w.after.as_str());
            if entry_order(&w.after) < entry_order(e) {
                *e = w.after.as_str();
            }
        }
        let (keys, ids): (Vec<&str>, Vec<&str>) = from.into_iter().unzip();
        let now = Instant::now();
        let soonest = waiting.iter().map(|w| w.deadline).min().expect("not empty");
        let block = soonest.saturating_duration_since(now).min(MAX_BLOCK);
        let opts = StreamReadOptions::default()
            .count(256)
            .block(block.as_millis().max(1) as usize);
        let read: Result<Option<StreamReadReply>, _> = conn.xread_options(&keys, &ids, &opts).await;
        blocked.store(0, Ordering::SeqCst);
        let reply = match read {
            Ok(r) => r,
            Err(e) => {
                // The connection reconnects by itself (its client id changes).
                let e = PipelineError::from(e);
                client_id = None;
                fail_all(&mut waiting, &e);
                if crate::queue::is_unavailable(&e) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let mut by_key: HashMap<String, Vec<redis::streams::StreamId>> = HashMap::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            by_key.insert(k.key, k.ids);
        }
        let now = Instant::now();
        let mut still = Vec::with_capacity(waiting.len());
        for w in waiting.drain(..) {
            let after = entry_order(&w.after);
            let events: Events = by_key
                .get(&w.key)
                .map(|ids| {
                    ids.iter()
                        .filter(|e| entry_order(&e.id) > after)
                        .map(|e| (e.id.clone(), TokenEvent::from_entry(e)))
                        .collect()
                })
                .unwrap_or_default();
            if !events.is_empty() || now >= w.deadline {
                let _ = w.reply.send(Ok(events));
            } else {
                still.push(w);
            }
        }
        waiting = still;
    }
}

#[cfg(test)]
mod tests {
    use super::entry_order;

    #[test]
    fn entry_ids_compare_as_numbers() {
        assert!(entry_order("10-0") > entry_order("9-5"));
        assert!(entry_order("9-10") > entry_order("9-9"));
        assert_eq!(entry_order("0"), (0, 0));
    }
}
