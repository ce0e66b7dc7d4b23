//! Real worker processes killed, stopped and restarted under the shim.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use pipeline::queue::{QueueConfig, RedisQueue};
use pipeline::{JobKind, Policy};
use redis::AsyncCommands;
use serde_json::{json, Value};

async fn attempts(redis: &Redis, id: &str) -> u32 {
    let n: Option<u32> = redis
        .conn()
        .await
        .hget(format!("cw:job:{id}"), "attempts")
        .await
        .unwrap();
    n.unwrap_or(0)
}

async fn submit(api: &Api, body: Value) -> String {
    let (code, accepted) = api.post("/run", Some(API_KEY), body.to_string()).await;
    assert_eq!(code, StatusCode::OK, "{accepted}");
    accepted["id"].as_str().unwrap().to_string()
}

/// Long enough to be killed while running.
const SLOW: &[(&str, &str)] = &[("MAX_NEW_TOKENS", "2000"), ("IGNORE_EOS", "true")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_job_is_rerun_by_another_worker() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let mut a = start_worker(&redis, SLOW);
    let id = submit(&api, seed_file("multiple_options.json")).await;
    let running = api
        .wait_for(&id, Duration::from_secs(60), |s| {
            s["status"] == "IN_PROGRESS"
        })
        .await;
    let first_worker = running["workerId"].as_str().unwrap().to_string();
    a.kill();

    let _b = start_worker(&redis, &[]);
    let done = api.wait_terminal(&id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert_ne!(done["workerId"].as_str().unwrap(), first_worker);
    assert_eq!(attempts(&redis, &id).await, 2);
    assert_eq!(
        done["output"]["messages"][1]["options"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_that_kills_its_worker_every_time_ends_failed() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[("JOB_MAX_ATTEMPTS", "2")]).await;
    let api = Api::new(&shim);
    let id = submit(&api, seed_file("multiple_options.json")).await;
    let mut previous = Value::Null;
    for attempt in 1..=2 {
        let mut w = start_worker(&redis, SLOW);
        // Running, and on the new worker (the killed one's record stays
        // IN_PROGRESS until someone takes it over).
        let s = api
            .wait_for(&id, Duration::from_secs(60), |s| {
                s["status"] == "IN_PROGRESS" && s["workerId"] != previous
            })
            .await;
        previous = s["workerId"].clone();
        assert_eq!(attempts(&redis, &id).await, attempt);
        w.kill();
    }
    let _w = start_worker(&redis, &[]);
    let done = api.wait_terminal(&id).await;
    assert_eq!(done["status"], "FAILED", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("2 attempts"),
        "{done}"
    );
    assert_eq!(
        attempts(&redis, &id).await,
        3,
        "the third pickup only settled it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_once_and_is_never_retried() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    // Bypass the shim's validation, as a buggy producer writing to Redis would.
    let q = RedisQueue::connect(&redis.url, QueueConfig::default())
        .await
        .unwrap();
    let rec = q
        .enqueue_input(
            JobKind::Chat,
            &json!({"messages": [], "character": "github:partner/character", "num_options": 99}),
            None,
            &Policy::default(),
            TENANT,
        )
        .await
        .unwrap();
    let _w = start_worker(&redis, &[]);
    let done = api.wait_terminal(&rec.id).await;
    assert_eq!(done["status"], "FAILED");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid input: input.num_options"),
        "{done}"
    );
    assert_eq!(attempts(&redis, &rec.id).await, 1);
    let (_, health) = api.get("/health", None).await;
    assert_eq!(health["jobs"]["failed"], 1);
    assert_eq!(health["jobs"]["retried"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_queued_job_never_runs_and_worker_restarts_cleanly() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    // No worker yet: the job waits, and is cancelled.
    let cancelled = submit(&api, seed_file("multiple_options.json")).await;
    let (code, body) = api
        .post(&format!("/cancel/{cancelled}"), Some(API_KEY), "")
        .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (StatusCode::OK, Some("CANCELLED"))
    );

    // A worker starts, stops on SIGTERM, and a new one starts right away.
    let mut first = start_worker(&redis, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, h) = api.get("/health", None).await;
        if h["workers"]["idle"].as_u64().unwrap_or(0)
            + h["workers"]["running"].as_u64().unwrap_or(0)
            >= 1
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never registered: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = first.terminate();
    assert!(status.success(), "SIGTERM exit: {status:?}");
    let _second = start_worker(&redis, &[]);
    let served = submit(&api, seed_file("multiple_options.json")).await;
    let done = api.wait_terminal(&served).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");

    let c = api.status(&cancelled).await;
    assert_eq!(c["status"], "CANCELLED");
    assert_eq!(
        attempts(&redis, &cancelled).await,
        0,
        "the cancelled job never ran"
    );

    // Retry is for FAILED / TIMED_OUT only; purge empties this key's queue.
    let (code, _) = api
        .post(&format!("/retry/{cancelled}"), Some(API_KEY), "")
        .await;
    assert_eq!(code, StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_queue_cancels_only_this_keys_queued_jobs() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let body = seed_file("multiple_options.json").to_string();
    let mut mine = vec![];
    for _ in 0..3 {
        let (_, a) = api.post("/v2/chat/run", Some(API_KEY), body.clone()).await;
        mine.push(a["id"].as_str().unwrap().to_string());
    }
    let (_, theirs) = api.post("/run", Some(OTHER_KEY), body.clone()).await;
    let (code, purged) = api.post("/v2/chat/purge-queue", Some(API_KEY), "").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(purged, json!({"removed": 3, "status": "completed"}));
    for id in &mine {
        assert_eq!(api.status(id).await["status"], "CANCELLED");
    }
    let (_, s) = api
        .get(
            &format!("/status/{}", theirs["id"].as_str().unwrap()),
            Some(OTHER_KEY),
        )
        .await;
    assert_eq!(s["status"], "IN_QUEUE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_timeout_ends_a_long_run_as_timed_out() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let _w = start_worker(&redis, SLOW);
    let mut body = seed_file("multiple_options.json");
    body["policy"] = json!({"executionTimeout": 5000});
    let id = submit(&api, body).await;
    let done = api.wait_terminal(&id).await;
    assert_eq!(done["status"], "TIMED_OUT", "{done}");
    assert!(done["error"].as_str().unwrap().contains("executionTimeout"));
    // Stopped at its timeout, not after its 2,000 tokens (minutes here). The
    // upper bound is loose: tests in this file run side by side, several
    // workers share 2 cores, and a starved run notices late.
    let took = done["executionTime"].as_u64().unwrap();
    assert!((5000..60000).contains(&took), "stopped after {took} ms");
}
