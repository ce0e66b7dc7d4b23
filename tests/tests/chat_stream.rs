//! Streamed chat end to end: shim route → Redis → worker (real model, context
//! from a platform fixture) → token stream → chunked response, and the
//! messages saved to the platform once.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::platform::PlatformFixture;
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

/// The worker's platform settings: tenant-a's key is the fixture's
/// `PLATFORM_KEY`, tenant-b's is `PLATFORM_KEY_B`.
fn worker_env<'a>(
    platform: &'a PlatformFixture,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("PLATFORM_URL", platform.url.as_str()),
        ("PLATFORM_API_KEYS", PLATFORM_KEYS),
    ];
    env.extend_from_slice(extra);
    env
}

const PLATFORM_KEYS: &str = "tenant-a:platform-key,tenant-b:platform-key-b";

/// When job `id` ended, by its record.
async fn finished_ms(redis: &Redis, id: &str) -> u64 {
    let queue = pipeline::queue::RedisQueue::connect(&redis.url, Default::default())
        .await
        .unwrap();
    queue.get(id).await.unwrap().unwrap().finished_ms.unwrap()
}

async fn open_stream(api: &Api, body: Value) -> reqwest::Response {
    api.http
        .post(format!("{}/v1/instances/inst-1/chat/stream", api.base))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_relays_chunks_while_generating_and_saves_both_messages_once() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let platform = PlatformFixture::start().await;
    // The platform fails twice before answering: the job still succeeds.
    platform.state.fail_instance.store(2, Ordering::SeqCst);
    // A long scratchpad: condensed to MEMORY_MAX_WORDS for the prompt.
    let pad = seed_file("memory_condense.json")["input"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    *platform.state.scratchpad.lock().unwrap() = Some(pad);
    let _worker = start_worker(
        &redis,
        &worker_env(
            &platform,
            &[
                ("MAX_NEW_TOKENS", "60"),
                ("IGNORE_EOS", "true"),
                ("MEMORY_MAX_WORDS", "60"),
                // Token by token, to see the relay at work (whole sentences
                // are the default, tested in reply_quality.rs).
                ("WHOLE_SENTENCES", "false"),
            ],
        ),
    );
    let api = Api::new(&shim);

    let resp = open_stream(
        &api,
        json!({"content": "What are you doing tonight?", "medium": "text", "skin_id": "skin-7"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(
        resp.headers()
            .get("transfer-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("chunked")
    );
    let job_id = resp.headers()["x-job-id"].to_str().unwrap().to_string();
    let mut chunks: Vec<String> = Vec::new();
    let mut first_chunk_at = None;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        first_chunk_at.get_or_insert_with(pipeline::now_ms);
        // Every chunk is valid UTF-8 on its own: no character is split.
        chunks.push(String::from_utf8(chunk.to_vec()).expect("chunk is whole UTF-8"));
    }
    let text: String = chunks.concat();
    assert!(chunks.len() >= 5, "{} chunks", chunks.len());
    assert!(!text.trim().is_empty());

    let status = api.wait_terminal(&job_id).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    assert_eq!(status["output"]["content"], text.as_str());
    assert_eq!(status["output"]["partial"], false);
    let memory_words = status["output"]["memory_words"].as_u64().unwrap();
    assert!((1..=60).contains(&memory_words), "{memory_words}");
    assert_eq!(platform.state.hits("scratchpad"), 1);
    // The first bytes reached us while the model was still generating.
    let finished = finished_ms(&redis, &job_id).await;
    assert!(
        first_chunk_at.unwrap() + 300 < finished,
        "first chunk {first_chunk_at:?}, job finished {finished}"
    );

    let saved = platform.saved();
    assert_eq!(saved.len(), 2, "{saved:?}");
    assert_eq!(
        saved[0].0.as_deref(),
        Some(format!("{job_id}:user").as_str())
    );
    assert_eq!(
        saved[0].1,
        json!({"role": "user", "medium": "text", "content": "What are you doing tonight?", "skin_id": "skin-7"})
    );
    assert_eq!(
        saved[1].1,
        json!({"role": "assistant", "medium": "text", "content": text, "skin_id": "skin-7"})
    );
    assert_eq!(
        platform.state.hits("instance"),
        3,
        "two 500s, then the answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_stops_generation_and_saves_the_partial_reply() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let platform = PlatformFixture::start().await;
    let _worker = start_worker(
        &redis,
        &worker_env(
            &platform,
            &[("MAX_NEW_TOKENS", "3000"), ("IGNORE_EOS", "true")],
        ),
    );
    let api = Api::new(&shim);

    let resp = open_stream(&api, json!({"content": "Tell me a long story."})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let job_id = resp.headers()["x-job-id"].to_str().unwrap().to_string();
    let mut body = resp.bytes_stream();
    let mut received = String::new();
    for _ in 0..3 {
        received.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    let left_at = Instant::now();
    drop(body);

    let status = api.wait_terminal(&job_id).await;
    assert!(
        left_at.elapsed() < Duration::from_secs(20),
        "generation went on after the disconnect"
    );
    assert_eq!(status["status"], "COMPLETED", "{status}");
    assert_eq!(status["output"]["partial"], true);
    let content = status["output"]["content"].as_str().unwrap();
    assert!(content.starts_with(&received), "{received:?} / {content:?}");
    assert!(content.split_whitespace().count() < 1500, "stopped early");
    let saved = platform.saved();
    assert_eq!(saved.len(), 2, "saved once each: {saved:?}");
    assert_eq!(saved[1].1["partial"], true);
    assert!(
        status["output"].get("memory_words").is_none(),
        "no scratchpad, no memory"
    );
    assert_eq!(saved[1].1["content"], content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stream_requests_and_sse_of_a_run_job() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let platform = PlatformFixture::start().await;
    let _worker = start_worker(&redis, &worker_env(&platform, &[]));
    let api = Api::new(&shim);
    for (body, field) in [
        (json!({"content": "  "}), "content"),
        (json!({"content": "hi", "medium": "fax"}), "medium"),
        (json!({"medium": "text"}), "content"),
    ] {
        let resp = open_stream(&api, body).await;
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["field"], field, "{err}");
    }

    // Server-Sent Events of a job started with /run.
    let (_, accepted) = api
        .post(
            "/run",
            Some(API_KEY),
            seed_file("multiple_options.json").to_string(),
        )
        .await;
    let id = accepted["id"].as_str().unwrap();
    let resp = api
        .http
        .get(format!("{}/stream/{id}", api.base))
        .bearer_auth(API_KEY)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    drop(resp);
    let (per_option, end) = api.sse_texts(id).await;
    assert!(!end.is_empty(), "a completed event ends the stream");
    let status = api.status(id).await;
    let options = status["output"]["messages"][1]["options"]
        .as_array()
        .unwrap();
    for (i, o) in options.iter().enumerate() {
        assert_eq!(o["text"].as_str().unwrap(), per_option[i], "option {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_context_wins_over_fetching() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let platform = PlatformFixture::start().await;
    // The platform's instance route would fail every time: it must not be asked.
    platform.state.fail_instance.store(1_000, Ordering::SeqCst);
    let _worker = start_worker(&redis, &worker_env(&platform, &[]));
    let api = Api::new(&shim);
    let body = json!({"input": {
        "instance_id": "inst-9", "content": "Hi there!",
        "context": {
            "instance": {"snapshot_title": "Mia", "snapshot_description": "{{char}} runs a bookshop."},
            "persona": {"name": "Alex", "gender": "male"},
            "messages": [{"role": "assistant", "content": "Welcome to the shop!"}],
            "scratchpad": "Alex likes mystery novels."
        }
    }});
    let (code, done) = api
        .post(
            "/v2/chat_stream/runsync?wait=120000",
            Some(API_KEY),
            body.to_string(),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert!(!done["output"]["content"].as_str().unwrap().is_empty());
    assert_eq!(done["output"]["memory_words"], 4);
    assert_eq!(platform.state.hits("instance"), 0);
    assert_eq!(platform.state.hits("scratchpad"), 0);
    assert_eq!(
        platform.saved().len(),
        2,
        "messages are still saved to the platform"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_stream_is_continued_by_another_without_repeating_text() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let platform = PlatformFixture::start().await;
    let slow = [("MAX_NEW_TOKENS", "150"), ("IGNORE_EOS", "true")];
    let mut first = start_worker(&redis, &worker_env(&platform, &slow));
    let api = Api::new(&shim);

    let resp = open_stream(&api, json!({"content": "Tell me about your day."})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let job_id = resp.headers()["x-job-id"].to_str().unwrap().to_string();
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    for _ in 0..5 {
        text.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    first.kill();
    let _second = start_worker(&redis, &worker_env(&platform, &slow));
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }

    let status = api.wait_terminal(&job_id).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    assert_eq!(status["output"]["partial"], false);
    // The second run regenerated the same reply and streamed only the rest.
    assert_eq!(status["output"]["content"], text.as_str());
    let saved = platform.saved();
    assert_eq!(saved.len(), 2, "{saved:?}");
    assert_eq!(saved[1].1["content"], text.as_str());
}

/// A platform that accepts the connection and never answers: the job's
/// `executionTimeout` is a hard limit (the run is aborted, not asked to
/// stop), the job ends TIMED_OUT, and the worker goes on to the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_platform_call_is_cut_by_the_execution_timeout() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let platform = PlatformFixture::start().await;
    platform.state.hang_saves.store(true, Ordering::SeqCst);
    let _worker = start_worker(&redis, &worker_env(&platform, &[("MAX_NEW_TOKENS", "8")]));
    let api = Api::new(&shim);
    let body = json!({
        "input": {"instance_id": "inst-1", "content": "Hi there!"},
        "policy": {"executionTimeout": 5000}
    });
    let (code, queued) = api
        .post("/v2/chat_stream/run", Some(API_KEY), body.to_string())
        .await;
    assert_eq!(code, StatusCode::OK, "{queued}");
    let id = queued["id"].as_str().unwrap().to_string();
    let done = api
        .wait_for(&id, Duration::from_secs(90), |s| {
            !matches!(s["status"].as_str(), Some("IN_QUEUE") | Some("IN_PROGRESS"))
        })
        .await;
    assert_eq!(done["status"], "TIMED_OUT", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("executionTimeout"),
        "{done}"
    );
    assert!(platform.state.hits("save") >= 1, "the save was under way");
    assert!(platform.saved().is_empty(), "nothing was saved");
    // The worker lives on and takes the next job.
    platform.state.hang_saves.store(false, Ordering::SeqCst);
    let (code, next) = api
        .post(
            "/v2/chat_stream/runsync?wait=120000",
            Some(API_KEY),
            json!({"input": {"instance_id": "inst-1", "content": "Hello?"}}).to_string(),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(next["status"], "COMPLETED", "{next}");
}

/// One Server-Sent Event: its name, its data, when it arrived.
struct Received {
    event: String,
    data: Value,
    at_ms: u64,
}

/// Reads a Server-Sent Events body as it arrives.
async fn read_events(resp: reqwest::Response) -> Vec<Received> {
    let mut events = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let event = block.lines().find_map(|l| l.strip_prefix("event: "));
            let data = block.lines().find_map(|l| l.strip_prefix("data: "));
            if let (Some(event), Some(data)) = (event, data) {
                events.push(Received {
                    event: event.to_string(),
                    data: serde_json::from_str(data).unwrap(),
                    at_ms: pipeline::now_ms(),
                });
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_stream_sends_each_sentences_audio_right_after_its_text() {
    use base64::Engine as _;
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let platform = PlatformFixture::start().await;
    let _worker = start_worker(
        &redis,
        &worker_env(
            &platform,
            &[
                ("MAX_NEW_TOKENS", "48"),
                ("TTS_BACKEND", "piper"),
                ("TTS_DETERMINISTIC", "true"),
            ],
        ),
    );
    let api = Api::new(&shim);
    let resp = api
        .http
        .post(format!("{}/v1/instances/inst-1/chat/stream", api.base))
        .bearer_auth(API_KEY)
        .header("accept", "text/event-stream")
        .json(&json!({"content": "Tell me about your evening.", "generate_audio": true, "skin_id": "skin-7"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let job_id = resp.headers()["x-job-id"].to_str().unwrap().to_string();
    let events = read_events(resp).await;
    assert_eq!(events.last().unwrap().event, "completed");
    assert_eq!(events.last().unwrap().data["status"], "COMPLETED");

    // Every audio event speaks text already sent: the chunks' texts, joined
    // in order, are always a prefix of the text streamed so far, and at the
    // end they are the whole reply.
    let mut text = String::new();
    let mut spoken = String::new();
    let mut chunks = Vec::new();
    for e in &events {
        match e.event.as_str() {
            "output" => text.push_str(e.data["text"].as_str().unwrap()),
            "audio" => {
                assert_eq!(e.data["index"], chunks.len() as u64);
                assert_eq!(e.data["format"], "wav");
                spoken.push_str(e.data["text"].as_str().unwrap());
                assert!(text.starts_with(&spoken), "{spoken:?} before {text:?}");
                // A whole file of its own.
                let wav = base64::engine::general_purpose::STANDARD
                    .decode(e.data["audio"].as_str().unwrap())
                    .unwrap();
                let pcm = models::speech::audio::decode(&wav, f64::INFINITY).unwrap();
                let seconds = e.data["seconds"].as_f64().unwrap();
                assert!((pcm.seconds() - seconds).abs() < 1e-3, "{seconds}");
                assert!(pcm.samples.iter().any(|s| s.abs() > 0.01), "not silent");
                chunks.push((e.at_ms, seconds));
            }
            _ => {}
        }
    }
    assert!(!chunks.is_empty(), "no audio events");
    assert_eq!(spoken, text);

    let status = api.wait_terminal(&job_id).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    let output = &status["output"];
    assert_eq!(output["content"], text.as_str());
    // The whole reply's audio, inline (no media store here): every chunk's
    // samples in order.
    let audio = &output["audio"];
    assert_eq!(audio["format"], "wav");
    assert_eq!(audio["chunks"], chunks.len() as u64);
    let whole = base64::engine::general_purpose::STANDARD
        .decode(audio["base64"].as_str().unwrap())
        .unwrap();
    let whole = models::speech::audio::decode(&whole, f64::INFINITY).unwrap();
    let sum: f64 = chunks.iter().map(|c| c.1).sum();
    assert!(
        (whole.seconds() - sum).abs() < 1e-3,
        "{} vs {sum}",
        whole.seconds()
    );
    assert!((audio["seconds"].as_f64().unwrap() - sum).abs() < 1e-3);
    // The first audio went out while the job was still running.
    let finished = finished_ms(&redis, &job_id).await;
    assert!(
        chunks[0].0 < finished,
        "first audio {} finished {finished}",
        chunks[0].0
    );
    // Saved once each, the reply as a spoken message.
    let saved = platform.saved();
    assert_eq!(saved.len(), 2, "{saved:?}");
    assert_eq!(
        saved[1].1,
        json!({"role": "assistant", "medium": "audio", "content": text, "skin_id": "skin-7"})
    );
    // RunPod's polled form carries the chunks too.
    let (_, polled) = api.get(&format!("/stream/{job_id}"), Some(API_KEY)).await;
    let polled_audio: Vec<&Value> = polled["stream"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["output"].get("audio"))
        .collect();
    assert_eq!(polled_audio.len(), chunks.len());
    assert_eq!(polled_audio[0]["index"], 0);

    // A worker without text-to-speech refuses the job with a reason.
    drop(_worker);
    let _plain = start_worker(&redis, &worker_env(&platform, &[("TTS_BACKEND", "none")]));
    let resp = open_stream(&api, json!({"content": "Hi!", "generate_audio": true})).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err.to_string().contains("text-to-speech is not configured"),
        "{err}"
    );
}
