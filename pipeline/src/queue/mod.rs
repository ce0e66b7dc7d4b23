//! Jobs in Redis.
//!
//! apalis-redis 1.0.0 was measured with seven defects that matter to GPU jobs
//! (slow pickup, a fatal error past ~8,000 due jobs, attempts reset after a
//! crash, blind retries, refused restarts, 5-minute orphan recovery, no
//! priorities; `../shared/DESIGN.md`, "Queue"). DESIGN.md names the fallback:
//! Redis Streams with consumer groups behind this interface, which is what
//! this module is, one concern a file:
//!
//! - [`keys`]: the key layout, in one place;
//! - [`record`]: the job record, a hash `{ns}:job:{id}`;
//! - [`scripts`]: every state change is one Lua script, so a record is never
//!   half-written, a result is written once, and times come from Redis;
//! - [`admin`]: enqueue, status, cancel, retry, purge, counts;
//! - [`consumer`]: the worker side. Each kind has two lanes,
//!   `{ns}:queue:{kind}:normal` and `:low`, read by the group `workers`; a
//!   blocked `XREADGROUP` wakes the moment a job is added. A run holds a lease
//!   token (the record's `run`, bumped by every claim): heartbeats, token
//!   writes, platform saves and the result are accepted only from the
//!   holder, so a worker that stalled past its lease and woke up writes
//!   nothing. Entries of a dead worker are taken over (`XAUTOCLAIM`) after
//!   `heartbeat × missed_heartbeats`; attempts are counted when a run starts
//!   and capped; a draining worker hands its job back without spending an
//!   attempt;
//! - [`tokens`]: each job's text deltas and end event (a stream), stops;
//! - [`fleet`]: live workers by kind, fleet-wide totals, worker names.
//!
//! Connections are [`redis::aio::ConnectionManager`]s: after Redis restarts
//! they reconnect by themselves; a command sent while Redis is down fails
//! fast (callers retry or answer 503), and consumer groups missing after a
//! restart without persistence are created again.

pub mod admin;
pub mod consumer;
pub mod fleet;
pub mod hub;
pub mod keys;
pub mod record;
mod scripts;
pub mod sink;
pub mod tokens;
pub mod waiters;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use serde_json::Value;

pub use admin::{EnqueueOptions, KindQueue, RetryOutcome};
pub use consumer::{Consumer, Finished, Lease, LeaseGuard, RunControl};
pub use fleet::{mask_redis_url, unique_worker_name, FleetView};
pub use hub::TokenHub;
pub use keys::Keys;
pub use record::JobRecord;
pub use sink::JobSink;
pub use tokens::{AudioChunk, TokenEvent};
pub use waiters::{JobWaiters, JobWatch, Subscription};

use crate::{JobKind, PipelineError};
use keys::GROUP;
use scripts::Scripts;

/// What [`RedisQueue::spawn_relay`] sends after each (re)subscribe: never a
/// job id.
pub const RESYNC: &str = "";

/// The id of the job a message of the events channel is about.
pub fn job_event_id(message: &str) -> &str {
    message.split_once('\n').map_or(message, |(id, _)| id)
}

/// A message of the events channel: the id of the job that ended, and its
/// record as it ended when the script that ended it sent it along (records
/// up to 8 KiB; larger ones are read back). Many waiters see every
/// message: check [`job_event_id`] first, parse only your own.
pub fn job_event(message: &str) -> (&str, Option<JobRecord>) {
    let Some((id, json)) = message.split_once('\n') else {
        return (message, None);
    };
    let record = serde_json::from_str::<Vec<String>>(json)
        .ok()
        .and_then(|flat| {
            let mut fields = HashMap::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                fields.insert(k, v);
            }
            JobRecord::from_hash(id, fields).ok()
        });
    (id, record)
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Key prefix, so several deployments (or tests) can share one Redis.
    pub namespace: String,
    pub heartbeat: Duration,
    /// Heartbeats a worker may miss before its jobs are taken over.
    pub missed_heartbeats: u32,
    /// Runs a job gets before it is FAILED (counting runs lost to crashes).
    pub max_attempts: u32,
    /// How long a finished record is kept.
    pub result_ttl: Duration,
    /// Seals and opens the secrets a job carries (`s3Config`); None: jobs
    /// with secrets are refused.
    pub secrets: Option<crate::secrets::JobSecrets>,
    /// How many consumers of this process that read the same lanes wait in
    /// Redis (`XREADGROUP BLOCK`) at once; its other idle slots wait in the
    /// process for a turn. Redis looks at every client blocked on a lane
    /// for each entry added to it, so a lane's cost per job would grow
    /// with every idle slot of the fleet.
    pub blocking_reads: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            namespace: "cw".into(),
            heartbeat: Duration::from_secs(1),
            missed_heartbeats: 5,
            max_attempts: 3,
            result_ttl: Duration::from_secs(48 * 3600),
            secrets: None,
            blocking_reads: 4,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed(Value),
    Failed(String),
    TimedOut(String),
}

