//! The platform API client (seed 000): what a worker fetches when a job
//! carries only ids — the instance snapshot, the activity, the skin, the
//! user's default persona, recent messages — and where it saves messages.
//!
//! - `Authorization: Bearer` with the job's tenant's platform key (never one
//!   key for every tenant: [`PlatformClient::with_key`]), a configurable base
//!   URL and a per-request timeout;
//! - every id is checked ([`ID_RULE`]) and percent-encoded as one path
//!   segment, so no id reaches another path of the platform;
//! - the platform's error bodies are logged, never put in an error a client
//!   reads;
//! - retries (with backoff) on 5xx and connection errors only; a 4xx is the
//!   caller's answer at once;
//! - a short-lived cache keyed by path and the caller's version, so a burst of
//!   jobs of one chat fetches once;
//! - message creation carries an `Idempotency-Key`, so its retries save once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// What an id sent to the platform must be.
pub const ID_RULE: &str = "must be 1 to 128 characters of A-Z, a-z, 0-9, '_' and '-'";
/// [`ID_RULE`] as a JSON Schema pattern.
pub const ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,128}$";

/// Whether `id` may be sent to the platform ([`ID_RULE`]).
pub fn is_valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Everything but RFC 3986's unreserved characters is escaped.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `id` as one path segment, or an error when it breaks [`ID_RULE`].
fn segment(field: &str, id: &str) -> Result<String, PlatformError> {
    if !is_valid_id(id) {
        return Err(PlatformError::BadId {
            field: field.to_string(),
        });
    }
    Ok(percent_encoding::utf8_percent_encode(id, SEGMENT).to_string())
}

