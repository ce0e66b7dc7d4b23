//! RunPod's job routes: run, runsync, status, cancel, retry, purge-queue.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, RawPathParams, State};
use axum::http::StatusCode;
use axum::Json;
use pipeline::queue::{JobRecord, RetryOutcome};
use pipeline::{JobKind, RunRequest};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::startup::AppState;

/// The job kind a route serves: `/v2/{endpoint_id}/...` names it, the bare
/// routes serve chat; `echo` only where `ECHO_KIND` turns it on.
fn kind_of(state: &AppState, params: &HashMap<String, String>) -> Result<JobKind, ApiError> {
    match params.get("endpoint_id") {
        None => Ok(JobKind::Chat),
        Some(e) => JobKind::parse(e)
            .filter(|k| *k != JobKind::Echo || state.cfg.echo_kind)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no endpoint {e:?}; endpoints: {}", JobKind::names()),
                )
            }),
    }
}

fn path_params(raw: &RawPathParams) -> HashMap<String, String> {
    raw.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let mut err = ApiError::new(status, format!("request body: {}", e.body_text()));
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            err.field = Some("body".into());
            err.rule = Some(
                "must not exceed the route's size limit (10 MB for /run, 20 MB for /runsync)"
                    .into(),
            );
        }
        err
    })
}

/// The body of a native route (`/v1/...`), which is the job's input itself:
/// a JSON object, which `complete` may add path parameters to.
pub fn native_input(
    body: &[u8],
    complete: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::input(
            StatusCode::BAD_REQUEST,
            &pipeline::InputError::new("body", format!("must be valid JSON ({e})")),
        )
    })?;
    let Value::Object(mut input) = value else {
        return Err(ApiError::input(
            StatusCode::UNPROCESSABLE_ENTITY,
            &pipeline::InputError::new("body", "must be a JSON object"),
        ));
    };
    complete(&mut input);
    Ok(input)
}

/// RunPod's status body.
pub fn status_body(rec: &JobRecord) -> Value {
    let mut body = json!({
        "id": rec.id,
        "status": rec.state.as_str(),
        "delayTime": rec.delay_ms(),
        "executionTime": rec.execution_ms(),
    });
    if let Some(o) = &rec.output {
        body["output"] = o.clone();
    } else if let (Some(p), pipeline::JobState::InProgress) = (&rec.progress, rec.state) {
        body["output"] = json!({ "progress": p });
    }
    if let Some(e) = &rec.error {
        body["error"] = json!(e);
    }
    if let Some(w) = &rec.worker {
        body["workerId"] = json!(w);
    }
    body
}

/// The job a `/…/{id}` route names (under a known endpoint), if the caller
/// owns it.
pub async fn owned_job(
    state: &AppState,
    caller: &Caller,
    raw: &RawPathParams,
) -> Result<JobRecord, ApiError> {
    let params = path_params(raw);
    kind_of(state, &params)?;
    let id = params.get("id").cloned().unwrap_or_default();
    owned(state, caller, &id).await
}

async fn owned(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    match state.queue.get(id).await? {
        Some(rec) if rec.owner == caller.owner => Ok(rec),
        _ => Err(ApiError::not_found(id)),
    }
}

/// A webhook whose host is an address the outbound guard refuses is
/// refused now, not after the job ran (a host name is checked when the
/// callback is sent).
pub(crate) fn check_webhook(state: &AppState, req: &RunRequest) -> Result<(), ApiError> {
    let refuse = |field: &str, rule: String| {
        ApiError::input(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            &pipeline::InputError::new(field, rule),
        )
    };
    if let Some(url) = &req.webhook {
        state
            .callbacks
            .guard()
            .check_url(url)
            .map_err(|e| refuse("webhook", e.to_string()))?;
    }
    if let Some(s3) = &req.s3_config {
        // The workers dial it on the caller's behalf: the same guard.
        state
            .callbacks
            .guard()
            .check_url(&s3.endpoint_url)
            .map_err(|e| refuse("s3Config.endpointUrl", e.to_string()))?;
        if !state.queue.takes_secrets() {
            return Err(refuse(
                "s3Config",
                "this endpoint does not take per-request storage (no JOB_SECRETS_KEY)".into(),
            ));
        }
    }
    Ok(())
}

