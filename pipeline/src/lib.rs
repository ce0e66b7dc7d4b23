//! The job pipeline shared by the api-shim and the worker.
//!
//! - [`jobs`]: one contract per job kind (typed input parsed once, valid by
//!   construction; typed output; input schema) and the table of kinds: the
//!   chat job (seed 003), streamed chat, memory condense.
//! - [`envelope`]: the RunPod-style body around a job (`input`, `webhook`,
//!   `policy`) and job states.
//! - [`queue`]: jobs in Redis: records, per-kind priority lanes on Redis
//!   Streams with consumer groups, leases kept alive by heartbeats, attempt
//!   caps, cancellation, retry and purge, and the event channel.
//! - [`media_store`]: S3-compatible or local-directory media storage.
//! - [`platform`]: the platform API client (context by id, messages).
//! - [`webhook`]: Standard Webhooks signing and the delivery schedule.
//! - [`inprocess`]: an in-process queue for the embedded mode (no Redis).

pub mod cog;
pub mod envelope;
pub mod inprocess;
pub mod jobs;
pub mod media_store;
pub mod outbound;
pub mod platform;
pub mod queue;
pub mod secrets;
pub mod webhook;

pub use envelope::{JobState, Policy, RunRequest};
pub use jobs::chat::{ChatRespondJob, ChatRespondOutput};
pub use jobs::{Job, JobContract, JobKind};

/// A request that breaks a rule: which field, and what the rule is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{field}: {rule}")]
pub struct InputError {
    pub field: String,
    pub rule: String,
}

impl InputError {
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("job record {0} is malformed: {1}")]
    BadRecord(String, String),
    /// Redis could not be reached (an outage passed on to another task).
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

impl PipelineError {
    /// The same error for another waiter on one failed call: an outage
    /// stays an outage (so the waiter waits it out), anything else its text.
    pub(crate) fn copy(&self) -> Self {
        if crate::queue::is_unavailable(self) {
            Self::Unavailable(self.to_string())
        } else {
            Self::Other(self.to_string())
        }
    }
}

/// An [`InputError`] from a serde error at `path` (as serde_path_to_error
/// writes it) under `root`; a missing field is named itself.
pub(crate) fn field_error(root: &str, path: &str, message: String) -> InputError {
    let mut field = match (root, path) {
        (r, ".") => r.to_string(),
        ("", p) => p.to_string(),
        (r, p) => format!("{r}.{p}"),
    };
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
        .map(str::to_owned);
    if let Some(name) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        let field = if field.is_empty() {
            name.to_string()
        } else if field == name || field.ends_with(&format!(".{name}")) {
            field
        } else {
            format!("{field}.{name}")
        };
        return InputError::new(field, "is not a known field");
    }
    match missing {
        Some(name) => {
            if field.is_empty() {
                field = name;
            } else {
                field = format!("{field}.{name}");
            }
            InputError::new(field, "is required")
        }
        None => InputError::new(
            if field.is_empty() {
                "body".into()
            } else {
                field
            },
            message,
        ),
    }
}

/// The tenant of API keys given without one (`SHIM_API_KEYS=key`), and
/// whose platform key is `PLATFORM_API_KEY`.
pub const DEFAULT_TENANT: &str = "default";
/// What a tenant name must be.
pub const TENANT_RULE: &str = "is 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'";

/// Whether `name` is a tenant name ([`TENANT_RULE`]).
pub fn is_valid_tenant(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A short fingerprint of a secret (an API key): for cache keys and logs,
/// never the secret itself.
pub fn owner_fingerprint(api_key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(api_key.trim().as_bytes())
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Resolves on the first SIGTERM or Ctrl-C (both binaries stop on either).
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
