//! The security issue's attacks, each against the real binaries and a real
//! redis-server: the refusal or bound, and that nothing was lost (other
//! jobs complete, the worker is still up).

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::platform::{PlatformFixture, INTERNAL_DETAIL, PLATFORM_KEY, PLATFORM_KEY_B};
use common::*;
use serde_json::json;

/// Nothing lost: the worker is up and completes the next job.
async fn worker_goes_on(api: &Api) {
    let (_, done) = api
        .post(
            "/runsync?wait=120000",
            Some(API_KEY),
            seed_file("multiple_options.json").to_string(),
        )
        .await;
    assert_eq!(done["status"], "COMPLETED", "the worker goes on: {done}");
}

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
    platform
        .state
        .b_instances
        .lock()
        .unwrap()
        .push("inst-b".into());
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
    assert_eq!(
        platform.state.hits("other"),
        0,
        "no other platform path was called"
    );
}

/// Webhooks to loopback in six spellings, with the operator's allow list
/// unset: address literals are refused at submission (422 naming
/// `webhook`), a host name that resolves to loopback is refused when the
/// callback is sent (parked at once, not retried); the receiver gets
/// nothing. The parked letter's URL has no credentials or query, and only
/// its tenant sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_non_public_addresses_are_refused_in_every_spelling() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[("OUTBOUND_ALLOW", "")]).await;
    let api = Api::new(&shim);
    let _worker = start_worker(&redis, &[]);
    let receiver = Receiver::start(0).await;
    let port = receiver
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let mut body = seed_file("multiple_options.json");
    // A job that ends at once (its character is missing).
    body["input"]["character"] = json!("github:nobody/missing");
    for host in [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f000001",
        "[::ffff:127.0.0.1]",
    ] {
        let mut b = body.clone();
        b["webhook"] = json!(format!("http://{host}:{port}/cb"));
        let (code, err) = api.post("/run", Some(API_KEY), b.to_string()).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{host}: {err}");
        assert_eq!(err["field"], "webhook", "{host}: {err}");
    }
    let mut b = body.clone();
    b["webhook"] = json!(format!("http://user:pw@localhost:{port}/cb?token=s3cret"));
    let (code, accepted) = api.post("/run", Some(API_KEY), b.to_string()).await;
    assert_eq!(code, StatusCode::OK, "{accepted}");
    let id = accepted["id"].as_str().unwrap().to_string();
    assert_eq!(api.wait_terminal(&id).await["status"], "FAILED");
    let dead = api
        .wait_for_health(Some(API_KEY), |h| h["callbacks"]["deadLettered"] == 1)
        .await;
    let letter = &dead["callbacks"]["recentDeadLetters"][0];
    assert_eq!(letter["job_id"], json!(id));
    assert_eq!(
        letter["reason"], "refused by the outbound guard",
        "{letter}"
    );
    assert_eq!(letter["attempts"], 1, "refused once, never retried");
    assert_eq!(letter["url"], json!(format!("http://localhost:{port}/cb")));
    let text = letter.to_string();
    assert!(!text.contains("pw") && !text.contains("s3cret"), "{text}");
    assert_eq!(
        receiver.got.lock().unwrap().len(),
        0,
        "nothing was delivered"
    );
    let (_, other) = api.get("/health", Some(OTHER_KEY)).await;
    assert_eq!(other["callbacks"]["recentDeadLetters"], json!([]));
    let (_, anonymous) = api.get("/health", None).await;
    assert!(
        anonymous["callbacks"].get("recentDeadLetters").is_none(),
        "{anonymous}"
    );
    worker_goes_on(&api).await;
}

fn tone_wav(seconds: f64) -> String {
    use base64::Engine;
    let rate = 16_000u32;
    let pcm = models::speech::audio::Pcm {
        samples: (0..(rate as f64 * seconds) as usize)
            .map(|i| (i as f32 * 330.0 * std::f32::consts::TAU / rate as f32).sin() * 0.2)
            .collect(),
        sample_rate: rate,
    };
    base64::engine::general_purpose::STANDARD.encode(
        models::speech::audio::encode(&pcm, models::speech::audio::AudioFormat::Wav).unwrap(),
    )
}

