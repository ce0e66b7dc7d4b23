//! The job record: a hash `{ns}:job:{id}` written only by the scripts in
//! [`super::scripts`], read here.

use std::collections::HashMap;

use serde_json::Value;

use crate::{now_ms, JobKind, JobState, PipelineError, Policy};

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
    /// Runs started so far, never reset: the current run's lease token.
    pub run: u64,
    pub max_attempts: u32,
    pub worker: Option<String>,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// The running job's last progress (`{step, steps}`), kinds that report
    /// one (image).
    pub progress: Option<Value>,
    /// When the job's `policy.ttl` (its whole life, queue and run) ends.
    pub expires_ms: Option<u64>,
    /// The job's sealed `s3Config` (see [`crate::secrets`]), never shown.
    pub sealed_s3: Option<String>,
    /// The callback's body format: None for RunPod's, `cog` for the
    /// prediction object.
    pub hook_format: Option<String>,
    /// Cog's `output_file_prefix`: where the job's media are PUT.
    pub output_prefix: Option<String>,
}

impl JobRecord {
    pub(crate) fn from_hash(id: &str, h: HashMap<String, String>) -> Result<Self, PipelineError> {
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
            run: num("run").unwrap_or(0),
            max_attempts: num("max_attempts").unwrap_or(1) as u32,
            worker: h.get("worker").cloned(),
            progress: h.get("progress").and_then(|v| serde_json::from_str(v).ok()),
            // 0: a job handed back on drain (no queue expiry); its life
            // still ends `ttl` after it was submitted.
            expires_ms: num("expires_ms").filter(|&e| e > 0).or_else(|| {
                let created = num("created_ms")?;
                let policy: crate::Policy = serde_json::from_str(h.get("policy")?).ok()?;
                Some(created + policy.ttl_ms)
            }),
            sealed_s3: h.get("s3").cloned(),
            hook_format: h.get("hook_format").cloned(),
            output_prefix: h.get("output_prefix").cloned(),
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
