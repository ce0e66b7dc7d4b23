//! Load for `benches/pipeline_overhead.sh`: `clients` concurrent callers
//! each submit no-op `echo` jobs through the shim's `/v2/echo/runsync` (with
//! a webhook to a receiver in this process) back to back for `seconds`, and
//! the run prints jobs/s, p50/p99 latency of the round trip (shim → Redis
//! → worker → result → response) and the signed callbacks received: a
//! markdown row on stdout, the same as JSON on stderr.
//!
//!   overhead_load BASE_URL API_KEY CLIENTS SECONDS

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::json;

/// What a `/runsync` answer must hold: the job completed with the payload
/// it was given.
#[derive(Deserialize)]
struct Answer {
    status: String,
    output: Output,
}

#[derive(Deserialize)]
struct Output {
    payload: Payload,
}

#[derive(Deserialize)]
struct Payload {
    n: u64,
}

/// One thread: the load generator shares the machine with what it measures,
/// and a second runtime thread only adds wake-ups between the two.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, key, clients, seconds] = args.as_slice() else {
        bail!("usage: overhead_load BASE_URL API_KEY CLIENTS SECONDS");
    };
    let clients: usize = clients.parse().context("CLIENTS")?;
    let seconds: f64 = seconds.parse().context("SECONDS")?;

    // The callback receiver: counts deliveries that carry a signature.
    let callbacks = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    let counter = callbacks.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let counter = counter.clone();
            async move {
                if headers.contains_key("webhook-signature") {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients.max(1))
        .build()?;
    let url = format!("{base}/v2/echo/runsync");
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url, key, hook) = (http.clone(), url.clone(), key.clone(), hook.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let body = json!({"input": {"payload": {"client": c, "n": n}}, "webhook": hook});
                let t = Instant::now();
                let resp = http.post(&url).bearer_auth(&key).json(&body).send().await?;
                let status = resp.status();
                let bytes = resp.bytes().await?;
                let out: Answer = match serde_json::from_slice(&bytes) {
                    Ok(out) if status.is_success() => out,
                    _ => bail!("job failed: {status} {}", String::from_utf8_lossy(&bytes)),
                };
                if out.status != "COMPLETED" || out.output.payload.n != n {
                    bail!("wrong answer: {}", String::from_utf8_lossy(&bytes));
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                n += 1;
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Callbacks go out after the result: give the last ones a moment.
    let want = lat.len() as u64;
    let wait = Instant::now() + Duration::from_secs(10);
    while callbacks.load(Ordering::Relaxed) < want && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if lat.is_empty() {
        bail!("no job finished in {seconds} s");
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let summary = json!({
        "clients": clients,
        "jobs": lat.len(),
        "seconds": elapsed,
        "jobs_per_s": lat.len() as f64 / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "callbacks": callbacks.load(Ordering::Relaxed),
    });
    eprintln!("{summary}");
    // The row of the script's table.
    println!(
        "| ours (shim → Redis → worker → callback) | {clients} | {:.0} | {:.2} | {:.2} | {}/{} |",
        lat.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        callbacks.load(Ordering::Relaxed),
        lat.len()
    );
    Ok(())
}
