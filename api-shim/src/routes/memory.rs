//! `POST /v1/memory/condense`: the scratchpad condensed to `max_words` by a
//! worker, answered synchronously with `{content, word_count, version?}`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use pipeline::{JobKind, RunRequest};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::jobs::{body_or_error, native_input, wait_until_done};
use crate::startup::AppState;

pub async fn condense(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body_or_error(body)?;
    let input = native_input(&body, |_| {})?;
    let req = RunRequest::parse(
        JobKind::Memory,
        json!({ "input": input }).to_string().as_bytes(),
    )
    .map_err(ApiError::native_input)?;
    let events = state.waiters.subscribe();
    let rec = state.queue.enqueue(&req, &caller.owner).await?;
    state
        .metrics
        .jobs_submitted
        .with_label_values(&[JobKind::Memory.as_str()])
        .inc();
    let wait = Duration::from_millis(state.cfg.runsync_wait_ms);
    let done = wait_until_done(&state, &rec, events, wait).await?;
    match (done.state, done.output) {
        (pipeline::JobState::Completed, Some(output)) => Ok((StatusCode::OK, Json(output))),
        (st, _) if st.is_terminal() => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "condense job {} ended {}: {}",
                rec.id,
                st.as_str(),
                done.error.unwrap_or_default()
            ),
        )),
        (st, _) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": rec.id, "status": st.as_str()})),
        )),
    }
}
