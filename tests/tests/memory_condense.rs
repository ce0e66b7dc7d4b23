//! `POST /v1/memory/condense` and the `memory` job kind, end to end with the
//! real default model.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{json, Value};

fn prompt_tokens_total(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("fleet_worker_totals{stat=\"prompt_tokens\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn condense_keeps_hinted_facts_within_max_words() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(&redis, &[]);
    let api = Api::new(&shim);
    let input = seed_file("memory_condense.json")["input"].clone();
    assert!(
        input["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count()
            >= 600
    );

    let (code, out) = api
        .post("/v1/memory/condense", Some(API_KEY), input.to_string())
        .await;
    assert_eq!(code, StatusCode::OK, "{out}");
    let content = out["content"].as_str().unwrap();
    let words = content.split_whitespace().count();
    assert!(words <= 80, "{words} words: {content}");
    assert_eq!(out["word_count"], words);
    assert_eq!(out["version"], 7);
    for fact in ["Ana", "peanuts", "March 3", "Pixel"] {
        assert!(content.contains(fact), "lost {fact:?}: {content}");
    }
    for small_talk in ["pineapple", "battery"] {
        assert!(
            !content.contains(small_talk),
            "kept small talk {small_talk:?}: {content}"
        );
    }

    // A scratchpad already within the budget comes back as it is, with no
    // model call.
    let metrics = || api.metrics();
    let before = prompt_tokens_total(&metrics().await);
    let tiny = json!({"content": "Sam likes tea. ", "max_words": 80});
    let (code, out) = api
        .post("/v1/memory/condense", Some(API_KEY), tiny.to_string())
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(out, json!({"content": "Sam likes tea.", "word_count": 3}));
    assert_eq!(
        prompt_tokens_total(&metrics().await),
        before,
        "no model call for a tiny scratchpad"
    );

    // The same job through RunPod's routes.
    let (code, body) = api
        .post(
            "/v2/memory/runsync",
            Some(API_KEY),
            json!({"input": tiny}).to_string(),
        )
        .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (StatusCode::OK, Some("COMPLETED")),
        "{body}"
    );
    assert_eq!(body["output"]["word_count"], 3);

    // Broken rules are 422s naming the field; nothing is queued.
    for (bad, field) in [
        (json!({"content": "x", "max_words": 0}), "max_words"),
        (json!({"max_words": 5}), "content"),
        (
            json!({"content": "x", "max_words": 5, "version": [1]}),
            "version",
        ),
        (json!(["x"]), "body"),
    ] {
        let (code, err): (StatusCode, Value) = api
            .post("/v1/memory/condense", Some(API_KEY), bad.to_string())
            .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
        assert_eq!(err["field"], field, "{err}");
        assert!(err["error"].as_str().unwrap().starts_with(field), "{err}");
    }
    let (code, _) = api.post("/v1/memory/condense", Some(API_KEY), "{").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (code, _) = api
        .post("/v1/memory/condense", None, tiny.to_string())
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
}
