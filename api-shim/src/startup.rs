//! Builds the app: state, routes (bare and under `/v2/{endpoint_id}`), the
//! event relay and the callback delivery loop.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put, MethodRouter};
use axum::Router;

use crate::error::ApiError;
use pipeline::queue::{QueueConfig, RedisQueue};
use pipeline::webhook::CallbackSender;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::auth::ApiKeys;
use crate::config::ShimConfig;
use crate::routes::{cog, health, images, jobs, memory, openai, openapi, stream};

pub struct Metrics {
    pub registry: Registry,
    pub jobs_submitted: IntCounterVec,
    pub jobs: IntGaugeVec,
    pub workers: IntGaugeVec,
    pub callbacks: IntGaugeVec,
    pub worker_totals: IntGaugeVec,
    pub kind_jobs: IntGaugeVec,
    pub kind_workers: IntGaugeVec,
    pub worker_gauges: IntGaugeVec,
    pub waiting_requests: IntGauge,
}

impl Metrics {
    fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let jobs_submitted = IntCounterVec::new(
            Opts::new("shim_jobs_submitted_total", "Jobs accepted, by kind"),
            &["kind"],
        )?;
        let jobs = IntGaugeVec::new(Opts::new("shim_jobs", "Jobs by state"), &["state"])?;
        let workers = IntGaugeVec::new(
            Opts::new("shim_workers", "Workers seen, by state"),
            &["state"],
        )?;
        let callbacks = IntGaugeVec::new(
            Opts::new("shim_callbacks", "Callbacks pending or dead-lettered"),
            &["state"],
        )?;
        registry.register(Box::new(jobs_submitted.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(workers.clone()))?;
        let worker_totals = IntGaugeVec::new(
            Opts::new(
                "fleet_worker_totals",
                "Totals over all workers: runs by outcome, prompt and generated tokens, prefill and decode milliseconds, recordings transcribed and their milliseconds",
            ),
            &["stat"],
        )?;
        registry.register(Box::new(callbacks.clone()))?;
        registry.register(Box::new(worker_totals.clone()))?;
        let kind_jobs = IntGaugeVec::new(
            Opts::new(
                "shim_kind_jobs",
                "Jobs of each kind waiting (queued) or held by a worker (running)",
            ),
            &["kind", "state"],
        )?;
        let kind_workers = IntGaugeVec::new(
            Opts::new("shim_kind_workers", "Live workers that take each kind"),
            &["kind"],
        )?;
        registry.register(Box::new(kind_jobs.clone()))?;
        registry.register(Box::new(kind_workers.clone()))?;
        let worker_gauges = IntGaugeVec::new(
            Opts::new(
                "fleet_text_engine",
                "Text engines of live workers, summed: running_jobs, waiting_jobs, running_sequences, kv_blocks_used, kv_blocks_total, prefix_cache_blocks, tokens_per_s, and the running totals generated_tokens, prompt_tokens, prefix_hit_tokens, prefix_hits, decode_steps, batch_rows, peak_batch_rows (as of each worker's last heartbeat)",
            ),
            &["stat"],
        )?;
        registry.register(Box::new(worker_gauges.clone()))?;
        let waiting_requests = IntGauge::new(
            "shim_waiting_requests",
            "Requests of this shim held until their job ends (/runsync, /status?wait, condense, OpenAI, Cog)",
        )?;
        registry.register(Box::new(waiting_requests.clone()))?;
        Ok(Self {
            registry,
            jobs_submitted,
            jobs,
            workers,
            callbacks,
            worker_totals,
            kind_jobs,
            kind_workers,
            worker_gauges,
            waiting_requests,
        })
    }
}

/// What every request handler reads, behind one `Arc`: axum clones the
/// state for each extractor of each request, and a field-by-field clone
/// (the Redis client's connection info, key prefixes, the callback
/// sender's own queue) was ~3% of the shim's CPU at 64 clients.
#[derive(Clone)]
pub struct AppState(Arc<SharedState>);

impl std::ops::Deref for AppState {
    type Target = SharedState;
    fn deref(&self) -> &SharedState {
        &self.0
    }
}

pub struct SharedState {
    pub queue: RedisQueue,
    pub keys: ApiKeys,
    /// Job-end events relayed from Redis, handed to the requests waiting
    /// on each job.
    pub waiters: pipeline::queue::JobWaiters,
    pub cfg: Arc<ShimConfig>,
    pub metrics: Arc<Metrics>,
    pub callbacks: CallbackSender,
    /// Reads every open token stream over one Redis connection.
    pub tokens: pipeline::queue::TokenHub,
    /// Per-key request rate and open streams.
    pub limits: Arc<crate::limits::Limits>,
    /// True once the shim is shutting down: streams end cleanly.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub shutdown_tx: Arc<tokio::sync::watch::Sender<bool>>,
}

const MB: usize = 1024 * 1024;

/// Body limits by route (also in the OpenAPI document).
pub const RUN_BODY_MAX: usize = 10 * MB;
pub const RUNSYNC_BODY_MAX: usize = 20 * MB;
pub const NATIVE_BODY_MAX: usize = MB;

