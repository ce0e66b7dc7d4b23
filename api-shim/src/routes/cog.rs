//! Cog's HTTP prediction API on our jobs, under `/cog/{kind}/`:
//! `POST /predictions` (synchronous; `Prefer: respond-async` → 202
//! `starting`; `Accept: text/event-stream` → events `start`, `output`,
//! `log`, `metric`, `completed`), idempotent `PUT /predictions/{id}`,
//! `GET /predictions/{id}`, `POST /predictions/{id}/cancel` and
//! `GET /health-check`. Bodies are Cog's prediction objects
//! (`pipeline::cog`); the webhook gets the final prediction, signed as our
//! other callbacks.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pipeline::queue::{EnqueueOptions, JobRecord, TokenEvent};
use pipeline::{cog, JobKind, RunRequest};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::jobs::{check_webhook, wait_until_done};
use crate::routes::stream::TokenReader;
use crate::startup::AppState;

const EVENTS: [&str; 4] = ["start", "output", "logs", "completed"];

fn kind(name: &str) -> Result<JobKind, ApiError> {
    // The no-op `echo` kind is RunPod-route only (`ECHO_KIND`).
    JobKind::parse(name)
        .filter(|k| *k != JobKind::Echo)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no model {name:?}; models: {}", JobKind::names()),
            )
        })
}

fn invalid(field: &str, rule: &str) -> ApiError {
    ApiError::input(
        StatusCode::UNPROCESSABLE_ENTITY,
        &pipeline::InputError::new(field, rule),
    )
}

/// The job id of the caller's prediction `id` (a `PUT`): stable, and
/// private to the caller's tenant.
fn job_id_for(owner: &str, id: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("cog/{owner}/{id}").as_bytes(),
    )
    .to_string()
}

/// The prediction's id as the caller named it.
fn shown_id(rec: &JobRecord) -> String {
    rec.hook_format
        .as_deref()
        .and_then(|f| f.strip_prefix("cog:"))
        .filter(|s| !s.is_empty())
        .unwrap_or(&rec.id)
        .to_string()
}

/// `GET /cog/{kind}/health-check`.
pub async fn health_check(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let kind = kind(&name)?;
    let fleet = state.queue.workers().await?;
    let workers = fleet.by_kind.get(kind.as_str()).copied().unwrap_or(0);
    let q = state.queue.kind_queue(kind).await?;
    let status = if workers == 0 {
        "STARTING"
    } else if q.running as usize >= workers {
        "BUSY"
    } else {
        "READY"
    };
    Ok(Json(
        json!({"status": status, "setup": {"status": if workers > 0 { "succeeded" } else { "starting" }}}),
    ))
}

/// `POST /cog/{kind}/predictions`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    predict(state, caller, kind(&name)?, None, headers, body).await
}

/// `PUT /cog/{kind}/predictions/{id}`: the same id while running or done
/// is the same prediction (no second job).
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if !pipeline::platform::is_valid_id(&id) {
        return Err(invalid("id", pipeline::platform::ID_RULE));
    }
    predict(state, caller, kind(&name)?, Some(id), headers, body).await
}

/// `GET /cog/{kind}/predictions/{id}`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    kind(&name)?;
    let rec = find(&state, &caller, &id).await?;
    Ok(Json(cog::prediction(&rec, &id)))
}

/// `POST /cog/{kind}/predictions/{id}/cancel`.
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    kind(&name)?;
    let rec = find(&state, &caller, &id).await?;
    state
        .queue
        .cancel(&rec.id, "cancelled by the client")
        .await?;
    if rec.state == pipeline::JobState::InProgress {
        let _ = state
            .queue
            .request_stop(&rec.id, "cancelled by the client")
            .await;
    }
    let rec = find(&state, &caller, &id).await?;
    Ok(Json(cog::prediction(&rec, &id)))
}

/// The caller's prediction `id`: a `PUT` id, or a job id.
async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    for job in [job_id_for(&caller.owner, id), id.to_string()] {
        if let Some(rec) = state.queue.get(&job).await? {
            if rec.owner == caller.owner {
                return Ok(rec);
            }
        }
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no prediction {id} for this API key"),
    ))
}

