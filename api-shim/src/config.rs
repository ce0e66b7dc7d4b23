//! The shim's configuration: flags or environment variables, one typed
//! struct, printed at start-up with secrets masked.

use std::time::Duration;

use clap::Parser;
use pipeline::webhook::{parse_schedule, WebhookConfig, STANDARD_SCHEDULE};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "api-shim",
    version,
    about = "RunPod-compatible HTTP front of the companion job pipeline; delivers signed callbacks."
)]
pub struct ShimConfig {
    /// Redis holding the queues and job records.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,
    /// Key prefix in Redis (the workers must use the same).
    #[arg(long, env = "QUEUE_NAMESPACE", default_value = "cw")]
    pub queue_namespace: String,
    /// Address to listen on.
    #[arg(long, env = "SHIM_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// Comma-separated API keys, each `tenant:key` (or a bare `key`, of the
    /// tenant `default`); a caller sends one as `Authorization: Bearer KEY`.
    /// A tenant's keys see its jobs; the worker calls the platform with the
    /// tenant's key (`PLATFORM_API_KEYS`).
    #[arg(
        long,
        env = "SHIM_API_KEYS",
        value_delimiter = ',',
        required = true,
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Standard Webhooks signing secret: whsec_ followed by base64.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: String,
    /// Delays before each callback try, e.g. "0s,5s,5m"; the count is the number of tries.
    #[arg(long, env = "WEBHOOK_RETRY_SCHEDULE", default_value = STANDARD_SCHEDULE)]
    pub webhook_retry_schedule: String,
    /// Seconds one callback POST may take.
    #[arg(long, env = "WEBHOOK_TIMEOUT_S", default_value_t = 10)]
    pub webhook_timeout_s: u64,
    /// Milliseconds /runsync waits for a result when ?wait= is not given.
    #[arg(long, env = "SHIM_RUNSYNC_WAIT_MS", default_value_t = 90_000)]
    pub runsync_wait_ms: u64,
    /// 32 bytes, base64: seals per-request secrets (RunPod's `s3Config`) in
    /// job records; the workers need the same key. Unset: such requests are
    /// refused.
    #[arg(long, env = "JOB_SECRETS_KEY", hide_env_values = true)]
    pub job_secrets_key: Option<String>,
    /// The model id the OpenAI-compatible routes name (`GET /openai/v1/models`).
    #[arg(long, env = "OPENAI_MODEL_NAME", default_value = "companion-chat")]
    pub openai_model: String,
    /// The character card of an OpenAI-style request without `character`.
    #[arg(
        long,
        env = "OPENAI_DEFAULT_CHARACTER",
        default_value = "github:partner/character"
    )]
    pub openai_default_character: String,
    /// Runs a job gets (runs lost to worker crashes count) before it is FAILED.
    #[arg(long, env = "JOB_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Hours a finished job record is kept.
    #[arg(long, env = "RESULT_TTL_HOURS", default_value_t = 48)]
    pub result_ttl_hours: u64,
    /// Parked callbacks kept in the dead-letter list (the oldest are dropped).
    #[arg(long, env = "CALLBACK_DEAD_LETTER_MAX", default_value_t = 1000)]
    pub callback_dead_letter_max: usize,
    /// Serve the no-op `echo` kind on `/v2/echo/…` (pipeline overhead
    /// benchmarks: `benches/pipeline_overhead.sh`); off by default.
    #[arg(long, env = "ECHO_KIND", default_value_t = false)]
    pub echo_kind: bool,
    /// Seconds a SIGTERM waits for open requests and streams before the shim exits.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_S", default_value_t = 10)]
    pub shutdown_timeout_s: u64,
    /// Requests per second one API key may make on average (0: no limit);
    /// over it: 429 with Retry-After.
    #[arg(long, env = "RATE_LIMIT_PER_S", default_value_t = 50)]
    pub rate_limit_per_s: u32,
    /// Requests one API key may make at once before the rate applies.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 100)]
    pub rate_limit_burst: u32,
    /// Streams (SSE and chunked chat) one API key may hold open at once.
    #[arg(long, env = "MAX_STREAMS_PER_KEY", default_value_t = 16)]
    pub max_streams_per_key: usize,
    /// Seconds a stream may stay open; then it ends (the job goes on).
    #[arg(long, env = "STREAM_MAX_SECONDS", default_value_t = 900)]
    pub stream_max_seconds: u64,
    /// Addresses and hosts webhooks may reach besides public ones:
    /// comma-separated CIDRs (`10.0.0.0/8`) and host names
    /// (`receiver.svc.cluster.local`). Empty: public addresses only.
    #[arg(long, env = "OUTBOUND_ALLOW", default_value = "")]
    pub outbound_allow: String,
    /// Dial only what `OUTBOUND_ALLOW` names: public addresses refused too,
    /// other host names never resolved (closed networks).
    #[arg(long, env = "OUTBOUND_ALLOW_ONLY", default_value_t = false)]
    pub outbound_allow_only: bool,
    /// Largest audio message a chat job may carry, in decoded bytes (422 over it).
    #[arg(long, env = "MAX_AUDIO_BYTES", default_value_t = pipeline::jobs::chat::DEFAULT_MAX_AUDIO_BYTES)]
    pub max_audio_bytes: usize,
}

impl ShimConfig {
    pub fn webhook(&self) -> anyhow::Result<WebhookConfig> {
        let schedule = parse_schedule(&self.webhook_retry_schedule)
            .map_err(|e| anyhow::anyhow!("WEBHOOK_RETRY_SCHEDULE: {e}"))?;
        if schedule.is_empty() {
            anyhow::bail!("WEBHOOK_RETRY_SCHEDULE needs at least one try");
        }
        let timeout = Duration::from_secs(self.webhook_timeout_s);
        Ok(WebhookConfig {
            secret: self.webhook_secret.clone(),
            schedule,
            timeout,
            lease: timeout * 3,
            dead_letter_max: self.callback_dead_letter_max,
            allow: {
                let allow = pipeline::outbound::OutboundAllow::parse(&self.outbound_allow)
                    .map_err(|e| anyhow::anyhow!(e))?;
                if self.outbound_allow_only {
                    allow.only_named()
                } else {
                    allow
                }
            },
        })
    }

    /// For the start-up log.
    pub fn masked(&self) -> Self {
        let mut c = self.clone();
        c.api_keys = c
            .api_keys
            .iter()
            .map(|k| match k.split_once(':') {
                Some((tenant, _)) => format!("{tenant}:****"),
                None => "****".to_string(),
            })
            .collect();
        c.webhook_secret = "whsec_****".into();
        c.redis_url = pipeline::queue::mask_redis_url(&c.redis_url);
        c
    }
}
