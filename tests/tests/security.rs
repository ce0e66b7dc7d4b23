//! The security issue's attacks, each against the real binaries and a real
//! redis-server: the refusal or bound, and that nothing was lost (other
//! jobs complete, the worker is still up).

mod common;

use axum::http::StatusCode;
use common::platform::{PlatformFixture, INTERNAL_DETAIL, PLATFORM_KEY, PLATFORM_KEY_B};
use common::*;
use serde_json::json;

fn platform_env(platform: &PlatformFixture) -> Vec<(&str, String)> {
    vec![
        ("PLATFORM_URL", platform.url.clone()),
        (
            "PLATFORM_API_KEYS",
            format!("{TENANT}:{PLATFORM_KEY},{OTHER_TENANT}:{PLATFORM_KEY_B}"),
        ),
    ]
}

/// Instance ids that would name other platform paths are refused with 422
/// (before anything is queued); each tenant calls the platform with its own
/// key, so one tenant cannot chat on another's instance; the platform's
/// error body never reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_ids_are_checked_and_each_tenant_calls_with_its_own_key() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let platform = PlatformFixture::start().await;
    platform.state.b_instances.lock().unwrap().push("inst-b".into());
    let env = platform_env(&platform);
    let env: Vec<(&str, &str)> = env
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain([("MAX_NEW_TOKENS", "8")])
        .collect();
    let _worker = start_worker(&redis, &env);

    // The attack: a path parameter that decodes to another platform path.
    for raw in [
        "..%2F..%2Fv1%2Fadmin%2Fx%3F",
        "inst-1%2F..%2F..%2Fadmin",
        "inst-1%3Fx%3D1",
        "inst-1%20",
    ] {
        let (code, err) = api
            .post(
                &format!("/v1/instances/{raw}/chat/stream"),
                Some(API_KEY),
                json!({"content": "hi"}).to_string(),
            )
            .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{raw}: {err}");
        assert_eq!(err["field"], "instance_id", "{raw}: {err}");
    }
    let (code, err) = api
        .post(
            "/v2/chat_stream/run",
            Some(API_KEY),
            json!({"input": {"instance_id": "../../v1/admin/x?", "content": "hi"}}).to_string(),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["field"], "input.instance_id", "{err}");
    let (_, health) = api.get("/health", None).await;
    assert_eq!(health["jobs"]["inQueue"], 0, "nothing was queued: {health}");

    // Tenant b asks for tenant a's instance: the platform, called with
    // tenant b's key, does not know it.
    let (code, done) = api
        .post(
            "/v2/chat_stream/runsync?wait=120000",
            Some(OTHER_KEY),
            json!({"input": {"instance_id": "inst-1", "content": "hi"}}).to_string(),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(done["status"], "FAILED", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(error.contains("404"), "{error}");
    assert!(
        !error.contains(INTERNAL_DETAIL) && !error.contains("127.0.0.1"),
        "the platform's body and host stay out of client errors: {error}"
    );
    // Each tenant on its own instance: both complete.
    for (key, instance) in [(API_KEY, "inst-1"), (OTHER_KEY, "inst-b")] {
        let (code, done) = api
            .post(
                "/v2/chat_stream/runsync?wait=120000",
                Some(key),
                json!({"input": {"instance_id": instance, "content": "hi"}}).to_string(),
            )
            .await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(done["status"], "COMPLETED", "{instance}: {done}");
    }
    assert_eq!(platform.state.hits("other"), 0, "no other platform path was called");
}
