//! Callbacks: `{"id", "status", "output" | "error"}` POSTed to a job's
//! webhook when it ends, signed per Standard Webhooks (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">`).
//!
//! Delivery state lives in Redis, so a restarted shim carries on: the due
//! set `{ns}:callbacks:due` (score: when), one hash `{ns}:cb:{id}` per pending
//! callback (the body and webhook-id fixed at the first try, so every retry
//! is byte-identical), and the dead-letter list `{ns}:callbacks:dead`
//! (capped). A delivery is leased by pushing its due time ahead before the
//! POST; a shim that dies mid-POST leaves it due again after the lease.
//!
//! The script that ends a job creates its delivery with a fresh webhook id;
//! every later write of a delivery (its body, the next try, parking, the
//! final removal) happens only while that webhook id is still the job's, so
//! a delivery of an old run (before a `/retry`) never touches the new one.

use crate::outbound::{redact_url, OutboundGuard, Refused};
use std::collections::HashMap;
use std::time::Duration;

use rand::Rng;
use redis::AsyncCommands;
use serde_json::{json, Value};
use standardwebhooks::Webhook;

use crate::queue::RedisQueue;
use crate::{now_ms, JobState, PipelineError};

/// Standard Webhooks' schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h,
/// 10 h, 14 h, 20 h, 24 h.
pub const STANDARD_SCHEDULE: &str = "0s,5s,5m,30m,2h,5h,10h,14h,20h,24h";

/// Parses `"0s,5s,5m,100ms,2h"`.
pub fn parse_schedule(s: &str) -> Result<Vec<Duration>, String> {
    s.split(',')
        .map(|part| {
            let part = part.trim();
            let (num, unit) = part
                .find(|c: char| !c.is_ascii_digit())
                .map(|i| part.split_at(i))
                .ok_or_else(|| format!("{part:?}: a duration needs a unit (ms, s, m, h)"))?;
            let n: u64 = num.parse().map_err(|_| format!("{part:?}: not a number"))?;
            Ok(match unit {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n * 60),
                "h" => Duration::from_secs(n * 3600),
                _ => return Err(format!("{part:?}: unit must be ms, s, m or h")),
            })
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// `whsec_` + base64.
    pub secret: String,
    /// Delay before each try; its length is the number of tries.
    pub schedule: Vec<Duration>,
    pub timeout: Duration,
    /// How long a delivery in flight is leased before another try may start.
    pub lease: Duration,
    /// Parked callbacks kept (the oldest are dropped past it).
    pub dead_letter_max: usize,
    /// What the outbound guard lets through besides public addresses
    /// (`OUTBOUND_ALLOW`).
    pub allow: crate::outbound::OutboundAllow,
}

/// The callback body of a finished job: what `/status` answers for it
/// (`id`, `status`, `delayTime`, `executionTime`, `workerId`, and `output`
/// or `error`).
pub fn callback_body(rec: &crate::queue::JobRecord) -> String {
    // A Cog prediction's callback is the prediction object, named as the
    // caller named it (`cog:{id}`; empty: the job id).
    if let Some(id) = rec
        .hook_format
        .as_deref()
        .and_then(|f| f.strip_prefix("cog:"))
    {
        let id = if id.is_empty() { rec.id.as_str() } else { id };
        return crate::cog::prediction(rec, id).to_string();
    }
    let mut body = json!({
        "id": rec.id,
        "status": rec.state.as_str(),
        "delayTime": rec.delay_ms(),
        "executionTime": rec.execution_ms(),
    });
    if let Some(w) = &rec.worker {
        body["workerId"] = json!(w);
    }
    match (&rec.output, &rec.error) {
        (Some(o), _) if rec.state == JobState::Completed => body["output"] = o.clone(),
        (_, Some(e)) => body["error"] = json!(e),
        _ => {}
    }
    body.to_string()
}

/// Why a try did not reach the receiver.
enum Failure {
    Refused(String),
    Other(String),
}

/// The guard's refusal, when that is why a request failed.
fn refusal_in(e: &reqwest::Error) -> Option<&Refused> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return Some(r);
        }
        source = s.source();
    }
    None
}

