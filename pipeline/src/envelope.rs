//! The RunPod-serverless body around a job, and job states.
//!
//! `{"input": {...}, "webhook": "https://...", "policy": {"executionTimeout":
//! ms, "ttl": ms, "lowPriority": bool}}`; other top-level fields (RunPod's
//! `s3Config`) are ignored.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jobs::{Job, JobKind};
use crate::InputError;

/// RunPod's job states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::InQueue,
        JobState::InProgress,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::InQueue => "IN_QUEUE",
            JobState::InProgress => "IN_PROGRESS",
            JobState::Completed => "COMPLETED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::TimedOut => "TIMED_OUT",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::InQueue | JobState::InProgress)
    }
}

/// How long a job may wait and run, and its lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Milliseconds a run may take before it is TIMED_OUT.
    #[serde(rename = "executionTimeout")]
    pub execution_timeout_ms: u64,
    /// Milliseconds from submission after which a job not yet started is
    /// TIMED_OUT instead of run.
    #[serde(rename = "ttl")]
    pub ttl_ms: u64,
    #[serde(rename = "lowPriority")]
    pub low_priority: bool,
}

pub const DEFAULT_EXECUTION_TIMEOUT_MS: u64 = 600_000;
pub const DEFAULT_TTL_MS: u64 = 86_400_000;
const WEEK_MS: u64 = 7 * 86_400_000;

impl Default for Policy {
    fn default() -> Self {
        Self {
            execution_timeout_ms: DEFAULT_EXECUTION_TIMEOUT_MS,
            ttl_ms: DEFAULT_TTL_MS,
            low_priority: false,
        }
    }
}

#[derive(Debug, Deserialize)]
struct PolicyWire {
    #[serde(default, rename = "executionTimeout")]
    execution_timeout: Option<u64>,
    #[serde(default)]
    ttl: Option<u64>,
    #[serde(default, rename = "lowPriority")]
    low_priority: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct RunRequestWire {
    input: Option<Value>,
    #[serde(default)]
    webhook: Option<String>,
    #[serde(default)]
    policy: Option<PolicyWire>,
    #[serde(default, rename = "s3Config")]
    s3_config: Option<S3ConfigWire>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct S3ConfigWire {
    #[serde(rename = "accessId")]
    access_id: String,
    #[serde(rename = "accessSecret")]
    access_secret: String,
    #[serde(rename = "bucketName")]
    bucket_name: String,
    #[serde(rename = "endpointUrl")]
    endpoint_url: String,
}

impl std::fmt::Debug for S3ConfigWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("S3ConfigWire(****)")
    }
}

/// RunPod's per-request `s3Config`: this job's media go to the caller's
/// bucket with the caller's credentials. Never logged (its `Debug` hides
/// it) and never stored in clear (sealed in the job record).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Config {
    #[serde(rename = "accessId")]
    pub access_id: String,
    #[serde(rename = "accessSecret")]
    pub access_secret: String,
    #[serde(rename = "bucketName")]
    pub bucket_name: String,
    #[serde(rename = "endpointUrl")]
    pub endpoint_url: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "S3Config {{ bucket: {:?}, endpoint: {:?}, credentials: **** }}",
            self.bucket_name, self.endpoint_url
        )
    }
}

fn s3_config(w: S3ConfigWire) -> Result<S3Config, RequestError> {
    let invalid = |f: &str, r: &str| RequestError::Invalid(InputError::new(f, r));
    if w.access_id.is_empty() || w.access_id.len() > 256 {
        return Err(invalid("s3Config.accessId", "must be 1 to 256 characters"));
    }
    if w.access_secret.is_empty() || w.access_secret.len() > 256 {
        return Err(invalid(
            "s3Config.accessSecret",
            "must be 1 to 256 characters",
        ));
    }
    let bucket_ok = (3..=63).contains(&w.bucket_name.len())
        && w.bucket_name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(invalid(
            "s3Config.bucketName",
            "must be an S3 bucket name (3 to 63 characters of a-z, 0-9, '-' and '.')",
        ));
    }
    let ok = reqwest::Url::parse(&w.endpoint_url)
        .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .unwrap_or(false);
    if !ok {
        return Err(invalid(
            "s3Config.endpointUrl",
            "must be an absolute http or https URL",
        ));
    }
    Ok(S3Config {
        access_id: w.access_id,
        access_secret: w.access_secret,
        bucket_name: w.bucket_name,
        endpoint_url: w.endpoint_url,
    })
}

/// Why a request body was refused: unreadable (400) or breaking a rule (422).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    Malformed(InputError),
    Invalid(InputError),
}

impl RequestError {
    pub fn input_error(&self) -> &InputError {
        match self {
            RequestError::Malformed(e) | RequestError::Invalid(e) => e,
        }
    }
}

/// A submitted job, checked: the typed job and the input it was parsed
/// from (what the queue stores).
#[derive(Debug, Clone, PartialEq)]
pub struct RunRequest {
    pub kind: JobKind,
    pub job: Job,
    pub input: Value,
    pub webhook: Option<String>,
    pub policy: Policy,
    /// The caller's own bucket for this job's media.
    pub s3_config: Option<S3Config>,
}