async fn submit(
    state: &AppState,
    caller: &Caller,
    params: &HashMap<String, String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<JobRecord, ApiError> {
    let kind = kind_of(state, params)?;
    let body = body_or_error(body)?;
    let req = RunRequest::parse(kind, &body)?;
    check_webhook(state, &req)?;
    let rec = state.queue.enqueue(&req, &caller.owner).await?;
    state
        .metrics
        .jobs_submitted
        .with_label_values(&[kind.as_str()])
        .inc();
    tracing::info!(job = %rec.id, kind = kind.as_str(), "job queued");
    Ok(rec)
}

pub async fn run(
    State(state): State<AppState>,
    caller: Caller,
    raw: RawPathParams,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = path_params(&raw);
    let rec = submit(&state, &caller, &params, body).await?;
    Ok(Json(json!({"id": rec.id, "status": rec.state.as_str()})))
}

#[derive(Deserialize)]
pub struct WaitQuery {
    wait: Option<u64>,
}

pub async fn runsync(
    State(state): State<AppState>,
    caller: Caller,
    raw: RawPathParams,
    Query(q): Query<WaitQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = path_params(&raw);
    let wait = match q.wait {
        None => state.cfg.runsync_wait_ms,
        Some(w) if (1_000..=300_000).contains(&w) => w,
        Some(_) => {
            return Err(ApiError::input(
                StatusCode::UNPROCESSABLE_ENTITY,
                &pipeline::InputError::new("wait", "must be between 1000 and 300000 milliseconds"),
            ))
        }
    };
    // Subscribe before submitting so the end of a fast job is not missed.
    let events = state.waiters.subscribe();
    let rec = submit(&state, &caller, &params, body).await?;
    let done = wait_until_done(&state, &rec, events, Duration::from_millis(wait)).await?;
    Ok(Json(status_body(&done)))
}

/// Waits up to `wait` for job `rec` to reach a terminal state and returns
/// its record as it stands when the wait ends (as the job's end event
/// carried it, or read again after each wake; `rec` itself only when it is
/// already terminal). Take `events` (`state.waiters.subscribe()`) before
/// submitting or reading `rec`, so a fast job's end is not missed. Only
/// this job's end wakes the wait; the record is re-read after a wake
/// without it (a relay reconnect, missed messages) and at least every
/// second, so an event lost while the relay reconnected costs at most a
/// second.
pub async fn wait_until_done(
    state: &AppState,
    rec: &JobRecord,
    events: pipeline::queue::Subscription,
    wait: Duration,
) -> Result<JobRecord, ApiError> {
    const RECHECK: Duration = Duration::from_secs(1);
    let deadline = tokio::time::Instant::now() + wait;
    let id = rec.id.as_str();
    let mut events = events.watch(id);
    // The record just read (after subscribing) counts as the first look.
    let mut current = Some(rec.clone());
    loop {
        let current = match current.take() {
            Some(r) => r,
            None => state
                .queue
                .get(id)
                .await?
                .ok_or_else(|| ApiError::not_found(id))?,
        };
        if current.state.is_terminal() || tokio::time::Instant::now() >= deadline {
            return Ok(current);
        }
        let wake = deadline.min(tokio::time::Instant::now() + RECHECK);
        // Only this job's end or RESYNC comes (anything else but the end
        // with its record: read again), else the recheck or the deadline.
        match tokio::time::timeout_at(wake, events.recv()).await {
            Ok(Some(message)) => {
                if let (_, Some(ended)) = pipeline::queue::job_event(&message) {
                    // The record as the job ended, sent along: no read back.
                    if ended.state.is_terminal() {
                        return Ok(ended);
                    }
                }
            }
            Ok(None) => tokio::time::sleep_until(wake).await,
            Err(_) => {}
        }
    }
}

/// `wait`: milliseconds (1000–300000), as `/runsync` takes it.
fn wait_ms(wait: Option<u64>, default: Option<u64>) -> Result<Option<u64>, ApiError> {
    match wait {
        None => Ok(default),
        Some(w) if (1_000..=300_000).contains(&w) => Ok(Some(w)),
        Some(_) => Err(ApiError::input(
            StatusCode::UNPROCESSABLE_ENTITY,
            &pipeline::InputError::new("wait", "must be between 1000 and 300000 milliseconds"),
        )),
    }
}

/// `GET|POST /status/{id}[?wait=MS]`: the job's status; with `wait`, held
/// until the job ends or the wait runs out.
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    raw: RawPathParams,
    Query(q): Query<WaitQuery>,
) -> Result<Json<Value>, ApiError> {
    let wait = wait_ms(q.wait, None)?;
    status_waiting(&state, &caller, &raw, wait).await
}

