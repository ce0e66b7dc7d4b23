//! A real HTTP fixture of the platform API (in-process axum, in-memory data,
//! seed 000 field names) for the worker's streamed chat.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

pub const PLATFORM_KEY: &str = "platform-key";

#[derive(Default)]
pub struct Platform {
    /// 500s the instance route answers before it works.
    pub fail_instance: AtomicUsize,
    pub instance_hits: AtomicUsize,
    /// (idempotency key, body) of every saved message.
    pub saved: Mutex<Vec<(Option<String>, Value)>>,
    /// The memory scratchpad of every companion; None answers 404.
    pub scratchpad: Mutex<Option<String>>,
    pub scratchpad_hits: AtomicUsize,
}

pub struct PlatformFixture {
    pub url: String,
    pub state: Arc<Platform>,
}

fn ok(h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {PLATFORM_KEY}"))
}

async fn instance(
    State(p): State<Arc<Platform>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> (StatusCode, Json<Value>) {
    p.instance_hits.fetch_add(1, Ordering::SeqCst);
    if !ok(&h) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "unauthorized"})),
        );
    }
    if p.fail_instance.load(Ordering::SeqCst) > 0 {
        p.fail_instance.fetch_sub(1, Ordering::SeqCst);
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "try again"})),
        );
    }
    (
        StatusCode::OK,
        Json(json!({
            "id": id, "snapshot_title": "Luna",
            "snapshot_description": "{{char}} is a cheerful barista who loves astronomy.",
            "snapshot_personality": "warm, playful", "snapshot_scenario": "{{user}} is texting {{char}} in the evening.",
            "snapshot_first_message": "Hey you!", "snapshot_alternate_greetings": [],
            "snapshot_system_prompt": null, "snapshot_post_history_instructions": null,
            "snapshot_lorebook_ids": [], "assigned_voice_id": null, "status": "active"
        })),
    )
}

async fn messages(State(_p): State<Arc<Platform>>, Path(_id): Path<String>) -> Json<Value> {
    Json(json!({"data": [
        {"id": "m2", "role": "assistant", "medium": "text", "content": "Great! You?"},
        {"id": "m1", "role": "user", "medium": "text", "content": "How are you doing?"}
    ], "next_cursor": null}))
}

async fn save(
    State(p): State<Arc<Platform>>,
    h: HeaderMap,
    Path(_id): Path<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let key = h
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut saved = p.saved.lock().unwrap();
    if key.is_some() && saved.iter().any(|(k, _)| *k == key) {
        return (StatusCode::OK, Json(json!({"id": "duplicate"})));
    }
    saved.push((key, body.clone()));
    (
        StatusCode::CREATED,
        Json(
            json!({"id": format!("msg-{}", saved.len()), "role": body["role"], "content": body["content"]}),
        ),
    )
}

async fn scratchpad(
    State(p): State<Arc<Platform>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    p.scratchpad_hits.fetch_add(1, Ordering::SeqCst);
    match (p.scratchpad.lock().unwrap().clone(), q.get("companion_id")) {
        (Some(content), Some(_)) => (
            StatusCode::OK,
            Json(
                json!({"id": "sp1", "content": content, "version": 4, "type": "companion", "updated_at": "2026-11-20T10:00:00Z"}),
            ),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no scratchpad"})),
        ),
    }
}

async fn personas() -> Json<Value> {
    Json(
        json!({"data": [{"id": "p1", "name": "Sam", "gender": "female", "description": "{{user}} is a nurse.", "is_default": true}]}),
    )
}

impl PlatformFixture {
    pub async fn start() -> Self {
        let state: Arc<Platform> = Arc::default();
        let app = Router::new()
            .route("/v1/instances/{id}", get(instance))
            .route("/v1/instances/{id}/messages", get(messages).post(save))
            .route("/v1/personas", get(personas))
            .route("/v1/memory/scratchpad", get(scratchpad))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, state }
    }

    pub fn saved(&self) -> Vec<(Option<String>, Value)> {
        self.state.saved.lock().unwrap().clone()
    }
}
