//! The Redis consume loops: one job at a time per slot (one slot for the
//! kinds in `WORKER_KINDS`, or more as `WORKER_CONCURRENCY` says); cancellation noticed between
//! tokens; the execution timeout enforced (a run that does not stop in time
//! is abandoned); every write fenced by the run's lease; Redis outages
//! waited out; on SIGTERM, a drain that hands the running job back at the
//! deadline without spending an attempt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use pipeline::queue::{
    is_unavailable, unique_worker_name, Lease, LeaseGuard, Outcome, RedisQueue, RunControl,
};
use pipeline::{Job, JobKind, JobState};
use tokio::sync::broadcast;
use tracing::Instrument;

use crate::chat::{seed_from_job_id, Usage};
use crate::config::WorkerConfig;
use crate::handlers::{self, RunCtx, Services, StreamItem};
use crate::runtime::{Claimed, StreamsBackend, TraceRunsLayer};

/// Exponential backoff for Redis outages: 100 ms doubling to 2 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
    }
}

pub async fn serve(cfg: WorkerConfig) -> anyhow::Result<()> {
    let kinds = cfg.worker_kinds()?;
    let slots = cfg.slots(&kinds)?;
    let services = Arc::new(Services {
        engine: Arc::new(cfg.chat_engine().await?),
        platform: cfg.platform_client()?,
        platform_keys: cfg.platform_keys()?,
        history_messages: cfg.history_messages,
        memory_max_words: cfg.memory_max_words,
        image: cfg.image_service(&kinds).await?,
        video: cfg.video_service(&kinds).await?,
        outbound: cfg.outbound_guard()?,
    });
    let queue = RedisQueue::connect_with_retry(&cfg.redis_url, cfg.queue_config()).await?;
    queue.warn_if_not_persistent().await;
    if let Some(stats) = services.engine.text_stats().cloned() {
        queue.report_gauges(Arc::new(move || {
            stats
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect()
        }));
    }
    // Ids of jobs whose stop was requested (a streaming client went away).
    let stops = queue.spawn_relay(queue.keys().stops());

    let stopping = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(tokio::sync::Notify::new());
    {
        let (stop, stopping) = (stop.clone(), stopping.clone());
        tokio::spawn(async move {
            pipeline::shutdown_signal().await;
            tracing::info!("stop requested: finishing the running jobs, taking no new ones");
            stopping.store(true, Ordering::SeqCst);
            stop.notify_waiters();
        });
    }
    // Every slot is an apalis worker under one monitor; the monitor stops
    // them on SIGTERM, and each drains its run before leaving.
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    tracing::info!(name = %cfg.worker_name, host = host.trim(), pid = std::process::id(), "worker identity");
    let mut monitor = apalis_core::monitor::Monitor::new();
    for (i, slot_kinds) in slots.into_iter().enumerate() {
        let slot = Slot {
            name: unique_worker_name(&format!("{}{i}", cfg.worker_name)),
            kinds: slot_kinds,
            services: services.clone(),
            queue: queue.clone(),
            stops: stops.clone(),
            stopping: stopping.clone(),
            poll: Duration::from_millis(cfg.heartbeat_ms.max(50)),
            drain: Duration::from_secs(cfg.drain_timeout_s),
        };
        monitor = slot.register(monitor);
    }
    let signal = async move {
        while !stopping.load(Ordering::SeqCst) {
            tokio::select! {
                _ = stop.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        Ok::<(), std::io::Error>(())
    };
    // The monitor polls every slot inside its own future: as a task it runs
    // on the runtime's threads, where the slots' I/O wakes it. Awaited here
    // it would run on the main thread (`block_on`), and every read, claim
    // and finish of every slot would wake that thread from its condvar.
    match tokio::spawn(monitor.run_with_signal(signal)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the worker runtime stopped"),
        Err(e) => tracing::error!(error = %e, "the worker runtime panicked"),
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// One consume loop: one job at a time of its kinds, under its own
/// consumer name (a worker runs one per slot of `WORKER_CONCURRENCY`).
struct Slot {
    name: String,
    kinds: Vec<JobKind>,
    services: Arc<Services>,
    queue: RedisQueue,
    stops: broadcast::Sender<std::sync::Arc<str>>,
    stopping: Arc<AtomicBool>,
    poll: Duration,
    drain: Duration,
}

impl Slot {
    /// Adds the slot to `monitor` as an apalis worker: our Streams backend,
    /// a span per run, one run at a time (the next job is claimed only once
    /// this one ended).
    fn register(self, monitor: apalis_core::monitor::Monitor) -> apalis_core::monitor::Monitor {
        monitor.register(move |_restarts| {
            let backend = StreamsBackend::new(
                self.queue.clone(),
                self.kinds.clone(),
                self.name.clone(),
                self.poll,
            );
            let (services, stops, stopping, drain) = (
                self.services.clone(),
                self.stops.clone(),
                self.stopping.clone(),
                self.drain,
            );
            let run = tower::service_fn(move |task: apalis_core::task::Task<Claimed>| {
                let (Claimed { lease, control }, _) = task.take();
                let (services, stops, stopping) =
                    (services.clone(), stops.subscribe(), stopping.clone());
                async move {
                    run_lease(&services, stops, &control, lease, &stopping, drain).await;
                    Ok::<(), apalis_core::error::BoxDynError>(())
                }
            });
            apalis_core::worker::builder::WorkerBuilder::new(self.name.as_str())
                .backend(backend)
                .layer(TraceRunsLayer)
                .layer(tower::limit::ConcurrencyLimitLayer::new(1))
                .build(run)
        })
    }
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

/// Retries `op` while Redis is unavailable, until it succeeds, fails for
/// another reason, or `give_up` says the result no longer matters.
async fn with_redis_retry<T, F, Fut>(what: &str, give_up: impl Fn() -> bool, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, pipeline::PipelineError>>,
{
    let mut backoff = Backoff::new();
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) if is_unavailable(&e) && !give_up() => {
                tracing::warn!(error = %e, "{what}: Redis unavailable, retrying");
                backoff.wait().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "{what} failed");
                return None;
            }
        }
    }
}

/// How a run's wait ended.
enum RunEnd {
    Done(Outcome, Usage),
    /// Another worker holds the job now: write nothing.
    LeaseLost,
    /// The worker is stopping and the drain deadline passed: hand it back.
    HandBack,
}

async fn run_lease(
    services: &Arc<Services>,
    mut stops: broadcast::Receiver<std::sync::Arc<str>>,
    consumer: &RunControl,
    lease: Lease,
    stopping: &AtomicBool,
    drain: Duration,
) {
    let id = lease.record.id.clone();
    tracing::info!(job = %id, attempt = lease.attempt, run = lease.run, "job started");
    let queue = consumer.queue().clone();
    let guard = LeaseGuard::new(&queue, &lease);
    let cancel = Arc::new(AtomicBool::new(false));
    // Text deltas (and spoken chunks) go to the job's token stream (for
    // /stream/{id} and the streamed chat route) as they come, in order,
    // only while this run holds the job.
    let (deltas, mut delta_rx) = tokio::sync::mpsc::unbounded_channel::<StreamItem>();
    let pump = {
        let (guard, cancel, queue, id) = (guard.clone(), cancel.clone(), queue.clone(), id.clone());
        tokio::spawn(async move {
            let mut batch_no = 0u64;
            // A run after a crash or a hand-back regenerates the same text
            // (same prompt, same seed): what an earlier run already streamed
            // is skipped (text by bytes here, spoken chunks by index in
            // Redis). Read when the first item comes: a job that streams
            // nothing never asks.
            let mut streamed: Option<Vec<usize>> = None;
            while let Some(first) = delta_rx.recv().await {
                if streamed.is_none() {
                    streamed = Some(
                        with_redis_retry(
                            "reading the token stream",
                            || guard.is_lost(),
                            || queue.streamed_bytes(&id),
                        )
                        .await
                        .unwrap_or_default(),
                    );
                }
                let streamed = streamed.as_mut().expect("read above");
                let mut burst = vec![first];
                while let Ok(more) = delta_rx.try_recv() {
                    burst.push(more);
                }
                // Runs of text go as one batch each; a spoken chunk goes
                // between the texts around it.
                let mut sent = Some(true);
                let mut texts: Vec<(usize, String)> = Vec::new();
                for item in burst.into_iter().map(Some).chain([None]) {
                    let audio = match item {
                        Some(StreamItem::Text(option, text)) => {
                            texts.extend(skip_streamed(streamed, option, text));
                            continue;
                        }
                        Some(StreamItem::Audio(chunk)) => Some(chunk),
                        None => None,
                    };
                    if !texts.is_empty() {
                        // Retried as one numbered batch: written once even
                        // when a Redis restart hid that the first send went
                        // through.
                        batch_no += 1;
                        let batch = std::mem::take(&mut texts);
                        sent = with_redis_retry(
                            "publishing tokens",
                            || guard.is_lost(),
                            || guard.publish_tokens(batch_no, &batch),
                        )
                        .await;
                        if sent != Some(true) {
                            break;
                        }
                    }
                    if let Some(chunk) = audio {
                        sent = with_redis_retry(
                            "publishing audio",
                            || guard.is_lost(),
                            || guard.publish_audio(&chunk),
                        )
                        .await;
                        if sent != Some(true) {
                            break;
                        }
                    }
                }
                if sent != Some(true) {
                    // Refused: the job was settled or taken over. Stop the
                    // run; nothing more goes out.
                    cancel.store(true, Ordering::Relaxed);
                    break;
                }
            }
        })
    };
    // Progress of a media job: the latest goes to the record and the
    // stream, only while this run holds the job. A burst is coalesced to its
    // latest event, but never across a stage: a stage's last step (a video's
    // "decode 3/3") is published before the next stage's first.
    let (progress, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let progress_pump = {
        let guard = guard.clone();
        tokio::spawn(async move {
            let publish = |event: serde_json::Value| {
                let guard = guard.clone();
                async move {
                    with_redis_retry(
                        "publishing progress",
                        || guard.is_lost(),
                        || guard.publish_progress(&event),
                    )
                    .await
                        == Some(true)
                }
            };
            while let Some(first) = progress_rx.recv().await {
                let mut burst = vec![first];
                while let Ok(newer) = progress_rx.try_recv() {
                    burst.push(newer);
                }
                for event in coalesce_progress(burst) {
                    if !publish(event).await {
                        return;
                    }
                }
            }
        })
    };
    // The caller's own bucket (RunPod's s3Config), opened from the record.
    let job_store = match queue.s3_config(&lease.record) {
        Ok(Some(s3)) => Some(Arc::new(pipeline::media_store::MediaStore::s3(
            pipeline::media_store::S3Settings {
                endpoint: Some(s3.endpoint_url),
                region: "us-east-1".into(),
                bucket: s3.bucket_name,
                access_key_id: s3.access_id,
                secret_access_key: s3.access_secret,
                force_path_style: true,
                cdn_base_url: None,
            },
        ))),
        Ok(None) => match &lease.record.output_prefix {
            // Cog's output_file_prefix: PUT there, through the guard.
            Some(prefix) => match pipeline::media_store::MediaStore::http_put(
                prefix.clone(),
                &services.outbound,
            ) {
                Ok(store) => Some(Arc::new(store)),
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "output_file_prefix store");
                    None
                }
            },
            None => None,
        },
        Err(e) => {
            tracing::error!(job = %id, error = %e, "the job's s3Config cannot be opened");
            None
        }
    };
    let seed = seed_from_job_id(&id);
    // The job's clock is its submission time, so a re-run renders the same
    // {{time}} and {{date}}.
    let clock = DateTime::from_timestamp_millis(lease.record.created_ms as i64)
        .unwrap_or_default()
        .fixed_offset();
    // The typed job, parsed once in this process; bad input fails at once
    // and is never retried.
    let ctx = RunCtx {
        job_id: id.clone(),
        tenant: lease.record.owner.clone(),
        seed,
        clock,
        cancel: cancel.clone(),
        deltas,
        progress,
        media: job_store,
        fence: Some(guard.clone()),
        services: services.clone(),
    };
    let mut task = match Job::parse(lease.record.kind, &lease.record.input) {
        Ok(job) => tokio::spawn(handlers::run(job, ctx).in_current_span()),
        Err(e) => {
            drop(ctx);
            let failed = (
                Outcome::Failed(format!("invalid input: {e}")),
                Usage::default(),
            );
            tokio::spawn(async move { failed })
        }
    };
    // The run ends at its execution timeout or when the job's ttl (its
    // whole life, queue and run, as RunPod counts it) runs out.
    let exec_timeout = Duration::from_millis(lease.record.policy.execution_timeout_ms);
    let life_left = lease
        .record
        .expires_ms
        .map(|e| Duration::from_millis(e.saturating_sub(pipeline::now_ms())));
    let ttl_first = life_left.is_some_and(|l| l < exec_timeout);
    let timeout = life_left.map_or(exec_timeout, |l| l.min(exec_timeout));
    let deadline = tokio::time::Instant::now() + timeout;
    // A run told to stop gets this long to end by itself before it is
    // abandoned (its result, if any, is never written).
    const GRACE: Duration = Duration::from_secs(2);
    let mut abandon_at: Option<tokio::time::Instant> = None;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut timed_out = false;
    // The first look is a period in (an interval's first tick is at once:
    // a Redis read for every job, most of which end before it matters).
    const CHECK: Duration = Duration::from_millis(200);
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + CHECK, CHECK);
    let end = loop {
        tokio::select! {
            done = &mut task => {
                let (outcome, usage) = done.unwrap_or_else(|e| {
                    (Outcome::Failed(format!("the job's handler panicked: {e}")), Usage::default())
                });
                break if guard.is_lost() { RunEnd::LeaseLost } else { RunEnd::Done(outcome, usage) };
            }
            _ = tokio::time::sleep_until(deadline), if !timed_out => {
                timed_out = true;
                cancel.store(true, Ordering::Relaxed);
                abandon_at = Some(tokio::time::Instant::now() + GRACE);
            }
            _ = async { tokio::time::sleep_until(abandon_at.expect("guarded")).await }, if abandon_at.is_some() => {
                // A hard timeout: whatever the run awaits (a hung upload or
                // platform call, a step that never checks the flag), the
                // job ends now.
                task.abort();
                tracing::warn!(job = %id, "the run did not stop in time: abandoned");
                break RunEnd::Done(Outcome::Failed(String::new()), Usage::default());
            }
            stop = stops.recv() => {
                if matches!(stop, Ok(ref stopped) if **stopped == *id) {
                    tracing::info!(job = %id, "stop requested: ending generation");
                    cancel.store(true, Ordering::Relaxed);
                }
            }
            _ = check.tick() => {
                if guard.is_lost() {
                    cancel.store(true, Ordering::Relaxed);
                    task.abort();
                    break RunEnd::LeaseLost;
                }
                // Cancelled by the shim (state no longer IN_PROGRESS)?
                if let Ok(st) = consumer.state_of(&id).await {
                    if st != Some(JobState::InProgress) {
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
                if stopping.load(Ordering::SeqCst) {
                    let d = *drain_deadline.get_or_insert_with(|| tokio::time::Instant::now() + drain);
                    if tokio::time::Instant::now() >= d {
                        cancel.store(true, Ordering::Relaxed);
                        task.abort();
                        break RunEnd::HandBack;
                    }
                }
            }
        }
    };
    let (outcome, usage) = match end {
        RunEnd::LeaseLost => {
            tracing::warn!(job = %id, run = lease.run, "lease lost: another worker runs this job; nothing written");
            pump.abort();
            progress_pump.abort();
            return;
        }
        RunEnd::HandBack => {
            pump.abort();
            progress_pump.abort();
            let released = with_redis_retry(
                "handing the job back",
                || guard.is_lost(),
                || consumer.release(&lease),
            )
            .await;
            tracing::warn!(job = %id, released = ?released, "drain deadline: job handed back to the queue (its attempt returned)");
            return;
        }
        RunEnd::Done(outcome, usage) => (outcome, usage),
    };
    let outcome = if timed_out && ttl_first {
        Outcome::TimedOut(format!(
            "the job outlived its policy.ttl ({} ms from submission)",
            lease.record.policy.ttl_ms
        ))
    } else if timed_out {
        Outcome::TimedOut(format!(
            "the run took longer than policy.executionTimeout ({} ms)",
            timeout.as_millis()
        ))
    } else {
        outcome
    };
    let state = match &outcome {
        Outcome::Completed(_) => JobState::Completed,
        Outcome::Failed(_) => JobState::Failed,
        Outcome::TimedOut(_) => JobState::TimedOut,
    };
    // Every delta is written before the result (the end event follows it).
    let _ = pump.await;
    let _ = progress_pump.await;
    // The run's totals go in with the result (the script adds them first):
    // once the result is written, callbacks and /status may be read, and
    // the metrics should already count this run.
    let stats = [
        (state.as_str(), 1),
        ("prompt_tokens", usage.prompt_tokens),
        ("generated_tokens", usage.generated_tokens),
        ("prefill_ms", usage.prefill_ms),
        ("decode_ms", usage.decode_ms),
        ("transcriptions", usage.transcriptions),
        ("transcribed_ms", usage.transcribed_ms),
        ("reply_trims", usage.reply_trims),
        ("stop_sequence_hits", usage.stop_sequence_hits),
        ("reply_resamples", usage.reply_resamples),
    ];
    let finished = with_redis_retry(
        "writing the result",
        || guard.is_lost(),
        || consumer.finish_counting(&lease, outcome.clone(), &stats),
    )
    .await;
    tracing::info!(job = %id, state = state.as_str(), finished = ?finished, "job finished");
}

/// A burst of progress events as published: each run of events of the same
/// stage (`stage`, absent for an image's steps) down to its last one, so a
/// stage's final step is never dropped in favour of the next stage's first.
fn coalesce_progress(burst: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = Vec::with_capacity(burst.len());
    for event in burst {
        match out.last_mut() {
            Some(last) if last.get("stage") == event.get("stage") => *last = event,
            _ => out.push(event),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{coalesce_progress, skip_streamed};

    #[test]
    fn a_progress_burst_keeps_each_stage_s_last_step() {
        let e = |stage: Option<&str>, step: u64| match stage {
            Some(s) => serde_json::json!({"stage": s, "step": step}),
            None => serde_json::json!({"step": step}),
        };
        let burst = vec![
            e(Some("denoise"), 1),
            e(Some("denoise"), 2),
            e(Some("decode"), 1),
            e(Some("decode"), 2),
            e(Some("decode"), 3),
            e(Some("encode"), 0),
        ];
        let want = vec![
            e(Some("denoise"), 2),
            e(Some("decode"), 3),
            e(Some("encode"), 0),
        ];
        assert_eq!(coalesce_progress(burst), want);
        // An image's steps (no stage): the latest only.
        let steps = vec![e(None, 1), e(None, 2), e(None, 3)];
        assert_eq!(coalesce_progress(steps), vec![e(None, 3)]);
        assert!(coalesce_progress(vec![]).is_empty());
    }

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
