//! Token streams: `POST /v1/instances/{instance_id}/chat/stream` (seed 000
//! "Stream chat response": the reply as plain-text chunks) and
//! `GET /stream/{id}` (Server-Sent Events of any job's text as it is
//! generated).
//!
//! Both relay the job's Redis token stream, which the worker fills as it
//! generates. Deltas are whole UTF-8 characters, so no chunk splits one. A
//! plain-text client that goes away makes the shim request a stop: the
//! worker ends generation within one token step and still saves what it
//! generated.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawPathParams, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use pipeline::queue::{RedisQueue, TokenEvent};
use pipeline::{JobKind, JobState, RunRequest};
use serde_json::json;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::jobs::{body_or_error, native_input, owned_job};
use crate::startup::AppState;

const READ_BLOCK: Duration = Duration::from_millis(500);
/// How long a stream waits for Redis to come back before it ends.
const REDIS_OUTAGE_GRACE: Duration = Duration::from_secs(30);

/// Requests a stop when dropped before the stream ended: the client left.
struct StopOnDrop {
    queue: RedisQueue,
    id: String,
    ended: bool,
}

impl StopOnDrop {
    /// The stream reached its end: nothing to stop.
    fn disarm(mut self) {
        self.ended = true;
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if !self.ended {
            let (queue, id) = (self.queue.clone(), self.id.clone());
            tracing::info!(job = %id, "stream client went away: requesting a stop");
            tokio::spawn(async move {
                if let Err(e) = queue.request_stop(&id, "client disconnected").await {
                    tracing::warn!(job = %id, error = %e, "stop request failed");
                }
            });
        }
    }
}

/// Reads a job's token events in order, ending at its End event (or when the
/// job is over and no more events come).
pub(crate) struct TokenReader {
    queue: RedisQueue,
    /// The process's one connection for token streams.
    hub: pipeline::queue::TokenHub,
    /// Set when the shim shuts down: the stream ends cleanly.
    shutdown: tokio::sync::watch::Receiver<bool>,
    id: String,
    after: String,
    pending: VecDeque<TokenEvent>,
    done: bool,
    /// The caller's stream slot, freed when the stream ends.
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// When the stream ends at the latest (`STREAM_MAX_SECONDS`).
    deadline: tokio::time::Instant,
}

impl TokenReader {
    /// `slot`: the caller's stream slot (taken before anything is queued).
    pub(crate) async fn new(
        state: &AppState,
        slot: tokio::sync::OwnedSemaphorePermit,
        id: &str,
    ) -> Result<Self, ApiError> {
        Ok(Self {
            hub: state.tokens.clone(),
            _slot: slot,
            deadline: tokio::time::Instant::now() + state.limits.stream_max,
            queue: state.queue.clone(),
            shutdown: state.shutdown.clone(),
            id: id.to_string(),
            after: "0".into(),
            pending: VecDeque::new(),
            done: false,
        })
    }

