//! OpenAI-compatible chat: `POST /openai/v1/chat/completions` and
//! `GET /openai/v1/models`, as OpenAI's API documents them, on the chat
//! job. `n` choices come from one prefill (the job's options); `stream`
//! relays the job's token stream as `chat.completion.chunk` events, then
//! `data: [DONE]`. An extra body field `character` (with
//! `character_params`) picks the character card, as in seed 003's job;
//! system messages are instructions after the card's system prompt.
//! Errors use OpenAI's shape `{"error": {"message", "type", "param",
//! "code"}}`.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pipeline::queue::TokenEvent;
use pipeline::{JobKind, JobState, RunRequest};
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::jobs::wait_until_done;
use crate::routes::stream::TokenReader;
use crate::startup::AppState;

/// An error in OpenAI's shape.
pub struct OpenAiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl OpenAiError {
    fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        let kind = match e.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let param = e
            .field
            .map(|f| f.strip_prefix("input.").unwrap_or(&f).to_string());
        Self {
            status: e.status,
            message: e.message,
            kind,
            param,
            code: None,
        }
    }
}

impl From<pipeline::PipelineError> for OpenAiError {
    fn from(e: pipeline::PipelineError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {
                "message": self.message, "type": self.kind, "param": self.param, "code": self.code
            }})),
        )
            .into_response()
    }
}

/// `GET /openai/v1/models`.
pub async fn models(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
) -> Result<Json<Value>, OpenAiError> {
    caller?;
    Ok(Json(json!({"object": "list", "data": [{
        "id": state.cfg.openai_model, "object": "model", "created": 0, "owned_by": "companion-worker"
    }]})))
}

/// What a request asked for beyond the job.
struct Asked {
    model: String,
    n: usize,
    stream: bool,
    include_usage: bool,
    stop: Vec<String>,
}

fn text_of(content: &Value, at: &str) -> Result<String, OpenAiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                _ => Err(OpenAiError::invalid(
                    at,
                    "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join("\n")),
        _ => Err(OpenAiError::invalid(
            at,
            "must be a string or an array of text parts",
        )),
    }
}

/// The chat job's input for an OpenAI request.
fn job_input(
    body: &Map<String, Value>,
    default_character: &str,
) -> Result<(Value, Asked), OpenAiError> {
    const KNOWN: &[&str] = &[
        "model",
        "messages",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "character",
        "character_params",
        "user",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "response_format",
        "metadata",
        "store",
    ];
    if let Some(k) = body.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(OpenAiError::invalid(
            k,
            format!("unrecognized request argument: {k}"),
        ));
    }
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(OpenAiError::invalid(
                "model",
                "you must provide a model parameter",
            ))
        }
    };
    let Some(Value::Array(msgs)) = body.get("messages") else {
        return Err(OpenAiError::invalid(
            "messages",
            "must be a non-empty array of messages",
        ));
    };
    if msgs.is_empty() {
        return Err(OpenAiError::invalid(
            "messages",
            "must be a non-empty array of messages",
        ));
    }
    let mut system = Vec::new();
    let mut turns = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m["role"].as_str().unwrap_or_default();
        let text = text_of(&m["content"], &format!("{at}.content"))?;
        match role {
            "system" | "developer" => system.push(text),
            "user" => turns.push(("user", text)),
            "assistant" => turns.push(("bot", text)),
            _ => {
                return Err(OpenAiError::invalid(
                    &format!("{at}.role"),
                    "must be system, developer, user or assistant",
                ))
            }
        }
    }
    match turns.last() {
        Some(("user", _)) => {}
        _ => {
            return Err(OpenAiError::invalid(
                "messages",
                "the last non-system message must be from the user",
            ))
        }
    }
    let last = turns.len() - 1;
    let messages: Vec<Value> = turns
        .iter()
        .enumerate()
        .map(|(i, (who, text))| {
            json!({"id": i, "type": "text", "originator": who, "text": text, "is_processed": i != last})
        })
        .collect();
    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=8) => n as usize,
            _ => return Err(OpenAiError::invalid("n", "must be an integer from 1 to 8")),
        },
    };
    let stop: Vec<String> = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                OpenAiError::invalid("stop", "must be a string or an array of strings")
            })?,
        Some(_) => {
            return Err(OpenAiError::invalid(
                "stop",
                "must be a string or an array of strings",
            ))
        }
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(OpenAiError::invalid("stream", "must be a boolean")),
    };
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let mut generation = json!({"usage": true, "stop": stop});
    if !system.is_empty() {
        generation["system"] = json!(system.join("\n\n"));
    }
    let max_tokens = body
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| body.get("max_tokens").filter(|v| !v.is_null()));
    if let Some(v) = max_tokens {
        generation["max_tokens"] = v.clone();
    }
    for k in ["temperature", "top_p", "seed"] {
        if let Some(v) = body.get(k).filter(|v| !v.is_null()) {
            generation[k] = v.clone();
        }
    }
    let mut input = json!({
        "messages": messages,
        "character": body.get("character").and_then(|c| c.as_str()).unwrap_or(default_character),
        "num_options": n,
        "generation": generation,
    });
    if let Some(p) = body.get("character_params").filter(|v| !v.is_null()) {
        input["character_params"] = p.clone();
    }
    Ok((
        input,
        Asked {
            model,
            n,
            stream,
            include_usage,
            stop,
        },
    ))
}