/// `route` with a body limit, enforced twice: from `Content-Length` before
/// a byte of the body is read (413 at once, so an oversized upload is not
/// read just to be refused), and on the bytes as they come (a chunked body).
fn limited(route: MethodRouter<AppState>, max: usize) -> MethodRouter<AppState> {
    route
        .layer(DefaultBodyLimit::max(max))
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| async move {
                let declared = req
                    .headers()
                    .get(axum::http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if declared.is_some_and(|n| n > max as u64) {
                    let mut err = ApiError::new(
                        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                        format!("body: must not exceed {max} bytes on this route"),
                    );
                    err.field = Some("body".into());
                    err.rule = Some(format!("must not exceed {max} bytes on this route"));
                    return axum::response::IntoResponse::into_response(err);
                }
                next.run(req).await
            },
        ))
}

fn job_routes() -> Router<AppState> {
    Router::new()
        .route("/run", limited(post(jobs::run), RUN_BODY_MAX))
        .route("/runsync", limited(post(jobs::runsync), RUNSYNC_BODY_MAX))
        .route("/status/{id}", get(jobs::status).post(jobs::status))
        .route(
            "/status-sync/{id}",
            get(jobs::status_sync).post(jobs::status_sync),
        )
        .route("/cancel/{id}", post(jobs::cancel))
        .route("/retry/{id}", post(jobs::retry))
        .route("/purge-queue", post(jobs::purge_queue))
        .route("/stream/{id}", get(stream::stream_route))
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(job_routes())
        .nest(
            "/v2/{endpoint_id}",
            job_routes().route("/health", get(health::health)),
        )
        .route("/health", get(health::health))
        .route(
            "/v1/memory/condense",
            limited(post(memory::condense), NATIVE_BODY_MAX),
        )
        .route(
            "/v1/images/generate",
            limited(post(images::generate), NATIVE_BODY_MAX),
        )
        .route(
            "/v1/videos/generate",
            limited(post(images::generate_video), NATIVE_BODY_MAX),
        )
        .route(
            "/v1/instances/{instance_id}/chat/stream",
            limited(post(stream::chat_stream), NATIVE_BODY_MAX),
        )
        .route(
            "/openai/v1/chat/completions",
            limited(post(openai::chat_completions), NATIVE_BODY_MAX),
        )
        .route("/openai/v1/models", get(openai::models))
        .route("/cog/{kind}/health-check", get(cog::health_check))
        .route(
            "/cog/{kind}/predictions",
            limited(post(cog::create), RUN_BODY_MAX),
        )
        .route(
            "/cog/{kind}/predictions/{id}",
            limited(put(cog::put), RUN_BODY_MAX).get(cog::get),
        )
        .route("/cog/{kind}/predictions/{id}/cancel", post(cog::cancel))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::openapi))
        .layer(axum::middleware::map_response(json_errors))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Every error answer is JSON: what axum answers as plain text or with no
/// body (a bad query string, an unknown route or method) becomes
/// `{"error": text}`, its headers (`Allow`, `Retry-After`) kept.
async fn json_errors(resp: axum::response::Response) -> axum::response::Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    use axum::response::IntoResponse;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    for (name, value) in parts.headers.iter() {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

pub async fn build(cfg: ShimConfig) -> anyhow::Result<(Router, AppState)> {
    let keys = ApiKeys::parse(&cfg.api_keys)?;
    if keys.is_empty() {
        anyhow::bail!("SHIM_API_KEYS holds no key");
    }
    let queue = RedisQueue::connect_with_retry(
        &cfg.redis_url,
        QueueConfig {
            namespace: cfg.queue_namespace.clone(),
            max_attempts: cfg.max_attempts,
            result_ttl: Duration::from_secs(cfg.result_ttl_hours * 3600),
            secrets: cfg
                .job_secrets_key
                .as_deref()
                .map(pipeline::secrets::JobSecrets::from_base64)
                .transpose()
                .map_err(|e| anyhow::anyhow!(e))?,
            ..QueueConfig::default()
        },
    )
    .await?;
    queue.warn_if_not_persistent().await;
    // Ids of jobs that reached a terminal state (and RESYNC after a
    // reconnect), for /runsync, condense and the callback loop.
    let events = queue.spawn_relay(queue.keys().events());
    let callbacks = CallbackSender::new(queue.clone(), cfg.webhook()?)?;
    tokio::spawn(
        callbacks
            .clone()
            .run(Duration::from_millis(100), events.subscribe()),
    );
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let state = AppState(Arc::new(SharedState {
        tokens: pipeline::queue::TokenHub::start(&queue),
        shutdown,
        shutdown_tx: Arc::new(shutdown_tx),
        queue,
        keys,
        waiters: pipeline::queue::JobWaiters::start(&events),
        limits: Arc::new(crate::limits::Limits::new(
            cfg.rate_limit_per_s,
            cfg.rate_limit_burst,
            cfg.max_streams_per_key,
            Duration::from_secs(cfg.stream_max_seconds),
        )),
        cfg: Arc::new(cfg),
        metrics: Arc::new(Metrics::new()?),
        callbacks,
    }));
    Ok((router(state.clone()), state))
}
