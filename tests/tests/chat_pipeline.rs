//! End to end: shim → Redis → worker (real SmolLM2 model) → result and signed
//! callback, with the seed 003 examples.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine;
use common::*;
use serde_json::{json, Value};

fn verify_signature(r: &Received) {
    let wh = standardwebhooks::Webhook::new(WEBHOOK_SECRET).unwrap();
    wh.verify(&r.body, &r.headers)
        .expect("callback signature verifies");
    let sig = r.headers["webhook-signature"].to_str().unwrap();
    assert!(sig.starts_with("v1,"), "{sig}");
}

/// Sends only the head of a POST that announces `length` bytes, and reads
/// the answer the server gives without waiting for the body.
async fn raw_post_head(base: &str, path: &str, length: usize) -> (StatusCode, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len || n == 0 {
                    let code: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
                    let body: Value =
                        serde_json::from_str(&body[..len.min(body.len())]).unwrap_or(Value::Null);
                    return (StatusCode::from_u16(code).unwrap(), body);
                }
            }
            assert!(n > 0, "the connection closed without an answer");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answered before the body was sent")
}

fn with_webhook(mut body: Value, url: &str) -> String {
    body["webhook"] = json!(url);
    body.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_options_seed_round_trips_with_signed_callback() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(&redis, &[]);
    let receiver = Receiver::start(0).await;
    let api = Api::new(&shim);

    let (code, accepted) = api
        .post(
            "/run",
            Some(API_KEY),
            with_webhook(seed_file("multiple_options.json"), &receiver.url),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{accepted}");
    assert_eq!(accepted["status"], "IN_QUEUE");
    let id = accepted["id"].as_str().unwrap().to_string();

    let got = receiver.wait_for(1, Duration::from_secs(180)).await;
    verify_signature(&got[0]);
    let callback: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(callback["id"], id.as_str());
    assert_eq!(callback["status"], "COMPLETED");
    let keys: Vec<&str> = callback
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    // What /status answers: the timings and the worker, then the output.
    assert_eq!(
        keys,
        [
            "id",
            "status",
            "delayTime",
            "executionTime",
            "workerId",
            "output"
        ]
    );

    let output = &callback["output"];
    let messages = output["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(
        messages[0],
        json!({"id": 1, "type": "text", "text": "I'm feeling adventurous!"})
    );
    let reply = messages[1].as_object().unwrap();
    assert_eq!(
        reply.keys().map(String::as_str).collect::<Vec<_>>(),
        ["type", "text", "options"]
    );
    assert_eq!(reply["type"], "text");
    let options = reply["options"].as_array().unwrap();
    assert_eq!(options.len(), 3);
    for o in options {
        assert_eq!(o["type"], "text");
        assert!(
            !o["text"].as_str().unwrap().trim().is_empty(),
            "empty option: {output}"
        );
    }
    assert_eq!(reply["text"], options[0]["text"]);
    let distinct: std::collections::HashSet<&str> = options
        .iter()
        .map(|o| o["text"].as_str().unwrap())
        .collect();
    assert!(distinct.len() >= 2, "options should differ: {output}");
    assert_eq!(output["audio_files"], json!({}));

    let status = api.status(&id).await;
    assert_eq!(status["status"], "COMPLETED");
    assert_eq!(
        &status["output"], output,
        "status and callback carry the same output"
    );
    assert!(status["delayTime"].as_u64().is_some());
    assert!(status["executionTime"].as_u64().unwrap() > 0);

    // Prometheus: job states and the fleet's model totals.
    let metrics = api.metrics().await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert_eq!(value("shim_jobs{state=\"COMPLETED\"}"), 1.0);
    assert_eq!(value("fleet_worker_totals{stat=\"COMPLETED\"}"), 1.0);
    assert!(value("fleet_worker_totals{stat=\"generated_tokens\"}") >= 3.0);
    assert!(value("fleet_worker_totals{stat=\"prompt_tokens\"}") > 50.0);
}

/// A `/runsync` held until its job ends counts in `shim_waiting_requests`
/// while it waits and no longer once it is answered (no worker: the job
/// stays queued and the wait runs out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_counts_as_waiting_until_it_is_answered() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let waiting = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("shim_waiting_requests "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("shim_waiting_requests missing:\n{metrics}"))
    };
    assert_eq!(waiting(&api.metrics().await), 0);
    let held = {
        let api = Api::new(&shim);
        tokio::spawn(async move {
            api.post(
                "/runsync?wait=3000",
                Some(API_KEY),
                seed_file("multiple_options.json").to_string(),
            )
            .await
        })
    };
    // Within its wait the request shows as waiting.
    let deadline = std::time::Instant::now() + Duration::from_millis(2500);
    loop {
        let n = waiting(&api.metrics().await);
        if n == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && !held.is_finished(),
            "the held request never counted as waiting ({n})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, body) = held.await.unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "IN_QUEUE", "{body}");
    assert_eq!(waiting(&api.metrics().await), 0);
}

