//! `GET /openapi.json`: the shim's routes, bodies and errors.

use axum::Json;
use pipeline::JobKind;
use serde_json::{json, Value};

/// The JSON error responses `codes` (every error the shim answers has the
/// `Error` body).
fn errors(codes: &[u16]) -> serde_json::Map<String, Value> {
    codes
        .iter()
        .map(|code| {
            let description = match code {
                400 => "unreadable JSON or query",
                401 => "missing or unknown API key",
                404 => "no such job for this key, or no such endpoint",
                409 => "the job is not in a state this allows",
                413 => "body over the route's limit",
                422 => "a rule broken; `field` and `rule` say which",
                429 => "over the key's request rate or open streams; `Retry-After` says when to try again",
                502 => "the job failed",
                503 => "Redis is unavailable; `Retry-After` says when to try again",
                _ => "error",
            };
            (
                code.to_string(),
                json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
            )
        })
        .collect()
}

/// Errors every authenticated route may answer.
const COMMON: [u16; 4] = [401, 404, 429, 503];

fn job_routes(prefix: &str, tag: &str) -> Vec<(String, Value)> {
    let id = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}});
    let mut params = vec![];
    if prefix.contains("{endpoint_id}") {
        let kinds: Vec<&str> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
        params.push(json!({"name": "endpoint_id", "in": "path", "required": true,
            "description": format!("names the job kind: {}", JobKind::names()), "schema": {"type": "string", "enum": kinds}}));
    }
    let with_id = {
        let mut p = params.clone();
        p.push(id);
        p
    };
    // `body`: the route's body limit in bytes, when it takes a body.
    let op = |summary: &str, params: &Vec<Value>, body: Option<usize>, ok: &str, extra: &[u16]| {
        let mut o = json!({
            "tags": [tag], "summary": summary, "parameters": params,
            "security": [{"bearer": []}],
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{ok}")}}}}}
        });
        for (k, v) in errors(&COMMON).into_iter().chain(errors(extra)) {
            o["responses"][k] = v;
        }
        if let Some(max) = body {
            o["requestBody"] = json!({
                "required": true,
                "description": format!("at most {max} bytes (413 over it, refused from Content-Length)"),
                "x-max-body-bytes": max,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunRequest"}}}
            });
        }
        o
    };
    let mut with_wait = with_id.clone();
    with_wait.push(json!({"name": "wait", "in": "query", "required": false,
        "description": "milliseconds to wait for the end, 1000..=300000", "schema": {"type": "integer"}}));
    let mut runsync_params = params.clone();
    runsync_params.push(json!({"name": "wait", "in": "query", "required": false,
        "description": "milliseconds to wait for the result, 1000..=300000", "schema": {"type": "integer"}}));
    vec![
        (
            format!("{prefix}/run"),
            json!({"post": op("Queue a job", &params, Some(crate::startup::RUN_BODY_MAX), "JobAccepted", &[400, 413, 422])}),
        ),
        (
            format!("{prefix}/runsync"),
            json!({"post": op("Queue a job and wait for its result", &runsync_params, Some(crate::startup::RUNSYNC_BODY_MAX), "JobStatus", &[400, 413, 422])}),
        ),
        (
            format!("{prefix}/status/{{id}}"),
            json!({"get": op("A job's state and result; with ?wait=MS held until it ends or the wait runs out", &with_wait, None, "JobStatus", &[400, 422])}),
        ),
        (
            format!("{prefix}/status-sync/{{id}}"),
            json!({"get": op("A job's state and result, held until it ends (at most ?wait=MS, default the /runsync wait)", &with_wait, None, "JobStatus", &[400, 422])}),
        ),
        (
            format!("{prefix}/cancel/{{id}}"),
            json!({"post": op("Cancel a queued or running job", &with_id, None, "JobAccepted", &[409])}),
        ),
        (
            format!("{prefix}/retry/{{id}}"),
            json!({"post": op("Queue a FAILED or TIMED_OUT job again", &with_id, None, "JobAccepted", &[409])}),
        ),
        (
            format!("{prefix}/purge-queue"),
            json!({"post": op("Cancel all of this key's queued jobs", &params, None, "Purged", &[])}),
        ),
    ]
}