impl RunRequest {
    pub fn parse(kind: JobKind, body: &[u8]) -> Result<Self, RequestError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            RequestError::Malformed(InputError::new("body", format!("must be valid JSON ({e})")))
        })?;
        if !value.is_object() {
            return Err(RequestError::Invalid(InputError::new(
                "body",
                "must be a JSON object",
            )));
        }
        let wire: RunRequestWire = serde_path_to_error::deserialize(&value).map_err(|e| {
            let path = e.path().to_string();
            RequestError::Invalid(crate::field_error("", &path, e.into_inner().to_string()))
        })?;
        let invalid = |f: &str, r: &str| RequestError::Invalid(InputError::new(f, r));
        let input = match wire.input {
            Some(v @ Value::Object(_)) => v,
            Some(_) => return Err(invalid("input", "must be a JSON object")),
            None => return Err(invalid("input", "is required")),
        };
        let job = Job::parse(kind, &input).map_err(RequestError::Invalid)?;
        if let Some(url) = &wire.webhook {
            let ok = reqwest::Url::parse(url)
                .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .unwrap_or(false);
            if !ok {
                return Err(invalid("webhook", "must be an absolute http or https URL"));
            }
        }
        let mut policy = Policy::default();
        if let Some(p) = wire.policy {
            if let Some(t) = p.execution_timeout {
                if !(5_000..=WEEK_MS).contains(&t) {
                    return Err(invalid(
                        "policy.executionTimeout",
                        "must be between 5000 and 604800000 milliseconds",
                    ));
                }
                policy.execution_timeout_ms = t;
            }
            if let Some(t) = p.ttl {
                if !(10_000..=WEEK_MS).contains(&t) {
                    return Err(invalid(
                        "policy.ttl",
                        "must be between 10000 and 604800000 milliseconds",
                    ));
                }
                policy.ttl_ms = t;
            }
            policy.low_priority = p.low_priority.unwrap_or(false);
        }
        let s3_config = wire.s3_config.map(s3_config).transpose()?;
        Ok(Self {
            kind,
            job,
            input,
            webhook: wire.webhook,
            policy,
            s3_config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &str = r#"{"messages":[{"id":1,"type":"text","text":"hi","is_processed":false}],"character":"github:a/b"}"#;

    #[test]
    fn parses_envelope_with_policy_and_webhook() {
        let body = format!(
            r#"{{"input":{INPUT},"webhook":"http://127.0.0.1:9/cb","policy":{{"executionTimeout":60000,"ttl":20000,"lowPriority":true}},"s3Config":{{"accessId":"a","accessSecret":"s","bucketName":"my-bucket","endpointUrl":"http://127.0.0.1:9000"}}}}"#
        );
        let r = RunRequest::parse(JobKind::Chat, body.as_bytes()).unwrap();
        assert_eq!(
            r.policy,
            Policy {
                execution_timeout_ms: 60_000,
                ttl_ms: 20_000,
                low_priority: true
            }
        );
        assert_eq!(r.webhook.as_deref(), Some("http://127.0.0.1:9/cb"));
        let s3 = r.s3_config.unwrap();
        assert_eq!(s3.bucket_name, "my-bucket");
        assert!(
            !format!("{s3:?}").contains("\"s\""),
            "the secret is not in Debug"
        );
        let body = format!(
            r#"{{"input":{INPUT},"s3Config":{{"accessId":"a","accessSecret":"s","bucketName":"B!","endpointUrl":"http://x"}}}}"#
        );
        let e = RunRequest::parse(JobKind::Chat, body.as_bytes()).unwrap_err();
        assert_eq!(e.input_error().field, "s3Config.bucketName");
    }

    #[test]
    fn bad_json_is_malformed_and_broken_rules_are_invalid() {
        let e = RunRequest::parse(JobKind::Chat, b"{\"input\":").unwrap_err();
        assert!(
            matches!(e, RequestError::Malformed(ref i) if i.field == "body"),
            "{e:?}"
        );
        let e = RunRequest::parse(JobKind::Chat, b"{}").unwrap_err();
        assert_eq!(
            e,
            RequestError::Invalid(InputError::new("input", "is required"))
        );
        let body = format!(r#"{{"input":{INPUT},"webhook":"ftp://x/y"}}"#);
        let e = RunRequest::parse(JobKind::Chat, body.as_bytes()).unwrap_err();
        assert_eq!(e.input_error().field, "webhook");
        let body = format!(r#"{{"input":{INPUT},"policy":{{"ttl":5}}}}"#);
        let e = RunRequest::parse(JobKind::Chat, body.as_bytes()).unwrap_err();
        assert_eq!(e.input_error().field, "policy.ttl");
        let body = format!(r#"{{"input":{INPUT},"policy":{{"lowPriority":"yes"}}}}"#);
        let e = RunRequest::parse(JobKind::Chat, body.as_bytes()).unwrap_err();
        assert_eq!(e.input_error().field, "policy.lowPriority");
    }
}