/// A request error with its causes and without its URL (which may carry
/// credentials or tokens).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Signs and delivers callbacks.
#[derive(Clone)]
pub struct CallbackSender {
    queue: RedisQueue,
    /// The guarded client: public addresses (or `OUTBOUND_ALLOW`) only, no
    /// redirects.
    http: reqwest::Client,
    guard: OutboundGuard,
    signer: std::sync::Arc<Webhook>,
    cfg: WebhookConfig,
    settle_script: std::sync::Arc<redis::Script>,
    lease_script: std::sync::Arc<redis::Script>,
    /// Deliveries accepted by their receivers, settled together
    /// ([`settle_delivered`]): started on first use.
    delivered: std::sync::Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Delivered>>>,
}

/// A delivery to settle as done, and where its outcome goes.
type Delivered = (
    String,
    String,
    tokio::sync::oneshot::Sender<Result<bool, PipelineError>>,
);

/// A leased delivery: the job's callback hash and record as read.
struct Delivery {
    id: String,
    callback: HashMap<String, String>,
    record: HashMap<String, String>,
}

/// Leases up to ARGV[3] due ids: their score moves to now + lease.
const LUA_LEASE_DUE: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
if #ids > 0 then
  local scored = {}
  for i, id in ipairs(ids) do
    scored[2 * i - 1] = ARGV[2]
    scored[2 * i] = id
  end
  redis.call('ZADD', KEYS[1], 'XX', unpack(scored))
end
return ids
"#;

