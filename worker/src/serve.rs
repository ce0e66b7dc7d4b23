//! The Redis consume loop: one job at a time per worker (one model, one
//! device), cancellation and execution timeouts noticed between tokens,
//! graceful drain on SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use pipeline::memory_contract::MemoryCondenseJob;
use pipeline::queue::{unique_worker_name, Consumer, Lease, Outcome, RedisQueue};
use pipeline::{ChatRespondJob, JobKind, JobState};
use serde_json::Value;

use crate::chat::{seed_from_job_id, ChatEngine, Usage};
use crate::config::WorkerConfig;

/// Runs a job's input to an outcome. Bad input fails at once (never
/// retried).
pub fn run_job(
    engine: &ChatEngine,
    kind: JobKind,
    input: &Value,
    seed: u64,
    clock: DateTime<FixedOffset>,
    cancelled: &dyn Fn() -> bool,
) -> (Outcome, Usage) {
    let ran = match kind {
        JobKind::Chat => ChatRespondJob::parse(input)
            .map_err(|e| format!("invalid input: {e}"))
            .and_then(|job| {
                engine
                    .respond(&job, seed, clock, cancelled)
                    .map(|(o, u)| (serde_json::to_value(o).expect("output serializes"), u))
                    .map_err(|e| e.to_string())
            }),
        JobKind::Memory => MemoryCondenseJob::parse(input)
            .map_err(|e| format!("invalid input: {e}"))
            .and_then(|job| {
                crate::memory::condense(engine, &job, seed, cancelled)
                    .map(|(o, u)| (serde_json::to_value(o).expect("output serializes"), u))
                    .map_err(|e| e.to_string())
            }),
    };
    match ran {
        Ok((output, usage)) => (Outcome::Completed(output), usage),
        Err(e) => (Outcome::Failed(e), Usage::default()),
    }
}

pub async fn serve(cfg: WorkerConfig) -> anyhow::Result<()> {
    let engine = Arc::new(cfg.chat_engine().await?);
    let queue = RedisQueue::connect(&cfg.redis_url, cfg.queue_config()).await?;
    let name = unique_worker_name("worker");
    let mut consumer = queue.consumer(&JobKind::ALL, &name).await?;
    let heartbeat = consumer.spawn_heartbeat();
    tracing::info!(worker = %name, "waiting for jobs");

    let stop = Arc::new(tokio::sync::Notify::new());
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let (stop, stopping) = (stop.clone(), stopping.clone());
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stop requested: finishing the running job, taking no new ones");
            stopping.store(true, Ordering::SeqCst);
            stop.notify_waiters();
        });
    }

    let poll = Duration::from_millis(cfg.heartbeat_ms.max(50));
    while !stopping.load(Ordering::SeqCst) {
        let lease = tokio::select! {
            lease = consumer.next(poll) => lease?,
            _ = stop.notified() => break,
        };
        let Some(lease) = lease else { continue };
        let drain = Duration::from_secs(cfg.drain_timeout_s);
        run_lease(&engine, &consumer, lease, &stopping, drain).await?;
    }
    heartbeat.abort();
    consumer.deregister().await?;
    tracing::info!("worker stopped");
    Ok(())
}

async fn run_lease(
    engine: &Arc<ChatEngine>,
    consumer: &Consumer,
    lease: Lease,
    stopping: &AtomicBool,
    drain: Duration,
) -> anyhow::Result<()> {
    let id = lease.record.id.clone();
    tracing::info!(job = %id, attempt = lease.attempt, "job started");
    let cancel = Arc::new(AtomicBool::new(false));
    let mut task = {
        let (engine, cancel, input) = (engine.clone(), cancel.clone(), lease.record.input.clone());
        let kind = lease.record.kind;
        let seed = seed_from_job_id(&id);
        // The job's clock is its submission time, so a re-run renders the
        // same {{time}} and {{date}}.
        let clock = DateTime::from_timestamp_millis(lease.record.created_ms as i64)
            .unwrap_or_default()
            .fixed_offset();
        tokio::task::spawn_blocking(move || {
            run_job(&engine, kind, &input, seed, clock, &|| {
                cancel.load(Ordering::Relaxed)
            })
        })
    };
    let timeout = Duration::from_millis(lease.record.policy.execution_timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut timed_out = false;
    let mut check = tokio::time::interval(Duration::from_millis(200));
    let (outcome, usage) = loop {
        tokio::select! {
            done = &mut task => break done.unwrap_or_else(|e| (Outcome::Failed(format!("worker task panicked: {e}")), Usage::default())),
            _ = tokio::time::sleep_until(deadline), if !timed_out => {
                timed_out = true;
                cancel.store(true, Ordering::Relaxed);
            }
            _ = check.tick() => {
                // Cancelled by the shim (state no longer IN_PROGRESS)?
                if consumer.state_of(&id).await? != Some(JobState::InProgress) {
                    cancel.store(true, Ordering::Relaxed);
                }
                if stopping.load(Ordering::SeqCst) {
                    let d = *drain_deadline.get_or_insert_with(|| tokio::time::Instant::now() + drain);
                    if tokio::time::Instant::now() >= d {
                        // Exiting stops the heartbeats: another worker takes
                        // the job over once its entry is idle.
                        tracing::warn!(job = %id, "drain timeout: leaving the job to another worker");
                        std::process::exit(0);
                    }
                }
            }
        }
    };
    let outcome = if timed_out {
        Outcome::TimedOut(format!(
            "the run took longer than policy.executionTimeout ({} ms)",
            timeout.as_millis()
        ))
    } else {
        outcome
    };
    let state = match &outcome {
        Outcome::Completed(_) => "COMPLETED",
        Outcome::Failed(_) => "FAILED",
        Outcome::TimedOut(_) => "TIMED_OUT",
    };
    // Totals first: once the result is written, callbacks and /status may
    // be read, and the metrics should already count this run.
    consumer
        .queue()
        .add_worker_stats(&[
            (state, 1),
            ("prompt_tokens", usage.prompt_tokens),
            ("generated_tokens", usage.generated_tokens),
            ("prefill_ms", usage.prefill_ms),
            ("decode_ms", usage.decode_ms),
        ])
        .await?;
    let written = consumer.finish(lease, outcome).await?;
    tracing::info!(job = %id, state, written, "job finished");
    Ok(())
}
