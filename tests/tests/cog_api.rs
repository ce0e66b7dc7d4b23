//! Cog's prediction API (`/cog/{kind}/…`) through the real binaries: a
//! synchronous prediction, `Prefer: respond-async`, the idempotent `PUT`
//! (the same id twice is one job), the SSE events in order, the webhook
//! filter (`["completed"]` → exactly one signed call with the prediction),
//! cancel and the health check.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use serde_json::{json, Value};

fn chat_input() -> Value {
    seed_file("multiple_options.json")["input"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cog_predictions_sync_async_put_events_webhook_and_cancel() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    // No worker yet: the model is starting.
    let (code, h) = api.get("/cog/chat/health-check", Some(API_KEY)).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(h["status"], "STARTING");
    let _worker = start_worker(&redis, &[("WORKER_KINDS", "chat")]);
    let h = loop {
        let (_, h) = api.get("/cog/chat/health-check", Some(API_KEY)).await;
        if h["status"] != "STARTING" {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(h["status"], "READY");

    // Synchronous by default: the finished prediction.
    let hook = Receiver::start(0).await;
    let body = json!({"input": chat_input(), "webhook": hook.url, "webhook_events_filter": ["completed"]});
    let (code, p) = api
        .post("/cog/chat/predictions", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(code, StatusCode::OK, "{p}");
    assert_eq!(p["status"], "succeeded");
    assert_eq!(p["input"], chat_input());
    assert_eq!(p["output"]["messages"][1]["options"].as_array().unwrap().len(), 3);
    for f in ["created_at", "started_at", "completed_at"] {
        assert!(p[f].as_str().is_some_and(|t| t.ends_with('Z')), "{f}: {p}");
    }
    assert!(p["metrics"]["predict_time"].as_f64().unwrap() > 0.0);
    // The filter ["completed"]: exactly one call, the signed prediction.
    let got = hook.wait_for(1, Duration::from_secs(30)).await;
    let wh = standardwebhooks::Webhook::new(WEBHOOK_SECRET).unwrap();
    wh.verify(&got[0].body, &got[0].headers).expect("signed");
    let cb: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(cb["id"], p["id"]);
    assert_eq!(cb["status"], "succeeded");
    assert_eq!(cb["output"], p["output"]);

    // Prefer: respond-async → 202 starting; then the same by GET.
    let resp = api
        .http
        .post(format!("{}/cog/chat/predictions", api.base))
        .bearer_auth(API_KEY)
        .header("prefer", "respond-async")
        .body(json!({"input": chat_input()}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let p: Value = resp.json().await.unwrap();
    assert_eq!(p["status"], "starting");
    let id = p["id"].as_str().unwrap().to_string();
    let done = loop {
        let (_, p) = api.get(&format!("/cog/chat/predictions/{id}"), Some(API_KEY)).await;
        if p["status"] == "succeeded" {
            break p;
        }
        assert!(["starting", "processing"].contains(&p["status"].as_str().unwrap()), "{p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(done["output"].is_object());

    // PUT is idempotent: the same id twice is one prediction, one job.
    let put = |prefer: bool| {
        let mut r = api
            .http
            .put(format!("{}/cog/chat/predictions/my-pred-1", api.base))
            .bearer_auth(API_KEY)
            .body(json!({"input": chat_input()}).to_string());
        if prefer {
            r = r.header("prefer", "respond-async");
        }
        r.send()
    };
    let first: Value = put(true).await.unwrap().json().await.unwrap();
    let second_resp = put(false).await.unwrap();
    assert_eq!(second_resp.status().as_u16(), 202);
    let second: Value = second_resp.json().await.unwrap();
    assert_eq!(first["id"], "my-pred-1");
    assert_eq!(second["id"], "my-pred-1");
    assert_eq!(first["created_at"], second["created_at"], "one job");
    let (_, health) = api.get("/health", Some(API_KEY)).await;
    let submitted: u64 = ["inQueue", "inProgress", "completed"]
        .iter()
        .map(|s| health["jobs"][s].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(submitted, 3, "sync + async + one PUT: {health}");
    // Another tenant's PUT with the same id is its own prediction.
    let (code, other) = api
        .get("/cog/chat/predictions/my-pred-1", Some(OTHER_KEY))
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{other}");

    // Server-sent events in order: start, output…, metric, completed.
    let resp = api
        .http
        .post(format!("{}/cog/chat/predictions", api.base))
        .bearer_auth(API_KEY)
        .header("accept", "text/event-stream")
        .body(json!({"input": chat_input()}).to_string())
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"start"), "{text}");
    assert_eq!(&names[names.len() - 2..], &["metric", "completed"], "{text}");
    assert!(names[1..names.len() - 2].iter().all(|n| *n == "output") && names.len() > 3, "{names:?}");

    // Cancel a queued prediction (no worker takes memory jobs here).
    let resp = api
        .http
        .put(format!("{}/cog/memory/predictions/to-cancel", api.base))
        .bearer_auth(API_KEY)
        .header("prefer", "respond-async")
        .body(json!({"input": {"content": "a b c", "max_words": 2}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let (code, c) = api
        .post("/cog/memory/predictions/to-cancel/cancel", Some(API_KEY), "")
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(c["status"], "canceled", "{c}");
    // Bad requests are named.
    let (code, err) = api
        .post(
            "/cog/chat/predictions",
            Some(API_KEY),
            json!({"input": chat_input(), "webhook_events_filter": ["sometimes"]}).to_string(),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["field"], "webhook_events_filter");
}
