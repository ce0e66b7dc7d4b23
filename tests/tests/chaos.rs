//! Chaos: jobs of mixed kinds (chat, memory condense, streamed chat) through
//! three real workers while a driver `kill -9`s a random worker every few
//! seconds (and restarts it), stalls one with SIGSTOP past its lease, kills
//! and restarts redis-server once (AOF on) and keeps the callback receiver
//! down for a stretch. Every job must end COMPLETED exactly once, every
//! callback arrive (repeats only under one webhook-id), no token stream hold
//! a delta twice, and the platform store each message once.
//!
//! CI runs a short form; `benches/chaos.sh` runs the long one
//! (`CHAOS_JOBS`, `CHAOS_KILL_EVERY_MS`) and prints the figures.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::platform::{PlatformFixture, PLATFORM_KEY};
use common::*;
use serde_json::{json, Value};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator, so a failing run can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

fn signal(proc: &Proc, sig: &str) {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(proc.child.id().to_string())
        .status()
        .unwrap();
}

/// The job bodies, cycling through the kinds.
fn job(i: usize, hook: &str) -> (&'static str, Value) {
    match i % 3 {
        0 => {
            let mut body = seed_file("multiple_options.json");
            body["webhook"] = json!(hook);
            ("/run", body)
        }
        1 => {
            let mut body = seed_file("memory_condense.json");
            body["webhook"] = json!(hook);
            ("/v2/memory/run", body)
        }
        _ => (
            "/v2/chat_stream/run",
            json!({
                "input": {"instance_id": format!("inst-{i}"), "content": format!("Hello number {i}!")},
                "webhook": hook,
            }),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_kills_stalls_a_redis_restart_and_a_receiver_outage() {
    let jobs = env_usize("CHAOS_JOBS", 9);
    // On 2 cores three workers share the CPU: a job takes seconds, and a
    // restarted worker needs ~3 s to load its models.
    let kill_every = Duration::from_millis(env_usize("CHAOS_KILL_EVERY_MS", 10000) as u64);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start_persistent(dir.path());
    let shim = Shim::start(
        &redis,
        &[
            (
                "WEBHOOK_RETRY_SCHEDULE",
                "0s,200ms,500ms,1s,1s,2s,2s,3s,5s,5s,5s,5s",
            ),
            // Kills every few seconds can hit one job several times: the
            // attempt cap (a shim setting) is not what this test is about.
            ("JOB_MAX_ATTEMPTS", "20"),
        ],
    )
    .await;
    let api = Api::new(&shim);
    let platform = PlatformFixture::start().await;
    let receiver = Receiver::start(0).await;
    let platform_keys = format!("{TENANT}:{PLATFORM_KEY}");
    // The long run (benches/chaos.sh) may shorten replies to fit more jobs.
    let max_new_tokens = std::env::var("CHAOS_MAX_NEW_TOKENS").unwrap_or_default();
    let mut env = vec![
        ("PLATFORM_URL", platform.url.as_str()),
        ("PLATFORM_API_KEYS", platform_keys.as_str()),
    ];
    if !max_new_tokens.is_empty() {
        env.push(("MAX_NEW_TOKENS", max_new_tokens.as_str()));
    }
    let mut workers: Vec<Proc> = (0..3).map(|_| start_worker(&redis, &env)).collect();

    let mut ids = Vec::new();
    for i in 0..jobs {
        let (path, body) = job(i, &receiver.url);
        let (code, accepted) = api.post(path, Some(API_KEY), body.to_string()).await;
        assert_eq!(code, StatusCode::OK, "{accepted}");
        ids.push((i % 3, accepted["id"].as_str().unwrap().to_string()));
    }

    // The driver: a kill every `kill_every`, one stall, one Redis restart,
    // until every job has ended. The receiver is down from the start until
    // it has refused at least one callback (so the outage always meets one).
    let mut rng = Lcg(0x5eed);
    let (mut kills, mut stalled, mut redis_restarted) = (0, false, false);
    receiver
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut next_kill = Instant::now() + kill_every;
    let deadline = Instant::now() + Duration::from_secs(120 + jobs as u64 * 20);
    loop {
        let (code, health) = api.get("/health", None).await;
        if code == StatusCode::OK {
            let j = &health["jobs"];
            let open = j["inQueue"].as_i64().unwrap_or(0) + j["inProgress"].as_i64().unwrap_or(0);
            if open == 0 && j["completed"].as_i64().unwrap_or(0) > 0 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "jobs still open: {health}");
        let refused_one = receiver
            .got
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.answered == 503);
        if refused_one {
            receiver
                .down
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        if Instant::now() >= next_kill {
            next_kill = Instant::now() + kill_every;
            let w = rng.next(workers.len());
            match kills % 3 {
                // Stall one worker once, past its lease (200 ms × 5).
                1 if !stalled => {
                    stalled = true;
                    signal(&workers[w], "STOP");
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    signal(&workers[w], "CONT");
                }
                2 if !redis_restarted => {
                    redis_restarted = true;
                    redis.restart();
                }
                _ => {
                    workers[w].kill();
                    workers[w] = start_worker(&redis, &env);
                }
            }
            kills += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();

    // Every job COMPLETED; the counters say each ended once.
    let mut runs = 0u64;
    for (kind, id) in &ids {
        let s = api.status(id).await;
        assert_eq!(s["status"], "COMPLETED", "{s}");
        let attempts: Option<String> =
            redis::AsyncCommands::hget(&mut redis.conn().await, format!("cw:job:{id}"), "attempts")
                .await
                .unwrap();
        runs += attempts.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
        // Token streams: the replay equals the result, no delta twice.
        if *kind == 0 {
            let (streamed, end) = api.sse_texts(id).await;
            assert_eq!(end, "COMPLETED");
            let options: Vec<String> = s["output"]["messages"][1]["options"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["text"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(streamed, options, "job {id}");
        }
    }
    let (_, health) = api.get("/health", None).await;
    assert_eq!(health["jobs"]["completed"], jobs, "{health}");

    // Every callback arrived; repeats only under the same webhook-id.
    let limit = Duration::from_secs(60);
    let wait_until = Instant::now() + limit;
    let by_job = loop {
        let got = receiver.got.lock().unwrap().clone();
        let mut by_job: HashMap<String, HashSet<String>> = HashMap::new();
        for r in got.iter().filter(|r| r.answered == 200) {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(body["status"], "COMPLETED", "{body}");
            let hook_id = r.headers["webhook-id"].to_str().unwrap().to_string();
            by_job
                .entry(body["id"].as_str().unwrap().to_string())
                .or_default()
                .insert(hook_id);
        }
        if by_job.len() == jobs || Instant::now() > wait_until {
            break by_job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        by_job.len(),
        jobs,
        "callbacks delivered for {} of {jobs} jobs",
        by_job.len()
    );
    for (id, hook_ids) in &by_job {
        assert_eq!(
            hook_ids.len(),
            1,
            "job {id} was delivered under {hook_ids:?}"
        );
    }

    // The platform stored each streamed chat's two messages once (it
    // drops repeats of an idempotency key, as the real one does), and the
    // stored reply is the job's result, never a stale run's.
    let saved: HashMap<String, Value> = platform
        .saved()
        .into_iter()
        .map(|(key, body)| (key.unwrap_or_default(), body))
        .collect();
    let streamed_chats: Vec<&String> = ids
        .iter()
        .filter(|(k, _)| *k == 2)
        .map(|(_, id)| id)
        .collect();
    assert_eq!(saved.len(), streamed_chats.len() * 2, "{saved:?}");
    for id in streamed_chats {
        let s = api.status(id).await;
        let reply = &saved[&format!("{id}:assistant")];
        assert_eq!(reply["content"], s["output"]["content"], "job {id}");
        assert!(saved.contains_key(&format!("{id}:user")));
    }
    let deliveries = receiver.got.lock().unwrap().len();
    let refused = receiver
        .got
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.answered != 200)
        .count();
    assert!(refused > 0, "the outage refused no callback");
    eprintln!(
        "chaos: {jobs} jobs in {:.1} s, {kills} faults (kills, 1 stall, 1 redis restart, 1 receiver outage), {runs} runs ({} re-runs), {deliveries} callback POSTs ({refused} refused during the outage)",
        elapsed.as_secs_f64(),
        runs.saturating_sub(jobs as u64),
    );
}