async fn predict(
    state: AppState,
    caller: Caller,
    kind: JobKind,
    put_id: Option<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = crate::routes::jobs::body_or_error(body)?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::input(
            StatusCode::BAD_REQUEST,
            &pipeline::InputError::new("body", format!("must be valid JSON ({e})")),
        )
    })?;
    let Value::Object(body) = value else {
        return Err(invalid("body", "must be a JSON object"));
    };
    for k in body.keys() {
        if ![
            "input",
            "id",
            "webhook",
            "webhook_events_filter",
            "output_file_prefix",
            "created_at",
            "context",
        ]
        .contains(&k.as_str())
        {
            return Err(invalid(k, "is not a field of a prediction request"));
        }
    }
    let output_prefix = match body.get("output_file_prefix") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => {
            // The workers PUT there on the caller's behalf: the same guard.
            let url = state
                .callbacks
                .guard()
                .check_url(p)
                .map_err(|e| invalid("output_file_prefix", &e.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(invalid(
                    "output_file_prefix",
                    "must be an absolute http or https URL",
                ));
            }
            Some(p.clone())
        }
        Some(_) => return Err(invalid("output_file_prefix", "must be a URL")),
    };
    let filter: Vec<String> = match body.get("webhook_events_filter") {
        None | Some(Value::Null) => EVENTS.iter().map(|e| e.to_string()).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|e| e.as_str().filter(|e| EVENTS.contains(e)).map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                invalid(
                    "webhook_events_filter",
                    "must list start, output, logs or completed",
                )
            })?,
        Some(_) => return Err(invalid("webhook_events_filter", "must be an array")),
    };
    let mut envelope = json!({ "input": body.get("input").cloned().unwrap_or(json!({})) });
    // The final prediction is what the webhook gets (start, output and
    // logs events are not sent: the stream and GET show them).
    if let Some(w) = body.get("webhook").filter(|w| !w.is_null()) {
        if filter.iter().any(|e| e == "completed") {
            envelope["webhook"] = w.clone();
        }
    }
    let req = RunRequest::parse(kind, envelope.to_string().as_bytes())?;
    check_webhook(&state, &req)?;
    let events = state.waiters.subscribe();
    let shown = put_id.clone();
    let rec = match &put_id {
        Some(id) => {
            let job = job_id_for(&caller.owner, id);
            // One job per id: the first PUT claims it, the others read it.
            let claim = format!("{}:cogclaim:{job}", state.queue.config().namespace);
            let mut conn = state.queue.connection();
            let claimed: bool = redis::cmd("SET")
                .arg(&claim)
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(state.queue.config().result_ttl.as_secs().max(60))
                .query_async::<Option<String>>(&mut conn)
                .await
                .map_err(pipeline::PipelineError::from)?
                .is_some();
            if claimed {
                let format = format!("cog:{id}");
                state
                    .queue
                    .enqueue_opts(
                        &req,
                        &caller.owner,
                        EnqueueOptions {
                            id: Some(&job),
                            hook_format: Some(&format),
                            output_prefix: output_prefix.as_deref(),
                            s3: None,
                        },
                    )
                    .await?
            } else {
                let mut found = None;
                for _ in 0..50 {
                    if let Some(r) = state.queue.get(&job).await? {
                        found = Some(r);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let rec = found.ok_or_else(|| {
                    ApiError::new(
                        StatusCode::CONFLICT,
                        format!("prediction {id} is being created"),
                    )
                })?;
                return Ok((StatusCode::ACCEPTED, Json(cog::prediction(&rec, id))).into_response());
            }
        }
        None => {
            state
                .queue
                .enqueue_opts(
                    &req,
                    &caller.owner,
                    EnqueueOptions {
                        id: None,
                        hook_format: Some("cog:"),
                        output_prefix: output_prefix.as_deref(),
                        s3: None,
                    },
                )
                .await?
        }
    };
    state
        .metrics
        .jobs_submitted
        .with_label_values(&[kind.as_str()])
        .inc();
    let shown = shown.unwrap_or_else(|| shown_id(&rec));
    // start / output / logs webhooks: sent once each, as they happen.
    let intermediate: Vec<String> = filter
        .iter()
        .filter(|e| *e != "completed")
        .cloned()
        .collect();
    if let (Some(Value::String(url)), false) = (body.get("webhook"), intermediate.is_empty()) {
        tokio::spawn(send_intermediate(
            state.clone(),
            rec.id.clone(),
            shown.clone(),
            url.clone(),
            intermediate,
        ));
    }
    let wants_events = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if wants_events {
        let slot = state.limits.open_stream(caller.key)?;
        let reader = TokenReader::new(&state, slot, &rec.id).await?;
        return Ok(events_response(state, reader, rec, shown).into_response());
    }
    let respond_async = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.contains("respond-async"));
    if respond_async {
        return Ok((StatusCode::ACCEPTED, Json(cog::prediction(&rec, &shown))).into_response());
    }
    let wait = Duration::from_millis(state.cfg.runsync_wait_ms);
    let done = wait_until_done(&state, &rec, events, wait).await?;
    let code = if done.state.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((code, Json(cog::prediction(&done, &shown))).into_response())
}

