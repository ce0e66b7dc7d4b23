//! The video job end to end through the real binaries: shim → Redis →
//! worker (the random-weight Wan 2.2 TI2V-style default of `fetch-models`,
//! and the image default for generated first frames) → an H.264 MP4 and a
//! JPEG poster in a real S3 server (s3s-fs), the user-media record, the
//! signed callback, the video delivered once into the instance, progress on
//! `/stream`; the skin's reference image fetched from a fixture through the
//! outbound guard, a refused address a clear job error; the same seed twice
//! gives the same bytes; each broken rule is a 422 before anything is
//! queued; only video workers take video jobs.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::platform::PlatformFixture;
use common::*;
use serde_json::{json, Value};
use sha2::Digest;

const PLATFORM_KEYS: &str = "tenant-a:platform-key,tenant-b:platform-key-b";

fn video_worker(
    redis: &Redis,
    s3: &S3Server,
    platform: &PlatformFixture,
    kinds: &str,
    allow: &str,
) -> Proc {
    start_worker(
        redis,
        &[
            ("WORKER_KINDS", kinds),
            ("S3_BUCKET", "media"),
            ("S3_ENDPOINT", &s3.endpoint),
            ("S3_ACCESS_KEY_ID", S3_KEY),
            ("S3_SECRET_ACCESS_KEY", S3_SECRET),
            ("MEDIA_CDN_BASE_URL", "https://cdn.example.com"),
            ("PLATFORM_URL", &platform.url),
            ("PLATFORM_API_KEYS", PLATFORM_KEYS),
            ("IMAGE_STEPS", "1"),
            ("VIDEO_STEPS", "2"),
            ("OUTBOUND_ALLOW", allow),
        ],
    )
}

/// Serves one PNG (a smooth picture, 96x80) at `/face.png`, counting
/// requests.
struct ImageFixture {
    url: String,
    hits: Arc<AtomicUsize>,
}

