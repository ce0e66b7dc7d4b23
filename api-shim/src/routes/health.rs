//! `/health` (Redis, jobs by state and by kind, workers seen, callbacks)
//! and `/metrics`.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use pipeline::JobKind;
use prometheus::{Encoder, TextEncoder};
use redis::AsyncCommands;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::startup::AppState;

struct Snapshot {
    counts: std::collections::HashMap<String, i64>,
    fleet: pipeline::queue::FleetView,
    kinds: Vec<(JobKind, pipeline::queue::KindQueue)>,
    pending_callbacks: u64,
    dead_callbacks: u64,
}

async fn snapshot(state: &AppState) -> Result<Snapshot, ApiError> {
    let counts = state.queue.counts().await?;
    let fleet = state.queue.workers().await?;
    let mut kinds = Vec::new();
    for kind in JobKind::ALL {
        kinds.push((kind, state.queue.kind_queue(kind).await?));
    }
    let mut conn = state.queue.connection();
    let keys = state.queue.keys();
    let pending_callbacks: u64 = conn
        .zcard(keys.callbacks_due())
        .await
        .map_err(pipeline::PipelineError::from)?;
    let dead_callbacks: u64 = conn
        .llen(keys.dead_letters())
        .await
        .map_err(pipeline::PipelineError::from)?;
    Ok(Snapshot {
        counts,
        fleet,
        kinds,
        pending_callbacks,
        dead_callbacks,
    })
}

/// Liveness and load. While Redis is down: 503 with `"redis": "down"`.
/// Without a key: liveness and aggregate counts only. With one: also that
/// tenant's own recent dead letters (URLs without credentials or query).
pub async fn health(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let tenant = match headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        None => None,
        Some(h) => {
            let key = h.strip_prefix("Bearer ").unwrap_or(h).trim();
            Some(
                state
                    .keys
                    .tenant_of(key)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        ApiError::new(StatusCode::UNAUTHORIZED, "the API key is not valid")
                    })?,
            )
        }
    };
    let s = match snapshot(&state).await {
        Ok(s) => s,
        Err(mut e) => {
            if e.status == StatusCode::SERVICE_UNAVAILABLE {
                e.message = "redis is down: jobs can be neither queued nor read".into();
                e.field = None;
                e.extra = Some(Box::new(json!({"redis": "down"})));
            }
            return Err(e);
        }
    };
    let c = |k: &str| s.counts.get(k).copied().unwrap_or(0).max(0);
    let recent_dead = match &tenant {
        Some(tenant) => {
            let all = state
                .callbacks
                .dead_letters(state.cfg.callback_dead_letter_max.max(1) as isize)
                .await?;
            let own: Vec<Value> = all
                .into_iter()
                .filter(|d| d["owner"].as_str() == Some(tenant.as_str()))
                .take(20)
                .map(|mut d| {
                    if let Some(o) = d.as_object_mut() {
                        o.remove("owner");
                    }
                    d
                })
                .collect();
            Some(own)
        }
        None => None,
    };
    // Per kind: what waits, what runs, and how many live workers take it
    // (a kind with jobs and no workers needs a worker started).
    let kinds: serde_json::Map<String, Value> = s
        .kinds
        .iter()
        .map(|(kind, q)| {
            (
                kind.as_str().to_string(),
                json!({
                    "inQueue": q.queued,
                    "inProgress": q.running,
                    "workers": s.fleet.by_kind.get(kind.as_str()).copied().unwrap_or(0),
                }),
            )
        })
        .collect();
    let mut body = json!({
        "redis": "up",
        "jobs": {
            "completed": c("COMPLETED"),
            "failed": c("FAILED"),
            "inProgress": c("IN_PROGRESS"),
            "inQueue": c("IN_QUEUE"),
            "retried": c("retried"),
            "cancelled": c("CANCELLED"),
            "timedOut": c("TIMED_OUT"),
        },
        "workers": {"idle": s.fleet.idle, "running": s.fleet.running},
        "kinds": kinds,
        "callbacks": {
            "pending": s.pending_callbacks,
            "deadLettered": s.dead_callbacks,
        },
    });
    if let Some(dead) = recent_dead {
        body["callbacks"]["recentDeadLetters"] = json!(dead);
    }
    Ok(Json(body))
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
        .set(s.fleet.idle as i64);
    state
        .metrics
        .workers
        .with_label_values(&["running"])
        .set(s.fleet.running as i64);
    for (kind, q) in &s.kinds {
        let k = kind.as_str();
        let m = &state.metrics;
        m.kind_jobs
            .with_label_values(&[k, "queued"])
            .set(q.queued as i64);
        m.kind_jobs
            .with_label_values(&[k, "running"])
            .set(q.running as i64);
        m.kind_workers
            .with_label_values(&[k])
            .set(s.fleet.by_kind.get(k).copied().unwrap_or(0) as i64);
    }
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
    state
        .metrics
        .waiting_requests
        .set(state.waiters.watching() as i64);
    for (stat, n) in &s.fleet.gauges {
        state
            .metrics
            .worker_gauges
            .with_label_values(&[stat.as_str()])
            .set(*n as i64);
    }
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
