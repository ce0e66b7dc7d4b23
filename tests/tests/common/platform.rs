//! The one HTTP fixture of the platform API (in-process axum, in-memory
//! data, seed 000 field names) for every test that needs the platform: the
//! platform client's own tests, streamed chat, memory and the chaos run.
//! Its data are public fields a test may change before or during a run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

pub const PLATFORM_KEY: &str = "platform-key";
/// A second tenant's platform key: it sees only the instances in
/// [`Platform::b_instances`].
pub const PLATFORM_KEY_B: &str = "platform-key-b";
/// In every error body the platform sends: it must never reach a client.
pub const INTERNAL_DETAIL: &str = "db-7.internal.example: row lock on instances";

pub struct Platform {
    /// 500s the instance route answers before it works.
    pub fail_instance: AtomicUsize,
    /// The instance every id answers (its `id` set to the one asked for).
    pub instance: Mutex<Value>,
    /// Instance ids that answer 404.
    pub missing: Mutex<Vec<String>>,
    /// The instances [`PLATFORM_KEY_B`]'s tenant owns.
    pub b_instances: Mutex<Vec<String>>,
    /// An instance's messages, newest first, paged by `cursor`/`limit`.
    pub messages: Mutex<Vec<Value>>,
    pub personas: Mutex<Value>,
    /// (idempotency key, body) of every saved message.
    pub saved: Mutex<Vec<(Option<String>, Value)>>,
    /// While set, a message save never answers (a hung platform).
    pub hang_saves: AtomicBool,
    /// The memory scratchpad of every companion; None answers 404.
    pub scratchpad: Mutex<Option<String>>,
    /// The skin every skin id answers (its `id` set to the one asked for).
    pub skin: Mutex<Value>,
    /// The activity every activity id answers.
    pub activity: Mutex<Value>,
    /// Requests per route: "instance", "messages", "save", "personas",
    /// "scratchpad", "skin", "activity".
    hits: Mutex<HashMap<&'static str, usize>>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            fail_instance: AtomicUsize::new(0),
            instance: Mutex::new(json!({
                "id": "", "snapshot_title": "Luna",
                "snapshot_description": "{{char}} is a cheerful barista who loves astronomy.",
                "snapshot_personality": "warm, playful", "snapshot_scenario": "{{user}} is texting {{char}} in the evening.",
                "snapshot_first_message": "Hey you!", "snapshot_alternate_greetings": [],
                "snapshot_system_prompt": null, "snapshot_post_history_instructions": null,
                "snapshot_lorebook_ids": [], "assigned_voice_id": null, "status": "active"
            })),
            missing: Mutex::default(),
            b_instances: Mutex::default(),
            messages: Mutex::new(vec![
                json!({"id": "m2", "role": "assistant", "medium": "text", "content": "Great! You?"}),
                json!({"id": "m1", "role": "user", "medium": "text", "content": "How are you doing?"}),
            ]),
            personas: Mutex::new(json!([
                {"id": "p1", "name": "Sam", "gender": "female", "description": "{{user}} is a nurse.", "is_default": true}
            ])),
            saved: Mutex::default(),
            hang_saves: AtomicBool::new(false),
            scratchpad: Mutex::default(),
            skin: Mutex::new(json!({
                "id": "", "name": "Luna (anime)", "gender": "female", "style": "anime",
                "cover_photo_url": "https://cdn.example.com/skins/luna.png",
                "reference_images": {"face": "https://cdn.example.com/skins/luna-face.png"},
                "is_published": true
            })),
            activity: Mutex::new(json!({
                "id": "", "title": "Luna",
                "image_gen_character_short_text": "1girl, silver hair, violet eyes",
                "image_gen_character_clothed_text": "barista apron over a white blouse",
                "image_gen_character_naked_text": null,
                "default_outfit_text": "star-print scarf",
                "default_footwear_text": "white sneakers",
                "llm_image_prompt_generation_help_text": "Luna loves astronomy; favour night skies.",
                "anime_skin_id": "skin-anime", "realistic_skin_id": "skin-real"
            })),
            hits: Mutex::default(),
        }
    }
}

impl Platform {
    /// How many requests `route` got.
    pub fn hits(&self, route: &str) -> usize {
        self.hits.lock().unwrap().get(route).copied().unwrap_or(0)
    }