/// `GET|POST /status-sync/{id}[?wait=MS]`: `/status` held until the job
/// ends (at most `wait`, default the `/runsync` wait).
pub async fn status_sync(
    State(state): State<AppState>,
    caller: Caller,
    raw: RawPathParams,
    Query(q): Query<WaitQuery>,
) -> Result<Json<Value>, ApiError> {
    let wait = wait_ms(q.wait, Some(state.cfg.runsync_wait_ms))?;
    status_waiting(&state, &caller, &raw, wait).await
}

async fn status_waiting(
    state: &AppState,
    caller: &Caller,
    raw: &RawPathParams,
    wait: Option<u64>,
) -> Result<Json<Value>, ApiError> {
    // Subscribe before reading so an end between the two is not missed.
    let events = state.waiters.subscribe();
    let rec = owned_job(state, caller, raw).await?;
    let rec = match wait {
        Some(w) if !rec.state.is_terminal() => {
            wait_until_done(state, &rec, events, Duration::from_millis(w)).await?
        }
        _ => rec,
    };
    Ok(Json(status_body(&rec)))
}

pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    raw: RawPathParams,
) -> Result<Json<Value>, ApiError> {
    let rec = owned_job(&state, &caller, &raw).await?;
    let (id, before) = (rec.id, rec.state);
    let st = state
        .queue
        .cancel(&id, "cancelled by the client")
        .await?
        .ok_or_else(|| ApiError::not_found(&id))?;
    if before == pipeline::JobState::InProgress {
        // The worker stops generating at its next token instead of at its
        // next state check.
        state
            .queue
            .request_stop(&id, "cancelled by the client")
            .await?;
    }
    Ok(Json(json!({"id": id, "status": st.as_str()})))
}

pub async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    raw: RawPathParams,
) -> Result<Json<Value>, ApiError> {
    let id = owned_job(&state, &caller, &raw).await?.id;
    match state.queue.retry(&id).await? {
        RetryOutcome::Requeued => Ok(Json(json!({"id": id, "status": "IN_QUEUE"}))),
        RetryOutcome::NotFound => Err(ApiError::not_found(&id)),
        RetryOutcome::NotRetryable(st) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "job {id} is {}: only FAILED or TIMED_OUT jobs can be retried",
                st.as_str()
            ),
        )),
    }
}

pub async fn purge_queue(
    State(state): State<AppState>,
    caller: Caller,
    raw: RawPathParams,
) -> Result<Json<Value>, ApiError> {
    let params = path_params(&raw);
    let kind = kind_of(&state, &params)?;
    let removed = state.queue.purge_queue(kind, &caller.owner).await?;
    Ok(Json(json!({"removed": removed, "status": "completed"})))
}
