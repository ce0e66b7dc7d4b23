//! Media storage against a real S3-compatible server (s3s-fs on 127.0.0.1),
//! and a spoken chat reply uploaded with its CDN URL.

mod common;

use axum::http::StatusCode;
use base64::Engine;
use common::*;
use pipeline::media_store::{media_key, MediaStore, S3Settings};

fn settings(s3: &S3Server) -> S3Settings {
    S3Settings {
        endpoint: Some(s3.endpoint.clone()),
        region: "us-east-1".into(),
        bucket: s3.bucket.clone(),
        access_key_id: S3_KEY.into(),
        secret_access_key: S3_SECRET.into(),
        force_path_style: true,
        cdn_base_url: Some("https://cdn.example.com/media".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_puts_objects_under_tenant_date_job_keys() {
    let s3 = S3Server::start().await;
    let store = MediaStore::s3(settings(&s3));
    let at = chrono::DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .to_utc();
    let key = media_key("acme", at, "job-42", "response.wav");
    assert_eq!(key, "acme/2026/11/job-42/response.wav");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let stored = store.put(&key, bytes.clone(), "audio/wav").await.unwrap();
    assert_eq!(
        stored.url,
        "https://cdn.example.com/media/acme/2026/11/job-42/response.wav"
    );
    assert_eq!(s3.get(&key).await, bytes);
    // Without a CDN, the URL is the object's own (path-style).
    let plain = MediaStore::s3(S3Settings {
        cdn_base_url: None,
        ..settings(&s3)
    });
    let stored = plain
        .put("t/x.bin", b"x".to_vec(), "application/octet-stream")
        .await
        .unwrap();
    assert_eq!(stored.url, format!("{}/media/t/x.bin", s3.endpoint));
    // A wrong secret is a clear error, not a silent success.
    let bad = MediaStore::s3(S3Settings {
        secret_access_key: "wrong".into(),
        ..settings(&s3)
    });
    let err = bad
        .put("t/y.bin", b"y".to_vec(), "application/octet-stream")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("t/y.bin"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoken_reply_is_uploaded_and_carries_its_cdn_url() {
    let redis = Redis::start();
    let s3 = S3Server::start().await;
    let shim = Shim::start(&redis, &[]).await;
    let endpoint = s3.endpoint.clone();
    let _worker = start_worker(
        &redis,
        &[
            ("TTS_BACKEND", "espeak-ng"),
            ("S3_BUCKET", "media"),
            ("S3_ENDPOINT", &endpoint),
            ("S3_ACCESS_KEY_ID", S3_KEY),
            ("S3_SECRET_ACCESS_KEY", S3_SECRET),
            ("MEDIA_CDN_BASE_URL", "https://cdn.example.com"),
            ("MEDIA_TENANT", "acme"),
        ],
    );
    let api = Api::new(&shim);
    let (code, body) = api
        .post(
            "/runsync?wait=120000",
            Some(API_KEY),
            seed_file("audio_reply.json").to_string(),
        )
        .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (StatusCode::OK, Some("COMPLETED")),
        "{body}"
    );
    let reply = &body["output"]["messages"][3];
    let url = reply["audio_url"].as_str().unwrap();
    let id = body["id"].as_str().unwrap();
    let key = url.strip_prefix("https://cdn.example.com/").unwrap();
    assert!(
        key.starts_with("acme/") && key.ends_with(&format!("/{id}/response.wav")),
        "{key}"
    );
    let wav = base64::engine::general_purpose::STANDARD
        .decode(body["output"]["audio_files"]["response"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        s3.get(key).await,
        wav,
        "the stored object is the returned audio"
    );
}
