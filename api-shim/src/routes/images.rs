//! `POST /v1/images/generate` and `POST /v1/videos/generate` (seed 000
//! "Generate image / video from skin + category"): the body is the job's
//! input (plus an optional `webhook` and `policy`, as RunPod's `/run` takes
//! them), answered at once with `202 {"job_id", "generation_id"}`.
//! Progress and the result are read as for any job
//! (`/v2/{image,video}/status/{job_id}`, `/stream/{job_id}`, the signed
//! callback).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use pipeline::{JobKind, RunRequest};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::jobs::{body_or_error, check_webhook, native_input};
use crate::startup::AppState;

pub async fn generate(
    state: State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    generate_media(JobKind::Image, state, caller, body).await
}

pub async fn generate_video(
    state: State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    generate_media(JobKind::Video, state, caller, body).await
}

async fn generate_media(
    kind: JobKind,
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body_or_error(body)?;
    let mut input = native_input(&body, |_| {})?;
    let webhook = input.remove("webhook");
    let policy = input.remove("policy");
    // The generation's id: the caller's own, else a new one.
    let generation_id = match input.get("generation_id") {
        Some(Value::String(g)) => g.clone(),
        _ => {
            let g = uuid::Uuid::new_v4().to_string();
            input.insert("generation_id".into(), json!(g));
            g
        }
    };
    let mut envelope = json!({ "input": input });
    if let Some(w) = webhook {
        envelope["webhook"] = w;
    }
    if let Some(p) = policy {
        envelope["policy"] = p;
    }
    let req =
        RunRequest::parse(kind, envelope.to_string().as_bytes()).map_err(ApiError::native_input)?;
    check_webhook(&state, &req)?;
    let rec = state.queue.enqueue(&req, &caller.owner).await?;
    state
        .metrics
        .jobs_submitted
        .with_label_values(&[kind.as_str()])
        .inc();
    tracing::info!(job = %rec.id, generation = %generation_id, kind = kind.as_str(), "media job queued");
    Ok((
        StatusCode::ACCEPTED,
        Json(
            json!({"job_id": rec.id, "generation_id": generation_id, "status": rec.state.as_str()}),
        ),
    ))
}