pub async fn openapi(_caller: crate::auth::Caller) -> Json<Value> {
    let mut paths = serde_json::Map::new();
    for (p, v) in job_routes("", "jobs")
        .into_iter()
        .chain(job_routes("/v2/{endpoint_id}", "runpod-v2"))
    {
        paths.insert(p, v);
    }
    paths.insert("/v1/memory/condense".into(), json!({"post": {
        "tags": ["memory"], "summary": "Condense a memory scratchpad to max_words (synchronous)",
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "x-max-body-bytes": crate::startup::NATIVE_BODY_MAX, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MemoryInput"}}}},
        "responses": responses(
            json!({
                "200": {"description": "condensed", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MemoryCondensed"}}}},
                "202": {"description": "still running after the wait; poll /v2/memory/status/{id}", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobAccepted"}}}}
            }),
            &[400, 413, 422, 502],
        )
    }}));
    let mut image_body = JobKind::Image.input_schema();
    image_body["properties"]["webhook"] = json!({"type": "string", "format": "uri", "description": "signed callback URL (as RunPod's /run)"});
    image_body["properties"]["policy"] = json!({"type": "object"});
    paths.insert("/v1/images/generate".into(), json!({"post": {
        "tags": ["image"], "summary": "Generate images from skin + category (seed 000)",
        "description": "Queues an image job; poll /v2/image/status/{job_id} (output.progress {step, steps} while running), read /stream/{job_id} (`progress` events), or take the signed callback. The result holds the uploaded images and their user-media records.",
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "x-max-body-bytes": crate::startup::NATIVE_BODY_MAX, "content": {"application/json": {"schema": image_body}}},
        "responses": responses(
            json!({"202": {"description": "queued", "content": {"application/json": {"schema": {"type": "object", "required": ["job_id", "generation_id"], "properties": {
                "job_id": {"type": "string"}, "generation_id": {"type": "string"}, "status": {"type": "string"}}}}}}}),
            &[400, 413, 422],
        )
    }}));
    let mut video_body = JobKind::Video.input_schema();
    video_body["properties"]["webhook"] = json!({"type": "string", "format": "uri", "description": "signed callback URL (as RunPod's /run)"});
    video_body["properties"]["policy"] = json!({"type": "object"});
    paths.insert("/v1/videos/generate".into(), json!({"post": {
        "tags": ["video"], "summary": "Generate a video from skin + category (seed 000)",
        "description": "Queues a video job; poll /v2/video/status/{job_id} (output.progress {stage: first_frame | denoise | decode | encode, step, steps} while running), read /stream/{job_id} (`progress` events), or take the signed callback. The result holds the uploaded H.264 MP4, its JPEG poster and the user-media record.",
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "x-max-body-bytes": crate::startup::NATIVE_BODY_MAX, "content": {"application/json": {"schema": video_body}}},
        "responses": responses(
            json!({"202": {"description": "queued", "content": {"application/json": {"schema": {"type": "object", "required": ["job_id", "generation_id"], "properties": {
                "job_id": {"type": "string"}, "generation_id": {"type": "string"}, "status": {"type": "string"}}}}}}}),
            &[400, 413, 422],
        )
    }}));
    paths.insert("/v1/instances/{instance_id}/chat/stream".into(), json!({"post": {
        "tags": ["chat"], "summary": "Send a user message and stream the reply as plain-text chunks",
        "description": "Context (instance snapshot, default persona, recent messages, memory scratchpad) comes from the platform API. When the stream closes, the user and assistant messages have been saved; a client that disconnects stops generation and the partial reply is saved with \"partial\": true. With generate_audio the reply is also spoken sentence by sentence: send Accept: text/event-stream to get Server-Sent Events (`output` {option, text}, `audio` {index, text, format, seconds, audio (base64 of a whole file)} right after the text it speaks, then `completed`); the job's output.audio holds the whole reply.",
        "security": [{"bearer": []}],
        "parameters": [{"name": "instance_id", "in": "path", "required": true, "schema": {"type": "string", "pattern": pipeline::platform::ID_PATTERN}}],
        "requestBody": {"required": true, "x-max-body-bytes": crate::startup::NATIVE_BODY_MAX, "content": {"application/json": {"schema": {"type": "object", "required": ["content"], "properties": {
            "content": {"type": "string"}, "medium": {"type": "string", "enum": ["text", "audio", "image", "video"], "default": "text"},
            "skin_id": {"type": "string"},
            "generate_audio": {"type": "boolean", "default": false},
            "voice_id": {"type": "string", "maxLength": pipeline::jobs::chat_stream::MAX_VOICE_ID_CHARS, "description": "the voice; the instance's assigned_voice_id when absent"}}}}}},
        "responses": responses(
            json!({"200": {"description": "chunked reply, or Server-Sent Events with Accept: text/event-stream; header x-job-id names the job", "content": {"text/plain; charset=utf-8": {"schema": {"type": "string"}}, "text/event-stream": {}}}}),
            &[400, 413, 422, 502],
        )
    }}));
    paths.insert("/stream/{id}".into(), json!({"get": {
        "tags": ["jobs"], "summary": "A job's text as it is generated: Server-Sent Events with Accept: text/event-stream (`output` {option, text}, `audio` {index, text, format, seconds, audio} of a spoken streamed chat, `progress` {step, steps} of a media job, then `completed` {id, status}); otherwise RunPod's polled JSON {id, status, stream: [{output}]} with the text since the last poll",
        "security": [{"bearer": []}],
        "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
        "responses": responses(
            json!({"200": {"description": "event stream, or the polled JSON", "content": {"text/event-stream": {}, "application/json": {}}}}),
            &[],
        )
    }}));
    let mut health_errors = errors(&[401, 503]);
    health_errors.insert("200".into(), json!({"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}));
    paths.insert("/health".into(), json!({"get": {"tags": ["ops"],
        "summary": "Liveness, jobs by state and kind, workers seen, callbacks pending and dead-lettered; with a key, also that tenant's recent dead letters",
        "security": [{}, {"bearer": []}], "responses": health_errors}}));
    // OpenAI-compatible chat (errors in OpenAI's shape; the body limit and
    // the rate limit answer ours).
    let oai_errors = |codes: &[u16]| -> Value {
        let mut m = serde_json::Map::new();
        for c in codes {
            m.insert(c.to_string(), json!({"description": "error", "content": {"application/json": {"schema": {"anyOf": [
                {"$ref": "#/components/schemas/OpenAiError"}, {"$ref": "#/components/schemas/Error"}]}}}}));
        }
        Value::Object(m)
    };
    let mut completions = oai_errors(&[400, 401, 413, 429, 500, 503, 504]);
    completions["200"] = json!({"description": "a chat.completion, or with stream: true a stream of chat.completion.chunk events then [DONE]",
        "content": {"application/json": {"schema": {"type": "object", "required": ["id", "object", "choices"], "properties": {
            "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array"}, "usage": {"type": "object"}}}}, "text/event-stream": {}}});
    paths.insert("/openai/v1/chat/completions".into(), json!({"post": {
        "tags": ["openai"], "summary": "OpenAI-compatible chat completion on the chat job (character via the extra `character` field)",
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "x-max-body-bytes": crate::startup::NATIVE_BODY_MAX, "content": {"application/json": {"schema": {
            "type": "object", "required": ["model", "messages"], "properties": {
                "model": {"type": "string"}, "messages": {"type": "array", "items": {"type": "object"}},
                "n": {"type": "integer", "minimum": 1, "maximum": 8}, "max_tokens": {"type": "integer"},
                "max_completion_tokens": {"type": "integer"}, "temperature": {"type": "number"}, "top_p": {"type": "number"},
                "seed": {"type": "integer"}, "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                "stream": {"type": "boolean"}, "character": {"type": "string"}, "character_params": {"type": "object"}}}}}},
        "responses": completions
    }}));
    let mut models = oai_errors(&[401, 429, 503]);
    models["200"] = json!({"description": "the chat model", "content": {"application/json": {"schema": {"type": "object", "properties": {
        "object": {"type": "string"}, "data": {"type": "array"}}}}}});
    paths.insert(
        "/openai/v1/models".into(),
        json!({"get": {"tags": ["openai"], "summary": "The model the OpenAI routes serve",
        "security": [{"bearer": []}], "responses": models}}),
    );
    // Cog's prediction API.
    let kinds: Vec<&str> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
    let kind_param = json!({"name": "kind", "in": "path", "required": true, "schema": {"type": "string", "enum": kinds}});
    let pred_id =
        json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}});
    let prediction = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Prediction"}}}});
    let pred_ok = |extra: &[u16]| {
        let mut ok = serde_json::Map::new();
        let mut done = prediction.clone();
        done["description"] = json!("the prediction (finished)");
        let mut running = prediction.clone();
        running["description"] =
            json!("the prediction, still running (Prefer: respond-async, or the wait ran out)");
        ok.insert("200".into(), done);
        ok.insert("202".into(), running);
        responses(Value::Object(ok), extra)
    };
    let pred_body = json!({"required": true, "x-max-body-bytes": crate::startup::RUN_BODY_MAX, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"input": {"type": "object"}, "webhook": {"type": "string", "format": "uri"},
            "webhook_events_filter": {"type": "array", "items": {"type": "string", "enum": ["start", "output", "logs", "completed"]}},
            "output_file_prefix": {"type": "string", "format": "uri"}}}}}});
    paths.insert("/cog/{kind}/predictions".into(), json!({"post": {"tags": ["cog"], "summary": "Create a prediction (Cog's HTTP API)",
        "security": [{"bearer": []}], "parameters": [kind_param], "requestBody": pred_body, "responses": pred_ok(&[400, 413, 422])}}));
    paths.insert("/cog/{kind}/predictions/{id}".into(), json!({
        "put": {"tags": ["cog"], "summary": "Create a prediction with this id (idempotent)", "security": [{"bearer": []}],
            "parameters": [kind_param, pred_id], "requestBody": pred_body, "responses": pred_ok(&[400, 409, 413, 422])},
        "get": {"tags": ["cog"], "summary": "A prediction", "security": [{"bearer": []}], "parameters": [kind_param, pred_id],
            "responses": responses(json!({"200": prediction}), &[])}}));
    paths.insert("/cog/{kind}/predictions/{id}/cancel".into(), json!({"post": {"tags": ["cog"], "summary": "Cancel a prediction",
        "security": [{"bearer": []}], "parameters": [kind_param, pred_id], "responses": responses(json!({"200": prediction}), &[])}}));
    paths.insert("/cog/{kind}/health-check".into(), json!({"get": {"tags": ["cog"], "summary": "STARTING, READY or BUSY",
        "security": [{"bearer": []}], "parameters": [kind_param],
        "responses": responses(json!({"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object", "properties": {
            "status": {"type": "string", "enum": ["STARTING", "READY", "BUSY", "SETUP_FAILED"]}, "setup": {"type": "object"}}}}}}}), &[])}}));
    paths.insert("/metrics".into(), json!({"get": {"tags": ["ops"], "summary": "Prometheus metrics", "security": [{"bearer": []}],
        "responses": responses(json!({"200": {"description": "OK", "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}}}), &[])}}));
    // One input schema per kind, from its contract.
    let input_refs: Vec<Value> = JobKind::ALL
        .iter()
        .map(|k| json!({"$ref": format!("#/components/schemas/{}", input_schema_name(*k))}))
        .collect();
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "companion worker api-shim", "version": env!("CARGO_PKG_VERSION"),
                 "description": "RunPod-serverless-compatible job API. Callbacks are signed per Standard Webhooks."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string"}, "field": {"type": "string"}, "rule": {"type": "string"}}},
                "RunRequest": {"type": "object", "required": ["input"], "properties": {
                    "input": {"oneOf": input_refs, "description": "the input of the kind the route names (chat on the bare routes)"},
                    "webhook": {"type": "string", "format": "uri"},
                    "s3Config": {"type": "object", "required": ["accessId", "accessSecret", "bucketName", "endpointUrl"], "properties": {
                        "accessId": {"type": "string"}, "accessSecret": {"type": "string"}, "bucketName": {"type": "string"},
                        "endpointUrl": {"type": "string", "format": "uri"}}},
                    "policy": {"type": "object", "properties": {
                        "executionTimeout": {"type": "integer", "minimum": 5000, "maximum": 604800000},
                        "ttl": {"type": "integer", "minimum": 10000, "maximum": 604800000},
                        "lowPriority": {"type": "boolean"}}}}},
                "JobAccepted": {"type": "object", "properties": {"id": {"type": "string"}, "status": {"$ref": "#/components/schemas/JobState"}}},
                "JobState": {"type": "string", "enum": ["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]},
                "JobStatus": {"type": "object", "required": ["id", "status"], "properties": {
                    "id": {"type": "string"}, "status": {"$ref": "#/components/schemas/JobState"},
                    "delayTime": {"type": "integer"}, "executionTime": {"type": "integer"},
                    "output": {"type": "object"}, "error": {"type": "string"}, "workerId": {"type": "string"}}},
                "MemoryCondensed": {"type": "object", "required": ["content", "word_count"], "properties": {
                    "content": {"type": "string"}, "word_count": {"type": "integer"},
                    "version": {"type": ["integer", "string"]}}},
                "Purged": {"type": "object", "properties": {"removed": {"type": "integer"}, "status": {"type": "string"}}},
                "OpenAiError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
                "Prediction": {"type": "object", "required": ["id", "status"], "properties": {
                    "id": {"type": "string"}, "input": {"type": "object"}, "output": {}, "logs": {"type": "string"}, "error": {"type": ["string", "null"]},
                    "status": {"type": "string", "enum": ["starting", "processing", "succeeded", "failed", "canceled"]},
                    "created_at": {"type": ["string", "null"]}, "started_at": {"type": ["string", "null"]}, "completed_at": {"type": ["string", "null"]},
                    "metrics": {"type": "object"}}}
            }
        }
    });
    for kind in JobKind::ALL {
        doc["components"]["schemas"][input_schema_name(kind)] = kind.input_schema();
    }
    Json(doc)
}

/// `ok` (the success responses) with the common errors and `extra`.
fn responses(ok: Value, extra: &[u16]) -> Value {
    let mut all = ok.as_object().cloned().unwrap_or_default();
    all.extend(errors(&COMMON));
    all.extend(errors(extra));
    Value::Object(all)
}

/// `chat_stream` → `ChatStreamInput`.
fn input_schema_name(kind: JobKind) -> String {
    let camel: String = kind
        .as_str()
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    format!("{camel}Input")
}