impl ImageFixture {
    async fn start() -> Self {
        let mut png = Vec::new();
        let img = image::RgbImage::from_fn(96, 80, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x + y) % 256) as u8])
        });
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().route(
            "/face.png",
            axum::routing::get(move || {
                let (png, counter) = (png.clone(), counter.clone());
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    ([("content-type", "image/png")], png)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/face.png", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, hits }
    }
}

fn key_of(url: &str) -> String {
    url.strip_prefix("https://cdn.example.com/")
        .unwrap_or_else(|| panic!("{url} is not on the CDN"))
        .to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// ffprobe's view of an MP4: codec, pixel format, size, frames, rate.
fn probe(bytes: &[u8]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.mp4");
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
            "stream=codec_name,pix_fmt,width,height,nb_read_frames,r_frame_rate:format=duration",
            "-of",
            "json",
        ])
        .arg(&path)
        .output()
        .expect("ffprobe (scripts/setup installs ffmpeg)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_from_the_skins_reference_is_encoded_uploaded_recorded_called_back_and_delivered() {
    let redis = Redis::start();
    let s3 = S3Server::start().await;
    let platform = PlatformFixture::start().await;
    let face = ImageFixture::start().await;
    platform.state.skin.lock().unwrap()["reference_images"]["face"] = json!(face.url);
    let hook = Receiver::start(0).await;
    let shim = Shim::start(&redis, &[]).await;
    let _worker = video_worker(&redis, &s3, &platform, "video", "127.0.0.1");
    let api = Api::new(&shim);
    let body = json!({
        "skin_id": "skin-anime", "category": "portrait", "seed": 4321,
        "user_id": "user-9", "activity_instance_id": "inst-1", "activity_id": "act-1",
        "first_frame_source": "reference", "reference_image_type": "face",
        "positive_prompt": "turns and smiles", "num_frames": 9, "fps": 8,
        "width": 64, "height": 64, "webhook": hook.url
    });
    let (code, accepted) = api
        .post("/v1/videos/generate", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{accepted}");
    let job_id = accepted["job_id"].as_str().unwrap().to_string();
    let generation_id = accepted["generation_id"].as_str().unwrap().to_string();

    let done = api.wait_terminal(&job_id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let out = &done["output"];
    assert_eq!(out["generation_id"], generation_id.as_str());
    assert_eq!(out["seed"], 4321);
    assert_eq!(out["first_frame_source"], "reference");
    assert_eq!(
        (out["width"].as_u64(), out["height"].as_u64()),
        (Some(64), Some(64))
    );
    assert_eq!(
        (out["num_frames"].as_u64(), out["fps"].as_u64()),
        (Some(9), Some(8))
    );
    assert!((out["duration_s"].as_f64().unwrap() - 9.0 / 8.0).abs() < 1e-9);
    let prompt = out["prompt"].as_str().unwrap();
    assert!(prompt.starts_with("turns and smiles"), "{prompt:?}");
    // The reference was fetched once, through the guard.
    assert_eq!(face.hits.load(Ordering::SeqCst), 1);

    // The MP4: in the bucket with its content type, read by ffprobe as
    // H.264 / yuv420p with the frames, rate and duration asked for.
    let video = &out["video"];
    assert_eq!(video["contentType"], "video/mp4");
    let key = key_of(video["cdnUrl"].as_str().unwrap());
    assert!(
        key.starts_with(&format!("{TENANT}/")) && key.ends_with(".mp4"),
        "{key}"
    );
    let bytes = s3.get(&key).await;
    assert_eq!(video["bytes"], bytes.len());
    assert_eq!(video["sha256"], hex(&sha2::Sha256::digest(&bytes)).as_str());
    let head = s3
        .client()
        .head_object()
        .bucket(&s3.bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("video/mp4"));
    let p = probe(&bytes);
    let s = &p["streams"][0];
    assert_eq!(
        (s["codec_name"].as_str(), s["pix_fmt"].as_str()),
        (Some("h264"), Some("yuv420p"))
    );
    assert_eq!(
        (s["width"].as_u64(), s["height"].as_u64()),
        (Some(64), Some(64))
    );
    assert_eq!(s["nb_read_frames"], "9");
    assert_eq!(s["r_frame_rate"], "8/1");
    // The poster: a JPEG of the first frame.
    let poster = &out["poster"];
    assert_eq!(poster["contentType"], "image/jpeg");
    let pkey = key_of(poster["cdnUrl"].as_str().unwrap());
    let pbytes = s3.get(&pkey).await;
    assert_eq!(&pbytes[..3], b"\xff\xd8\xff", "a JPEG");
    let head = s3
        .client()
        .head_object()
        .bucket(&s3.bucket)
        .key(&pkey)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("image/jpeg"));

    // The user-media record.
    let media = out["media"].as_array().unwrap();
    assert_eq!(media.len(), 1);
    assert_eq!(media[0]["mediaType"], "video");
    assert_eq!(media[0]["cdnUrl"], video["cdnUrl"]);
    assert_eq!(media[0]["userId"], "user-9");
    assert_eq!(media[0]["relationType"], "generated");
    // Delivered into the instance once.
    let saved = platform.saved();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(saved[0].1["medium"], "video");
    assert_eq!(saved[0].1["content"], video["cdnUrl"]);
    assert_eq!(
        saved[0].0.as_deref(),
        Some(format!("{job_id}:video").as_str())
    );
    // The signed callback carries the same output.
    let got = hook.wait_for(1, Duration::from_secs(30)).await;
    let wh = standardwebhooks::Webhook::new(WEBHOOK_SECRET).unwrap();
    wh.verify(&got[0].body, &got[0].headers)
        .expect("callback signature verifies");
    let cb: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(cb["status"], "COMPLETED");
    assert_eq!(cb["output"], *out);
    // The stream replays the run's progress by stage, then the end.
    let resp = api.open_sse(&job_id, API_KEY).await;
    let text = resp.text().await.unwrap();
    assert!(
        text.contains(r#""stage":"denoise","step":2,"steps":2"#),
        "{text}"
    );
    assert!(
        text.contains(r#""stage":"decode","step":3,"steps":3"#),
        "{text}"
    );
    assert!(text.contains(r#""stage":"encode""#), "{text}");
    assert!(text.contains("event: completed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_first_frame_repeats_by_seed_and_bad_references_are_clear_errors() {
    let redis = Redis::start();
    let s3 = S3Server::start().await;
    let platform = PlatformFixture::start().await;
    let shim = Shim::start(&redis, &[]).await;
    // Only 127.0.0.1 is allowed: 127.0.0.2 stays refused.
    let _worker = video_worker(&redis, &s3, &platform, "video", "127.0.0.1");
    let api = Api::new(&shim);
    let input = json!({
        "category": "selfie", "seed": 77, "positive_prompt": "waving",
        "width": 64, "height": 64, "num_frames": 5, "first_frame_source": "generate",
        "skin": {"style": "realistic"},
        "activity": {"image_gen_character_short_text": "a tall man with a red beard", "video_character_prompt": "the man"}
    });
    let mut shas = Vec::new();
    for _ in 0..2 {
        let (code, queued) = api
            .post(
                "/v2/video/run",
                Some(API_KEY),
                json!({"input": input}).to_string(),
            )
            .await;
        assert_eq!(code, StatusCode::OK, "{queued}");
        let done = api.wait_terminal(queued["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "COMPLETED", "{done}");
        assert_eq!(done["output"]["first_frame_source"], "generate");
        assert_eq!(done["output"]["num_frames"], 5);
        shas.push(done["output"]["video"]["sha256"].clone());
    }
    assert_eq!(shas[0], shas[1], "same seed, same bytes");
    let mut other = input.clone();
    other["seed"] = json!(78);
    let (_, queued) = api
        .post(
            "/v2/video/run",
            Some(API_KEY),
            json!({"input": other}).to_string(),
        )
        .await;
    let done = api.wait_terminal(queued["id"].as_str().unwrap()).await;
    assert_ne!(
        done["output"]["video"]["sha256"], shas[0],
        "another seed, another video"
    );

    // A reference URL at an address the guard refuses: a clear job error,
    // nothing uploaded or delivered.
    let refused = json!({
        "category": "portrait", "positive_prompt": "x", "width": 64, "height": 64, "num_frames": 5,
        "first_frame_source": "reference", "reference_image_type": "face",
        "skin": {"reference_images": {"face": "http://127.0.0.2:9/face.png"}}
    });
    let (_, queued) = api
        .post(
            "/v2/video/run",
            Some(API_KEY),
            json!({"input": refused}).to_string(),
        )
        .await;
    let done = api.wait_terminal(queued["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "FAILED", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(
        error.contains("refused") && error.contains("127.0.0.2"),
        "{error}"
    );
    // A skin without the named reference: the error says what it has.
    let mut missing = refused.clone();
    missing["reference_image_type"] = json!("full_body");
    let (_, queued) = api
        .post(
            "/v2/video/run",
            Some(API_KEY),
            json!({"input": missing}).to_string(),
        )
        .await;
    let done = api.wait_terminal(queued["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "FAILED", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(
        error.contains("full_body") && error.contains("face"),
        "{error}"
    );
    assert!(platform.saved().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_broken_video_rule_is_a_422_naming_its_field_and_nothing_is_queued() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let ok = json!({"category": "selfie", "positive_prompt": "x"});
    let cases: Vec<(&str, Value)> = vec![
        (
            "first_frame_source",
            json!({"first_frame_source": "upload"}),
        ),
        (
            "reference_image_type",
            json!({"reference_image_type": "a/b"}),
        ),
        ("num_frames", json!({"num_frames": 8})),
        ("num_frames", json!({"num_frames": 245})),
        ("fps", json!({"fps": 0})),
        ("width", json!({"width": 1920})),
        ("height", json!({"height": 72})),
        ("num_options", json!({"num_options": 2})),
        ("format", json!({"format": "gif"})),
        ("category", json!({"category": "underwater"})),
        ("steps", json!({"steps": 0})),
        ("colour", json!({"colour": "red"})),
    ];
    for (field, patch) in cases {
        let mut body = ok.clone();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (code, err) = api
            .post("/v1/videos/generate", Some(API_KEY), body.to_string())
            .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {err}");
        assert_eq!(err["field"], field, "{err}");
        assert!(err["rule"].as_str().is_some_and(|r| !r.is_empty()), "{err}");
        let (code, err) = api
            .post(
                "/v2/video/run",
                Some(API_KEY),
                json!({"input": body}).to_string(),
            )
            .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {err}");
        assert_eq!(err["field"], format!("input.{field}"), "{err}");
    }
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cw:job:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_worker_that_takes_video_runs_a_video_job() {
    let redis = Redis::start();
    let s3 = S3Server::start().await;
    let platform = PlatformFixture::start().await;
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let mut image_worker = video_worker(&redis, &s3, &platform, "image", "");
    let (_, video) = api
        .post(
            "/v2/video/run",
            Some(API_KEY),
            json!({"input": {"category": "portrait", "positive_prompt": "x", "width": 64, "height": 64, "num_frames": 5}}).to_string(),
        )
        .await;
    let video_id = video["id"].as_str().unwrap().to_string();
    // An image job queued after it runs on the image worker, which leaves
    // the video job queued.
    let (_, image) = api
        .post(
            "/v2/image/run",
            Some(API_KEY),
            json!({"input": {"category": "portrait", "positive_prompt": "x", "width": 64, "height": 64}}).to_string(),
        )
        .await;
    let done = api.wait_terminal(image["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert_eq!(api.status(&video_id).await["status"], "IN_QUEUE");
    image_worker.terminate();
    let _video_worker = video_worker(&redis, &s3, &platform, "video", "");
    let done = api.wait_terminal(&video_id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert_eq!(done["output"]["video"]["contentType"], "video/mp4");
}
