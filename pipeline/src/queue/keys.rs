//! The Redis key layout, in one place. Every key a script touches is passed
//! to it as a key (never built inside Lua).

use crate::JobKind;

/// Consumer group every worker reads the lanes with.
pub const GROUP: &str = "workers";

/// How long a token stream (and its poll cursor) is kept after its last event.
pub const TOKEN_STREAM_TTL_SECS: u64 = 3600;

#[derive(Debug, Clone)]
pub struct Keys {
    ns: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        Self {
            ns: namespace.to_string(),
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.ns)
    }

    /// Hash: the job record.
    pub fn job(&self, id: &str) -> String {
        self.key(&format!("job:{id}"))
    }
    /// Hash: jobs by state, plus `retried`.
    pub fn counts(&self) -> String {
        self.key("counts")
    }
    /// Sorted set: job ids whose callback is due, scored by when.
    pub fn callbacks_due(&self) -> String {
        self.key("callbacks:due")
    }
    /// Hash: the pending callback of job `id` (url, webhook id, tries).
    pub fn callback(&self, id: &str) -> String {
        self.key(&format!("cb:{id}"))
    }
    /// List: parked callbacks, newest first.
    pub fn dead_letters(&self) -> String {
        self.key("callbacks:dead")
    }
    /// Pub/sub: ids of jobs that reached a terminal state.
    pub fn events(&self) -> String {
        self.key("events")
    }
    /// Pub/sub: ids of jobs whose stop was requested.
    pub fn stops(&self) -> String {
        self.key("stops")
    }
    /// Hash: live workers (name → heartbeat JSON).
    pub fn workers(&self) -> String {
        self.key("workers")
    }
    /// Hash: fleet-wide worker totals.
    pub fn worker_stats(&self) -> String {
        self.key("worker-stats")
    }
    /// Stream: one lane of a kind's queue.
    pub fn lane(&self, kind: JobKind, low_priority: bool) -> String {
        self.key(&format!(
            "queue:{}:{}",
            kind.as_str(),
            if low_priority { "low" } else { "normal" }
        ))
    }
    /// A kind's lanes, the normal one first.
    pub fn lanes(&self, kind: JobKind) -> [String; 2] {
        [self.lane(kind, false), self.lane(kind, true)]
    }
    /// String: held for a lease window by the one consumer of the fleet
    /// that looks for dead consumers of `lane` (a lane's key).
    pub fn prune_turn(&self, lane: &str) -> String {
        self.key(&format!("prune-turn:{lane}"))
    }
    /// Stream: a job's text deltas and its end event.
    pub fn tokens(&self, id: &str) -> String {
        self.key(&format!("tokens:{id}"))
    }
    /// String: how far RunPod-style polls of `/stream/{id}` have read.
    pub fn stream_cursor(&self, id: &str) -> String {
        self.key(&format!("stream-cursor:{id}"))
    }
}
