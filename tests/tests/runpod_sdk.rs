//! RunPod's own Python SDK (`runpod` from PyPI, installed by scripts/setup
//! into ~/.cache/companion-worker/venv) pointed at the shim works unchanged.

mod common;

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runpod_python_sdk_works_against_the_shim() {
    let redis = Redis::start();
    let shim = Shim::start(&redis, &[]).await;
    let _worker = start_worker(&redis, &[]);
    let script = repo_root().join("tests/runpod_sdk/use_sdk.py");
    let seed = repo_root().join("examples/multiple_options.json");
    let out = tokio::process::Command::new(sdk_python())
        .arg(&script)
        .arg(&seed)
        .env("RUNPOD_ENDPOINT_BASE_URL", format!("{}/v2", shim.base))
        .env("RUNPOD_API_KEY", API_KEY)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "SDK script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(got["base_url"], format!("{}/v2", shim.base));
    for key in ["sync_output", "async_output"] {
        let messages = got[key]["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: {got}"));
        assert_eq!(messages[0]["text"], "I'm feeling adventurous!");
        assert_eq!(messages[1]["options"].as_array().unwrap().len(), 3);
    }
    assert!(
        ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].contains(&got["first_status"].as_str().unwrap())
    );
    assert_eq!(got["final_status"], "COMPLETED");
    // Job.stream() polls /stream/{id}: the chunks make up the first option.
    let first_option = &got["streamed_output"]["messages"][1]["options"][0]["text"];
    assert!(!got["streamed"].as_str().unwrap().is_empty());
    assert_eq!(&got["streamed"], first_option);
    assert_eq!(got["health"]["jobs"]["completed"], 3);
    assert_eq!(got["purged"]["status"], "completed");
}