/// Thirty messages naming one recording: it is transcribed once. Two
/// recordings over the job's audio budget: the job fails as bad input
/// before any is transcribed, and the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_is_transcribed_once_and_a_job_s_audio_is_bounded() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let _worker = start_worker(
        &redis,
        &[
            ("STT_BACKEND", "whisper"),
            ("MAX_JOB_AUDIO_SECONDS", "5"),
            ("MAX_NEW_TOKENS", "8"),
        ],
    );
    let mut body = seed_file("audio_reply.json");
    body["input"]["generate_audio"] = json!(false);
    let messages = body["input"]["messages"].as_array_mut().unwrap();
    let template = messages.pop().unwrap();
    for i in 0..30 {
        let mut m = template.clone();
        m["id"] = json!(100 + i);
        messages.push(m);
    }
    body["input"]["audio_files"]["msg1"] = json!(tone_wav(3.0));
    let (_, done) = api
        .post("/runsync?wait=180000", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let metrics = api.metrics().await;
    let transcriptions: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("fleet_worker_totals{stat=\"transcriptions\"}"))
        .collect();
    assert_eq!(
        transcriptions,
        ["fleet_worker_totals{stat=\"transcriptions\"} 1"]
    );

    // Two different 3-second recordings: 6 s, over the 5 s budget.
    let messages = body["input"]["messages"].as_array_mut().unwrap();
    messages.truncate(4);
    let mut second = template.clone();
    second["id"] = json!(200);
    second["audio_file_id"] = json!("msg2");
    messages.push(template.clone());
    messages.push(second);
    body["input"]["audio_files"]["msg2"] = json!(tone_wav(3.0));
    let (_, failed) = api
        .post("/runsync?wait=180000", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(failed["status"], "FAILED", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("MAX_JOB_AUDIO_SECONDS"),
        "{failed}"
    );
    let metrics = api.metrics().await;
    assert!(
        metrics.contains("fleet_worker_totals{stat=\"transcriptions\"} 1\n"),
        "nothing more was transcribed"
    );

    // A header bomb: a 3 KB WAV claiming 4,294,967,291 Hz (it took the
    // worker to 23 GB before). It passes the shim's container check (it is
    // a RIFF/WAVE file), fails its job as bad input, and the worker lives.
    let messages = body["input"]["messages"].as_array_mut().unwrap();
    messages.truncate(4);
    messages.push(template.clone());
    body["input"]["audio_files"] = json!({"msg1": bomb_wav(4_294_967_291, 1)});
    let (code, failed) = api
        .post("/runsync?wait=180000", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(code, StatusCode::OK, "{failed}");
    assert_eq!(failed["status"], "FAILED", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("sample rate"),
        "{failed}"
    );
    worker_goes_on(&api).await;
}

/// A WAV of 3,000 bytes of silence whose header claims `rate` Hz and
/// `channels` channels, base64.
fn bomb_wav(rate: u32, channels: u16) -> String {
    use base64::Engine;
    let silence = models::speech::audio::Pcm {
        samples: vec![0.0; 1500],
        sample_rate: 16_000,
    };
    let mut w =
        models::speech::audio::encode(&silence, models::speech::audio::AudioFormat::Wav).unwrap();
    // The canonical header: channels at 22, rate at 24.
    w[22..24].copy_from_slice(&channels.to_le_bytes());
    w[24..28].copy_from_slice(&rate.to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(w)
}

/// Small leaks: `--help` prints no secret from the environment, `workerId`
/// names no host or process, and a failed job's error carries no file path
/// of the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_worker_ids_and_errors_leak_nothing() {
    let secret = "s3cret-value-in-env";
    for (bin, vars) in [
        (
            "api-shim",
            vec!["SHIM_API_KEYS", "WEBHOOK_SECRET", "REDIS_URL"],
        ),
        (
            "worker",
            vec![
                "PLATFORM_API_KEY",
                "PLATFORM_API_KEYS",
                "S3_SECRET_ACCESS_KEY",
                "S3_ACCESS_KEY_ID",
                "REDIS_URL",
            ],
        ),
    ] {
        let mut cmd = std::process::Command::new(binary_path(bin));
        cmd.arg("--help");
        for v in &vars {
            cmd.env(v, format!("t:{secret}"));
        }
        let out = cmd.output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains(vars[0]), "{bin} --help names its settings");
        assert!(
            !help.contains(secret),
            "{bin} --help shows a secret:\n{help}"
        );
    }
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let worker = start_worker(&redis, &[]);
    let mut body = seed_file("multiple_options.json");
    body["input"]["character"] = json!("github:nobody/missing");
    let (_, done) = api
        .post("/runsync?wait=120000", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(done["status"], "FAILED", "{done}");
    let error = done["error"].as_str().unwrap();
    let root = repo_root().display().to_string();
    assert!(
        !error.contains(&root) && !error.contains("card.json"),
        "{error}"
    );
    let worker_id = done["workerId"].as_str().unwrap();
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let pid = worker.child.id().to_string();
    assert!(
        !worker_id.contains(&pid) && (host.trim().is_empty() || !worker_id.contains(host.trim())),
        "{worker_id}"
    );
    worker_goes_on(&api).await;
}

/// Per-key limits: a key over its rate gets 429 with `Retry-After` and the
/// JSON error body (another key is not touched); a key holding its most
/// streams gets 429 for another (and a refused chat stream queues
/// nothing); a stream ends at `STREAM_MAX_SECONDS` while its job goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_stream_count_and_stream_duration_are_bounded_per_key() {
    let redis = Redis::start();
    let shim = Shim::start(
        &redis,
        &[
            ("RATE_LIMIT_PER_S", "1"),
            ("RATE_LIMIT_BURST", "4"),
            ("MAX_STREAMS_PER_KEY", "1"),
            ("STREAM_MAX_SECONDS", "3"),
        ],
    )
    .await;
    let api = Api::new(&shim);
    let _worker = start_worker(
        &redis,
        &[("MAX_NEW_TOKENS", "4000"), ("IGNORE_EOS", "true")],
    );
    // Request 1: a long job.
    let (code, accepted) = api
        .post(
            "/run",
            Some(API_KEY),
            seed_file("multiple_options.json").to_string(),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let id = accepted["id"].as_str().unwrap().to_string();
    // Request 2: its SSE stream, held open. Timed from before the request:
    // the shim's clock for the stream starts after it has the request and
    // before the client has the response.
    let opened = std::time::Instant::now();
    let sse = api.open_sse(&id, API_KEY).await;
    assert_eq!(sse.status().as_u16(), 200);
    let body = tokio::spawn(async move { sse.text().await.unwrap() });
    // Request 3: a second stream of the same key is refused.
    let second = api.open_sse(&id, API_KEY).await;
    assert_eq!(second.status().as_u16(), 429);
    let err: serde_json::Value = second.json().await.unwrap();
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("MAX_STREAMS_PER_KEY"),
        "{err}"
    );
    // Request 4: a chunked chat stream, refused before anything is queued.
    let (code, _) = api
        .post(
            "/v1/instances/inst-1/chat/stream",
            Some(API_KEY),
            json!({"content": "hi"}).to_string(),
        )
        .await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    let (_, health) = api.get("/health", None).await;
    let jobs = &health["jobs"];
    assert_eq!(
        jobs["inQueue"].as_i64().unwrap() + jobs["inProgress"].as_i64().unwrap(),
        1,
        "only the first job exists: {health}"
    );
    // Request 5 and on: past the burst of 4 (refilling at 1 a second),
    // refused with Retry-After within a few more.
    let mut tries = 0;
    let refused = loop {
        tries += 1;
        let resp = api
            .http
            .get(format!("{}/status/{id}", api.base))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        if resp.status().as_u16() == 429 {
            break resp;
        }
        assert_eq!(resp.status().as_u16(), 200);
        assert!(tries < 20, "never limited");
    };
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let err: serde_json::Value = refused.json().await.unwrap();
    assert!(
        err["error"].as_str().unwrap().contains("rate limit"),
        "{err}"
    );
    // Another key has its own budget.
    let (code, _) = api.get("/health", Some(OTHER_KEY)).await;
    assert_eq!(code, StatusCode::OK);
    // The held stream ends by itself at STREAM_MAX_SECONDS, without a
    // `completed` event, while the job goes on.
    let text = tokio::time::timeout(Duration::from_secs(30), body)
        .await
        .expect("the stream ended at its maximum duration")
        .unwrap();
    assert!(opened.elapsed() >= Duration::from_secs(3));
    assert!(!text.contains("event: completed"), "{text}");
    // Waiting as Retry-After says, the key gets through again.
    let status: serde_json::Value = loop {
        let resp = api
            .http
            .get(format!("{}/status/{id}", api.base))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        if resp.status().as_u16() != 429 {
            break resp.json().await.unwrap();
        }
        let wait: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(wait)).await;
    };
    assert_eq!(status["status"], "IN_PROGRESS", "{status}");
    let (code, _) = api.post(&format!("/cancel/{id}"), Some(API_KEY), "").await;
    assert_eq!(code, StatusCode::OK);
}

/// Open streams share one Redis connection (the shim's token hub): twelve
/// SSE streams of a running job add no connection per stream, and each
/// still gets the job's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_share_one_redis_connection() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let _worker = start_worker(&redis, &[("MAX_NEW_TOKENS", "60"), ("IGNORE_EOS", "true")]);
    let clients = || async {
        redis
            .info_number("clients", "connected_clients:")
            .await
            .expect("INFO clients has connected_clients")
    };
    let (_, accepted) = api
        .post(
            "/run",
            Some(API_KEY),
            seed_file("multiple_options.json").to_string(),
        )
        .await;
    let id = accepted["id"].as_str().unwrap().to_string();
    // One stream first, so the hub's connection exists.
    let mut streams = Vec::new();
    streams.push(api.open_sse(&id, API_KEY).await);
    let before = clients().await;
    for _ in 0..11 {
        streams.push(api.open_sse(&id, API_KEY).await);
    }
    let during = clients().await;
    assert!(
        during - before <= 1,
        "12 streams, {before} clients with one open, {during} with all"
    );
    for s in streams {
        assert_eq!(s.status().as_u16(), 200);
        let text = s.text().await.unwrap();
        assert!(text.contains("event: completed"), "{text}");
    }
}
