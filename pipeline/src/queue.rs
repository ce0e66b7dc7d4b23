//! Jobs in Redis.
//!
//! apalis-redis 1.0.0 was measured with seven defects that matter to GPU jobs
//! (slow pickup, a fatal error past ~8,000 due jobs, attempts reset after a
//! crash, blind retries, refused restarts, 5-minute orphan recovery, no
//! priorities; `../shared/DESIGN.md`, "Queue"). DESIGN.md names the fallback:
//! Redis Streams with consumer groups behind this interface, which is what
//! this module is:
//!
//! - a job record is a hash `{ns}:job:{id}` (state, timestamps, attempts,
//!   worker, input, output or error); every state change is one Lua script,
//!   so a record is never half-written and a result is written once;
//! - each kind has two lanes, `{ns}:queue:{kind}:normal` and `:low`
//!   (`policy.lowPriority`), streams read by the group `workers`; a blocked
//!   `XREADGROUP` wakes the moment a job is added (pickup in milliseconds);
//! - a worker heartbeats the entries it holds (`XCLAIM ... JUSTID` resets
//!   their idle time); entries of a dead worker go idle and are taken over by
//!   any live worker (`XAUTOCLAIM`) after `heartbeat × missed_heartbeats`;
//! - attempts are counted in the record when a run starts; past
//!   `max_attempts` the job is FAILED instead of run again, so a job that
//!   kills its worker cannot loop;
//! - a terminal state publishes the job id on `{ns}:events` and, when the job
//!   has a webhook, schedules its callback in `{ns}:callbacks:due`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, Script};
use serde_json::Value;

use crate::{now_ms, JobKind, JobState, PipelineError, Policy, RunRequest};

const GROUP: &str = "workers";

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
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            namespace: "cw".into(),
            heartbeat: Duration::from_secs(1),
            missed_heartbeats: 5,
            max_attempts: 3,
            result_ttl: Duration::from_secs(48 * 3600),
        }
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub owner: String,
    pub state: JobState,
    pub input: Value,
    pub webhook: Option<String>,
    pub policy: Policy,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub attempts: u32,
    pub max_attempts: u32,
    pub worker: Option<String>,
    pub output: Option<Value>,
    pub error: Option<String>,
}

impl JobRecord {
    fn from_hash(id: &str, h: HashMap<String, String>) -> Result<Self, PipelineError> {
        let bad = |what: &str| PipelineError::BadRecord(id.to_string(), what.to_string());
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok());
        let json = |k: &str| -> Result<Option<Value>, PipelineError> {
            h.get(k)
                .map(|v| serde_json::from_str(v).map_err(|_| bad(k)))
                .transpose()
        };
        Ok(Self {
            id: id.to_string(),
            kind: h
                .get("kind")
                .and_then(|k| JobKind::parse(k))
                .ok_or_else(|| bad("kind"))?,
            owner: h.get("owner").cloned().unwrap_or_default(),
            state: h
                .get("state")
                .and_then(|s| JobState::parse(s))
                .ok_or_else(|| bad("state"))?,
            input: json("input")?.ok_or_else(|| bad("input"))?,
            webhook: h.get("webhook").cloned(),
            policy: json("policy")?
                .map(serde_json::from_value)
                .transpose()
                .map_err(|_| bad("policy"))?
                .unwrap_or_default(),
            created_ms: num("created_ms").ok_or_else(|| bad("created_ms"))?,
            started_ms: num("started_ms"),
            finished_ms: num("finished_ms"),
            attempts: num("attempts").unwrap_or(0) as u32,
            max_attempts: num("max_attempts").unwrap_or(1) as u32,
            worker: h.get("worker").cloned(),
            output: json("output")?,
            error: h.get("error").cloned(),
        })
    }

    /// Milliseconds between submission and the start of the (last) run.
    pub fn delay_ms(&self) -> u64 {
        match self.started_ms {
            Some(s) => s.saturating_sub(self.created_ms),
            None if self.state.is_terminal() => {
                self.finished_ms.unwrap_or(self.created_ms) - self.created_ms
            }
            None => now_ms().saturating_sub(self.created_ms),
        }
    }

    /// Milliseconds the (last) run took, or has taken so far.
    pub fn execution_ms(&self) -> u64 {
        match (self.started_ms, self.finished_ms) {
            (Some(s), Some(f)) => f.saturating_sub(s),
            (Some(s), None) => now_ms().saturating_sub(s),
            _ => 0,
        }
    }
}

