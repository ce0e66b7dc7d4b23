//! The shim's side of the queue: enqueue, read, cancel, retry, purge, counts.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::keys::GROUP;
use super::{JobRecord, RedisQueue};
use crate::{JobKind, JobState, PipelineError, RunRequest};

/// What `retry` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    Requeued,
    NotRetryable(JobState),
    NotFound,
}

/// Queued and held jobs of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindQueue {
    /// Entries no worker has read yet.
    pub queued: u64,
    /// Entries a worker holds (running, or read and about to run).
    pub running: u64,
}

/// How [`RedisQueue::enqueue_opts`] stores a job.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnqueueOptions<'a> {
    pub id: Option<&'a str>,
    pub hook_format: Option<&'a str>,
    /// Cog's `output_file_prefix`: the job's media are PUT there.
    pub output_prefix: Option<&'a str>,
    /// RunPod's `s3Config` (set from the request by `enqueue_opts`).
    pub s3: Option<&'a crate::envelope::S3Config>,
}

impl RedisQueue {
    /// Stores a new job and queues it on its kind's lane.
    pub async fn enqueue(&self, req: &RunRequest, owner: &str) -> Result<JobRecord, PipelineError> {
        self.enqueue_opts(req, owner, EnqueueOptions::default())
            .await
    }

    /// [`Self::enqueue`] with a chosen job id (Cog's `PUT
    /// /predictions/{id}`: the caller checks the id is free) and the
    /// callback's format (`cog`: the prediction object).
    pub async fn enqueue_opts(
        &self,
        req: &RunRequest,
        owner: &str,
        opts: EnqueueOptions<'_>,
    ) -> Result<JobRecord, PipelineError> {
        if req.s3_config.is_some() && self.cfg.secrets.is_none() {
            return Err(PipelineError::Other(
                "s3Config needs JOB_SECRETS_KEY on the shim and the workers".into(),
            ));
        }
        self.enqueue_with(
            req.kind,
            &req.input,
            req.webhook.as_deref(),
            &req.policy,
            owner,
            EnqueueOptions {
                s3: req.s3_config.as_ref(),
                ..opts
            },
        )
        .await
    }

    /// Whether jobs may carry secrets (`s3Config`).
    pub fn takes_secrets(&self) -> bool {
        self.cfg.secrets.is_some()
    }

