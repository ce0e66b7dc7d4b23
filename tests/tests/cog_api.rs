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
    let body =
        json!({"input": chat_input(), "webhook": hook.url, "webhook_events_filter": ["completed"]});
    let (code, p) = api
        .post("/cog/chat/predictions", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(code, StatusCode::OK, "{p}");
    assert_eq!(p["status"], "succeeded");
    assert_eq!(p["input"], chat_input());
    assert_eq!(
        p["output"]["messages"][1]["options"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
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
    // Answered at once: queued, or already taken by the idle worker.
    assert!(
        ["starting", "processing"].contains(&p["status"].as_str().unwrap()),
        "{p}"
    );
    let id = p["id"].as_str().unwrap().to_string();
    let done = loop {
        let (_, p) = api
            .get(&format!("/cog/chat/predictions/{id}"), Some(API_KEY))
            .await;
        if p["status"] == "succeeded" {
            break p;
        }
        assert!(
            ["starting", "processing"].contains(&p["status"].as_str().unwrap()),
            "{p}"
        );
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
    assert_eq!(
        &names[names.len() - 2..],
        &["metric", "completed"],
        "{text}"
    );
    assert!(
        names[1..names.len() - 2].iter().all(|n| *n == "output") && names.len() > 3,
        "{names:?}"
    );

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
        .post(
            "/cog/memory/predictions/to-cancel/cancel",
            Some(API_KEY),
            "",
        )
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
    // The ["completed"] prediction's hook got exactly one call in all this.
    assert_eq!(hook.got.lock().unwrap().len(), 1);
}

/// (file name, content type, bytes) of each PUT.
type Uploads = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A PUT receiver: stores each body with its content type, by path.
async fn put_receiver() -> (String, Uploads) {
    use axum::routing::put;
    let got: Uploads = Default::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/uploads/{name}",
        put(
            move |axum::extract::Path(name): axum::extract::Path<String>,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Bytes| {
                let g = g.clone();
                async move {
                    let ct = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    g.lock().unwrap().push((name, ct, body.to_vec()));
                    StatusCode::CREATED
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/uploads/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cog_event_webhooks_and_output_file_prefix() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(
        &redis,
        &[
            ("WORKER_KINDS", "chat,image"),
            ("OUTBOUND_ALLOW", "127.0.0.0/8"),
            ("IMAGE_STEPS", "2"),
            ("MAX_NEW_TOKENS", "40"),
        ],
    );
    let api = Api::new(&shim);
    // start + output + completed: the start first, outputs with the text so
    // far, one final prediction; all signed.
    let hook = Receiver::start(0).await;
    let body = json!({"input": chat_input(), "webhook": hook.url,
                      "webhook_events_filter": ["start", "output", "completed"]});
    let (code, p) = api
        .post("/cog/chat/predictions", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(code, StatusCode::OK, "{p}");
    let wh = standardwebhooks::Webhook::new(WEBHOOK_SECRET).unwrap();
    // Until the final prediction has come (the events may still be coming).
    let mut n = 2;
    let got = loop {
        let got = hook.wait_for(n, Duration::from_secs(30)).await;
        if got
            .iter()
            .any(|r| r.body.windows(11).any(|w| w == b"\"succeeded\""))
        {
            break got;
        }
        n = got.len() + 1;
    };
    let bodies: Vec<Value> = got
        .iter()
        .map(|r| {
            wh.verify(&r.body, &r.headers).expect("signed");
            serde_json::from_slice(&r.body).unwrap()
        })
        .collect();
    assert_eq!(bodies[0]["status"], "processing", "start first: {bodies:?}");
    assert!(bodies[0]["output"].is_null());
    let finals: Vec<&Value> = bodies
        .iter()
        .filter(|b| b["status"] == "succeeded")
        .collect();
    assert_eq!(finals.len(), 1, "{bodies:?}");
    assert_eq!(finals[0]["output"], p["output"]);
    let outputs: Vec<&Value> = bodies
        .iter()
        .filter(|b| b["status"] == "processing" && b["output"].is_string())
        .collect();
    assert!(!outputs.is_empty(), "{bodies:?}");
    let first_option = p["output"]["messages"][1]["options"][0]["text"]
        .as_str()
        .unwrap();
    for o in &outputs {
        let so_far = o["output"].as_str().unwrap();
        assert!(
            !so_far.is_empty() && first_option.starts_with(so_far.trim_end()),
            "{so_far:?} / {first_option:?}"
        );
    }

    // output_file_prefix: the image is PUT there, its URL is the output's.
    let (prefix, uploads) = put_receiver().await;
    let body = json!({"input": {"category": "portrait", "positive_prompt": "x", "width": 64, "height": 64},
                      "output_file_prefix": prefix});
    let (code, p) = api
        .post("/cog/image/predictions", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(code, StatusCode::OK, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    let url = p["output"]["images"][0]["cdnUrl"].as_str().unwrap();
    assert_eq!(url, format!("{prefix}image-0.png"));
    let got = uploads.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.as_str(), got[0].1.as_str()),
        ("image-0.png", "image/png")
    );
    assert_eq!(&got[0].2[..4], b"\x89PNG");
    // A prefix the shim's guard refuses (not loopback-allowed there) is a 422
    // — the shim here allows 127.0.0.0/8, so a bad scheme shows the rule.
    let (code, err) = api
        .post(
            "/cog/image/predictions",
            Some(API_KEY),
            json!({"input": {"category": "portrait", "positive_prompt": "x"}, "output_file_prefix": "ftp://127.0.0.1/x/"}).to_string(),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["field"], "output_file_prefix");
}