/// Moves a job to a terminal state: counts, finish time, expiry, callback,
/// event. Shared by every script below.
const LUA_TERMINAL: &str = r#"
local function terminal(from, to, now, ttl)
  redis.call('HINCRBY', KEYS[2], from, -1)
  redis.call('HINCRBY', KEYS[2], to, 1)
  redis.call('HSET', KEYS[1], 'state', to, 'finished_ms', now)
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  if redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then
    -- A new terminal state means a new callback: drop any stale delivery.
    redis.call('DEL', (string.gsub(KEYS[3], 'callbacks:due$', 'cb:')) .. ARGV[1])
    redis.call('ZADD', KEYS[3], now, ARGV[1])
  end
  redis.call('PUBLISH', ARGV[2], ARGV[1])
end
"#;

/// ARGV: id, events, worker, now, ttl. Returns {verdict, attempt}.
const LUA_CLAIM: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'gone', 0} end
if st ~= 'IN_QUEUE' and st ~= 'IN_PROGRESS' then return {'skip', 0} end
local now = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_ms') or '0')
if st == 'IN_QUEUE' and expires > 0 and now > expires then
  redis.call('HSET', KEYS[1], 'error', 'the job waited longer than its policy.ttl before a worker was free')
  terminal(st, 'TIMED_OUT', now, ttl)
  return {'expired', 0}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local max = tonumber(redis.call('HGET', KEYS[1], 'max_attempts') or '1')
if attempt > max then
  redis.call('HSET', KEYS[1], 'error', 'the worker running this job stopped (crash, kill or lost heartbeat) on each of its ' .. max .. ' attempts')
  terminal(st, 'FAILED', now, ttl)
  return {'exhausted', attempt}
end
if st == 'IN_QUEUE' then
  redis.call('HINCRBY', KEYS[2], 'IN_QUEUE', -1)
  redis.call('HINCRBY', KEYS[2], 'IN_PROGRESS', 1)
end
redis.call('HSET', KEYS[1], 'state', 'IN_PROGRESS', 'worker', ARGV[3], 'started_ms', now)
return {'run', attempt}
"#;

/// ARGV: id, events, now, ttl, to_state, field, payload. Returns 1 if written.
const LUA_FINISH: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= 'IN_PROGRESS' then return 0 end
redis.call('HSET', KEYS[1], ARGV[6], ARGV[7])
terminal(st, ARGV[5], tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"#;

/// ARGV: id, events, now, ttl, only_if_queued, reason. Returns the state after.
const LUA_CANCEL: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return false end
if st == 'IN_QUEUE' or (st == 'IN_PROGRESS' and ARGV[5] == '0') then
  if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[6]) end
  terminal(st, 'CANCELLED', tonumber(ARGV[3]), tonumber(ARGV[4]))
  return 'CANCELLED'
end
return st
"#;

/// KEYS[4] = stream. ARGV: id, events, now. Returns 1 if re-queued.
const LUA_RETRY: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= 'FAILED' and st ~= 'TIMED_OUT' then return 0 end
local policy = cjson.decode(redis.call('HGET', KEYS[1], 'policy'))
redis.call('HDEL', KEYS[1], 'error', 'output', 'started_ms', 'finished_ms', 'worker')
redis.call('HSET', KEYS[1], 'state', 'IN_QUEUE', 'attempts', 0, 'expires_ms', tonumber(ARGV[3]) + policy['ttl'])
redis.call('PERSIST', KEYS[1])
redis.call('HINCRBY', KEYS[2], st, -1)
redis.call('HINCRBY', KEYS[2], 'IN_QUEUE', 1)
redis.call('HINCRBY', KEYS[2], 'retried', 1)
redis.call('XADD', KEYS[4], '*', 'job', ARGV[1])
return 1
"#;

