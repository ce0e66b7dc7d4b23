//! The image job end to end through the real binaries: shim → Redis →
//! worker (the random-weight Stable Diffusion default of `fetch-models`) →
//! PNGs in a real S3 server (s3s-fs), user-media records, the signed
//! callback, the image delivered once into the instance, progress on
//! `/status` and `/stream`; the same seed twice gives the same bytes; each
//! broken rule is a 422 before anything is queued; only image workers take
//! image jobs.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::platform::PlatformFixture;
use common::*;
use serde_json::{json, Value};
use sha2::Digest;

const PLATFORM_KEYS: &str = "tenant-a:platform-key,tenant-b:platform-key-b";

fn image_worker(redis: &Redis, s3: &S3Server, platform: &PlatformFixture, kinds: &str) -> Proc {
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
            ("IMAGE_STEPS", "2"),
        ],
    )
}

/// The S3 key of a CDN URL.
fn key_of(url: &str) -> String {
    url.strip_prefix("https://cdn.example.com/")
        .unwrap_or_else(|| panic!("{url} is not on the CDN"))
        .to_string()
}

fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_by_skin_and_category_is_uploaded_recorded_called_back_and_delivered() {
    let redis = Redis::start();
    let s3 = S3Server::start().await;
    let platform = PlatformFixture::start().await;
    let hook = Receiver::start(0).await;
    let shim = Shim::start(&redis, &[]).await;
    let _worker = image_worker(&redis, &s3, &platform, "image");
    let api = Api::new(&shim);
    let body = json!({
        "skin_id": "skin-anime", "category": "portrait", "seed": 1234,
        "user_id": "user-9", "activity_instance_id": "inst-1", "activity_id": "act-1",
        "positive_prompt": "smiling under the stars", "negative_prompt": "blurry",
        "width": 128, "height": 96, "num_options": 2, "webhook": hook.url
    });
    let (code, accepted) = api
        .post("/v1/images/generate", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{accepted}");
    let job_id = accepted["job_id"].as_str().unwrap().to_string();
    let generation_id = accepted["generation_id"].as_str().unwrap().to_string();
    assert!(!generation_id.is_empty() && generation_id != job_id);

    let done = api.wait_terminal(&job_id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let out = &done["output"];
    assert_eq!(out["generation_id"], generation_id.as_str());
    assert_eq!(out["seed"], 1234);
    assert_eq!(
        (out["width"].as_u64(), out["height"].as_u64()),
        (Some(128), Some(96))
    );
    // The prompt: the skin's style, the category's framing, the activity's
    // image fields and the job's own words.
    let prompt = out["prompt"].as_str().unwrap();
    for part in [
        "smiling under the stars",
        "anime style",
        "portrait, head and shoulders",
        "silver hair",
    ] {
        assert!(prompt.contains(part), "{part:?} missing from {prompt:?}");
    }
    assert!(out["negative_prompt"]
        .as_str()
        .unwrap()
        .starts_with("blurry, "));
    let images = out["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let mut shas = Vec::new();
    for (i, img) in images.iter().enumerate() {
        assert_eq!(img["seed"], 1234 + i as u64);
        assert_eq!(img["contentType"], "image/png");
        let key = key_of(img["cdnUrl"].as_str().unwrap());
        assert!(key.starts_with(&format!("{TENANT}/")), "{key}");
        let bytes = s3.get(&key).await;
        assert_eq!(png_size(&bytes), (128, 96));
        assert_eq!(img["bytes"], bytes.len());
        let sha = hex(&sha2::Sha256::digest(&bytes));
        assert_eq!(img["sha256"], sha.as_str());
        let head = s3
            .client()
            .head_object()
            .bucket(&s3.bucket)
            .key(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_type(), Some("image/png"));
        shas.push(sha);
    }
    assert_ne!(shas[0], shas[1], "two options, two images");
    // The user-media records (seed 000's shape).
    let media = out["media"].as_array().unwrap();
    assert_eq!(media.len(), 2);
    for (m, img) in media.iter().zip(images) {
        assert_eq!(m["mediaType"], "image");
        assert_eq!(m["cdnUrl"], img["cdnUrl"]);
        assert_eq!(m["relationType"], "generated");
        assert_eq!(m["isFavorite"], false);
        assert_eq!(m["userId"], "user-9");
        for f in ["id", "mediaId", "createdAt"] {
            assert!(m[f].as_str().is_some_and(|s| !s.is_empty()), "{f} in {m}");
        }
    }
    // Context came from the platform: skin and activity, once each.
    assert_eq!(platform.state.hits("skin"), 1);
    assert_eq!(platform.state.hits("activity"), 1);
    // The image was delivered into the instance once.
    let saved = platform.saved();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(saved[0].1["medium"], "image");
    assert_eq!(saved[0].1["content"], images[0]["cdnUrl"]);
    assert_eq!(saved[0].1["skin_id"], "skin-anime");
    assert_eq!(out["message"]["id"], "msg-1");
    // The signed callback carries the same output.
    let got = hook.wait_for(1, Duration::from_secs(30)).await;
    let wh = standardwebhooks::Webhook::new(WEBHOOK_SECRET).unwrap();
    wh.verify(&got[0].body, &got[0].headers)
        .expect("callback signature verifies");
    let cb: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(cb["status"], "COMPLETED");
    assert_eq!(cb["output"], *out);
    // The stream replays the run's progress, then the end.
    let resp = api.open_sse(&job_id, API_KEY).await;
    let text = resp.text().await.unwrap();
    assert!(text.contains("event: progress"), "{text}");
    assert!(text.contains(r#"{"step":2,"steps":2}"#), "{text}");
    assert!(text.contains("event: completed"), "{text}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_bytes_and_generation_mode_writes_the_prompt() {
    let redis = Redis::start();
    let s3 = S3Server::start().await;
    let platform = PlatformFixture::start().await;
    let shim = Shim::start(&redis, &[]).await;
    let _worker = image_worker(&redis, &s3, &platform, "image");
    let api = Api::new(&shim);
    // RunPod's form on /v2/image/run, inline context (nothing fetched).
    let input = json!({
        "category": "selfie", "seed": 77, "positive_prompt": "waving",
        "width": 64, "height": 64, "format": "png",
        "skin": {"style": "realistic"},
        "activity": {"image_gen_character_short_text": "a tall man with a red beard"}
    });
    let mut shas = Vec::new();
    for _ in 0..2 {
        let (code, queued) = api
            .post(
                "/v2/image/run",
                Some(API_KEY),
                json!({"input": input}).to_string(),
            )
            .await;
        assert_eq!(code, StatusCode::OK, "{queued}");
        let done = api.wait_terminal(queued["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "COMPLETED", "{done}");
        assert!(done["output"]["prompt"]
            .as_str()
            .unwrap()
            .contains("photorealistic"));
        shas.push(done["output"]["images"][0]["sha256"].clone());
    }
    assert_eq!(shas[0], shas[1], "same seed, same bytes");
    let mut other = input.clone();
    other["seed"] = json!(78);
    let (_, queued) = api
        .post(
            "/v2/image/run",
            Some(API_KEY),
            json!({"input": other}).to_string(),
        )
        .await;
    let done = api.wait_terminal(queued["id"].as_str().unwrap()).await;
    assert_ne!(
        done["output"]["images"][0]["sha256"], shas[0],
        "another seed, another image"
    );
    assert_eq!(
        platform.state.hits("skin") + platform.state.hits("activity"),
        0
    );

    // generation_mode: the text model writes the scene from the chat.
    let input = json!({
        "category": "location", "generation_mode": "chat", "seed": 5,
        "width": 64, "height": 64,
        "activity": {"image_gen_character_short_text": "a young woman with short black hair"},
        "messages": ["user: Let's go to the beach tonight!", "assistant: Yes! I'll bring a blanket and we can watch the waves."]
    });
    let (code, queued) = api
        .post(
            "/v2/image/run",
            Some(API_KEY),
            json!({"input": input}).to_string(),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{queued}");
    let done = api.wait_terminal(queued["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let prompt = done["output"]["prompt"].as_str().unwrap();
    let base = prompts::media::image_prompt(
        &prompts::media::ImageCharacter {
            short_text: "a young woman with short black hair".into(),
            ..Default::default()
        },
        prompts::media::Style::Anime,
        prompts::media::category("location").unwrap(),
        prompts::media::NsfwLevel::Safe,
        5,
    );
    assert!(prompt.starts_with(&base.positive), "{prompt:?}");
    assert!(
        prompt.len() > base.positive.len() + 3,
        "the model added nothing: {prompt:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_broken_rule_is_a_422_naming_its_field_and_nothing_is_queued() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let ok = json!({"category": "selfie", "positive_prompt": "x"});
    let cases: Vec<(&str, Value)> = vec![
        ("category", json!({"positive_prompt": "x"})),
        (
            "category",
            json!({"category": "underwater", "positive_prompt": "x"}),
        ),
        ("positive_prompt", json!({"positive_prompt": null})),
        ("width", json!({"width": 100})),
        ("height", json!({"height": 4096})),
        ("num_options", json!({"num_options": 0})),
        ("steps", json!({"steps": 101})),
        ("guidance_scale", json!({"guidance_scale": -1})),
        ("format", json!({"format": "gif"})),
        ("nsfw_level", json!({"nsfw_level": "extreme"})),
        ("seed", json!({"seed": "abc"})),
        ("skin_id", json!({"skin_id": "a/b"})),
        ("user_id", json!({"user_id": ""})),
        (
            "generation_mode",
            json!({"generation_mode": "chat", "positive_prompt": null}),
        ),
        (
            "negative_prompt",
            json!({"negative_prompt": "n".repeat(2001)}),
        ),
        ("colour", json!({"colour": "red"})),
        ("webhook", json!({"webhook": "not a url"})),
    ];
    for (field, patch) in cases {
        let mut body = ok.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                body.as_object_mut().unwrap().remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        if field == "category" && !patch.as_object().unwrap().contains_key("category") {
            body.as_object_mut().unwrap().remove("category");
        }
        let (code, err) = api
            .post("/v1/images/generate", Some(API_KEY), body.to_string())
            .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {err}");
        assert_eq!(err["field"], field, "{err}");
        assert!(err["rule"].as_str().is_some_and(|r| !r.is_empty()), "{err}");
        // The same input through RunPod's form names it under input.
        if field != "webhook" {
            let (code, err) = api
                .post(
                    "/v2/image/run",
                    Some(API_KEY),
                    json!({"input": body}).to_string(),
                )
                .await;
            assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {err}");
            assert_eq!(err["field"], format!("input.{field}"), "{err}");
        }
    }
    let (code, err) = api.post("/v1/images/generate", Some(API_KEY), "[1]").await;
    assert_eq!(
        (code, err["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("body"))
    );
    // Nothing reached the queue.
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cw:job:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_worker_that_takes_images_runs_an_image_job() {
    let redis = Redis::start();
    let s3 = S3Server::start().await;
    let platform = PlatformFixture::start().await;
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let mut text_worker = image_worker(&redis, &s3, &platform, "chat");
    let (_, image) = api
        .post(
            "/v2/image/run",
            Some(API_KEY),
            json!({"input": {"category": "portrait", "positive_prompt": "x", "width": 64, "height": 64}}).to_string(),
        )
        .await;
    let image_id = image["id"].as_str().unwrap().to_string();
    // A chat job queued after the image job runs to the end on the text
    // worker, which leaves the image job queued.
    let chat = seed_file("multiple_options.json");
    let (_, queued) = api
        .post("/v2/chat/run", Some(API_KEY), chat.to_string())
        .await;
    let done = api.wait_terminal(queued["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let st = api.status(&image_id).await;
    assert_eq!(st["status"], "IN_QUEUE", "{st}");
    text_worker.terminate();
    let _image_worker = image_worker(&redis, &s3, &platform, "image");
    let done = api.wait_terminal(&image_id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
}