    /// The next event; None once the stream is over (or the shim shuts
    /// down). While Redis is unreachable it keeps trying for
    /// [`REDIS_OUTAGE_GRACE`], so a Redis restart does not cut streams.
    pub(crate) async fn next(&mut self) -> Result<Option<TokenEvent>, pipeline::PipelineError> {
        let mut outage_since: Option<tokio::time::Instant> = None;
        loop {
            match self.next_once().await {
                Err(e) if pipeline::queue::is_unavailable(&e) => {
                    let since = *outage_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > REDIS_OUTAGE_GRACE {
                        return Err(e);
                    }
                    tracing::warn!(job = %self.id, error = %e, "token stream: Redis unavailable, retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    /// [`Self::next`] for a response being sent: an error ends the
    /// stream, and is logged (the client only sees the stream end).
    pub(crate) async fn next_or_end(&mut self) -> Option<TokenEvent> {
        match self.next().await {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(job = %self.id, error = %e, "token stream ended by an error");
                None
            }
        }
    }

    async fn next_once(&mut self) -> Result<Option<TokenEvent>, pipeline::PipelineError> {
        loop {
            // What was read goes out first; then a shutdown or the
            // stream's deadline ends it.
            if let Some(e) = self.pending.pop_front() {
                if matches!(e, TokenEvent::End { .. }) {
                    self.done = true;
                }
                return Ok(Some(e));
            }
            if *self.shutdown.borrow() || tokio::time::Instant::now() >= self.deadline {
                self.done = true;
                return Ok(None);
            }
            if self.done {
                return Ok(None);
            }
            let events = self.hub.read(&self.id, &self.after, READ_BLOCK).await?;
            if let Some((last, _)) = events.last() {
                self.after = last.clone();
            }
            let quiet = events.is_empty();
            self.pending.extend(events.into_iter().map(|(_, e)| e));
            if quiet {
                // Over without an End event (cancelled, expired, or its
                // worker died after writing the result)? Every delta was
                // written before the result, so after one last look the
                // stream is complete.
                if let Some(rec) = self.queue.get(&self.id).await? {
                    if rec.state.is_terminal() {
                        let rest = self
                            .hub
                            .read(&self.id, &self.after, Duration::from_millis(1))
                            .await?;
                        if let Some((last, _)) = rest.last() {
                            self.after = last.clone();
                        }
                        let ended = rest
                            .iter()
                            .any(|(_, e)| matches!(e, TokenEvent::End { .. }));
                        self.pending.extend(rest.into_iter().map(|(_, e)| e));
                        if !ended {
                            self.pending.push_back(TokenEvent::End { state: rec.state });
                        }
                    }
                }
            }
        }
    }
}

/// With `Accept: text/event-stream` the reply comes as Server-Sent Events
/// instead (the events of [`sse`]: `output`, `audio` when the job has
/// `generate_audio`, `completed`), so a client hears each sentence as it
/// is spoken on the one connection.
pub async fn chat_stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    Path(instance_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let wants_events = accepts_events(&headers);
    // The stream slot first: a refused stream queues nothing.
    let slot = state.limits.open_stream(caller.key)?;
    let body = body_or_error(body)?;
    let input = native_input(&body, |input| {
        input.insert("instance_id".into(), json!(instance_id));
    })?;
    let req = RunRequest::parse(
        JobKind::ChatStream,
        json!({ "input": input }).to_string().as_bytes(),
    )
    .map_err(ApiError::native_input)?;
    let rec = state.queue.enqueue(&req, &caller.owner).await?;
    state
        .metrics
        .jobs_submitted
        .with_label_values(&[JobKind::ChatStream.as_str()])
        .inc();
    let mut reader = TokenReader::new(&state, slot, &rec.id).await?;
    // Hold the answer until the first event, so a job that fails before
    // producing anything gets an error status instead of an empty 200.
    let first = reader.next().await?;
    if let Some(TokenEvent::End { state: st }) = &first {
        if *st != JobState::Completed {
            let error = state
                .queue
                .get(&rec.id)
                .await?
                .and_then(|r| r.error)
                .unwrap_or_default();
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("chat job {} ended {}: {error}", rec.id, st.as_str()),
            ));
        }
    }
    let guard = StopOnDrop {
        queue: state.queue.clone(),
        id: rec.id.clone(),
        ended: false,
    };
    if wants_events {
        let stream = futures::stream::unfold(
            (reader, first, Some(guard)),
            |(mut reader, mut first, mut guard)| async move {
                // None once the end went out.
                guard.as_ref()?;
                let event = match first.take() {
                    Some(e) => Some(e),
                    None => reader.next_or_end().await,
                };
                let ended = !matches!(event, Some(ref e) if !matches!(e, TokenEvent::End { .. }));
                if ended {
                    // The end, the shim shutting down, or Redis gone for
                    // good: the worker goes on and saves the whole reply,
                    // so no stop is requested.
                    if let Some(g) = guard.take() {
                        g.disarm();
                    }
                }
                let ev = sse_event(&reader.id, event?);
                Some((Ok::<Event, Infallible>(ev), (reader, None, guard)))
            },
        );
        let mut resp = Sse::new(stream)
            .keep_alive(axum::response::sse::KeepAlive::default())
            .into_response();
        resp.headers_mut().insert(
            "x-job-id",
            header::HeaderValue::from_str(&rec.id).expect("job ids are header-safe"),
        );
        return Ok(resp);
    }
    let stream = futures::stream::unfold(
        (reader, first, guard),
        |(mut reader, mut first, guard)| async move {
            loop {
                let event = match first.take() {
                    Some(e) => Some(e),
                    None => reader.next_or_end().await,
                };
                match event {
                    Some(TokenEvent::Text { option: 0, text }) => {
                        return Some((
                            Ok::<Bytes, Infallible>(Bytes::from(text)),
                            (reader, None, guard),
                        ))
                    }
                    // Plain text carries option 0's text only (spoken
                    // chunks go to event-stream clients).
                    Some(
                        TokenEvent::Text { .. }
                        | TokenEvent::Progress { .. }
                        | TokenEvent::Audio(_),
                    ) => continue,
                    // The end, the shim shutting down, or Redis gone for
                    // good: the worker goes on and saves the whole reply,
                    // so no stop is requested.
                    Some(TokenEvent::End { .. }) | None => {
                        guard.disarm();
                        return None;
                    }
                }
            }
        },
    );
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-job-id", rec.id.as_str())
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

/// `GET /stream/{id}`: with `Accept: text/event-stream`, Server-Sent Events
/// (see [`sse`]); otherwise RunPod's polled form, `{"id", "status",
/// "stream": [{"output": text}]}` with the text produced since the previous
/// poll, which RunPod's SDKs read with `Job.stream()`.
/// `?options=all`: the polled form carries every option.
#[derive(serde::Deserialize)]
pub struct StreamQuery {
    options: Option<String>,
}

pub async fn stream_route(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    raw: RawPathParams,
    axum::extract::Query(q): axum::extract::Query<StreamQuery>,
) -> Result<Response, ApiError> {
    let all_options = q.options.as_deref() == Some("all");
    if accepts_events(&headers) {
        return Ok(sse(State(state), caller, raw).await?.into_response());
    }
    let rec = owned_job(&state, &caller, &raw).await?;
    let id = rec.id.clone();
    let chunks: Vec<serde_json::Value> = state
        .queue
        .poll_tokens(&id)
        .await?
        .into_iter()
        .filter_map(|e| match e {
            // Option 0 as RunPod's SDKs read it (they join every chunk's
            // output); with ?options=all every option, each saying which.
            TokenEvent::Text { option: 0, text } if !all_options => Some(json!({ "output": text })),
            TokenEvent::Text { option, text } if all_options => {
                Some(json!({ "output": text, "option": option }))
            }
            TokenEvent::Progress { progress } => Some(json!({ "output": {"progress": progress} })),
            TokenEvent::Audio(chunk) => Some(json!({ "output": {"audio": chunk.to_json()} })),
            _ => None,
        })
        .collect();
    Ok(
        axum::Json(json!({"id": id, "status": rec.state.as_str(), "stream": chunks}))
            .into_response(),
    )
}

/// Whether the request asks for Server-Sent Events.
fn accepts_events(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
}

/// A token event as a Server-Sent Event of job `id`.
fn sse_event(id: &str, event: TokenEvent) -> Event {
    match event {
        TokenEvent::Text { option, text } => Event::default()
            .event("output")
            .data(json!({"option": option, "text": text}).to_string()),
        TokenEvent::Progress { progress } => Event::default()
            .event("progress")
            .data(progress.to_string()),
        TokenEvent::Audio(chunk) => Event::default()
            .event("audio")
            .data(chunk.to_json().to_string()),
        TokenEvent::End { state } => Event::default()
            .event("completed")
            .data(json!({"id": id, "status": state.as_str()}).to_string()),
    }
}

/// Server-Sent Events — `output` events `{"option", "text"}` as text is
/// generated, `audio` events `{"index", "text", "format", "seconds",
/// "audio"}` (base64 of a whole file) as a streamed reply is spoken,
/// `progress` events `{"step", "steps"}` as a media job runs, then one
/// `completed` event `{"id", "status"}`.
async fn sse(
    State(state): State<AppState>,
    caller: Caller,
    raw: RawPathParams,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = owned_job(&state, &caller, &raw).await?.id;
    let slot = state.limits.open_stream(caller.key)?;
    let reader = TokenReader::new(&state, slot, &id).await?;
    let stream =
        futures::stream::unfold((reader, false), move |(mut reader, finished)| async move {
            if finished {
                return None;
            }
            match reader.next().await {
                Ok(Some(event)) => {
                    let end = matches!(event, TokenEvent::End { .. });
                    let ev = sse_event(&reader.id, event);
                    Some((Ok(ev), (reader, end)))
                }
                Ok(None) | Err(_) => None,
            }
        });
    Ok(Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default()))
}