/// The job's input field names → OpenAI's parameter names.
fn openai_param(field: &str) -> String {
    let f = field.strip_prefix("input.").unwrap_or(field);
    match f {
        "num_options" => "n".into(),
        "generation.max_tokens" => "max_tokens".into(),
        f if f.starts_with("generation.") => f["generation.".len()..].to_string(),
        f => f.to_string(),
    }
}

/// `POST /openai/v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let caller = caller?;
    let body = body.map_err(|e| OpenAiError::invalid("body", e.body_text()))?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| OpenAiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    let Value::Object(body) = value else {
        return Err(OpenAiError::invalid("body", "must be a JSON object"));
    };
    let (input, asked) = job_input(&body, &state.cfg.openai_default_character)?;
    let req = RunRequest::parse(
        JobKind::Chat,
        json!({ "input": input }).to_string().as_bytes(),
    )
    .map_err(|e| {
        let e = e.input_error();
        OpenAiError::invalid(
            &openai_param(&e.field),
            format!("{}: {}", openai_param(&e.field), e.rule),
        )
    })?;
    let slot = if asked.stream {
        Some(state.limits.open_stream(caller.key)?)
    } else {
        None
    };
    let events = state.waiters.subscribe();
    let rec = state.queue.enqueue(&req, &caller.owner).await?;
    state
        .metrics
        .jobs_submitted
        .with_label_values(&[JobKind::Chat.as_str()])
        .inc();
    let id = format!("chatcmpl-{}", rec.id);
    let created = (rec.created_ms / 1000) as i64;
    if let Some(slot) = slot {
        let reader = TokenReader::new(&state, slot, &rec.id).await?;
        return Ok(stream_response(state, reader, rec.id, id, created, asked).into_response());
    }
    let wait = Duration::from_millis(state.cfg.runsync_wait_ms);
    let done = wait_until_done(&state, &rec, events, wait).await?;
    match (done.state, done.output) {
        (JobState::Completed, Some(output)) => {
            let (texts, usage) = read_output(&output);
            let choices: Vec<Value> = texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    json!({"index": i, "message": {"role": "assistant", "content": t, "refusal": null},
                           "logprobs": null, "finish_reason": finish_reason(&usage, i)})
                })
                .collect();
            Ok(Json(json!({
                "id": id, "object": "chat.completion", "created": created, "model": asked.model,
                "choices": choices, "usage": usage_body(&usage), "system_fingerprint": null
            }))
            .into_response())
        }
        (st, _) if st.is_terminal() => Err(OpenAiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!(
                "the completion {} ended {}: {}",
                rec.id,
                st.as_str(),
                done.error.unwrap_or_default()
            ),
            kind: "server_error",
            param: None,
            code: None,
        }),
        _ => Err(OpenAiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!(
                "the completion {} is still running; poll /status/{}",
                rec.id, rec.id
            ),
            kind: "timeout",
            param: None,
            code: None,
        }),
    }
}

