//! The fleet: live workers (which kinds each serves, idle or running),
//! fleet-wide totals, worker names, and pruning consumers of dead workers.

use std::collections::{BTreeMap, HashMap};

use redis::AsyncCommands;
use serde_json::{json, Value};

use super::keys::GROUP;
use super::RedisQueue;
use crate::{now_ms, JobKind, PipelineError};

/// Live workers, as their heartbeats say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetView {
    pub idle: usize,
    pub running: usize,
    /// Live workers that serve each kind.
    pub by_kind: BTreeMap<String, usize>,
    /// The gauges live workers report (text engine sequences, KV blocks,
    /// tokens/s), summed.
    pub gauges: BTreeMap<String, u64>,
}

impl RedisQueue {
    /// The fleet-wide worker totals (jobs by outcome, tokens, model time),
    /// which runs add as they finish and the shim exports on /metrics.
    pub async fn worker_stats(&self) -> Result<HashMap<String, i64>, PipelineError> {
        Ok(self.conn.clone().hgetall(self.keys.worker_stats()).await?)
    }

    /// Records worker `name` as alive for one lease window.
    pub(crate) async fn register_worker(
        &self,
        name: &str,
        kinds: &[JobKind],
        running: Option<&str>,
    ) -> Result<(), PipelineError> {
        let window = self.cfg.heartbeat.as_millis() as u64 * self.cfg.missed_heartbeats as u64;
        let gauges: serde_json::Map<String, Value> = self
            .gauges
            .get()
            .filter(|g| g.owner.get_or_init(|| name.to_string()) == name)
            .map(|g| {
                (g.source)()
                    .into_iter()
                    .map(|(k, v)| (k, json!(v)))
                    .collect()
            })
            .unwrap_or_default();
        let beat = json!({
            "state": if running.is_some() { "running" } else { "idle" },
            "job": running,
            "kinds": kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            "gauges": gauges,
            "seen_ms": now_ms(),
            "expires_ms": now_ms() + window,
        });
        let _: i64 = self
            .conn
            .clone()
            .hset(self.keys.workers(), name, beat.to_string())
            .await?;
        Ok(())
    }

    /// Leaves the worker list (graceful stop).
    pub async fn deregister_worker(&self, name: &str) -> Result<(), PipelineError> {
        let _: i64 = self.conn.clone().hdel(self.keys.workers(), name).await?;
        Ok(())
    }

    /// Workers seen within their heartbeat window. Entries of workers gone
    /// quiet are removed.
    pub async fn workers(&self) -> Result<FleetView, PipelineError> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = conn.hgetall(self.keys.workers()).await?;
        let now = now_ms();
        let mut view = FleetView::default();
        for (name, raw) in all {
            let v: Value = serde_json::from_str(&raw).unwrap_or_default();
            if v["expires_ms"].as_u64().unwrap_or(0) < now {
                let _: i64 = conn.hdel(self.keys.workers(), &name).await?;
                continue;
            }
            if v["state"] == "running" {
                view.running += 1;
            } else {
                view.idle += 1;
            }
            for (g, n) in v["gauges"].as_object().into_iter().flatten() {
                *view.gauges.entry(g.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
            for kind in v["kinds"].as_array().into_iter().flatten() {
                if let Some(k) = kind.as_str() {
                    *view.by_kind.entry(k.to_string()).or_default() += 1;
                }
            }
        }
        Ok(view)
    }

    /// Whether `consumer` takes this lease window's turn at pruning
    /// `lane`'s dead consumers: one consumer of the whole fleet a window
    /// (the look lists every consumer of the lane; made by every slot of
    /// every worker each heartbeat, it grew with the square of the fleet).
    pub(crate) async fn prune_turn(
        &self,
        lane: &str,
        consumer: &str,
        window: std::time::Duration,
    ) -> Result<bool, PipelineError> {
        let taken: Option<String> = redis::cmd("SET")
            .arg(self.keys.prune_turn(lane))
            .arg(consumer)
            .arg("NX")
            .arg("PX")
            .arg(window.as_millis().max(1) as u64)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(taken.is_some())
    }

    /// Removes from `stream`'s group the consumers that hold nothing and
    /// have been idle for `min_idle_ms` (workers that died or moved on), so
    /// consumer names do not pile up. A consumer that holds entries is never
    /// removed (that would drop its entries); a live worker whose consumer
    /// was removed gets it back on its next read.
    pub(crate) async fn prune_consumers(
        &self,
        stream: &str,
        min_idle_ms: u64,
    ) -> Result<usize, PipelineError> {
        let mut conn = self.conn.clone();
        let consumers: Vec<HashMap<String, redis::Value>> = match redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg(GROUP)
            .query_async(&mut conn)
            .await
        {
            Ok(c) => c,
            Err(e) if e.code() == Some("NOGROUP") => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut removed = 0;
        for c in consumers {
            let field = |k: &str| {
                c.get(k)
                    .and_then(|v| redis::from_redis_value::<u64>(v).ok())
            };
            let name: Option<String> = c.get("name").and_then(|v| redis::from_redis_value(v).ok());
            let (Some(name), Some(pending), Some(idle)) = (name, field("pending"), field("idle"))
            else {
                continue;
            };
            if pending == 0 && idle >= min_idle_ms {
                let _: i64 = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(stream)
                    .arg(GROUP)
                    .arg(&name)
                    .query_async(&mut conn)
                    .await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// A unique worker name: host, pid and start time, so a restarted worker
/// never collides with the entry of its previous life.
pub fn unique_worker_name(prefix: &str) -> String {
    // Opaque: clients see it as `workerId`, so it names no host, path or
    // process; the worker logs which host and process it is at start.
    format!("{prefix}-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
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