    /// The `s3Config` job `rec` carries, opened.
    pub fn s3_config(
        &self,
        rec: &JobRecord,
    ) -> Result<Option<crate::envelope::S3Config>, PipelineError> {
        let Some(sealed) = &rec.sealed_s3 else {
            return Ok(None);
        };
        let secrets = self.cfg.secrets.as_ref().ok_or_else(|| {
            PipelineError::Other(
                "this job carries an s3Config: set JOB_SECRETS_KEY on the worker".into(),
            )
        })?;
        let raw = secrets
            .open(&rec.id, sealed)
            .map_err(PipelineError::Other)?;
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| PipelineError::BadRecord(rec.id.clone(), format!("s3Config: {e}")))
    }

    /// Stores `input` as a job of `kind` as it is, unchecked: [`Self::enqueue`]
    /// takes a parsed request; this exists for tests that must store input
    /// no shim would accept (to show the worker refuses it).
    pub async fn enqueue_input(
        &self,
        kind: JobKind,
        input: &serde_json::Value,
        webhook: Option<&str>,
        policy: &crate::Policy,
        owner: &str,
    ) -> Result<JobRecord, PipelineError> {
        self.enqueue_with(
            kind,
            input,
            webhook,
            policy,
            owner,
            EnqueueOptions::default(),
        )
        .await
    }

    async fn enqueue_with(
        &self,
        kind: JobKind,
        input: &serde_json::Value,
        webhook: Option<&str>,
        policy: &crate::Policy,
        owner: &str,
        opts: EnqueueOptions<'_>,
    ) -> Result<JobRecord, PipelineError> {
        let id = opts
            .id
            .map(String::from)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut fields: Vec<(&str, String)> = vec![
            ("id", id.clone()),
            ("kind", kind.as_str().into()),
            ("owner", owner.into()),
            ("state", JobState::InQueue.as_str().into()),
            ("input", input.to_string()),
            (
                "policy",
                serde_json::to_string(policy).expect("policy serializes"),
            ),
            ("attempts", "0".into()),
            ("run", "0".into()),
            ("max_attempts", self.cfg.max_attempts.to_string()),
        ];
        if let Some(w) = webhook {
            fields.push(("webhook", w.to_string()));
        }
        if let Some(f) = opts.hook_format {
            fields.push(("hook_format", f.to_string()));
        }
        if let Some(p) = opts.output_prefix {
            fields.push(("output_prefix", p.to_string()));
        }
        if let (Some(s3), Some(secrets)) = (opts.s3, &self.cfg.secrets) {
            let plain = serde_json::to_vec(s3).expect("s3Config serializes");
            fields.push(("s3", secrets.seal(&id, &plain)));
        }
        let mut inv = self.scripts.enqueue.prepare_invoke();
        for k in self.terminal_keys(&id) {
            inv.key(k);
        }
        inv.key(self.keys.lane(kind, policy.low_priority))
            .arg(&id)
            .arg(self.keys.events())
            .arg(policy.ttl_ms)
            .arg(super::keys::GROUP);
        for (k, v) in &fields {
            inv.arg(*k).arg(v);
        }
        let reply: (i64, redis::Value) = inv.invoke_async(&mut self.conn.clone()).await?;
        let stored: HashMap<String, String> = match reply {
            // New: what was written, and the two times from the Redis clock.
            (1, times) => {
                let (created, expires): (i64, i64) = redis::from_redis_value(&times)?;
                fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .chain([
                        ("created_ms".to_string(), created.to_string()),
                        ("expires_ms".to_string(), expires.to_string()),
                    ])
                    .collect()
            }
            (_, existing) => redis::from_redis_value(&existing)?,
        };
        JobRecord::from_hash(&id, stored)
    }

    pub async fn get(&self, id: &str) -> Result<Option<JobRecord>, PipelineError> {
        let h: HashMap<String, String> = self.conn.clone().hgetall(self.keys.job(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        JobRecord::from_hash(id, h).map(Some)
    }

    /// Cancels a queued or running job; the state after (None: no such job).
    /// A running job's token stream ends with CANCELLED here; its worker
    /// notices and writes nothing more.
    pub async fn cancel(&self, id: &str, reason: &str) -> Result<Option<JobState>, PipelineError> {
        self.cancel_inner(id, false, reason).await
    }

    async fn cancel_inner(
        &self,
        id: &str,
        only_if_queued: bool,
        reason: &str,
    ) -> Result<Option<JobState>, PipelineError> {
        let mut inv = self.scripts.cancel.prepare_invoke();
        for k in self.terminal_keys(id) {
            inv.key(k);
        }
        let st: Option<String> = inv
            .arg(id)
            .arg(self.keys.events())
            .arg(self.result_ttl_ms())
            .arg(if only_if_queued { "1" } else { "0" })
            .arg(reason)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(st.and_then(|s| JobState::parse(&s)))
    }

    /// Puts a FAILED or TIMED_OUT job back in its queue with fresh attempts,
    /// a clean token stream and no callback state of the old run.
    pub async fn retry(&self, id: &str) -> Result<RetryOutcome, PipelineError> {
        let Some(rec) = self.get(id).await? else {
            return Ok(RetryOutcome::NotFound);
        };
        self.ensure_groups(rec.kind).await?;
        let mut inv = self.scripts.retry.prepare_invoke();
        for k in self.terminal_keys(id) {
            inv.key(k);
        }
        let done: i32 = inv
            .key(self.keys.lane(rec.kind, rec.policy.low_priority))
            .key(self.keys.stream_cursor(id))
            .arg(id)
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
        for stream in self.keys.lanes(kind) {
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
                    let owned: Option<String> = conn.hget(self.keys.job(&id), "owner").await?;
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

    /// Jobs by state, plus `retried`.
    pub async fn counts(&self) -> Result<HashMap<String, i64>, PipelineError> {
        Ok(self.conn.clone().hgetall(self.keys.counts()).await?)
    }

    /// Queued and held entries of `kind`'s lanes. Settled entries are
    /// deleted, so a lane's length is what waits plus what is held (pending).
    pub async fn kind_queue(&self, kind: JobKind) -> Result<KindQueue, PipelineError> {
        let mut out = KindQueue::default();
        let mut conn = self.conn.clone();
        for stream in self.keys.lanes(kind) {
            let len: u64 = conn.xlen(&stream).await?;
            let pending: Result<redis::streams::StreamPendingReply, _> =
                conn.xpending(&stream, GROUP).await;
            let held = match pending {
                Ok(p) => p.count() as u64,
                // No group yet (nothing was ever queued, or Redis restarted
                // without persistence).
                Err(e) if e.code() == Some("NOGROUP") => 0,
                Err(e) => return Err(e.into()),
            };
            out.queued += len.saturating_sub(held);
            out.running += held;
        }
        Ok(out)
    }
}
