//! The rest of RunPod's API: a request's `s3Config` sends that job's media
//! to the caller's bucket with the caller's credentials (the worker's own
//! bucket stays empty, the secret never sits in Redis in clear); the
//! callback body carries `/status`'s timings; `/status?wait=` and
//! `/status-sync` hold until the end; the polled `/stream` carries every
//! option.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use serde_json::{json, Value};

const SECRETS_KEY: &str = "c2VjcmV0cy1rZXktb2YtdGhpcnR5LXR3by1ieXRlcyE=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_config_sends_the_media_to_the_callers_bucket_and_the_callback_has_timings() {
    let redis = Redis::start();
    let s3 = S3Server::start().await;
    s3.client()
        .create_bucket()
        .bucket("caller-bucket")
        .send()
        .await
        .unwrap();
    let hook = Receiver::start(0).await;
    let shim = Shim::start(&redis, &[("JOB_SECRETS_KEY", SECRETS_KEY)]).await;
    let _worker = start_worker(
        &redis,
        &[
            ("WORKER_KINDS", "image"),
            ("JOB_SECRETS_KEY", SECRETS_KEY),
            ("S3_BUCKET", "media"),
            ("S3_ENDPOINT", &s3.endpoint),
            ("S3_ACCESS_KEY_ID", S3_KEY),
            ("S3_SECRET_ACCESS_KEY", S3_SECRET),
            ("IMAGE_STEPS", "1"),
        ],
    );
    let api = Api::new(&shim);
    let body = json!({
        "input": {"category": "portrait", "positive_prompt": "x", "width": 64, "height": 64, "seed": 3},
        "webhook": hook.url,
        "s3Config": {"accessId": S3_KEY, "accessSecret": S3_SECRET, "bucketName": "caller-bucket", "endpointUrl": s3.endpoint}
    });
    let (code, queued) = api
        .post("/v2/image/run", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(code, StatusCode::OK, "{queued}");
    let id = queued["id"].as_str().unwrap().to_string();
    // The sealed secret is not in Redis in clear.
    let mut conn = redis.conn().await;
    let fields: Vec<String> = redis::cmd("HVALS")
        .arg(format!("cw:job:{id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(fields.iter().all(|v| !v.contains(S3_SECRET)), "{fields:?}");
    // /status-sync holds until the job ends.
    let (code, done) = api
        .get(
            &format!("/v2/image/status-sync/{id}?wait=120000"),
            Some(API_KEY),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let url = done["output"]["images"][0]["cdnUrl"].as_str().unwrap();
    let prefix = format!("{}/caller-bucket/", s3.endpoint);
    let key = url
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{url} is not in the caller's bucket"));
    let obj = s3
        .client()
        .get_object()
        .bucket("caller-bucket")
        .key(key)
        .send()
        .await
        .unwrap();
    let bytes = obj.body.collect().await.unwrap().into_bytes();
    assert_eq!(&bytes[..4], b"\x89PNG");
    let own = s3
        .client()
        .list_objects_v2()
        .bucket("media")
        .send()
        .await
        .unwrap();
    assert_eq!(own.key_count(), Some(0), "the worker's bucket stays empty");
    // The callback carries what /status says.
    let got = hook.wait_for(1, Duration::from_secs(30)).await;
    let cb: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(cb["status"], "COMPLETED");
    assert!(cb["executionTime"].as_u64().unwrap() > 0, "{cb}");
    assert!(cb["delayTime"].is_u64(), "{cb}");
    assert_eq!(cb["workerId"], done["workerId"]);
    assert_eq!(cb["output"], done["output"]);
    // A bucket the guard refuses, or a bad bucket name, is a 422.
    let mut bad = body.clone();
    bad["s3Config"]["bucketName"] = json!("Bad_Bucket");
    let (code, err) = api
        .post("/v2/image/run", Some(API_KEY), bad.to_string())
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["field"], "s3Config.bucketName");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_waits_and_the_polled_stream_carries_every_option() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(&redis, &[("WORKER_KINDS", "chat")]);
    let api = Api::new(&shim);
    // No secrets key: an s3Config is refused before anything is queued.
    let mut chat = seed_file("multiple_options.json");
    let mut with_s3 = chat.clone();
    with_s3["s3Config"] = json!({"accessId": "a", "accessSecret": "b", "bucketName": "bucket", "endpointUrl": "http://127.0.0.1:9"});
    let (code, err) = api
        .post("/v2/chat/run", Some(API_KEY), with_s3.to_string())
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["field"], "s3Config");
    chat["input"]["num_options"] = json!(3);
    let (_, queued) = api
        .post("/v2/chat/run", Some(API_KEY), chat.to_string())
        .await;
    let id = queued["id"].as_str().unwrap().to_string();
    let mut options = std::collections::BTreeSet::new();
    let mut texts = vec![String::new(); 3];
    loop {
        let (_, polled) = api
            .get(&format!("/v2/chat/stream/{id}?options=all"), Some(API_KEY))
            .await;
        for chunk in polled["stream"].as_array().unwrap() {
            let o = chunk["option"].as_u64().unwrap_or(0) as usize;
            options.insert(o);
            texts[o].push_str(chunk["output"].as_str().unwrap());
        }
        if polled["status"] == "COMPLETED" {
            break;
        }
        // /status?wait= holds until the end or the wait.
        let (_, st) = api
            .get(&format!("/v2/chat/status/{id}?wait=1000"), Some(API_KEY))
            .await;
        assert!(st["status"].is_string());
    }
    let (_, last) = api
        .get(&format!("/v2/chat/stream/{id}?options=all"), Some(API_KEY))
        .await;
    for chunk in last["stream"].as_array().unwrap() {
        let o = chunk["option"].as_u64().unwrap_or(0) as usize;
        options.insert(o);
        texts[o].push_str(chunk["output"].as_str().unwrap());
    }
    assert_eq!(options.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    let (_, done) = api
        .get(&format!("/v2/chat/status/{id}?wait=60000"), Some(API_KEY))
        .await;
    let reply = &done["output"]["messages"][1]["options"];
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(
            reply[i]["text"].as_str().unwrap().trim(),
            t.trim(),
            "option {i}"
        );
    }
    let (code, err) = api
        .get(&format!("/v2/chat/status/{id}?wait=5"), Some(API_KEY))
        .await;
    assert_eq!(
        (code, err["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("wait"))
    );
}

/// `policy.ttl` is the job's whole life, queue and run: a run still going
/// when it runs out ends TIMED_OUT (before its executionTimeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_bounds_the_whole_life_of_a_running_job() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    // A reply that would take far longer than the ttl.
    let _worker = start_worker(
        &redis,
        &[
            ("WORKER_KINDS", "chat"),
            ("MAX_NEW_TOKENS", "4000"),
            ("IGNORE_EOS", "true"),
        ],
    );
    let api = Api::new(&shim);
    let mut chat = seed_file("multiple_options.json");
    chat["policy"] = json!({"ttl": 10_000, "executionTimeout": 600_000});
    let (_, queued) = api
        .post("/v2/chat/run", Some(API_KEY), chat.to_string())
        .await;
    let id = queued["id"].as_str().unwrap().to_string();
    let done = api.wait_terminal(&id).await;
    assert_eq!(done["status"], "TIMED_OUT", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("policy.ttl"),
        "{done}"
    );
    let life = done["delayTime"].as_u64().unwrap() + done["executionTime"].as_u64().unwrap();
    assert!(
        (9_000..30_000).contains(&life),
        "ended {life} ms after submission"
    );
}