/// KEYS[3] = stream. ARGV: fields as pairs. Creates the record and queues it.
const LUA_ENQUEUE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
redis.call('HINCRBY', KEYS[2], 'IN_QUEUE', 1)
redis.call('XADD', KEYS[3], '*', 'job', redis.call('HGET', KEYS[1], 'id'))
return 1
"#;

struct Scripts {
    claim: Script,
    finish: Script,
    cancel: Script,
    retry: Script,
    enqueue: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_terminal = |body: &str| Script::new(&format!("{LUA_TERMINAL}\n{body}"));
        Self {
            claim: with_terminal(LUA_CLAIM),
            finish: with_terminal(LUA_FINISH),
            cancel: with_terminal(LUA_CANCEL),
            retry: Script::new(LUA_RETRY),
            enqueue: Script::new(LUA_ENQUEUE),
        }
    }
}

/// Handle on the Redis side of the pipeline; cheap to clone.
#[derive(Clone)]
pub struct RedisQueue {
    client: redis::Client,
    conn: MultiplexedConnection,
    cfg: Arc<QueueConfig>,
    scripts: Arc<Scripts>,
}

/// What `retry` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    Requeued,
    NotRetryable(JobState),
    NotFound,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed(Value),
    Failed(String),
    TimedOut(String),
}

