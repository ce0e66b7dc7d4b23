//! The official `openai` Python package (PyPI, installed by scripts/setup
//! into ~/.cache/companion-worker/venv) against the shim's OpenAI-compatible
//! chat: n=3 from one job, a stream of chunks that adds up to the same
//! reply, `seed` reproducible, errors in OpenAI's shape.

mod common;

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_against_the_shim() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(&redis, &[("WORKER_KINDS", "chat")]);
    let out = tokio::process::Command::new(sdk_python())
        .arg(repo_root().join("tests/openai_sdk/use_sdk.py"))
        .env("OPENAI_BASE_URL", format!("{}/openai/v1", shim.base))
        .env("OPENAI_API_KEY", API_KEY)
        .output()
        .await
        .expect("the test venv's python (scripts/setup installs openai there)");
    assert!(
        out.status.success(),
        "SDK script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(got["models"], serde_json::json!(["companion-chat"]));
    // n=3: three choices from one job, with usage.
    let n3 = &got["n3"];
    assert!(n3["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(n3["object"], "chat.completion");
    let choices = n3["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["role"], "assistant");
        assert!(!c["content"].as_str().unwrap().is_empty(), "{c}");
        assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
    }
    let usage = &n3["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((3..=36).contains(&completion), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    // The same seed gives the same choices.
    let texts: Vec<&Value> = choices.iter().map(|c| &c["content"]).collect();
    let again: Vec<&Value> = got["n3_again"].as_array().unwrap().iter().collect();
    assert_eq!(texts, again, "seed 7 twice");
    // The stream adds up to the non-streamed reply of the same request.
    let s = &got["stream"];
    assert_eq!(s["roles"], serde_json::json!(["assistant"]));
    let streamed: String = s["deltas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(!s["deltas"].as_array().unwrap().is_empty(), "{s}");
    assert_eq!(streamed, got["single"].as_str().unwrap());
    assert!(["stop", "length"].contains(&s["finish"].as_str().unwrap()));
    assert!(s["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // Errors in OpenAI's shape.
    let bad = &got["bad_n"];
    assert_eq!(bad["status"], 400);
    assert_eq!(bad["body"]["param"], "n", "{bad}");
    assert_eq!(bad["body"]["type"], "invalid_request_error");
    assert!(bad["body"]["message"].as_str().unwrap().contains("1 to 8"));
    assert_eq!(got["bad_last"]["body"]["param"], "messages");
    assert_eq!(got["bad_key"]["status"], 401);
    assert_eq!(got["bad_key"]["body"]["type"], "authentication_error");
}