/// KEYS[1] due set, then callback hashes. ARGV: (id, webhook id) per hash.
/// Settles each delivery whose webhook id is still its job's as done (its
/// hash deleted, its id off the due set); 1 or 0 per delivery.
const LUA_SETTLE_DONE: &str = r#"
local out, hashes, ids = {}, {}, {}
for i = 2, #KEYS do
  local id, wid = ARGV[2 * i - 3], ARGV[2 * i - 2]
  if redis.call('HGET', KEYS[i], 'webhook_id') == wid then
    hashes[#hashes + 1] = KEYS[i]
    ids[#ids + 1] = id
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if #ids > 0 then
  redis.call('DEL', unpack(hashes))
  redis.call('ZREM', KEYS[1], unpack(ids))
end
return out
"#;

/// Most deliveries one settling script takes.
const SETTLE_BATCH: usize = 128;

/// Settles the deliveries sent to `rx` as done, all that are waiting in
/// one script (at 64 concurrent jobs, one call where there were dozens).
async fn settle_delivered(
    queue: RedisQueue,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Delivered>,
) {
    let script = redis::Script::new(LUA_SETTLE_DONE);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < SETTLE_BATCH {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let keys = queue.keys();
        let mut inv = script.prepare_invoke();
        inv.key(keys.callbacks_due());
        for (id, webhook_id, _) in &batch {
            inv.key(keys.callback(id)).arg(id).arg(webhook_id);
        }
        let settled: Result<Vec<i32>, _> = inv.invoke_async(&mut queue.connection()).await;
        match settled {
            Ok(flags) => {
                for ((_, _, reply), flag) in batch.into_iter().zip(flags) {
                    let _ = reply.send(Ok(flag == 1));
                }
            }
            Err(e) => {
                let e = PipelineError::from(e);
                for (_, _, reply) in batch {
                    let _ = reply.send(Err(e.copy()));
                }
            }
        }
    }
}

/// KEYS: callback hash, due set, dead letters. ARGV: id, webhook id, mode
/// (`retry` attempts last_error when body | `park` letter max | `stale`).
/// Writes only while the webhook id is the job's. A retry keeps the body
/// of the first try (every try byte-identical). Deliveries that are done
/// go through [`LUA_SETTLE_DONE`], many at once.
const LUA_SETTLE: &str = r#"
if ARGV[3] == 'stale' then
  if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
  return 1
end
if redis.call('HGET', KEYS[1], 'webhook_id') ~= ARGV[2] then return 0 end
if ARGV[3] == 'retry' then
  redis.call('HSET', KEYS[1], 'attempts', ARGV[4], 'last_error', ARGV[5])
  redis.call('HSETNX', KEYS[1], 'body', ARGV[7])
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
  return 1
end
if ARGV[3] == 'park' then
  redis.call('LPUSH', KEYS[3], ARGV[4])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"#;

impl CallbackSender {
    pub fn new(queue: RedisQueue, cfg: WebhookConfig) -> Result<Self, PipelineError> {
        let signer = Webhook::new(&cfg.secret).map_err(|e| {
            PipelineError::Other(format!(
                "WEBHOOK_SECRET must be whsec_ followed by base64: {e:?}"
            ))
        })?;
        let guard = OutboundGuard::new(cfg.allow.clone());
        let http = guard
            .client(cfg.timeout)
            .map_err(|e| PipelineError::Other(e.to_string()))?;
        Ok(Self {
            queue,
            http,
            guard,
            signer: std::sync::Arc::new(signer),
            cfg,
            settle_script: std::sync::Arc::new(redis::Script::new(LUA_SETTLE)),
            lease_script: std::sync::Arc::new(redis::Script::new(LUA_LEASE_DUE)),
            delivered: Default::default(),
        })
    }

    /// Sends one signed event (a Cog prediction's `start`, `output` or
    /// `logs` webhook) once, no retries (as Cog sends them); the final
    /// callback goes through the retried delivery instead.
    pub async fn send_event(&self, url: &str, body: &str) -> Result<u16, PipelineError> {
        let msg_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let resp = self
            .post_signed(url, &msg_id, body.to_string())
            .await?
            .map_err(|f| match f {
                Failure::Refused(e) | Failure::Other(e) => PipelineError::Other(e),
            })?;
        Ok(resp.status().as_u16())
    }

    /// POSTs `body` to `url` signed as message `msg_id` (Standard Webhooks
    /// headers), through the guard: an address literal is checked here, a
    /// host name by the client's resolver, which connects only to the
    /// addresses it checked.
    async fn post_signed(
        &self,
        url: &str,
        msg_id: &str,
        body: String,
    ) -> Result<Result<reqwest::Response, Failure>, PipelineError> {
        let ts = (now_ms() / 1000) as i64;
        let signature = self
            .signer
            .sign(msg_id, ts, body.as_bytes())
            .map_err(|e| PipelineError::Other(format!("signing: {e:?}")))?;
        Ok(match self.guard.check_url(url) {
            Ok(target) => self
                .http
                .post(target)
                .header("content-type", "application/json")
                .header("webhook-id", msg_id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signature)
                .body(body)
                .send()
                .await
                .map_err(|e| match refusal_in(&e) {
                    Some(r) => Failure::Refused(r.to_string()),
                    None => Failure::Other(describe(e)),
                }),
            Err(r) => Err(Failure::Refused(r.to_string())),
        })
    }

    /// Leases the callbacks that are due now.
    pub async fn lease_due(&self, max: usize) -> Result<Vec<String>, PipelineError> {
        let now = now_ms();
        let ids: Vec<String> = self
            .lease_script
            .key(self.queue.keys().callbacks_due())
            .arg(now)
            .arg(now + self.cfg.lease.as_millis() as u64)
            .arg(max)
            .invoke_async(&mut self.queue.connection())
            .await?;
        Ok(ids)
    }

    /// Writes delivery `webhook_id` of job `id` as `mode` says, if it is
    /// still the job's delivery; whether it was.
    async fn settle(
        &self,
        id: &str,
        webhook_id: &str,
        mode: &str,
        args: &[String],
    ) -> Result<bool, PipelineError> {
        let keys = self.queue.keys();
        let mut inv = self.settle_script.prepare_invoke();
        inv.key(keys.callback(id))
            .key(keys.callbacks_due())
            .key(keys.dead_letters())
            .arg(id)
            .arg(webhook_id)
            .arg(mode);
        for a in args {
            inv.arg(a);
        }
        let done: i32 = inv.invoke_async(&mut self.queue.connection()).await?;
        Ok(done == 1)
    }

    /// Settles delivery `webhook_id` of job `id` as done, with the others
    /// accepted meanwhile; whether it was still the job's delivery.
    async fn settle_done(&self, id: &str, webhook_id: &str) -> Result<bool, PipelineError> {
        let tx = self.delivered.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(settle_delivered(self.queue.clone(), rx));
            tx
        });
        let (reply, outcome) = tokio::sync::oneshot::channel();
        tx.send((id.to_string(), webhook_id.to_string(), reply))
            .map_err(|_| PipelineError::Other("the callback settler stopped".into()))?;
        outcome
            .await
            .map_err(|_| PipelineError::Other("the callback settler stopped".into()))?
    }

    /// The guard every callback URL goes through (the shim also checks a
    /// webhook with it at submission).
    pub fn guard(&self) -> &OutboundGuard {
        &self.guard
    }

    /// The callback hash and the record of each job in `ids`, in one round
    /// trip.
    async fn read_deliveries(&self, ids: &[String]) -> Result<Vec<Delivery>, PipelineError> {
        let keys = self.queue.keys();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hgetall(keys.callback(id)).hgetall(keys.job(id));
        }
        let hashes: Vec<HashMap<String, String>> =
            pipe.query_async(&mut self.queue.connection()).await?;
        let mut hashes = hashes.into_iter();
        Ok(ids
            .iter()
            .map(|id| Delivery {
                id: id.clone(),
                callback: hashes.next().unwrap_or_default(),
                record: hashes.next().unwrap_or_default(),
            })
            .collect())
    }

    /// One try at delivering the callback of job `id`; schedules the next try
    /// or parks it in the dead-letter list.
    pub async fn deliver(&self, id: &str) -> Result<(), PipelineError> {
        let mut read = self.read_deliveries(&[id.to_string()]).await?;
        self.deliver_read(read.pop().expect("one asked, one read"))
            .await
    }

    async fn deliver_read(&self, d: Delivery) -> Result<(), PipelineError> {
        let Delivery {
            id,
            callback,
            record,
        } = d;
        let (id, cb) = (id.as_str(), &callback);
        let (Some(msg_id), Some(url)) = (cb.get("webhook_id"), cb.get("url")) else {
            // A due entry without a delivery (the job was retried since).
            self.settle(id, "", "stale", &[]).await?;
            return Ok(());
        };
        let record = (!record.is_empty())
            .then(|| crate::queue::JobRecord::from_hash(id, record).ok())
            .flatten();
        let body = match (cb.get("body"), &record) {
            // Kept from the first try, so every retry is byte-identical
            // (the record of an ended job does not change: it gives the
            // same body again until then).
            (Some(b), _) => b.clone(),
            (None, Some(rec)) => callback_body(rec),
            (None, None) => {
                tracing::warn!(job = %id, "callback dropped: the job record is gone");
                self.settle_done(id, msg_id).await?;
                return Ok(());
            }
        };
        let attempts: usize = cb.get("attempts").and_then(|a| a.parse().ok()).unwrap_or(0) + 1;
        let sent = self.post_signed(url, msg_id, body.clone()).await?;
        let refused = matches!(sent, Err(Failure::Refused(_)));
        let (status, error, retry_after) = match sent {
            Ok(r) => (
                Some(r.status().as_u16()),
                None,
                r.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs),
            ),
            Err(Failure::Refused(e) | Failure::Other(e)) => (None, Some(e), None),
        };
        if status.is_some_and(|s| (200..300).contains(&s)) {
            tracing::info!(job = %id, attempts, "callback delivered");
            self.settle_done(id, msg_id).await?;
            return Ok(());
        }
        let last = match (status, &error) {
            (Some(s), _) => format!("HTTP {s}"),
            (None, Some(e)) => e.clone(),
            _ => "unknown".into(),
        };
        tracing::warn!(job = %id, attempts, last = %last, "callback not accepted");
        let gone = status == Some(410);
        // A refused address is refused on every try: parked at once.
        if gone || refused || attempts >= self.cfg.schedule.len() {
            let owner = record.map(|r| r.owner);
            let reason = if gone {
                "the receiver answered 410 Gone"
            } else if refused {
                "refused by the outbound guard"
            } else {
                "retries exhausted"
            };
            // The URL without credentials or query (tokens live there).
            let dead = json!({
                "job_id": id, "owner": owner, "url": redact_url(url), "webhook_id": msg_id,
                "attempts": attempts, "last_status": status, "last_error": last,
                "reason": reason, "dead_ms": now_ms(),
            });
            // One script: a delivery is either pending or parked, never
            // both nor neither.
            self.settle(
                id,
                msg_id,
                "park",
                &[
                    dead.to_string(),
                    self.cfg.dead_letter_max.max(1).to_string(),
                ],
            )
            .await?;
            return Ok(());
        }
        let planned = self.cfg.schedule[attempts];
        // ±10 % jitter so a fleet's retries do not arrive together.
        let jitter = rand::thread_rng().gen_range(0.9..1.1);
        let wait = planned.mul_f64(jitter).max(retry_after.unwrap_or_default());
        self.settle(
            id,
            msg_id,
            "retry",
            &[
                attempts.to_string(),
                last,
                (now_ms() + wait.as_millis() as u64).to_string(),
                body,
            ],
        )
        .await?;
        Ok(())
    }

    /// Callbacks parked after their last try, newest first.
    pub async fn dead_letters(&self, max: isize) -> Result<Vec<Value>, PipelineError> {
        let raw: Vec<String> = self
            .queue
            .connection()
            .lrange(self.queue.keys().dead_letters(), 0, max - 1)
            .await?;
        Ok(raw
            .iter()
            .filter_map(|r| serde_json::from_str(r).ok())
            .collect())
    }

    /// Delivers due callbacks until `shutdown` fires, waking on `wake` (job
    /// events) or every `poll`.
    pub async fn run(
        self,
        poll: Duration,
        mut wake: tokio::sync::broadcast::Receiver<std::sync::Arc<str>>,
    ) {
        loop {
            let due = match self.lease_due(32).await {
                Ok(ids) if ids.is_empty() => Ok(Vec::new()),
                Ok(ids) => self.read_deliveries(&ids).await,
                Err(e) => Err(e),
            };
            match due {
                Ok(due) => {
                    for d in due {
                        let me = self.clone();
                        tokio::spawn(async move {
                            let id = d.id.clone();
                            if let Err(e) = me.deliver_read(d).await {
                                tracing::error!(job = %id, error = %e, "callback delivery failed");
                            }
                        });
                    }
                }
                Err(e) => tracing::error!(error = %e, "reading due callbacks failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = wake.recv() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_parses_units() {
        assert_eq!(
            parse_schedule("0s,100ms,5m,2h").unwrap(),
            vec![
                Duration::ZERO,
                Duration::from_millis(100),
                Duration::from_secs(300),
                Duration::from_secs(7200)
            ]
        );
        assert_eq!(parse_schedule(STANDARD_SCHEDULE).unwrap().len(), 10);
        assert!(parse_schedule("5").is_err());
        assert!(parse_schedule("5d").is_err());
    }

    #[test]
    fn body_has_the_status_timings_and_output_or_error() {
        let mut rec = crate::queue::JobRecord {
            id: "j".into(),
            kind: crate::JobKind::Chat,
            owner: "o".into(),
            state: JobState::Completed,
            input: json!({}),
            webhook: None,
            policy: crate::Policy::default(),
            created_ms: 1_000,
            started_ms: Some(1_250),
            finished_ms: Some(4_250),
            attempts: 1,
            run: 1,
            max_attempts: 3,
            worker: Some("worker-x".into()),
            output: Some(json!({"a": 1})),
            error: None,
            progress: None,
            expires_ms: None,
            sealed_s3: None,
            hook_format: None,
            output_prefix: None,
        };
        assert_eq!(
            callback_body(&rec),
            r#"{"id":"j","status":"COMPLETED","delayTime":250,"executionTime":3000,"workerId":"worker-x","output":{"a":1}}"#
        );
        rec.state = JobState::Failed;
        rec.output = None;
        rec.error = Some("boom".into());
        assert_eq!(
            callback_body(&rec),
            r#"{"id":"j","status":"FAILED","delayTime":250,"executionTime":3000,"workerId":"worker-x","error":"boom"}"#
        );
    }
}