/// Parses a PCM WAV: (sample rate, channels, bits, data bytes).
fn wav_facts(wav: &[u8]) -> (u32, u16, u16, usize) {
    assert_eq!(&wav[0..4], b"RIFF");
    assert_eq!(&wav[8..12], b"WAVE");
    let mut pos = 12;
    let mut fmt = None;
    while pos + 8 <= wav.len() {
        let id = &wav[pos..pos + 4];
        let size = u32::from_le_bytes(wav[pos + 4..pos + 8].try_into().unwrap()) as usize;
        if id == b"fmt " {
            let f = &wav[pos + 8..];
            fmt = Some((
                u16::from_le_bytes([f[2], f[3]]),
                u32::from_le_bytes(f[4..8].try_into().unwrap()),
                u16::from_le_bytes([f[14], f[15]]),
            ));
        }
        if id == b"data" {
            let (ch, rate, bits) = fmt.expect("fmt chunk before data");
            assert_eq!(size, wav.len() - pos - 8, "data size matches the file");
            return (rate, ch, bits, size);
        }
        pos += 8 + size;
    }
    panic!("no data chunk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_seed_round_trips_with_spoken_reply() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(
        &redis,
        &[("TTS_BACKEND", "piper"), ("TTS_DETERMINISTIC", "true")],
    );
    let api = Api::new(&shim);

    let (code, body) = api
        .post(
            "/runsync?wait=120000",
            Some(API_KEY),
            seed_file("audio_reply.json").to_string(),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "COMPLETED", "{body}");
    let output = &body["output"];
    let messages = output["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4);
    assert_eq!(
        messages[0],
        json!({"id": 4, "type": "text", "text": "Me too!!"})
    );
    assert_eq!(
        messages[1],
        json!({"id": 5, "type": "text", "text": "What are you doing tonight?"})
    );
    assert_eq!(
        messages[2],
        json!({"id": 6, "type": "audio", "text": "", "audio_file_id": "msg1"})
    );
    let reply = messages[3].as_object().unwrap();
    assert_eq!(
        reply.keys().map(String::as_str).collect::<Vec<_>>(),
        ["type", "text", "audio_file_id", "options"]
    );
    assert_eq!(reply["type"], "audio");
    assert_eq!(reply["audio_file_id"], "response");
    let text = reply["text"].as_str().unwrap();
    assert!(!text.trim().is_empty());
    // Seed 003's option shape, plus why it ended (an extra key).
    assert_eq!(reply["options"].as_array().unwrap().len(), 1);
    assert_eq!(reply["options"][0]["type"], "audio");
    assert_eq!(reply["options"][0]["text"], text);
    assert!(
        ["stop", "length-trimmed", "length"]
            .contains(&reply["options"][0]["finish_reason"].as_str().unwrap()),
        "{reply:?}"
    );

    let files = output["audio_files"].as_object().unwrap();
    assert_eq!(files.keys().collect::<Vec<_>>(), ["response"]);
    let wav = base64::engine::general_purpose::STANDARD
        .decode(files["response"].as_str().unwrap())
        .expect("audio is base64");
    let (rate, channels, bits, data) = wav_facts(&wav);
    assert_eq!((channels, bits), (1, 16));
    let seconds = data as f64 / (rate as f64 * 2.0);
    let words = text.split_whitespace().count() as f64;
    assert!(
        seconds > 0.15 * words && seconds < 1.5 * words + 2.0,
        "{seconds:.2} s of audio for {words} words: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_4xx_and_nothing_is_queued() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let seed = seed_file("multiple_options.json");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = seed.clone();
        f(&mut v);
        v.to_string()
    };
    let cases: Vec<(String, StatusCode, &str)> = vec![
        ("{\"input\": ".into(), StatusCode::BAD_REQUEST, "body"),
        ("[1,2]".into(), StatusCode::UNPROCESSABLE_ENTITY, "body"),
        ("{}".into(), StatusCode::UNPROCESSABLE_ENTITY, "input"),
        (
            with(&|v| v["input"]["num_options"] = json!(9)),
            StatusCode::UNPROCESSABLE_ENTITY,
            "input.num_options",
        ),
        (
            with(&|v| v["input"]["generate_audio"] = json!(true)),
            StatusCode::UNPROCESSABLE_ENTITY,
            "input.generate_audio",
        ),
        (
            with(&|v| v["input"]["character"] = json!("partner/character")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "input.character",
        ),
        (
            with(&|v| {
                v["input"]["messages"][1] =
                    json!({"id": 2, "type": "audio", "audio_file_id": "x", "is_processed": false})
            }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "input.messages[1].audio_file_id",
        ),
        (
            with(&|v| {
                v["input"]["messages"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("text");
            }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "input.messages[1].text",
        ),
        (
            with(&|v| {
                v["input"]
                    .as_object_mut()
                    .unwrap()
                    .remove("messages")
                    .map(|_| ())
                    .unwrap()
            }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "input.messages",
        ),
        (
            with(&|v| v["policy"] = json!({"ttl": 1})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "policy.ttl",
        ),
        (
            with(&|v| v["webhook"] = json!("not a url")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "webhook",
        ),
    ];
    for (body, want, field) in cases {
        let (code, err) = api.post("/run", Some(API_KEY), body.clone()).await;
        assert_eq!(code, want, "{body} -> {err}");
        assert_eq!(err["field"], field, "{body} -> {err}");
        assert!(err["rule"].as_str().is_some_and(|r| !r.is_empty()), "{err}");
        assert!(err["error"].as_str().unwrap().starts_with(field), "{err}");
    }
    let (code, err) = api.post("/run", None, seed.to_string()).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert!(err["error"].as_str().unwrap().contains("Bearer"));
    let (code, _) = api.post("/run", Some("wrong"), seed.to_string()).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, err) = api
        .post("/v2/nope/run", Some(API_KEY), seed.to_string())
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(err["error"].as_str().unwrap().contains("chat"), "{err}");
    // An oversized body is refused from its Content-Length, before a byte
    // of it is read (so the client sends only the head: a client still
    // writing when the server closes may see a broken pipe instead).
    let (code, err) = raw_post_head(&api.base, "/run", 11 * 1024 * 1024).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    assert_eq!(err["field"], "body");

    // Nothing above was queued.
    let (_, health) = api.get("/health", None).await;
    assert_eq!(health["jobs"]["inQueue"], 0, "{health}");

    // A job is visible only to the key that created it.
    let (code, accepted) = api
        .post("/v2/chat/run", Some(API_KEY), seed.to_string())
        .await;
    assert_eq!(code, StatusCode::OK);
    let id = accepted["id"].as_str().unwrap();
    let (code, _) = api.get(&format!("/status/{id}"), Some(OTHER_KEY)).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, _) = api
        .post(&format!("/cancel/{id}"), Some(OTHER_KEY), "")
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, s) = api
        .get(&format!("/v2/chat/status/{id}"), Some(API_KEY))
        .await;
    assert_eq!(
        (code, s["status"].as_str()),
        (StatusCode::OK, Some("IN_QUEUE"))
    );
    let (code, _) = api.get("/status/no-such-job", Some(API_KEY)).await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    let (code, _) = api.get("/openapi.json", None).await;
    assert_eq!(
        code,
        StatusCode::UNAUTHORIZED,
        "every route but /health needs a key"
    );
    let (code, _) = api.get("/metrics", None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, doc) = api.get("/openapi.json", Some(API_KEY)).await;
    assert_eq!(code, StatusCode::OK);
    for p in [
        "/run",
        "/runsync",
        "/status/{id}",
        "/cancel/{id}",
        "/retry/{id}",
        "/purge-queue",
        "/v2/{endpoint_id}/run",
    ] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_is_retried_with_the_same_id_until_accepted() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(&redis, &[]);
    let receiver = Receiver::start(2).await;
    let api = Api::new(&shim);
    // A job that fails fast (its template does not exist) still calls back.
    let mut body = seed_file("multiple_options.json");
    body["input"]["character"] = json!("github:nobody/missing");
    let (_, accepted) = api
        .post("/run", Some(API_KEY), with_webhook(body, &receiver.url))
        .await;
    let got = receiver.wait_for(3, Duration::from_secs(60)).await;
    assert_eq!(
        got.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    let ids: std::collections::HashSet<&str> = got
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "the same webhook-id on every try");
    for r in &got {
        verify_signature(r);
        assert_eq!(r.body, got[0].body, "byte-identical body on every try");
    }
    let cb: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(cb["id"], accepted["id"]);
    assert_eq!(cb["status"], "FAILED");
    assert!(
        cb["error"]
            .as_str()
            .unwrap()
            .contains("github:nobody/missing"),
        "{cb}"
    );
    assert!(cb.get("output").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_is_dead_lettered_after_the_last_try() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[("WEBHOOK_RETRY_SCHEDULE", "0s,50ms")]).await;
    let _worker = start_worker(&redis, &[]);
    let receiver = Receiver::start(usize::MAX).await;
    let api = Api::new(&shim);
    let mut body = seed_file("multiple_options.json");
    body["input"]["character"] = json!("github:nobody/missing");
    let (_, accepted) = api
        .post("/run", Some(API_KEY), with_webhook(body, &receiver.url))
        .await;
    receiver.wait_for(2, Duration::from_secs(60)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let health = loop {
        let (_, h) = api.get("/health", Some(API_KEY)).await;
        if h["callbacks"]["deadLettered"] == 1 {
            break h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never dead-lettered: {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let dead = &health["callbacks"]["recentDeadLetters"][0];
    assert_eq!(dead["job_id"], accepted["id"]);
    assert_eq!(dead["attempts"], 2);
    assert_eq!(dead["last_status"], 500);
    assert_eq!(health["callbacks"]["pending"], 0);
    // Without a key: counts only. Another tenant: none of these letters.
    let (_, anonymous) = api.get("/health", None).await;
    assert_eq!(anonymous["callbacks"]["deadLettered"], 1);
    assert!(
        anonymous["callbacks"].get("recentDeadLetters").is_none(),
        "{anonymous}"
    );
    let (_, other) = api.get("/health", Some(OTHER_KEY)).await;
    assert_eq!(
        other["callbacks"]["recentDeadLetters"],
        json!([]),
        "{other}"
    );
    assert_eq!(
        receiver.got.lock().unwrap().len(),
        2,
        "no try after the last one"
    );
}

/// The dead-letter list keeps `CALLBACK_DEAD_LETTER_MAX` letters, newest
/// first: it cannot grow without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_list_is_capped() {
    let redis = Redis::start();
    let shim = Shim::start(
        &redis,
        &[
            ("WEBHOOK_RETRY_SCHEDULE", "0s"),
            ("CALLBACK_DEAD_LETTER_MAX", "1"),
        ],
    )
    .await;
    let _worker = start_worker(&redis, &[]);
    let receiver = Receiver::start(usize::MAX).await;
    let api = Api::new(&shim);
    let mut body = seed_file("multiple_options.json");
    body["input"]["character"] = json!("github:nobody/missing");
    let mut ids = vec![];
    for _ in 0..2 {
        let (_, accepted) = api
            .post(
                "/run",
                Some(API_KEY),
                with_webhook(body.clone(), &receiver.url),
            )
            .await;
        let id = accepted["id"].as_str().unwrap().to_string();
        api.wait_terminal(&id).await;
        ids.push(id);
    }
    receiver.wait_for(2, Duration::from_secs(60)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let health = loop {
        let (_, h) = api.get("/health", Some(API_KEY)).await;
        if h["callbacks"]["pending"] == 0
            && h["callbacks"]["recentDeadLetters"][0]["job_id"] == json!(ids[1])
        {
            break h;
        }
        assert!(std::time::Instant::now() < deadline, "never parked: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health["callbacks"]["deadLettered"], 1, "{health}");
}

/// Whisper base from the model cache (scripts/test fetched it).
fn whisper() -> models::speech::whisper::Whisper {
    let dir = std::path::PathBuf::from(std::env::var("HOME").unwrap())
        .join(".cache/companion-worker/models");
    let path = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(models::speech::whisper::resolve_whisper(
            models::speech::whisper::DEFAULT_WHISPER_MODEL,
            &dir,
        ))
    })
    .unwrap();
    models::speech::whisper::Whisper::load(&path, &candle_core::Device::Cpu).unwrap()
}

fn words_of(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// The seed's first example with a real spoken recording (the Piper voice, sent as
/// browser-style WebM/Opus): the echoed audio message carries its transcript;
/// the spoken reply (MP3 here) decodes, lasts a plausible time and
/// transcribes back to the reply's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_message_is_transcribed_and_the_reply_is_spoken() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(
        &redis,
        &[
            ("TTS_BACKEND", "piper"),
            ("STT_BACKEND", "whisper"),
            ("TTS_FORMAT", "mp3"),
            ("TTS_DETERMINISTIC", "true"),
        ],
    );
    let api = Api::new(&shim);
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("msg.wav");
    let webm = dir.path().join("msg.webm");
    let models_dir = std::path::PathBuf::from(std::env::var("HOME").unwrap())
        .join(".cache/companion-worker/models");
    let voices = models::speech::piper::VoiceRegistry::new(
        [(
            "joe".to_string(),
            models::speech::piper::DEFAULT_VOICE.to_string(),
        )]
        .into(),
        "joe",
        models::speech::piper::DEFAULT_ONNXRUNTIME,
        models::speech::piper::DEFAULT_ESPEAK_DATA,
        &models_dir,
        0,
        1,
    )
    .await
    .unwrap();
    let voice = voices.voice(None).await.unwrap();
    let spoken = voice
        .synthesize(
            "I would love to go to the cinema tonight.",
            &models::speech::piper::SynthesisConfig::deterministic(),
        )
        .unwrap();
    std::fs::write(
        &wav,
        models::speech::audio::encode(&spoken, models::speech::audio::AudioFormat::Wav).unwrap(),
    )
    .unwrap();
    assert!(std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-i"])
        .arg(&wav)
        .args(["-c:a", "libopus", "-b:a", "32k"])
        .arg(&webm)
        .status()
        .unwrap()
        .success());
    let mut job = seed_file("audio_reply.json");
    job["input"]["audio_files"]["msg1"] =
        json!(base64::engine::general_purpose::STANDARD.encode(std::fs::read(&webm).unwrap()));
    let (code, body) = api
        .post("/runsync?wait=180000", Some(API_KEY), job.to_string())
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "COMPLETED", "{body}");
    let messages = body["output"]["messages"].as_array().unwrap();
    let heard = words_of(messages[2]["text"].as_str().unwrap());
    for w in ["cinema", "tonight"] {
        assert!(
            heard.contains(&w.to_string()),
            "{w:?} not in {:?}",
            messages[2]["text"]
        );
    }
    assert_eq!(messages[2]["audio_file_id"], "msg1");

    let reply = messages[3]["text"].as_str().unwrap();
    let mp3 = base64::engine::general_purpose::STANDARD
        .decode(body["output"]["audio_files"]["response"].as_str().unwrap())
        .unwrap();
    assert!(
        mp3.starts_with(b"ID3") || (mp3[0] == 0xFF && mp3[1] & 0xE0 == 0xE0),
        "not an MP3"
    );
    let pcm = models::speech::audio::decode_to(&mp3, 16000, 120.0).unwrap();
    let words = words_of(reply);
    let secs = pcm.seconds();
    assert!(
        secs > 0.15 * words.len() as f64 && secs < 1.0 * words.len() as f64 + 2.0,
        "{secs} s for {reply:?}"
    );
    let back = whisper()
        .transcribe(
            &pcm.samples,
            &models::speech::whisper::TranscribeOptions::default(),
        )
        .unwrap();
    let back = words_of(&back.text);
    // Its longer words, or all of them for a reply of fewer than three
    // (Whisper writes a reply of "Oh my gawd!" as "oh my god": one long
    // word, spelled its own way, must not decide the test alone).
    let mut long: Vec<&String> = words.iter().filter(|w| w.len() >= 4).collect();
    if long.len() < 3 {
        long = words.iter().collect();
    }
    let found = long.iter().filter(|w| back.contains(w)).count();
    assert!(
        found * 2 >= long.len(),
        "reply {reply:?} came back as {back:?}"
    );
}

/// Garbage in an audio message is refused at the door, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_that_is_not_audio_is_a_422() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let api = Api::new(&shim);
    let mut job = seed_file("audio_reply.json");
    job["input"]["audio_files"]["msg1"] =
        json!(base64::engine::general_purpose::STANDARD.encode(b"definitely not a recording"));
    let (code, body) = api.post("/run", Some(API_KEY), job.to_string()).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["field"], "input.audio_files.msg1", "{body}");
}
