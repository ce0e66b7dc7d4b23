//! Job-end events handed to the requests waiting on each job (`/runsync`,
//! `/status?wait`, condense, OpenAI, Cog), by id. With one broadcast
//! receiver per waiting request, every job's end woke every waiting request
//! (64 waiting clients: 64 wakes, each polling a whole HTTP connection's
//! future, for one of them to answer); here one task reads the relay and
//! wakes only the waiters of the job that ended.
//!
//! A request subscribes before it submits or reads its job (the id may not
//! exist yet) and watches the id once it has it: the events of the last
//! [`RECENT`] messages are kept, so an end that came between the two is
//! handed over when the watch starts; when more came than are kept, the
//! watcher gets [`super::RESYNC`] and reads the record again, as it does
//! after a relay reconnect.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc};

use super::{job_event_id, RESYNC};

/// Relay messages kept for watches that start after their job's end.
const RECENT: usize = 1024;

type Message = Arc<str>;

#[derive(Default)]
struct Inner {
    /// Messages relayed so far (the next one's number).
    seq: u64,
    /// The last [`RECENT`] messages, oldest first (the last is number
    /// `seq`).
    recent: VecDeque<Message>,
    /// Watches by job id: (watch number, its channel).
    watching: HashMap<String, Vec<(u64, mpsc::UnboundedSender<Message>)>>,
    next_watch: u64,
}

impl Inner {
    fn relay(&mut self, message: Message) {
        self.seq += 1;
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(message.clone());
        let id = job_event_id(&message);
        if id == RESYNC {
            for watches in self.watching.values() {
                for (_, tx) in watches {
                    let _ = tx.send(message.clone());
                }
            }
        } else if let Some(watches) = self.watching.get(id) {
            for (_, tx) in watches {
                let _ = tx.send(message.clone());
            }
        }
    }
}

/// The hub (cheap to clone).
#[derive(Clone)]
pub struct JobWaiters {
    inner: Arc<Mutex<Inner>>,
}