/// Handle on the Redis side of the pipeline; cheap to clone.
#[derive(Clone)]
pub struct RedisQueue {
    client: redis::Client,
    conn: ConnectionManager,
    keys: Keys,
    cfg: Arc<QueueConfig>,
    scripts: Arc<Scripts>,
    /// What the worker's heartbeat reports besides its state (the text
    /// engine's batch and KV pool), set once by the worker.
    gauges: Arc<std::sync::OnceLock<Gauges>>,
    /// Turns to wait in Redis of this process's consumers, by the lanes
    /// they read.
    read_turns: Arc<std::sync::Mutex<HashMap<Vec<String>, Arc<tokio::sync::Semaphore>>>>,
}

/// The gauge source and the one worker name (the first slot's heartbeat
/// that carries them) they go out under, so a process with several slots
/// is counted once.
pub(crate) struct Gauges {
    pub(crate) source: GaugeSource,
    pub(crate) owner: std::sync::OnceLock<String>,
}

/// Named gauges a worker reports with each heartbeat; the fleet view sums
/// them over live workers.
pub type GaugeSource = Arc<dyn Fn() -> Vec<(String, u64)> + Send + Sync>;

/// A connection that reconnects by itself. Commands fail after
/// `response_timeout` instead of hanging on a Redis that stopped answering
/// (`None` for connections that block on purpose).
pub async fn managed_connection(
    client: &redis::Client,
    response_timeout: Option<Duration>,
) -> Result<ConnectionManager, PipelineError> {
    let mut cfg = ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_factor(100)
        .set_max_delay(1000)
        .set_connection_timeout(Duration::from_secs(2));
    if let Some(t) = response_timeout {
        cfg = cfg.set_response_timeout(t);
    }
    Ok(ConnectionManager::new_with_config(client.clone(), cfg).await?)
}

/// Whether an error means Redis itself is unreachable (down, restarting,
/// timing out), as opposed to a bad command.
pub fn is_unavailable(e: &PipelineError) -> bool {
    match e {
        PipelineError::Redis(r) => {
            r.is_io_error()
                || r.is_timeout()
                || r.is_connection_dropped()
                || r.is_connection_refusal()
                || matches!(
                    r.kind(),
                    redis::ErrorKind::BusyLoadingError | redis::ErrorKind::TryAgain
                )
        }
        PipelineError::Unavailable(_) => true,
        _ => false,
    }
}

impl RedisQueue {
    /// Connects once; fails if Redis is not reachable now.
    pub async fn connect(url: &str, cfg: QueueConfig) -> Result<Self, PipelineError> {
        let client = redis::Client::open(url)?;
        let conn = managed_connection(&client, Some(Duration::from_secs(5))).await?;
        Ok(Self {
            client,
            conn,
            keys: Keys::new(&cfg.namespace),
            cfg: Arc::new(cfg),
            scripts: Arc::new(Scripts::new()),
            gauges: Arc::default(),
            read_turns: Arc::default(),
        })
    }

