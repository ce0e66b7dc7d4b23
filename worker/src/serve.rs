//! The Redis consume loop: one job at a time per worker (one model, one
//! device), cancellation and execution timeouts noticed between tokens,
//! graceful drain on SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use futures::StreamExt;
use pipeline::memory_contract::MemoryCondenseJob;
use pipeline::platform::PlatformClient;
use pipeline::queue::{unique_worker_name, Consumer, Lease, Outcome, RedisQueue};
use pipeline::{ChatRespondJob, JobKind, JobState};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::chat::{seed_from_job_id, ChatEngine, Usage};
use crate::config::WorkerConfig;
use crate::stream::StreamRun;

/// Runs a job's input to an outcome. Bad input fails at once (never
/// retried).
#[allow(clippy::too_many_arguments)]
pub fn run_job(
    engine: &ChatEngine,
    job_id: &str,
    kind: JobKind,
    input: &Value,
    seed: u64,
    clock: DateTime<FixedOffset>,
    cancelled: &dyn Fn() -> bool,
    on_text: &mut dyn FnMut(usize, &str),
) -> (Outcome, Usage) {
    let ran = match kind {
        JobKind::Chat => ChatRespondJob::parse(input)
            .map_err(|e| format!("invalid input: {e}"))
            .and_then(|job| {
                engine
                    .respond(&job, job_id, seed, clock, cancelled, on_text)
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
        JobKind::ChatStream => {
            Err("streamed chat runs on the Redis worker (it needs the platform API)".into())
        }
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
    let platform = cfg.platform_client()?;
    let stops = spawn_stop_relay(&queue);
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
        let ctx = RunContext {
            engine: engine.clone(),
            platform: platform.clone(),
            history_messages: cfg.history_messages,
            memory_max_words: cfg.memory_max_words,
            stops: stops.subscribe(),
        };
        run_lease(ctx, &consumer, lease, &stopping, drain).await?;
    }
    heartbeat.abort();
    consumer.deregister().await?;
    tracing::info!("worker stopped");
    Ok(())
}

/// The part of `text` (the next delta of `option`) not streamed by an
/// earlier run; `streamed[option]` counts down the bytes left to skip.
fn skip_streamed(streamed: &mut [usize], option: usize, text: String) -> Option<(usize, String)> {
    let Some(left) = streamed.get_mut(option).filter(|l| **l > 0) else {
        return Some((option, text));
    };
    if text.len() <= *left {
        *left -= text.len();
        return None;
    }
    let cut = *left;
    *left = 0;
    // Deltas are whole characters, so the earlier run's end falls between
    // two of them; if it does not (a different text), send the delta whole.
    let rest = if text.is_char_boundary(cut) {
        text[cut..].to_string()
    } else {
        text
    };
    Some((option, rest))
}

/// What a run needs besides its lease.
struct RunContext {
    engine: Arc<ChatEngine>,
    platform: Option<PlatformClient>,
    history_messages: usize,
    memory_max_words: u32,
    /// Ids of jobs whose stop was requested (a streaming client went away).
    stops: broadcast::Receiver<String>,
}

/// Relays `{ns}:stops` (pub/sub) into a broadcast channel, reconnecting.
fn spawn_stop_relay(queue: &RedisQueue) -> broadcast::Sender<String> {
    let (tx, _) = broadcast::channel(256);
    let (client, channel, out) = (queue.client().clone(), queue.stops_channel(), tx.clone());
    tokio::spawn(async move {
        loop {
            if let Ok(mut pubsub) = client.get_async_pubsub().await {
                if pubsub.subscribe(&channel).await.is_ok() {
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        if let Ok(id) = msg.get_payload::<String>() {
                            let _ = out.send(id);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    tx
}

async fn run_lease(
    mut ctx: RunContext,
    consumer: &Consumer,
    lease: Lease,
    stopping: &AtomicBool,
    drain: Duration,
) -> anyhow::Result<()> {
    let id = lease.record.id.clone();
    tracing::info!(job = %id, attempt = lease.attempt, "job started");
    let cancel = Arc::new(AtomicBool::new(false));
    // Text deltas go to the job's token stream (for /stream/{id} and the
    // streamed chat route) as they come.
    let (deltas, mut delta_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    // A re-run after a crash regenerates the same text (same prompt, same
    // seed): what the first run already streamed is not streamed again.
    let mut streamed = if lease.attempt > 1 {
        consumer.queue().streamed_bytes(&id).await?
    } else {
        Vec::new()
    };
    let pump = {
        let (queue, id) = (consumer.queue().clone(), id.clone());
        tokio::spawn(async move {
            while let Some(first) = delta_rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = delta_rx.try_recv() {
                    batch.push(more);
                }
                let batch: Vec<(usize, String)> = batch
                    .into_iter()
                    .filter_map(|(option, text)| skip_streamed(&mut streamed, option, text))
                    .collect();
                if let Err(e) = queue.publish_tokens(&id, &batch).await {
                    tracing::warn!(job = %id, error = %e, "publishing tokens failed");
                }
            }
        })
    };
    let seed = seed_from_job_id(&id);
    // The job's clock is its submission time, so a re-run renders the same
    // {{time}} and {{date}}.
    let clock = DateTime::from_timestamp_millis(lease.record.created_ms as i64)
        .unwrap_or_default()
        .fixed_offset();
    let input = lease.record.input.clone();
    let mut task = match lease.record.kind {
        JobKind::ChatStream => tokio::spawn(
            StreamRun {
                engine: ctx.engine.clone(),
                platform: ctx.platform.clone(),
                history_messages: ctx.history_messages,
                memory_max_words: ctx.memory_max_words,
                job_id: id.clone(),
                input,
                seed,
                clock,
                cancel: cancel.clone(),
                deltas,
            }
            .run(),
        ),
        kind => {
            let (engine, cancel, job_id) = (ctx.engine.clone(), cancel.clone(), id.clone());
            tokio::task::spawn_blocking(move || {
                run_job(
                    &engine,
                    &job_id,
                    kind,
                    &input,
                    seed,
                    clock,
                    &|| cancel.load(Ordering::Relaxed),
                    &mut |i, d| {
                        let _ = deltas.send((i, d.to_string()));
                    },
                )
            })
        }
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
            stop = ctx.stops.recv() => {
                if matches!(stop, Ok(ref stopped) if *stopped == id) {
                    tracing::info!(job = %id, "stop requested: ending generation");
                    cancel.store(true, Ordering::Relaxed);
                }
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
    let _ = pump.await;
    let final_state = JobState::parse(state).unwrap_or(JobState::Failed);
    let written = consumer.finish(lease, outcome).await?;
    consumer.queue().publish_end(&id, final_state).await?;
    tracing::info!(job = %id, state, written, "job finished");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::skip_streamed;

    #[test]
    fn a_rerun_skips_what_was_streamed_and_keeps_the_rest() {
        let mut streamed = vec![7, 0];
        let out: Vec<_> = [(0, "Hello"), (1, "Hi"), (0, " wor"), (0, "ld!")]
            .into_iter()
            .filter_map(|(o, t)| skip_streamed(&mut streamed, o, t.to_string()))
            .collect();
        // "Hello w" (7 bytes) went out before the crash.
        let expected: Vec<(usize, String)> =
            vec![(1, "Hi".into()), (0, "or".into()), (0, "ld!".into())];
        assert_eq!(out, expected);
        assert_eq!(streamed, vec![0, 0]);
        // Not on a character boundary: the delta goes whole.
        let mut streamed = vec![1];
        assert_eq!(
            skip_streamed(&mut streamed, 0, "é".into()),
            Some((0, "é".to_string()))
        );
    }
}