impl JobWaiters {
    /// Starts the task that hands out the relay's messages (`relay`: the
    /// sender [`super::RedisQueue::spawn_relay`] returned).
    pub fn start(relay: &broadcast::Sender<Message>) -> Self {
        let hub = Self {
            inner: Default::default(),
        };
        let mut rx = relay.subscribe();
        let inner = Arc::downgrade(&hub.inner);
        tokio::spawn(async move {
            loop {
                let message = match rx.recv().await {
                    Ok(m) => m,
                    // Messages were missed: every watcher reads again.
                    Err(broadcast::error::RecvError::Lagged(_)) => RESYNC.into(),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(inner) = inner.upgrade() else { return };
                inner.lock().expect("not poisoned").relay(message);
            }
        });
        hub
    }

    /// Marks now: a watch made from this subscription gets its job's
    /// messages relayed from here on.
    pub fn subscribe(&self) -> Subscription {
        let since = self.inner.lock().expect("not poisoned").seq;
        Subscription {
            hub: self.clone(),
            since,
        }
    }

    /// Watches open now: requests waiting on their job (the shim's
    /// `shim_waiting_requests`).
    pub fn watching(&self) -> usize {
        let inner = self.inner.lock().expect("not poisoned");
        inner.watching.values().map(Vec::len).sum()
    }
}

/// A point in the relay's messages, taken before the job is submitted or
/// read.
pub struct Subscription {
    hub: JobWaiters,
    since: u64,
}

impl Subscription {
    /// The messages of job `id` (and [`RESYNC`]) relayed since the
    /// subscription was taken.
    pub fn watch(self, id: &str) -> JobWatch {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.hub.inner.lock().expect("not poisoned");
        // What came between the subscription and now, from the kept
        // messages; RESYNC when some of them are no longer kept.
        let oldest_kept = inner.seq + 1 - inner.recent.len() as u64;
        if oldest_kept > self.since + 1 {
            let _ = tx.send(RESYNC.into());
        }
        // Numbered in order: the ones after `since` are the last few.
        let after = (self.since + 1).saturating_sub(oldest_kept) as usize;
        for message in inner.recent.iter().skip(after) {
            let mid = job_event_id(message);
            if mid == id || mid == RESYNC {
                let _ = tx.send(message.clone());
            }
        }
        inner.next_watch += 1;
        let number = inner.next_watch;
        inner
            .watching
            .entry(id.to_string())
            .or_default()
            .push((number, tx));
        drop(inner);
        JobWatch {
            hub: self.hub,
            id: id.to_string(),
            number,
            rx,
        }
    }
}

/// The relayed messages of one job; stops watching when dropped.
pub struct JobWatch {
    hub: JobWaiters,
    id: String,
    number: u64,
    rx: mpsc::UnboundedReceiver<Message>,
}

impl JobWatch {
    /// The next message: the job's end event or [`RESYNC`].
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        let mut inner = self.hub.inner.lock().expect("not poisoned");
        if let Some(watches) = inner.watching.get_mut(&self.id) {
            watches.retain(|(n, _)| *n != self.number);
            if watches.is_empty() {
                inner.watching.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-out task runs on this (current-thread) runtime: lets it
    /// take what was sent (the checks then read without waiting, so a
    /// message that was not handed out fails the test at once).
    async fn settled() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn only_the_job_s_watchers_get_its_end() {
        let (relay, _) = broadcast::channel(16);
        let hub = JobWaiters::start(&relay);
        let mut a = hub.subscribe().watch("a");
        let mut b = hub.subscribe().watch("b");
        relay.send("a\n[]".into()).unwrap();
        settled().await;
        assert_eq!(a.rx.try_recv().ok().as_deref(), Some("a\n[]"));
        assert!(b.rx.try_recv().is_err(), "b was woken for a's end");
        relay.send(RESYNC.into()).unwrap();
        settled().await;
        assert_eq!(a.rx.try_recv().ok().as_deref(), Some(RESYNC));
        assert_eq!(b.rx.try_recv().ok().as_deref(), Some(RESYNC));
        assert_eq!(hub.watching(), 2);
        drop(a);
        drop(b);
        assert_eq!(hub.watching(), 0);
    }

    #[tokio::test]
    async fn an_end_between_subscribing_and_watching_is_handed_over() {
        let (relay, _) = broadcast::channel(16);
        let hub = JobWaiters::start(&relay);
        let sub = hub.subscribe();
        relay.send("x".into()).unwrap();
        relay.send("fast\n[]".into()).unwrap();
        settled().await;
        let mut w = sub.watch("fast");
        assert_eq!(w.rx.try_recv().ok().as_deref(), Some("fast\n[]"));
        assert!(w.rx.try_recv().is_err());
        // A subscription taken after the end does not see it.
        let mut late = hub.subscribe().watch("fast");
        assert!(late.rx.try_recv().is_err());
        relay.send("fast".into()).unwrap();
        settled().await;
        assert_eq!(late.rx.try_recv().ok().as_deref(), Some("fast"));
    }

    #[tokio::test]
    async fn a_watch_older_than_the_kept_messages_reads_again() {
        let (relay, _) = broadcast::channel(4 * RECENT);
        let hub = JobWaiters::start(&relay);
        let sub = hub.subscribe();
        for i in 0..RECENT + 1 {
            relay.send(format!("job-{i}").into()).unwrap();
            if i % 64 == 0 {
                settled().await;
            }
        }
        settled().await;
        // job-0 is no longer kept: the watch is told to read again.
        let mut w = sub.watch("job-0");
        assert_eq!(w.rx.try_recv().ok().as_deref(), Some(RESYNC));
        assert!(w.rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_lagging_hand_out_makes_every_watcher_read_again() {
        let (relay, _) = broadcast::channel(2);
        let hub = JobWaiters::start(&relay);
        let mut w = hub.subscribe().watch("slow");
        // More than the channel holds before the hand-out task runs.
        for i in 0..5 {
            relay.send(format!("other-{i}").into()).unwrap();
        }
        settled().await;
        assert_eq!(w.rx.try_recv().ok().as_deref(), Some(RESYNC));
    }
}