/// An activity instance: the character snapshot a chat runs on (seed 000
/// field names; fields the pipeline does not read are kept in `extra`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Instance {
    pub id: Option<String>,
    pub snapshot_title: Option<String>,
    pub snapshot_description: Option<String>,
    pub snapshot_personality: Option<String>,
    pub snapshot_scenario: Option<String>,
    pub snapshot_example_dialogue: Option<String>,
    pub snapshot_first_message: Option<String>,
    pub snapshot_alternate_greetings: Option<Vec<String>>,
    pub snapshot_system_prompt: Option<String>,
    pub snapshot_post_history_instructions: Option<String>,
    pub snapshot_lorebook_ids: Option<Vec<String>>,
    pub assigned_voice_id: Option<String>,
    pub status: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A published activity (the character before it is instanced).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Activity {
    pub id: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
    pub personality: Option<String>,
    pub scenario: Option<String>,
    pub example_dialogue: Option<String>,
    pub first_message: Option<String>,
    pub system_prompt: Option<String>,
    pub post_history_instructions: Option<String>,
    pub anime_skin_id: Option<String>,
    pub realistic_skin_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Persona {
    pub id: Option<String>,
    pub name: Option<String>,
    /// For pronouns.
    pub gender: Option<String>,
    pub description: Option<String>,
    /// anime | realistic
    pub style_preference: Option<String>,
    pub is_default: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Skin {
    pub id: Option<String>,
    pub name: Option<String>,
    pub gender: Option<String>,
    pub style: Option<String>,
    pub cover_photo_url: Option<String>,
    /// Every other field the platform sends (reference images included).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Message {
    pub id: Option<Value>,
    pub role: String,
    pub medium: Option<String>,
    pub content: Option<String>,
    pub created_at: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// e.g. `https://api.example.com`; paths are `/v1/...` under it.
    pub base_url: String,
    pub api_key: String,
    pub timeout: Duration,
    /// Tries after the first, for 5xx and connection errors.
    pub retries: u32,
    pub backoff: Duration,
    pub cache_ttl: Duration,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:3000".into(),
            api_key: String::new(),
            timeout: Duration::from_secs(5),
            retries: 3,
            backoff: Duration::from_millis(100),
            cache_ttl: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The body is for logs only (it is not part of the message).
    #[error("platform {method} {path}: HTTP {status}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{field} {ID_RULE}")]
    BadId { field: String },
    #[error("platform {method} {path}: {message} (after {tries} tries)")]
    Unreachable {
        method: &'static str,
        path: String,
        message: String,
        tries: u32,
    },
    #[error("platform {path}: unexpected answer: {message}")]
    Shape { path: String, message: String },
}

impl PlatformError {
    pub fn status(&self) -> Option<u16> {
        match self {
            PlatformError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A message to save ("Create message").
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    pub role: &'a str,
    pub medium: &'a str,
    pub content: &'a str,
    /// Passed through (XP scoping).
    pub skin_id: Option<&'a str>,
    /// A reply cut short by a disconnect.
    pub partial: bool,
}

#[derive(Clone)]
pub struct PlatformClient {
    http: reqwest::Client,
    cfg: Arc<PlatformConfig>,
    /// The bearer key this client calls with.
    key: Arc<str>,
    cache: Arc<Mutex<HashMap<String, (Instant, Value)>>>,
}

impl PlatformClient {
    pub fn new(cfg: PlatformConfig) -> Result<Self, PlatformError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| PlatformError::Shape {
                path: String::new(),
                message: e.to_string(),
            })?;
        Ok(Self {
            http,
            key: cfg.api_key.as_str().into(),
            cfg: Arc::new(cfg),
            cache: Arc::default(),
        })
    }

    /// The same client calling with `key` (one tenant's platform key); its
    /// cache entries are its own, so no tenant reads another's answers.
    pub fn with_key(&self, key: &str) -> Self {
        Self {
            key: key.into(),
            ..self.clone()
        }
    }

    async fn send(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, PlatformError> {
        let url = format!("{}{path}", self.cfg.base_url.trim_end_matches('/'));
        let mut tries = 0;
        loop {
            tries += 1;
            let mut req = match method {
                "POST" => self.http.post(&url),
                "PUT" => self.http.put(&url),
                _ => self.http.get(&url),
            }
            .bearer_auth(&*self.key);
            if let Some(b) = body {
                req = req.json(b);
            }
            if let Some(k) = idempotency_key {
                req = req.header("Idempotency-Key", k);
            }
            let retryable = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    let text = resp.text().await.unwrap_or_default();
                    if text.trim().is_empty() {
                        return Ok(Value::Null);
                    }
                    return serde_json::from_str(&text).map_err(|e| PlatformError::Shape {
                        path: path.into(),
                        message: e.to_string(),
                    });
                }
                Ok(resp) if resp.status().is_server_error() => {
                    let status = resp.status().as_u16();
                    let body = resp.text().await.unwrap_or_default();
                    tracing::warn!(method, path, status, body = %truncate(&body), "platform error");
                    PlatformError::Status {
                        method,
                        path: path.into(),
                        status,
                        body,
                    }
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body = resp.text().await.unwrap_or_default();
                    tracing::warn!(method, path, status, body = %truncate(&body), "platform refused");
                    return Err(PlatformError::Status {
                        method,
                        path: path.into(),
                        status,
                        body,
                    });
                }
                Err(e) => PlatformError::Unreachable {
                    method,
                    path: path.into(),
                    // Without the URL: the platform's host is the operator's.
                    message: e.without_url().to_string(),
                    tries,
                },
            };
            if tries > self.cfg.retries {
                return Err(match retryable {
                    PlatformError::Unreachable {
                        method,
                        path,
                        message,
                        ..
                    } => PlatformError::Unreachable {
                        method,
                        path,
                        message,
                        tries,
                    },
                    other => other,
                });
            }
            tracing::warn!(path, tries, error = %retryable, "platform request failed; retrying");
            tokio::time::sleep(self.cfg.backoff * 2u32.pow(tries - 1)).await;
        }
    }

    /// GET with the cache: `version` (when the caller knows one) is part of
    /// the key, so a new version is fetched at once.
    pub async fn get(&self, path: &str, version: Option<&str>) -> Result<Value, PlatformError> {
        let key = format!(
            "{}|{path}#{}",
            crate::owner_fingerprint(&self.key),
            version.unwrap_or("")
        );
        if let Some((at, v)) = self.cache.lock().expect("not poisoned").get(&key) {
            if at.elapsed() < self.cfg.cache_ttl {
                return Ok(v.clone());
            }
        }
        let v = self.send("GET", path, None, None).await?;
        let mut cache = self.cache.lock().expect("not poisoned");
        cache.retain(|_, (at, _)| at.elapsed() < self.cfg.cache_ttl);
        cache.insert(key, (Instant::now(), v.clone()));
        Ok(v)
    }

    async fn get_typed<T: DeserializeOwned>(
        &self,
        path: &str,
        version: Option<&str>,
    ) -> Result<T, PlatformError> {
        typed(path, self.get(path, version).await?)
    }

    pub async fn instance(
        &self,
        id: &str,
        version: Option<&str>,
    ) -> Result<Instance, PlatformError> {
        let id = segment("instance_id", id)?;
        self.get_typed(&format!("/v1/instances/{id}"), version)
            .await
    }

    pub async fn activity(
        &self,
        id: &str,
        version: Option<&str>,
    ) -> Result<Activity, PlatformError> {
        let id = segment("activity_id", id)?;
        self.get_typed(&format!("/v1/activities/{id}"), version)
            .await
    }

    pub async fn skin(&self, id: &str, version: Option<&str>) -> Result<Skin, PlatformError> {
        let id = segment("skin_id", id)?;
        self.get_typed(&format!("/v1/skins/{id}"), version).await
    }

    /// The user's default persona (`is_default`), if any.
    pub async fn default_persona(&self) -> Result<Option<Persona>, PlatformError> {
        let list = self.get("/v1/personas", None).await?;
        let personas: Vec<Persona> = typed("/v1/personas", Value::Array(items(&list)))?;
        Ok(personas.into_iter().find(|p| p.is_default == Some(true)))
    }

    /// Up to `limit` most recent messages of an instance, oldest first,
    /// following the cursor pages (newest first on the wire).
    pub async fn recent_messages(
        &self,
        instance_id: &str,
        limit: usize,
    ) -> Result<Vec<Message>, PlatformError> {
        let instance_id = segment("instance_id", instance_id)?;
        let mut out: Vec<Value> = Vec::new();
        let mut cursor: Option<String> = None;
        while out.len() < limit {
            let page_size = (limit - out.len()).min(100).to_string();
            let mut params = vec![("limit", page_size.as_str())];
            if let Some(c) = &cursor {
                params.push(("cursor", c.as_str()));
            }
            let query =
                reqwest::Url::parse_with_params("http://query.invalid/", &params).map_err(|e| {
                    PlatformError::Shape {
                        path: instance_id.clone(),
                        message: e.to_string(),
                    }
                })?;
            let path = format!(
                "/v1/instances/{instance_id}/messages?{}",
                query.query().unwrap_or_default()
            );
            let page = self.send("GET", &path, None, None).await?;
            let batch = items(&page);
            if batch.is_empty() {
                break;
            }
            out.extend(batch);
            cursor = ["next_cursor", "nextCursor", "cursor"]
                .iter()
                .find_map(|k| page[*k].as_str().map(str::to_owned))
                .filter(|c| !c.is_empty());
            if cursor.is_none() {
                break;
            }
        }
        out.truncate(limit);
        out.reverse();
        typed("messages", Value::Array(out))
    }

    /// The memory scratchpad of a companion chat ("Get memory scratchpad"),
    /// or None when there is none (404 or empty).
    pub async fn scratchpad(&self, companion_id: &str) -> Result<Option<String>, PlatformError> {
        segment("companion_id", companion_id)?;
        let query = reqwest::Url::parse_with_params(
            "http://query.invalid/",
            &[("companion_id", companion_id)],
        )
        .map_err(|e| PlatformError::Shape {
            path: companion_id.into(),
            message: e.to_string(),
        })?;
        let path = format!(
            "/v1/memory/scratchpad?{}",
            query.query().unwrap_or_default()
        );
        match self.get(&path, None).await {
            Ok(v) => Ok(v["content"]
                .as_str()
                .map(str::to_owned)
                .filter(|c| !c.trim().is_empty())),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Saves a message ("Create message"); `idempotency_key` makes retries
    /// save it once; `partial` marks a reply cut short by a disconnect.
    pub async fn create_message(
        &self,
        instance_id: &str,
        message: &NewMessage<'_>,
        idempotency_key: &str,
    ) -> Result<Value, PlatformError> {
        let instance_id = segment("instance_id", instance_id)?;
        let mut body =
            json!({"role": message.role, "medium": message.medium, "content": message.content});
        if let Some(s) = message.skin_id {
            body["skin_id"] = json!(s);
        }
        if message.partial {
            body["partial"] = json!(true);
        }
        self.send(
            "POST",
            &format!("/v1/instances/{instance_id}/messages"),
            Some(&body),
            Some(idempotency_key),
        )
        .await
    }
}

/// At most 300 characters of an error body, for a log line.
fn truncate(body: &str) -> &str {
    match body.char_indices().nth(300) {
        Some((i, _)) => &body[..i],
        None => body,
    }
}

fn typed<T: DeserializeOwned>(path: &str, v: Value) -> Result<T, PlatformError> {
    serde_json::from_value(v).map_err(|e| PlatformError::Shape {
        path: path.into(),
        message: e.to_string(),
    })
}

/// The list in a page: `data`, `items` or `messages`, or the page itself.
fn items(page: &Value) -> Vec<Value> {
    if let Some(a) = page.as_array() {
        return a.clone();
    }
    ["data", "items", "messages"]
        .iter()
        .find_map(|k| page[*k].as_array().cloned())
        .unwrap_or_default()
}
