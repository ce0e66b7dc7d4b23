//! The platform client against a real HTTP fixture of the platform API
//! (in-process axum, in-memory data with seed 000's field names).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::platform::{Platform, PlatformFixture};
use pipeline::platform::{PlatformClient, PlatformConfig};
use serde_json::json;

/// The fixture with this file's data: one known instance (`inst-1`, with
/// a field the client does not know), seven messages and two personas.
async fn start() -> (String, std::sync::Arc<Platform>) {
    let f = PlatformFixture::start().await;
    *f.state.instance.lock().unwrap() = json!({
        "id": "", "snapshot_title": "Luna", "snapshot_description": "A barista.",
        "snapshot_personality": "warm", "snapshot_scenario": null, "snapshot_first_message": "Hi!",
        "snapshot_alternate_greetings": [], "snapshot_lorebook_ids": [], "assigned_voice_id": "joe",
        "status": "active", "created_at": "2026-11-01T00:00:00Z"
    });
    f.state.missing.lock().unwrap().push("nope".into());
    *f.state.messages.lock().unwrap() = (0..7)
        .rev()
        .map(|i| {
            json!({"id": format!("m{i}"), "role": if i % 2 == 0 { "user" } else { "assistant" },
                   "medium": "text", "content": format!("message {i}"), "created_at": i})
        })
        .collect();
    *f.state.personas.lock().unwrap() = json!([
        {"id": "p1", "name": "Alt", "gender": "male", "is_default": false},
        {"id": "p2", "name": "Sam", "gender": "female", "description": "A nurse.", "style_preference": "anime", "is_default": true}
    ]);
    (f.url, f.state)
}

fn client(base: &str, key: &str) -> PlatformClient {
    PlatformClient::new(PlatformConfig {
        base_url: base.into(),
        api_key: key.into(),
        backoff: Duration::from_millis(10),
        cache_ttl: Duration::from_secs(60),
        ..PlatformConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn retries_5xx_then_succeeds_and_caches_by_version() {
    let (base, f) = start().await;
    f.fail_instance.store(2, Ordering::SeqCst);
    let c = client(&base, "platform-key");
    let inst = c.instance("inst-1", Some("v1")).await.unwrap();
    assert_eq!(inst.snapshot_title.as_deref(), Some("Luna"));
    assert_eq!(inst.assigned_voice_id.as_deref(), Some("joe"));
    assert_eq!(
        inst.extra["created_at"], "2026-11-01T00:00:00Z",
        "other fields are kept"
    );
    assert_eq!(f.hits("instance"), 3, "two 500s, then 200");
    // A burst of jobs of one chat fetches once.
    for _ in 0..5 {
        c.instance("inst-1", Some("v1")).await.unwrap();
    }
    assert_eq!(f.hits("instance"), 3);
    // A new version is fetched at once.
    c.instance("inst-1", Some("v2")).await.unwrap();
    assert_eq!(f.hits("instance"), 4);
    // The snapshot is a character for the prompt.
    let character =
        prompts::RenderedCharacter::from_activity(&serde_json::to_value(&inst).unwrap()).unwrap();
    assert_eq!(
        (character.name.as_str(), character.scenario.as_str()),
        ("Luna", "")
    );
}

#[tokio::test]
async fn four_xx_is_not_retried() {
    let (base, f) = start().await;
    let e = client(&base, "platform-key")
        .instance("nope", None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
    let e = client(&base, "wrong-key")
        .instance("inst-1", None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert_eq!(f.hits("instance"), 2, "one request each");
}

#[tokio::test]
async fn unreachable_platform_is_retried_then_reported() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = client(&format!("http://127.0.0.1:{port}"), "k")
        .instance("inst-1", None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("after 4 tries"), "{e}");
}

#[tokio::test]
async fn recent_messages_follow_the_cursor_oldest_first() {
    let (base, f) = start().await;
    let c = client(&base, "platform-key");
    let msgs = c.recent_messages("inst-1", 5).await.unwrap();
    let contents: Vec<&str> = msgs.iter().map(|m| m.content.as_deref().unwrap()).collect();
    assert_eq!(
        contents,
        [
            "message 2",
            "message 3",
            "message 4",
            "message 5",
            "message 6"
        ]
    );
    let all = c.recent_messages("inst-1", 50).await.unwrap();
    assert_eq!(all.len(), 7);
    assert_eq!(all[0].content.as_deref(), Some("message 0"));
    assert_eq!(all[0].role, "user");
    assert!(f.hits("messages") >= 2);
}

#[tokio::test]
async fn default_persona_and_idempotent_message_save() {
    let (base, f) = start().await;
    let c = client(&base, "platform-key");
    let p = c.default_persona().await.unwrap().unwrap();
    let hello = pipeline::platform::NewMessage {
        role: "assistant",
        medium: "text",
        content: "Hello!",
        skin_id: Some("skin-9"),
        partial: false,
    };
    assert_eq!(
        (p.name.as_deref(), p.gender.as_deref()),
        (Some("Sam"), Some("female"))
    );
    c.create_message("inst-1", &hello, "job-1:assistant")
        .await
        .unwrap();
    c.create_message("inst-1", &hello, "job-1:assistant")
        .await
        .unwrap();
    let saved = f.saved.lock().unwrap().clone();
    assert_eq!(saved.len(), 1, "the same idempotency key saves once");
    assert_eq!(
        saved[0].1,
        json!({"role": "assistant", "medium": "text", "content": "Hello!", "skin_id": "skin-9"})
    );
}