/// The options' texts and the usage of a chat job's output.
fn read_output(output: &Value) -> (Vec<String>, Value) {
    let texts = output["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["options"].as_array())
        .map(|o| {
            o.iter()
                .map(|x| x["text"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    (texts, output["usage"].clone())
}

/// OpenAI's word for why choice `i` ended (a reply cut back to a whole
/// sentence at the limit is `length`).
fn finish_reason(usage: &Value, i: usize) -> Value {
    match usage["finish_reasons"].get(i).and_then(|r| r.as_str()) {
        Some("length") | Some("length-trimmed") => json!("length"),
        _ => json!("stop"),
    }
}

fn usage_body(usage: &Value) -> Value {
    let p = usage["prompt_tokens"].as_u64().unwrap_or(0);
    let c = usage["completion_tokens"].as_u64().unwrap_or(0);
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

/// Per choice: what was sent, and what waits in case it starts a stop
/// sequence.
struct Choice {
    sent: String,
    pending: String,
    stopped: bool,
}

struct Streaming {
    reader: TokenReader,
    state: AppState,
    job: String,
    id: String,
    created: i64,
    asked: Asked,
    choices: Vec<Choice>,
    queue: std::collections::VecDeque<String>,
    finished: bool,
}

impl Streaming {
    fn chunk(&self, index: usize, delta: Value, finish: Value) -> String {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.asked.model, "system_fingerprint": null,
               "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        .to_string()
    }

    /// New text of choice `i`: what can go now (none of it may be the start
    /// of a stop sequence).
    fn push_text(&mut self, i: usize, text: &str) {
        if i >= self.choices.len() {
            return;
        }
        let stops = &self.asked.stop;
        let c = &mut self.choices[i];
        if c.stopped {
            return;
        }
        c.pending.push_str(text);
        let mut emit = String::new();
        if let Some(at) = stops
            .iter()
            .filter_map(|s| c.pending.find(s.as_str()))
            .min()
        {
            emit.push_str(&c.pending[..at]);
            c.pending.clear();
            c.stopped = true;
        } else {
            // Hold back the longest tail that begins some stop sequence.
            let hold = stops
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(|k| s.is_char_boundary(*k))
                        .map(move |k| &s[..k])
                })
                .filter(|prefix| c.pending.ends_with(prefix))
                .map(|p| p.len())
                .max()
                .unwrap_or(0);
            let cut = c.pending.len() - hold;
            emit.push_str(&c.pending[..cut]);
            c.pending.drain(..cut);
        }
        if !emit.is_empty() {
            c.sent.push_str(&emit);
            let line = self.chunk(i, json!({"content": emit}), Value::Null);
            self.queue.push_back(line);
        }
    }

    /// The end: the rest of each choice from the job's output, the finish
    /// reasons, the usage when asked, `[DONE]`.
    async fn finish(&mut self, state: JobState) {
        let rec = self.state.queue.get(&self.job).await.ok().flatten();
        let output = rec.as_ref().and_then(|r| r.output.clone());
        match (state, output) {
            (JobState::Completed, Some(output)) => {
                let (texts, usage) = read_output(&output);
                for (i, text) in texts.iter().enumerate().take(self.choices.len()) {
                    let sent = &self.choices[i].sent;
                    if let Some(rest) = text.strip_prefix(sent.as_str()) {
                        if !rest.is_empty() {
                            let line = self.chunk(i, json!({"content": rest}), Value::Null);
                            self.queue.push_back(line);
                        }
                    }
                    let line = self.chunk(i, json!({}), finish_reason(&usage, i));
                    self.queue.push_back(line);
                }
                if self.asked.include_usage {
                    self.queue.push_back(
                        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.asked.model, "choices": [], "usage": usage_body(&usage)})
                        .to_string(),
                    );
                }
            }
            (st, _) => {
                let message = rec
                    .and_then(|r| r.error)
                    .unwrap_or_else(|| format!("the completion ended {}", st.as_str()));
                self.queue.push_back(
                    json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}})
                        .to_string(),
                );
            }
        }
        self.queue.push_back("[DONE]".into());
        self.finished = true;
    }
}

fn stream_response(
    state: AppState,
    reader: TokenReader,
    job: String,
    id: String,
    created: i64,
    asked: Asked,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let mut s = Streaming {
        reader,
        state,
        job,
        id,
        created,
        choices: (0..asked.n)
            .map(|_| Choice {
                sent: String::new(),
                pending: String::new(),
                stopped: false,
            })
            .collect(),
        asked,
        queue: Default::default(),
        finished: false,
    };
    for i in 0..s.asked.n {
        let line = s.chunk(i, json!({"role": "assistant", "content": ""}), Value::Null);
        s.queue.push_back(line);
    }
    let stream = futures::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(line) = s.queue.pop_front() {
                return Some((Ok(Event::default().data(line)), s));
            }
            if s.finished {
                return None;
            }
            match s.reader.next().await {
                Ok(Some(TokenEvent::Text { option, text })) => s.push_text(option, &text),
                Ok(Some(TokenEvent::Progress { .. } | TokenEvent::Audio(_))) => {}
                Ok(Some(TokenEvent::End { state })) => s.finish(state).await,
                Ok(None) | Err(_) => {
                    s.queue.push_back(
                        json!({"error": {"message": "the stream ended before the completion", "type": "server_error", "param": null, "code": null}})
                            .to_string(),
                    );
                    s.queue.push_back("[DONE]".into());
                    s.finished = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default())
}