    fn hit(&self, route: &'static str) {
        *self.hits.lock().unwrap().entry(route).or_default() += 1;
    }
}

pub struct PlatformFixture {
    pub url: String,
    pub state: Arc<Platform>,
}

/// The caller's platform key, when it is one of the fixture's.
fn key_of(h: &HeaderMap) -> Option<&'static str> {
    let bearer = h.get("authorization").and_then(|v| v.to_str().ok())?;
    [PLATFORM_KEY, PLATFORM_KEY_B]
        .into_iter()
        .find(|k| bearer == format!("Bearer {k}"))
}

fn authorized(h: &HeaderMap) -> bool {
    key_of(h).is_some()
}

fn error(status: StatusCode, message: &str) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(json!({ "error": message, "detail": INTERNAL_DETAIL })),
    )
}

async fn instance(
    State(p): State<Arc<Platform>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> (StatusCode, Json<Value>) {
    p.hit("instance");
    if !authorized(&h) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    if p.fail_instance.load(Ordering::SeqCst) > 0 {
        p.fail_instance.fetch_sub(1, Ordering::SeqCst);
        return error(StatusCode::INTERNAL_SERVER_ERROR, "try again");
    }
    let foreign =
        key_of(&h) == Some(PLATFORM_KEY_B) && !p.b_instances.lock().unwrap().contains(&id);
    if foreign || p.missing.lock().unwrap().contains(&id) {
        return error(StatusCode::NOT_FOUND, "not found");
    }
    let mut body = p.instance.lock().unwrap().clone();
    body["id"] = json!(id);
    (StatusCode::OK, Json(body))
}

async fn messages(
    State(p): State<Arc<Platform>>,
    Path(_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    p.hit("messages");
    let all = p.messages.lock().unwrap().clone();
    let start: usize = q
        .get("cursor")
        .and_then(|c| c.trim_start_matches("after-").parse().ok())
        .unwrap_or(0);
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(20);
    let page: Vec<Value> = all.iter().skip(start).take(limit).cloned().collect();
    let next = (start + limit < all.len()).then(|| format!("after-{}", start + limit));
    Json(json!({"data": page, "next_cursor": next}))
}

async fn save(
    State(p): State<Arc<Platform>>,
    h: HeaderMap,
    Path(_id): Path<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    p.hit("save");
    if p.hang_saves.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
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
    Query(q): Query<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    p.hit("scratchpad");
    match (p.scratchpad.lock().unwrap().clone(), q.get("companion_id")) {
        (Some(content), Some(_)) => (
            StatusCode::OK,
            Json(
                json!({"id": "sp1", "content": content, "version": 4, "type": "companion", "updated_at": "2026-11-20T10:00:00Z"}),
            ),
        ),
        _ => error(StatusCode::NOT_FOUND, "no scratchpad"),
    }
}

async fn personas(State(p): State<Arc<Platform>>) -> Json<Value> {
    p.hit("personas");
    Json(json!({ "data": p.personas.lock().unwrap().clone() }))
}

async fn skin(State(p): State<Arc<Platform>>, Path(id): Path<String>) -> Json<Value> {
    p.hit("skin");
    let mut body = p.skin.lock().unwrap().clone();
    body["id"] = json!(id);
    Json(body)
}

async fn activity(State(p): State<Arc<Platform>>, Path(id): Path<String>) -> Json<Value> {
    p.hit("activity");
    let mut body = p.activity.lock().unwrap().clone();
    body["id"] = json!(id);
    Json(body)
}

/// Any other path: counted (as "other"), answered 404.
async fn other(State(p): State<Arc<Platform>>) -> (StatusCode, Json<Value>) {
    p.hit("other");
    error(StatusCode::NOT_FOUND, "no such route")
}

impl PlatformFixture {
    pub async fn start() -> Self {
        let state: Arc<Platform> = Arc::default();
        let app = Router::new()
            .route("/v1/instances/{id}", get(instance))
            .route("/v1/instances/{id}/messages", get(messages).post(save))
            .route("/v1/personas", get(personas))
            .route("/v1/memory/scratchpad", get(scratchpad))
            .route("/v1/skins/{id}", get(skin))
            .route("/v1/activities/{id}", get(activity))
            .fallback(other)
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
