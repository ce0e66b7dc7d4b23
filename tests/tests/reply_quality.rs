//! Reply quality through the real binaries, with a small MAX_NEW_TOKENS so
//! the token limit stops most options: every option the limit stopped ends
//! on a whole sentence (and says `length-trimmed`), no option carries a
//! role marker or special-token text, the counters show on /metrics, and a
//! streamed chat's streamed text equals the saved reply.

mod common;

use common::platform::PlatformFixture;
use common::*;
use models::text::reply::sentence_end;
use serde_json::json;

const MARKERS: &[&str] = &["User:", "user:", "<|", "|>", "</s>", "[INST]"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_end_on_whole_sentences_without_role_markers() {
    let redis = Redis::start();
    let platform = PlatformFixture::start().await;
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(
        &redis,
        &[
            ("WORKER_KINDS", "chat,chat_stream"),
            ("MAX_NEW_TOKENS", "24"),
            ("PLATFORM_URL", &platform.url),
            ("PLATFORM_API_KEYS", "tenant-a:platform-key"),
        ],
    );
    let api = Api::new(&shim);
    let mut trimmed = 0;
    let mut seen = 0;
    let mut pairs = 0;
    for text in [
        "I'm feeling adventurous!",
        "Tell me about your day.",
        "What do you think about the stars tonight?",
    ] {
        let mut body = seed_file("multiple_options.json");
        body["input"]["messages"][1]["text"] = json!(text);
        let (_, queued) = api
            .post("/v2/chat/run", Some(API_KEY), body.to_string())
            .await;
        let done = api.wait_terminal(queued["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "COMPLETED", "{done}");
        let options = done["output"]["messages"][1]["options"].as_array().unwrap();
        // Pairwise distinct (a near-duplicate first sentence is resampled).
        for (i, a) in options.iter().enumerate() {
            for b in &options[i + 1..] {
                pairs += 1;
                assert_ne!(a["text"], b["text"], "{options:?}");
            }
        }
        for o in options {
            seen += 1;
            let t = o["text"].as_str().unwrap();
            assert!(!t.trim().is_empty(), "never trimmed to nothing");
            for m in MARKERS {
                assert!(!t.contains(m), "{m:?} in {t:?}");
            }
            match o["finish_reason"].as_str().unwrap() {
                "length-trimmed" => {
                    trimmed += 1;
                    assert_eq!(
                        sentence_end(t),
                        Some(t.len()),
                        "not a whole sentence: {t:?}"
                    );
                }
                "stop" | "length" => {}
                other => panic!("finish_reason {other}"),
            }
        }
    }
    assert_eq!((seen, pairs), (9, 9));
    assert!(
        trimmed > 0,
        "24 tokens should stop some options mid-sentence"
    );
    let counted = api.worker_total("reply_trims").await;
    assert!(counted >= trimmed as f64, "{counted} < {trimmed}");

    // Streamed chat: what was streamed is what was saved.
    for content in [
        "Tell me a long story about the sea.",
        "Describe your favourite place.",
    ] {
        let resp = api
            .http
            .post(format!("{}/v1/instances/inst-7/chat/stream", api.base))
            .bearer_auth(API_KEY)
            .body(json!({"content": content}).to_string())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        let streamed = resp.text().await.unwrap();
        let saved = platform.saved();
        let reply = saved
            .iter()
            .rev()
            .find(|(_, b)| b["role"] == "assistant")
            .expect("the reply was saved");
        assert_eq!(reply.1["content"].as_str().unwrap(), streamed);
        for m in MARKERS {
            assert!(!streamed.contains(m), "{m:?} in {streamed:?}");
        }
    }
}

/// The in-character rule set resamples: with a rule every sentence breaks
/// (`REJECT_PHRASES=e`) and one resampling round, every option is sampled
/// again once (its seed noted), the last try is kept, and /metrics counts
/// the resamples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_character_breaking_first_sentence_is_resampled_once() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(
        &redis,
        &[
            ("WORKER_KINDS", "chat"),
            ("MAX_NEW_TOKENS", "24"),
            ("REJECT_PHRASES", "e"),
            ("RESAMPLE_TRIES", "1"),
        ],
    );
    let api = Api::new(&shim);
    let (_, queued) = api
        .post(
            "/v2/chat/run",
            Some(API_KEY),
            seed_file("multiple_options.json").to_string(),
        )
        .await;
    let done = api.wait_terminal(queued["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let options = done["output"]["messages"][1]["options"].as_array().unwrap();
    let resampled = options
        .iter()
        .filter(|o| o["resampled_seed"].is_u64())
        .count();
    assert!(resampled >= 2, "{options:?}");
    for o in options {
        assert!(!o["text"].as_str().unwrap().trim().is_empty(), "{o}");
    }
    let counted = api.worker_total("reply_resamples").await;
    assert!(counted >= resampled as f64, "{counted} < {resampled}");
}
