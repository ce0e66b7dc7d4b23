//! Schemathesis (PyPI, installed by scripts/setup into
//! ~/.cache/companion-worker/venv) against the shim's `/openapi.json` with a
//! valid key: every operation, no 5xx, and every answer's status code,
//! content type and body as the document declares. CI runs a short form
//! (`SCHEMA_FUZZ_EXAMPLES`, default 10 per operation and phase);
//! `scripts/schema-fuzz` runs a longer one.

mod common;

use common::platform::{PlatformFixture, PLATFORM_KEY};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_the_openapi_document_says() {
    let redis = Redis::start();
    // Generated webhooks (`https://0.com/…`) must never be dialled or even
    // looked up: only loopback is allowed, and nothing unnamed. Runsync
    // waits at most 2 s: generated jobs end quickly whatever they ask.
    let shim = Shim::start(
        &redis,
        &[
            ("OUTBOUND_ALLOW", "127.0.0.0/8"),
            ("OUTBOUND_ALLOW_ONLY", "true"),
            ("SHIM_RUNSYNC_WAIT_MS", "2000"),
        ],
    )
    .await;
    // A platform for the streamed chat's context: with it, a valid request
    // gets its reply (a 5xx would be a fault of ours, not of the setup).
    let platform = PlatformFixture::start().await;
    let platform_keys = format!("{TENANT}:{PLATFORM_KEY}");
    let _worker = start_worker(
        &redis,
        &[
            ("MAX_NEW_TOKENS", "4"),
            ("PLATFORM_URL", platform.url.as_str()),
            ("PLATFORM_API_KEYS", platform_keys.as_str()),
        ],
    );
    let st = std::path::PathBuf::from(std::env::var_os("HOME").unwrap())
        .join(".cache/companion-worker/venv/bin/st");
    assert!(
        st.exists(),
        "{} is missing: scripts/setup installs schemathesis there",
        st.display()
    );
    let examples = std::env::var("SCHEMA_FUZZ_EXAMPLES").unwrap_or_else(|_| "10".into());
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(&st)
        .current_dir(dir.path())
        .args(["run", &format!("{}/openapi.json", shim.base)])
        .args(["--header", &format!("Authorization: Bearer {API_KEY}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", &examples])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "30"])
        .arg("--generation-deterministic")
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let tail: String = report
        .lines()
        .rev()
        .take(120)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    println!("{tail}");
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{tail}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