    /// Connects, waiting for Redis with backoff (up to 2 s between tries)
    /// for as long as it takes: a shim or worker started before Redis (any
    /// compose file or pod start) waits for it instead of exiting.
    pub async fn connect_with_retry(url: &str, cfg: QueueConfig) -> Result<Self, PipelineError> {
        redis::Client::open(url)?;
        let mut delay = Duration::from_millis(100);
        loop {
            match Self::connect(url, cfg.clone()).await {
                Ok(q) => return Ok(q),
                Err(e) if is_unavailable(&e) => {
                    tracing::warn!(error = %e, redis = %mask_redis_url(url), "Redis is not reachable yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// Gauges the heartbeat carries from now on (the first call wins).
    pub fn report_gauges(&self, source: GaugeSource) {
        let _ = self.gauges.set(Gauges {
            source,
            owner: std::sync::OnceLock::new(),
        });
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The shared connection (reconnects by itself). Blocking reads need
    /// one of their own: [`RedisQueue::blocking_connection`].
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A connection of its own for blocking reads (`XREAD BLOCK`).
    pub async fn blocking_connection(&self) -> Result<ConnectionManager, PipelineError> {
        managed_connection(&self.client, None).await
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Whether Redis answers now.
    pub async fn ping(&self) -> bool {
        let r: Result<String, _> = redis::cmd("PING").query_async(&mut self.conn.clone()).await;
        r.is_ok()
    }

    /// Warns when Redis would lose jobs on a restart: neither AOF nor RDB
    /// snapshots are on. (Managed Redis may refuse CONFIG: then nothing is
    /// said.) Returns whether persistence is off.
    pub async fn warn_if_not_persistent(&self) -> bool {
        let mut conn = self.conn.clone();
        let aof: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .query_async(&mut conn)
            .await;
        let save: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("save")
            .query_async(&mut conn)
            .await;
        let (Ok(aof), Ok(save)) = (aof, save) else {
            return false;
        };
        let aof_on = aof.get(1).is_some_and(|v| v == "yes");
        let rdb_on = save.get(1).is_some_and(|v| !v.trim().is_empty());
        if !aof_on {
            tracing::warn!(
                rdb_snapshots = rdb_on,
                "Redis persistence: appendonly is off, so a Redis restart loses queued and running jobs (RDB snapshots lose the last minutes). Configure `appendonly yes` and `appendfsync everysec`."
            );
        }
        !aof_on
    }

    /// Creates a kind's lanes and their consumer group if missing (at start,
    /// and again when a Redis restart without persistence lost them).
    pub(crate) async fn ensure_groups(&self, kind: JobKind) -> Result<(), PipelineError> {
        let mut conn = self.conn.clone();
        for stream in self.keys.lanes(kind) {
            let created: Result<(), _> = conn.xgroup_create_mkstream(&stream, GROUP, "0").await;
            if let Err(e) = created {
                if e.code() != Some("BUSYGROUP") {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Relays pub/sub `channel` into a broadcast channel, resubscribing
    /// after any disconnect (a Redis restart). After each (re)subscribe it
    /// sends [`RESYNC`]: messages published while the relay was away are
    /// lost, so whoever waits on one should look again at what it waits for.
    /// Messages are shared (`Arc<str>`): every receiver sees every message.
    pub fn spawn_relay(
        &self,
        channel: String,
    ) -> tokio::sync::broadcast::Sender<std::sync::Arc<str>> {
        let (tx, _) = tokio::sync::broadcast::channel(1024);
        let (client, out) = (self.client.clone(), tx.clone());
        tokio::spawn(async move {
            use futures::StreamExt;
            loop {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => {
                            let _ = out.send(RESYNC.into());
                            let mut messages = pubsub.on_message();
                            while let Some(msg) = messages.next().await {
                                if let Ok(payload) = msg.get_payload::<Vec<u8>>() {
                                    let _ = out.send(String::from_utf8_lossy(&payload).into());
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, channel = %channel, "subscribing failed")
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, channel = %channel, "pub/sub connection failed")
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        tx
    }

    fn result_ttl_ms(&self) -> u64 {
        self.cfg.result_ttl.as_millis() as u64
    }

    /// The keys every job-ending script takes, in the order
    /// [`scripts`] documents.
    fn terminal_keys(&self, id: &str) -> [String; 5] {
        [
            self.keys.job(id),
            self.keys.counts(),
            self.keys.callbacks_due(),
            self.keys.callback(id),
            self.keys.tokens(id),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_only_the_password() {
        assert_eq!(
            mask_redis_url("redis://:s3cret@host:6379/0"),
            "redis://:****@host:6379/0"
        );
        assert_eq!(
            mask_redis_url("redis://user:pw@h/1"),
            "redis://user:****@h/1"
        );
        assert_eq!(
            mask_redis_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
