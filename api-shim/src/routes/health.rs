//! `/health` (jobs by state, workers seen, callbacks) and `/metrics`.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::Json;
use prometheus::{Encoder, TextEncoder};
use redis::AsyncCommands;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::startup::AppState;

struct Snapshot {
    counts: std::collections::HashMap<String, i64>,
    idle: usize,
    running: usize,
    pending_callbacks: u64,
    dead_callbacks: u64,
}

async fn snapshot(state: &AppState) -> Result<Snapshot, ApiError> {
    let counts = state.queue.counts().await?;
    let (idle, running) = state.queue.workers().await?;
    let mut conn = state.queue.connection();
    let pending_callbacks: u64 = conn
        .zcard(state.queue.callbacks_due_key())
        .await
        .map_err(pipeline::PipelineError::from)?;
    let dead_callbacks: u64 = conn
        .llen(state.queue.dead_letters_key())
        .await
        .map_err(pipeline::PipelineError::from)?;
    Ok(Snapshot {
        counts,
        idle,
        running,
        pending_callbacks,
        dead_callbacks,
    })
}

pub async fn health(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let s = snapshot(&state).await?;
    let c = |k: &str| s.counts.get(k).copied().unwrap_or(0).max(0);
    let dead = state.callbacks.dead_letters(20).await?;
    Ok(Json(json!({
        "jobs": {
            "completed": c("COMPLETED"),
            "failed": c("FAILED"),
            "inProgress": c("IN_PROGRESS"),
            "inQueue": c("IN_QUEUE"),
            "retried": c("retried"),
            "cancelled": c("CANCELLED"),
            "timedOut": c("TIMED_OUT"),
        },
        "workers": {"idle": s.idle, "running": s.running},
        "callbacks": {
            "pending": s.pending_callbacks,
            "deadLettered": s.dead_callbacks,
            "recentDeadLetters": dead,
        },
    })))
}

pub async fn metrics(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    let s = snapshot(&state).await?;
    for st in pipeline::JobState::ALL {
        let n = s.counts.get(st.as_str()).copied().unwrap_or(0).max(0);
        state.metrics.jobs.with_label_values(&[st.as_str()]).set(n);
    }
    state
        .metrics
        .workers
        .with_label_values(&["idle"])
        .set(s.idle as i64);
    state
        .metrics
        .workers
        .with_label_values(&["running"])
        .set(s.running as i64);
    state
        .metrics
        .callbacks
        .with_label_values(&["pending"])
        .set(s.pending_callbacks as i64);
    state
        .metrics
        .callbacks
        .with_label_values(&["dead_lettered"])
        .set(s.dead_callbacks as i64);
    for (stat, n) in state.queue.worker_stats().await? {
        state
            .metrics
            .worker_totals
            .with_label_values(&[stat.as_str()])
            .set(n);
    }
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&state.metrics.registry.gather(), &mut buf)
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(CONTENT_TYPE, "text/plain; version=0.0.4")], buf))
}