impl RedisQueue {
    pub async fn connect(url: &str, cfg: QueueConfig) -> Result<Self, PipelineError> {
        let client = redis::Client::open(url)?;
        let conn = client.get_multiplexed_async_connection().await?;
        Ok(Self {
            client,
            conn,
            cfg: Arc::new(cfg),
            scripts: Arc::new(Scripts::new()),
        })
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    fn key(&self, parts: &str) -> String {
        format!("{}:{parts}", self.cfg.namespace)
    }
    fn job_key(&self, id: &str) -> String {
        self.key(&format!("job:{id}"))
    }
    fn counts_key(&self) -> String {
        self.key("counts")
    }
    pub fn callbacks_due_key(&self) -> String {
        self.key("callbacks:due")
    }
    pub fn events_channel(&self) -> String {
        self.key("events")
    }
    pub fn callback_key(&self, id: &str) -> String {
        self.key(&format!("cb:{id}"))
    }
    pub fn dead_letters_key(&self) -> String {
        self.key("callbacks:dead")
    }
    fn workers_key(&self) -> String {
        self.key("workers")
    }
    fn stream_key(&self, kind: JobKind, low_priority: bool) -> String {
        self.key(&format!(
            "queue:{}:{}",
            kind.as_str(),
            if low_priority { "low" } else { "normal" }
        ))
    }
    fn lanes(&self, kind: JobKind) -> [String; 2] {
        [self.stream_key(kind, false), self.stream_key(kind, true)]
    }
    pub fn connection(&self) -> MultiplexedConnection {
        self.conn.clone()
    }
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    async fn ensure_groups(&self, kind: JobKind) -> Result<(), PipelineError> {
        let mut conn = self.conn.clone();
        for stream in self.lanes(kind) {
            let created: Result<(), _> = conn.xgroup_create_mkstream(&stream, GROUP, "0").await;
            if let Err(e) = created {
                if e.code() != Some("BUSYGROUP") {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Stores a new job and queues it on its kind's lane.
    pub async fn enqueue(&self, req: &RunRequest, owner: &str) -> Result<JobRecord, PipelineError> {
        self.ensure_groups(req.kind).await?;
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let mut fields: Vec<(String, String)> = vec![
            ("id".into(), id.clone()),
            ("kind".into(), req.kind.as_str().into()),
            ("owner".into(), owner.into()),
            ("state".into(), JobState::InQueue.as_str().into()),
            ("input".into(), req.input.to_string()),
            (
                "policy".into(),
                serde_json::to_string(&req.policy).expect("policy serializes"),
            ),
            ("created_ms".into(), now.to_string()),
            ("expires_ms".into(), (now + req.policy.ttl_ms).to_string()),
            ("attempts".into(), "0".into()),
            ("max_attempts".into(), self.cfg.max_attempts.to_string()),
        ];
        if let Some(w) = &req.webhook {
            fields.push(("webhook".into(), w.clone()));
        }
        let mut inv = self.scripts.enqueue.key(self.job_key(&id));
        inv.key(self.counts_key())
            .key(self.stream_key(req.kind, req.policy.low_priority));
        for (k, v) in &fields {
            inv.arg(k).arg(v);
        }
        let _: i32 = inv.invoke_async(&mut self.conn.clone()).await?;
        self.get(&id).await?.ok_or_else(|| {
            PipelineError::Other(format!("job {id} vanished right after it was stored"))
        })
    }

    pub async fn get(&self, id: &str) -> Result<Option<JobRecord>, PipelineError> {
        let h: HashMap<String, String> = self.conn.clone().hgetall(self.job_key(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        JobRecord::from_hash(id, h).map(Some)
    }

    /// Cancels a queued or running job; the state after (None: no such job).
    pub async fn cancel(&self, id: &str, reason: &str) -> Result<Option<JobState>, PipelineError> {
        self.cancel_inner(id, false, reason).await
    }

    async fn cancel_inner(
        &self,
        id: &str,
        only_if_queued: bool,
        reason: &str,
    ) -> Result<Option<JobState>, PipelineError> {
        let st: Option<String> = self
            .scripts
            .cancel
            .key(self.job_key(id))
            .key(self.counts_key())
            .key(self.callbacks_due_key())
            .arg(id)
            .arg(self.events_channel())
            .arg(now_ms())
            .arg(self.cfg.result_ttl.as_millis() as u64)
            .arg(if only_if_queued { "1" } else { "0" })
            .arg(reason)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(st.and_then(|s| JobState::parse(&s)))
    }

    /// Puts a FAILED or TIMED_OUT job back in its queue with fresh attempts.
    pub async fn retry(&self, id: &str) -> Result<RetryOutcome, PipelineError> {
        let Some(rec) = self.get(id).await? else {
            return Ok(RetryOutcome::NotFound);
        };
        self.ensure_groups(rec.kind).await?;
        let done: i32 = self
            .scripts
            .retry
            .key(self.job_key(id))
            .key(self.counts_key())
            .key(self.callbacks_due_key())
            .key(self.stream_key(rec.kind, rec.policy.low_priority))
            .arg(id)
            .arg(self.events_channel())
            .arg(now_ms())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(if done == 1 {
            RetryOutcome::Requeued
        } else {
            RetryOutcome::NotRetryable(rec.state)
        })
    }

    /// Cancels every queued job of `kind` that `owner` submitted; how many.
    pub async fn purge_queue(&self, kind: JobKind, owner: &str) -> Result<usize, PipelineError> {
        let mut purged = 0;
        let mut conn = self.conn.clone();
        for stream in self.lanes(kind) {
            let mut start = "-".to_string();
            loop {
                let reply: redis::streams::StreamRangeReply =
                    conn.xrange_count(&stream, &start, "+", 500).await?;
                let Some(last) = reply.ids.last() else { break };
                start = format!("({}", last.id);
                for entry in &reply.ids {
                    let Some(id) = entry.get::<String>("job") else {
                        continue;
                    };
                    let owned: Option<String> = conn.hget(self.job_key(&id), "owner").await?;
                    if owned.as_deref() == Some(owner)
                        && self
                            .cancel_inner(&id, true, "purged from the queue")
                            .await?
                            == Some(JobState::Cancelled)
                    {
                        purged += 1;
                    }
                }
            }
        }
        Ok(purged)
    }

    /// Adds to the fleet-wide worker totals (jobs by outcome, tokens, model
    /// time), which the shim exports on /metrics.
    pub async fn add_worker_stats(&self, stats: &[(&str, u64)]) -> Result<(), PipelineError> {
        let mut pipe = redis::pipe();
        for (field, n) in stats {
            pipe.hincr(self.key("worker-stats"), *field, *n).ignore();
        }
        let _: () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    pub async fn worker_stats(&self) -> Result<HashMap<String, i64>, PipelineError> {
        Ok(self.conn.clone().hgetall(self.key("worker-stats")).await?)
    }

    /// Jobs by state, plus `retried`.
    pub async fn counts(&self) -> Result<HashMap<String, i64>, PipelineError> {
        Ok(self.conn.clone().hgetall(self.counts_key()).await?)
    }

    /// Workers seen within their heartbeat window: (idle, running). Entries of
    /// workers gone quiet are removed.
    pub async fn workers(&self) -> Result<(usize, usize), PipelineError> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = conn.hgetall(self.workers_key()).await?;
        let now = now_ms();
        let (mut idle, mut running) = (0, 0);
        for (name, raw) in all {
            let v: Value = serde_json::from_str(&raw).unwrap_or_default();
            if v["expires_ms"].as_u64().unwrap_or(0) < now {
                let _: i64 = conn.hdel(self.workers_key(), &name).await?;
            } else if v["state"] == "running" {
                running += 1;
            } else {
                idle += 1;
            }
        }
        Ok((idle, running))
    }

    /// A consumer for a worker named `name` (unique per process).
    pub async fn consumer(&self, kinds: &[JobKind], name: &str) -> Result<Consumer, PipelineError> {
        for k in kinds {
            self.ensure_groups(*k).await?;
        }
        let mut streams = Vec::new();
        for k in kinds {
            streams.extend(self.lanes(*k));
        }
        // Normal lanes before low ones: XREADGROUP returns streams in order.
        streams.sort_by_key(|s| s.ends_with(":low"));
        let consumer = Consumer {
            queue: self.clone(),
            name: name.to_string(),
            block_conn: self.client.get_multiplexed_async_connection().await?,
            streams,
            buffer: VecDeque::new(),
            held: Arc::new(Mutex::new(HashSet::new())),
            running: Arc::new(Mutex::new(None)),
            last_reclaim: None,
        };
        consumer.beat().await?;
        Ok(consumer)
    }
}

/// One event of a job's token stream.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// New text of option `option`.
    Text { option: usize, text: String },
    /// The job ended in this state; no events follow.
    End { state: String },
}

impl TokenEvent {
    fn from_entry(e: &redis::streams::StreamId) -> Self {
        match e.get::<String>("end") {
            Some(state) => TokenEvent::End { state },
            None => TokenEvent::Text {
                option: e.get::<usize>("o").unwrap_or(0),
                text: e.get::<String>("t").unwrap_or_default(),
            },
        }
    }
}

/// How long a token stream is kept after its last event.
const TOKEN_STREAM_TTL_SECS: i64 = 3600;

impl RedisQueue {
    fn tokens_key(&self, id: &str) -> String {
        self.key(&format!("tokens:{id}"))
    }

    pub fn stops_channel(&self) -> String {
        self.key("stops")
    }

    /// Appends text deltas to job `id`'s token stream.
    pub async fn publish_tokens(
        &self,
        id: &str,
        deltas: &[(usize, String)],
    ) -> Result<(), PipelineError> {
        if deltas.is_empty() {
            return Ok(());
        }
        let key = self.tokens_key(id);
        let mut pipe = redis::pipe();
        for (option, text) in deltas {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("o")
                .arg(*option)
                .arg("t")
                .arg(text)
                .ignore();
        }
        pipe.expire(&key, TOKEN_STREAM_TTL_SECS).ignore();
        let _: () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Closes job `id`'s token stream with its final state.
    pub async fn publish_end(&self, id: &str, state: JobState) -> Result<(), PipelineError> {
        let key = self.tokens_key(id);
        let mut pipe = redis::pipe();
        pipe.cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("end")
            .arg(state.as_str())
            .ignore();
        pipe.expire(&key, TOKEN_STREAM_TTL_SECS).ignore();
        let _: () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Events after entry `after` ("0" from the start), waiting up to
    /// `block`. `conn` must be a connection of its own: the read blocks it.
    pub async fn read_tokens(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
        after: &str,
        block: Duration,
    ) -> Result<Vec<(String, TokenEvent)>, PipelineError> {
        let opts = StreamReadOptions::default()
            .count(256)
            .block(block.as_millis().max(1) as usize);
        let reply: Option<StreamReadReply> = conn
            .xread_options(&[self.tokens_key(id)], &[after], &opts)
            .await?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for e in key.ids {
                let event = TokenEvent::from_entry(&e);
                out.push((e.id, event));
            }
        }
        Ok(out)
    }

    /// The token events of job `id` since the previous poll (RunPod's polled
    /// `/stream/{id}`): a cursor per job remembers how far polls have read.
    pub async fn poll_tokens(&self, id: &str) -> Result<Vec<TokenEvent>, PipelineError> {
        let mut conn = self.conn.clone();
        let cursor_key = self.key(&format!("stream-cursor:{id}"));
        let after: Option<String> = conn.get(&cursor_key).await?;
        let start = match &after {
            Some(a) => format!("({a}"),
            None => "-".into(),
        };
        let reply: redis::streams::StreamRangeReply = conn
            .xrange_count(self.tokens_key(id), &start, "+", 1000)
            .await?;
        if let Some(last) = reply.ids.last() {
            let _: () = conn
                .set_ex(&cursor_key, &last.id, TOKEN_STREAM_TTL_SECS as u64)
                .await?;
        }
        Ok(reply
            .ids
            .into_iter()
            .map(|e| TokenEvent::from_entry(&e))
            .collect())
    }

    /// Bytes of text already in job `id`'s token stream, by option (what an
    /// earlier run of the job streamed before its worker died).
    pub async fn streamed_bytes(&self, id: &str) -> Result<Vec<usize>, PipelineError> {
        let reply: redis::streams::StreamRangeReply =
            self.conn.clone().xrange_all(self.tokens_key(id)).await?;
        let mut bytes: Vec<usize> = Vec::new();
        for e in reply.ids {
            if let (Some(option), Some(text)) = (e.get::<usize>("o"), e.get::<String>("t")) {
                if bytes.len() <= option {
                    bytes.resize(option + 1, 0);
                }
                bytes[option] += text.len();
            }
        }
        Ok(bytes)
    }

    /// Asks the worker running job `id` to stop generating now (a streaming
    /// client went away). The job still finishes, with what it generated.
    pub async fn request_stop(&self, id: &str, reason: &str) -> Result<(), PipelineError> {
        let mut pipe = redis::pipe();
        pipe.hset(self.job_key(id), "stop_requested", reason)
            .ignore();
        pipe.publish(self.stops_channel(), id).ignore();
        let _: () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Why a stop was requested for job `id`, if one was.
    pub async fn stop_requested(&self, id: &str) -> Result<Option<String>, PipelineError> {
        Ok(self
            .conn
            .clone()
            .hget(self.job_key(id), "stop_requested")
            .await?)
    }
}

/// A job this worker may run now.
#[derive(Debug, Clone)]
pub struct Lease {
    pub record: JobRecord,
    pub attempt: u32,
    stream: String,
    entry: String,
}

/// The worker side: reads entries, takes over orphans, claims runs,
/// heartbeats what it holds.
pub struct Consumer {
    queue: RedisQueue,
    name: String,
    block_conn: MultiplexedConnection,
    streams: Vec<String>,
    buffer: VecDeque<(String, String, String)>,
    /// (stream, entry) this consumer holds: heartbeated.
    held: Arc<Mutex<HashSet<(String, String)>>>,
    running: Arc<Mutex<Option<String>>>,
    last_reclaim: Option<Instant>,
}

impl Consumer {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn queue(&self) -> &RedisQueue {
        &self.queue
    }

    /// Records this worker as alive and refreshes the idle time of every entry
    /// it holds, so nobody takes them over.
    pub async fn beat(&self) -> Result<(), PipelineError> {
        heartbeat(&self.queue, &self.name, &self.held, &self.running).await
    }

    /// Heartbeats every `heartbeat` until the returned handle is aborted.
    pub fn spawn_heartbeat(&self) -> tokio::task::JoinHandle<()> {
        let (queue, name, held, running) = (
            self.queue.clone(),
            self.name.clone(),
            self.held.clone(),
            self.running.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(queue.cfg.heartbeat);
            loop {
                tick.tick().await;
                if let Err(e) = heartbeat(&queue, &name, &held, &running).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
        })
    }

    /// Waits up to `block` for a job to run. Entries whose job must not run
    /// (cancelled, expired, out of attempts) are settled and skipped.
    pub async fn next(&mut self, block: Duration) -> Result<Option<Lease>, PipelineError> {
        let deadline = Instant::now() + block;
        loop {
            self.reclaim_orphans().await?;
            if self.buffer.is_empty() {
                self.read_in_priority_order().await?;
            }
            if self.buffer.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                // Block at most one heartbeat, so orphans are looked for as
                // often while idle.
                self.read_blocking(left.min(self.queue.cfg.heartbeat))
                    .await?;
                continue;
            }
            let (stream, entry, id) = self.buffer.pop_front().expect("checked non-empty");
            if let Some(lease) = self.claim(stream, entry, id).await? {
                return Ok(Some(lease));
            }
        }
    }

    /// One entry from the first lane that has one (normal before low).
    async fn read_in_priority_order(&mut self) -> Result<(), PipelineError> {
        let opts = StreamReadOptions::default()
            .group(GROUP, &self.name)
            .count(1);
        for stream in self.streams.clone() {
            let reply: Option<StreamReadReply> = self
                .block_conn
                .xread_options(&[&stream], &[">"], &opts)
                .await?;
            let entry = reply
                .and_then(|r| r.keys.into_iter().next())
                .and_then(|k| k.ids.into_iter().next());
            if let Some(entry) = entry {
                self.take(stream, entry);
                return Ok(());
            }
        }
        Ok(())
    }

    /// Waits for an entry on any lane. Entries that arrive on several lanes
    /// during one wait are all kept, the higher lane first.
    async fn read_blocking(&mut self, block: Duration) -> Result<(), PipelineError> {
        let opts = StreamReadOptions::default()
            .group(GROUP, &self.name)
            .count(1)
            .block(block.as_millis().max(1) as usize);
        let ids: Vec<&str> = self.streams.iter().map(|_| ">").collect();
        let reply: Option<StreamReadReply> = self
            .block_conn
            .xread_options(&self.streams, &ids, &opts)
            .await?;
        let mut keys = reply.map(|r| r.keys).unwrap_or_default();
        keys.sort_by_key(|k| self.streams.iter().position(|s| *s == k.key));
        for key in keys {
            for entry in key.ids {
                self.take(key.key.clone(), entry);
            }
        }
        Ok(())
    }

    fn take(&mut self, stream: String, entry: redis::streams::StreamId) {
        let job: Option<String> = entry.get("job");
        self.held
            .lock()
            .expect("not poisoned")
            .insert((stream.clone(), entry.id.clone()));
        self.buffer
            .push_back((stream, entry.id, job.unwrap_or_default()));
    }

    /// Takes over entries whose holder stopped heartbeating.
    async fn reclaim_orphans(&mut self) -> Result<(), PipelineError> {
        let every = self.queue.cfg.heartbeat;
        if self.last_reclaim.is_some_and(|t| t.elapsed() < every) {
            return Ok(());
        }
        self.last_reclaim = Some(Instant::now());
        let min_idle = self.queue.cfg.heartbeat.as_millis() as usize
            * self.queue.cfg.missed_heartbeats as usize;
        let mut conn = self.queue.conn.clone();
        for stream in self.streams.clone() {
            let reply: StreamAutoClaimReply = conn
                .xautoclaim_options(
                    &stream,
                    GROUP,
                    &self.name,
                    min_idle,
                    "0-0",
                    StreamAutoClaimOptions::default().count(10),
                )
                .await?;
            for entry in reply.claimed {
                tracing::warn!(stream = %stream, entry = %entry.id, "taking over a job whose worker stopped heartbeating");
                self.take(stream.clone(), entry);
            }
        }
        Ok(())
    }

    async fn claim(
        &mut self,
        stream: String,
        entry: String,
        id: String,
    ) -> Result<Option<Lease>, PipelineError> {
        let q = &self.queue;
        let (verdict, attempt): (String, u32) = q
            .scripts
            .claim
            .key(q.job_key(&id))
            .key(q.counts_key())
            .key(q.callbacks_due_key())
            .arg(&id)
            .arg(q.events_channel())
            .arg(&self.name)
            .arg(now_ms())
            .arg(q.cfg.result_ttl.as_millis() as u64)
            .invoke_async(&mut q.conn.clone())
            .await?;
        if verdict != "run" {
            tracing::info!(job = %id, verdict = %verdict, "queue entry settled without a run");
            self.settle(&stream, &entry).await?;
            return Ok(None);
        }
        let Some(record) = q.get(&id).await? else {
            self.settle(&stream, &entry).await?;
            return Ok(None);
        };
        *self.running.lock().expect("not poisoned") = Some(id);
        Ok(Some(Lease {
            record,
            attempt,
            stream,
            entry,
        }))
    }

    async fn settle(&self, stream: &str, entry: &str) -> Result<(), PipelineError> {
        let mut conn = self.queue.conn.clone();
        let _: i64 = conn.xack(stream, GROUP, &[entry]).await?;
        let _: i64 = conn.xdel(stream, &[entry]).await?;
        self.held
            .lock()
            .expect("not poisoned")
            .remove(&(stream.to_string(), entry.to_string()));
        Ok(())
    }

    /// Writes the result (once: false if the job was already settled, e.g.
    /// cancelled) and releases the entry.
    pub async fn finish(&self, lease: Lease, outcome: Outcome) -> Result<bool, PipelineError> {
        let q = &self.queue;
        let (state, field, payload) = match outcome {
            Outcome::Completed(v) => (JobState::Completed, "output", v.to_string()),
            Outcome::Failed(e) => (JobState::Failed, "error", e),
            Outcome::TimedOut(e) => (JobState::TimedOut, "error", e),
        };
        let written: i32 = q
            .scripts
            .finish
            .key(q.job_key(&lease.record.id))
            .key(q.counts_key())
            .key(q.callbacks_due_key())
            .arg(&lease.record.id)
            .arg(q.events_channel())
            .arg(now_ms())
            .arg(q.cfg.result_ttl.as_millis() as u64)
            .arg(state.as_str())
            .arg(field)
            .arg(payload)
            .invoke_async(&mut q.conn.clone())
            .await?;
        self.settle(&lease.stream, &lease.entry).await?;
        *self.running.lock().expect("not poisoned") = None;
        self.beat().await?;
        Ok(written == 1)
    }

    /// The job's current state (to notice a cancel while it runs).
    pub async fn state_of(&self, id: &str) -> Result<Option<JobState>, PipelineError> {
        let st: Option<String> = self
            .queue
            .conn
            .clone()
            .hget(self.queue.job_key(id), "state")
            .await?;
        Ok(st.and_then(|s| JobState::parse(&s)))
    }

    /// Leaves the worker list (graceful stop). Entries still held are taken
    /// over by other workers once idle.
    pub async fn deregister(&self) -> Result<(), PipelineError> {
        let _: i64 = self
            .queue
            .conn
            .clone()
            .hdel(self.queue.workers_key(), &self.name)
            .await?;
        Ok(())
    }
}

async fn heartbeat(
    queue: &RedisQueue,
    name: &str,
    held: &Mutex<HashSet<(String, String)>>,
    running: &Mutex<Option<String>>,
) -> Result<(), PipelineError> {
    let mut conn = queue.conn.clone();
    let entries: Vec<(String, String)> =
        held.lock().expect("not poisoned").iter().cloned().collect();
    let mut by_stream: HashMap<String, Vec<String>> = HashMap::new();
    for (s, e) in entries {
        by_stream.entry(s).or_default().push(e);
    }
    for (stream, ids) in by_stream {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(&stream)
            .arg(GROUP)
            .arg(name)
            .arg(0)
            .arg(&ids)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await?;
    }
    let job = running.lock().expect("not poisoned").clone();
    let beat = serde_json::json!({
        "state": if job.is_some() { "running" } else { "idle" },
        "job": job,
        "seen_ms": now_ms(),
        "expires_ms": now_ms() + queue.cfg.heartbeat.as_millis() as u64 * queue.cfg.missed_heartbeats as u64,
    });
    let _: i64 = conn
        .hset(queue.workers_key(), name, beat.to_string())
        .await?;
    Ok(())
}

/// A unique worker name: host, pid and start time, so a restarted worker
/// never collides with the entry of its previous life.
pub fn unique_worker_name(prefix: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{prefix}-{host}-{}-{}", std::process::id(), now_ms())
}

/// A Redis URL fit for logs: the password replaced by `****`.
pub fn mask_redis_url(url: &str) -> String {
    match redis::parse_redis_url(url) {
        Some(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("****"));
            u.to_string()
        }
        _ => url.to_string(),
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