/// A prediction's `start`, `output` and `logs` webhooks (those the filter
/// names): `start` when a worker takes the job, `output`/`logs` with the
/// text and progress so far, at most every 500 ms; each sent once, signed.
/// The final (`completed`) webhook is the retried callback.
async fn send_intermediate(
    state: AppState,
    job: String,
    shown: String,
    url: String,
    events: Vec<String>,
) {
    const EVERY: Duration = Duration::from_millis(500);
    let wants = |e: &str| events.iter().any(|x| x == e);
    let send = |p: Value| {
        let (state, url) = (state.clone(), url.clone());
        async move {
            if let Err(e) = state.callbacks.send_event(&url, &p.to_string()).await {
                tracing::warn!(error = %e, "a prediction event webhook failed");
            }
        }
    };
    // The worker's pickup: the record leaves IN_QUEUE.
    let rec = loop {
        match state.queue.get(&job).await {
            Ok(Some(r)) if r.state != pipeline::JobState::InQueue => break r,
            Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => return,
        }
    };
    if rec.state.is_terminal() {
        return;
    }
    if wants("start") {
        send(cog::prediction(&rec, &shown)).await;
    }
    if !wants("output") && !wants("logs") {
        return;
    }
    let permit = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
        .acquire_owned()
        .await
        .expect("a new semaphore");
    let Ok(mut reader) = TokenReader::new(&state, permit, &job).await else {
        return;
    };
    let (mut output, mut logs) = (String::new(), String::new());
    let (mut new_output, mut new_logs) = (false, false);
    let mut last = tokio::time::Instant::now() - EVERY;
    loop {
        let ended = match reader.next().await {
            Ok(Some(TokenEvent::Text { option: 0, text })) => {
                output.push_str(&text);
                new_output = true;
                false
            }
            Ok(Some(TokenEvent::Progress { progress })) => {
                logs.push_str(&format!(
                    "step {}/{}\n",
                    progress["step"], progress["steps"]
                ));
                new_logs = true;
                false
            }
            Ok(Some(TokenEvent::Text { .. })) => false,
            _ => true,
        };
        if ended {
            return;
        }
        let due = (new_output && wants("output")) || (new_logs && wants("logs"));
        if due && last.elapsed() >= EVERY {
            let Ok(Some(rec)) = state.queue.get(&job).await else {
                return;
            };
            if rec.state.is_terminal() {
                return;
            }
            let mut p = cog::prediction(&rec, &shown);
            p["output"] = json!(output);
            p["logs"] = json!(logs);
            send(p).await;
            last = tokio::time::Instant::now();
            new_output = false;
            new_logs = false;
        }
    }
}

/// The prediction's events: `start`, `output` per text delta, `log` per
/// progress step, then `metric` and `completed`.
fn events_response(
    state: AppState,
    reader: TokenReader,
    rec: JobRecord,
    shown: String,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let start = Event::default()
        .event("start")
        .data(cog::prediction(&rec, &shown).to_string());
    let queue: std::collections::VecDeque<Event> = [start].into();
    let stream = futures::stream::unfold(
        (reader, queue, false, state, rec.id.clone(), shown),
        |(mut reader, mut queue, mut done, state, job, shown)| async move {
            loop {
                if let Some(ev) = queue.pop_front() {
                    return Some((Ok(ev), (reader, queue, done, state, job, shown)));
                }
                if done {
                    return None;
                }
                match reader.next().await {
                    Ok(Some(TokenEvent::Text { option: 0, text })) => {
                        queue.push_back(
                            Event::default()
                                .event("output")
                                .data(json!(text).to_string()),
                        );
                    }
                    // Spoken chunks belong to streamed chat, not to Cog's form.
                    Ok(Some(TokenEvent::Text { .. } | TokenEvent::Audio(_))) => {}
                    Ok(Some(TokenEvent::Progress { progress })) => {
                        queue.push_back(
                            Event::default()
                                .event("log")
                                .data(format!("step {}/{}", progress["step"], progress["steps"])),
                        );
                    }
                    Ok(Some(TokenEvent::End { .. })) | Ok(None) | Err(_) => {
                        if let Ok(Some(rec)) = state.queue.get(&job).await {
                            let p = cog::prediction(&rec, &shown);
                            queue.push_back(Event::default().event("metric").data(
                                json!({"predict_time": p["metrics"]["predict_time"]}).to_string(),
                            ));
                            queue
                                .push_back(Event::default().event("completed").data(p.to_string()));
                        }
                        done = true;
                    }
                }
            }
        },
    );
    Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default())
}
