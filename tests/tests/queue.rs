//! The Redis queue against a real redis-server: one test per apalis-redis
//! defect DESIGN.md lists, plus lanes, TTL, cancel and retry.

mod common;

use std::time::{Duration, Instant};

use common::Redis;
use pipeline::queue::{
    AudioChunk, Finished, LeaseGuard, Outcome, QueueConfig, RedisQueue, RetryOutcome, TokenEvent,
};
use pipeline::{JobKind, JobState, Policy, RunRequest};
use redis::AsyncCommands;
use serde_json::json;

fn request(policy: Policy) -> RunRequest {
    let body = json!({
        "input": {"messages": [{"id": 1, "type": "text", "text": "hi", "is_processed": false}], "character": "github:a/b"},
    });
    let mut req = RunRequest::parse(JobKind::Chat, body.to_string().as_bytes()).unwrap();
    // Policies past what a client may ask for (a 1 ms ttl) are set here.
    req.policy = policy;
    req
}

async fn queue(redis: &Redis, cfg: QueueConfig) -> RedisQueue {
    RedisQueue::connect(&redis.url, cfg).await.unwrap()
}

fn fast_cfg(max_attempts: u32) -> QueueConfig {
    QueueConfig {
        heartbeat: Duration::from_millis(100),
        missed_heartbeats: 2,
        max_attempts,
        ..QueueConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumer_picks_up_a_pushed_job_in_milliseconds() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let mut consumer = q.consumer(&[JobKind::Chat], "idle-worker").await.unwrap();
    // The worker is idle: a first wait finds nothing.
    assert!(consumer
        .next(Duration::from_millis(100))
        .await
        .unwrap()
        .is_none());
    let waiting = tokio::spawn(async move {
        let lease = consumer.next(Duration::from_secs(10)).await.unwrap();
        (Instant::now(), lease)
    });
    // Let the consumer block in XREADGROUP before the push.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pushed = Instant::now();
    let rec = q
        .enqueue(&request(Policy::default()), "owner")
        .await
        .unwrap();
    let (picked, lease) = waiting.await.unwrap();
    let lease = lease.expect("the job was picked up");
    assert_eq!(lease.record.id, rec.id);
    let pickup = picked.duration_since(pushed);
    println!("pickup latency of an idle worker: {pickup:?}");
    // apalis-redis 1.0.0 took 1.5-5 s here; ours is a wake-up on XADD.
    assert!(
        pickup < Duration::from_millis(100),
        "pickup took {pickup:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_10000_jobs_drains() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let n = 10_000;
    let req = request(Policy::default());
    for chunk in 0..(n / 500) {
        let futs = (0..500).map(|_| q.enqueue(&req, "owner"));
        for r in futures::future::join_all(futs).await {
            r.unwrap_or_else(|e| panic!("enqueue in chunk {chunk}: {e}"));
        }
    }
    assert_eq!(q.counts().await.unwrap()["IN_QUEUE"], n as i64);
    let mut consumer = q.consumer(&[JobKind::Chat], "drainer").await.unwrap();
    let mut done = 0;
    while let Some(lease) = consumer.next(Duration::from_millis(500)).await.unwrap() {
        assert_eq!(
            consumer
                .finish(&lease, Outcome::Completed(json!({})))
                .await
                .unwrap(),
            Finished::Written
        );
        done += 1;
    }
    assert_eq!(done, n);
    let counts = q.counts().await.unwrap();
    assert_eq!(counts["COMPLETED"], n as i64);
    assert_eq!(counts["IN_QUEUE"], 0);
    assert_eq!(counts["IN_PROGRESS"], 0);
}

/// Runs every job `consumer` gets until none comes for 200 ms; their ids
/// in the order run.
async fn run_all(consumer: &mut pipeline::queue::Consumer) -> Vec<String> {
    let mut order = vec![];
    while let Some(lease) = consumer.next(Duration::from_millis(200)).await.unwrap() {
        order.push(lease.record.id.clone());
        consumer
            .finish(&lease, Outcome::Completed(json!({})))
            .await
            .unwrap();
    }
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_lane_goes_before_low_priority() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let low = q
        .enqueue(
            &request(Policy {
                low_priority: true,
                ..Policy::default()
            }),
            "o",
        )
        .await
        .unwrap();
    let a = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let b = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    let order = run_all(&mut consumer).await;
    assert_eq!(order, [a.id, b.id, low.id]);

    // The same once the consumer has found the lanes drained (its next read
    // blocks at once, and sees both lanes' entries in one reply).
    assert!(consumer
        .next(Duration::from_millis(50))
        .await
        .unwrap()
        .is_none());
    let low_priority = request(Policy {
        low_priority: true,
        ..Policy::default()
    });
    let low = q.enqueue(&low_priority, "o").await.unwrap();
    let low2 = q.enqueue(&low_priority, "o").await.unwrap();
    let a = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let b = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let order = run_all(&mut consumer).await;
    assert_eq!(order, [a.id, b.id, low.id, low2.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_past_its_ttl_is_timed_out_not_run() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let rec = q
        .enqueue(
            &request(Policy {
                ttl_ms: 1,
                ..Policy::default()
            }),
            "o",
        )
        .await
        .unwrap();
    // Let the ttl pass.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    assert!(consumer
        .next(Duration::from_millis(200))
        .await
        .unwrap()
        .is_none());
    let after = q.get(&rec.id).await.unwrap().unwrap();
    assert_eq!(after.state, JobState::TimedOut);
    assert_eq!(after.attempts, 0);
    assert!(after.error.unwrap().contains("ttl"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_job_is_never_run_and_cancel_is_final() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let rec = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    assert_eq!(
        q.cancel(&rec.id, "test").await.unwrap(),
        Some(JobState::Cancelled)
    );
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    assert!(consumer
        .next(Duration::from_millis(200))
        .await
        .unwrap()
        .is_none());
    let after = q.get(&rec.id).await.unwrap().unwrap();
    assert_eq!((after.state, after.attempts), (JobState::Cancelled, 0));
    // A running job that is cancelled keeps its CANCELLED state: the worker's
    // late result is not written.
    let rec = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let lease = consumer
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        q.cancel(&rec.id, "").await.unwrap(),
        Some(JobState::Cancelled)
    );
    assert_eq!(
        consumer
            .finish(&lease, Outcome::Completed(json!({"late": true})))
            .await
            .unwrap(),
        Finished::AlreadySettled
    );
    let after = q.get(&rec.id).await.unwrap().unwrap();
    assert_eq!((after.state, after.output), (JobState::Cancelled, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_requeues_failed_jobs_only_with_fresh_attempts() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let rec = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    let lease = consumer
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap();
    consumer
        .finish(&lease, Outcome::Failed("boom".into()))
        .await
        .unwrap();
    assert_eq!(q.retry(&rec.id).await.unwrap(), RetryOutcome::Requeued);
    let again = q.get(&rec.id).await.unwrap().unwrap();
    assert_eq!(
        (again.state, again.attempts, again.error),
        (JobState::InQueue, 0, None)
    );
    assert_eq!(q.counts().await.unwrap()["retried"], 1);
    let lease = consumer
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.attempt, 1);
    consumer
        .finish(&lease, Outcome::Completed(json!({})))
        .await
        .unwrap();
    assert_eq!(
        q.retry(&rec.id).await.unwrap(),
        RetryOutcome::NotRetryable(JobState::Completed)
    );
    assert_eq!(q.retry("nope").await.unwrap(), RetryOutcome::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_job_is_taken_over_and_attempts_are_capped() {
    let redis = Redis::start();
    let q = queue(&redis, fast_cfg(2)).await;
    let rec = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    // Worker A takes the job and dies (no finish, no more heartbeats).
    let mut a = q.consumer(&[JobKind::Chat], "a").await.unwrap();
    let lease = a.next(Duration::from_millis(500)).await.unwrap().unwrap();
    assert_eq!(lease.attempt, 1);
    drop(a);
    // Worker B takes it over once A's entry is idle past heartbeat × misses.
    let mut b = q.consumer(&[JobKind::Chat], "b").await.unwrap();
    let started = Instant::now();
    let lease = b
        .next(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("taken over");
    assert_eq!(lease.record.id, rec.id);
    assert_eq!(lease.attempt, 2, "attempts survive the crash");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(b);
    // Worker C finds the job out of attempts: FAILED, not run a third time.
    let mut c = q.consumer(&[JobKind::Chat], "c").await.unwrap();
    assert!(c.next(Duration::from_secs(1)).await.unwrap().is_none());
    let after = q.get(&rec.id).await.unwrap().unwrap();
    assert_eq!(after.state, JobState::Failed);
    assert!(after.error.unwrap().contains("2 attempts"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_long_job_with_its_worker() {
    let redis = Redis::start();
    // 100 ms heartbeats, 5 may be missed: B may take over after 500 ms idle.
    let q = queue(
        &redis,
        QueueConfig {
            missed_heartbeats: 5,
            ..fast_cfg(3)
        },
    )
    .await;
    q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut a = q.consumer(&[JobKind::Chat], "a").await.unwrap();
    let beat = a.spawn_heartbeat();
    let lease = a.next(Duration::from_millis(500)).await.unwrap().unwrap();
    // B looks for orphans for three idle windows while A keeps heartbeating.
    let mut b = q.consumer(&[JobKind::Chat], "b").await.unwrap();
    assert!(b.next(Duration::from_millis(1500)).await.unwrap().is_none());
    assert_eq!(
        a.finish(&lease, Outcome::Completed(json!({})))
            .await
            .unwrap(),
        Finished::Written
    );
    beat.abort();
}

/// Every event of job `id`'s token stream, in order.
async fn token_events(q: &RedisQueue, id: &str) -> Vec<TokenEvent> {
    pipeline::queue::TokenHub::start(q)
        .read(id, "0", Duration::from_millis(1))
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

fn text(t: &str) -> TokenEvent {
    TokenEvent::Text {
        option: 0,
        text: t.into(),
    }
}

fn end(state: &str) -> TokenEvent {
    TokenEvent::End {
        state: JobState::parse(state).unwrap(),
    }
}

/// A worker that stalls past its lease (SIGSTOP, GC, swap) and wakes up
/// after another worker took its job over: its heartbeat does not pull the
/// entry back, its tokens and its result are refused, and the job ends once,
/// with the new holder's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_lease_writes_nothing() {
    let redis = Redis::start();
    let q = queue(&redis, fast_cfg(3)).await;
    let rec = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut a = q.consumer(&[JobKind::Chat], "a").await.unwrap();
    let stale = a.next(Duration::from_millis(500)).await.unwrap().unwrap();
    let stale_guard = LeaseGuard::new(&q, &stale);
    assert!(stale_guard
        .publish_tokens(1, &[(0, "Hel".into())])
        .await
        .unwrap());
    // A stalls (no heartbeats); B takes the job over.
    let mut b = q.consumer(&[JobKind::Chat], "b").await.unwrap();
    let lease = b
        .next(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("taken over");
    assert_eq!((lease.attempt, lease.run), (2, 2));
    let guard = LeaseGuard::new(&q, &lease);
    // A wakes up: its heartbeat finds the entry gone to B and marks the run lost.
    a.beat().await.unwrap();
    assert!(stale.is_lost() && stale_guard.is_lost());
    assert!(!stale_guard.holds().await.unwrap());
    assert!(!stale_guard
        .publish_tokens(2, &[(0, "lo from the stale run".into())])
        .await
        .unwrap());
    // B still holds the entry after A's heartbeat: B's own heartbeat keeps it.
    b.beat().await.unwrap();
    assert!(!lease.is_lost() && guard.holds().await.unwrap());
    assert!(guard.publish_tokens(1, &[(0, "lo!".into())]).await.unwrap());
    // A batch sent again (its first reply lost) is not written twice.
    assert!(guard.publish_tokens(1, &[(0, "lo!".into())]).await.unwrap());
    assert_eq!(
        a.finish(&stale, Outcome::Completed(json!({"by": "a"})))
            .await
            .unwrap(),
        Finished::LeaseLost
    );
    assert_eq!(
        b.finish(&lease, Outcome::Completed(json!({"by": "b"})))
            .await
            .unwrap(),
        Finished::Written
    );
    let after = q.get(&rec.id).await.unwrap().unwrap();
    assert_eq!(after.state, JobState::Completed);
    assert_eq!(after.output, Some(json!({"by": "b"})));
    assert_eq!(
        token_events(&q, &rec.id).await,
        vec![text("Hel"), text("lo!"), end("COMPLETED")]
    );
}

/// A media job's progress is kept on its record (`/status` shows it) and
/// sent on its stream, only while the run holds the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_recorded_and_streamed_only_while_the_run_holds_the_job() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let rec = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    let lease = consumer
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap();
    let guard = LeaseGuard::new(&q, &lease);
    let one = json!({"step": 1, "steps": 4});
    assert!(guard.publish_progress(&one).await.unwrap());
    assert_eq!(
        q.get(&rec.id).await.unwrap().unwrap().progress,
        Some(one.clone())
    );
    consumer
        .finish(&lease, Outcome::Completed(json!({"ok": true})))
        .await
        .unwrap();
    assert!(!guard
        .publish_progress(&json!({"step": 2, "steps": 4}))
        .await
        .unwrap());
    assert_eq!(
        token_events(&q, &rec.id).await,
        vec![TokenEvent::Progress { progress: one }, end("COMPLETED")]
    );
}

/// A cancelled running job's token stream ends with CANCELLED (written by
/// the cancel itself), and the run's later tokens are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_ends_its_stream_with_cancelled() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let rec = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    let lease = consumer
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap();
    let guard = LeaseGuard::new(&q, &lease);
    assert!(guard.publish_tokens(2, &[(0, "Hi".into())]).await.unwrap());
    q.cancel(&rec.id, "by the client").await.unwrap();
    assert!(!guard
        .publish_tokens(3, &[(0, " there".into())])
        .await
        .unwrap());
    assert!(!guard.is_lost(), "cancelled is not taken over");
    assert_eq!(
        consumer
            .finish(&lease, Outcome::Completed(json!({})))
            .await
            .unwrap(),
        Finished::AlreadySettled
    );
    assert_eq!(
        token_events(&q, &rec.id).await,
        vec![text("Hi"), end("CANCELLED")]
    );
}

/// `/retry` starts from a clean token stream and a new callback delivery: the
/// old run's text, end event and webhook id are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_starts_from_a_clean_token_stream_and_callback() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let mut req = request(Policy::default());
    req.webhook = Some("http://127.0.0.1:9/hook".into());
    let rec = q.enqueue(&req, "o").await.unwrap();
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    let lease = consumer
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap();
    let guard = LeaseGuard::new(&q, &lease);
    assert!(guard.publish_tokens(4, &[(0, "old".into())]).await.unwrap());
    consumer
        .finish(&lease, Outcome::Failed("boom".into()))
        .await
        .unwrap();
    let mut conn = redis.conn().await;
    let cb_key = q.keys().callback(&rec.id);
    let old_hook: String = conn.hget(&cb_key, "webhook_id").await.unwrap();
    assert_eq!(
        token_events(&q, &rec.id).await,
        vec![text("old"), end("FAILED")]
    );

    assert_eq!(q.retry(&rec.id).await.unwrap(), RetryOutcome::Requeued);
    assert!(token_events(&q, &rec.id).await.is_empty());
    let exists: bool = conn.exists(&cb_key).await.unwrap();
    assert!(!exists, "the old run's delivery is gone");

    let lease = consumer
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((lease.attempt, lease.run), (1, 2));
    let guard = LeaseGuard::new(&q, &lease);
    assert!(guard.publish_tokens(5, &[(0, "new".into())]).await.unwrap());
    consumer
        .finish(&lease, Outcome::Completed(json!({"ok": true})))
        .await
        .unwrap();
    assert_eq!(
        token_events(&q, &rec.id).await,
        vec![text("new"), end("COMPLETED")]
    );
    let new_hook: String = conn.hget(&cb_key, "webhook_id").await.unwrap();
    assert_ne!(new_hook, old_hook);
}

/// A draining worker hands its job back: the attempt it spent is returned
/// and another worker takes the job at once, not after the lease window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_back_job_runs_elsewhere_at_once_with_its_attempt_returned() {
    let redis = Redis::start();
    // A 10 s lease window: a takeover could not explain a pickup within 1 s.
    let q = queue(
        &redis,
        QueueConfig {
            heartbeat: Duration::from_secs(2),
            missed_heartbeats: 5,
            ..QueueConfig::default()
        },
    )
    .await;
    let rec = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut a = q.consumer(&[JobKind::Chat], "a").await.unwrap();
    let lease = a.next(Duration::from_millis(500)).await.unwrap().unwrap();
    let mut b = q.consumer(&[JobKind::Chat], "b").await.unwrap();
    assert!(a.release(&lease).await.unwrap());
    let handed = q.get(&rec.id).await.unwrap().unwrap();
    assert_eq!((handed.state, handed.attempts), (JobState::InQueue, 0));
    let started = Instant::now();
    let again = b
        .next(Duration::from_secs(1))
        .await
        .unwrap()
        .expect("picked up at once");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!((again.record.id, again.attempt), (rec.id.clone(), 1));
    // The released run cannot write any more.
    assert_eq!(
        a.finish(&lease, Outcome::Completed(json!({})))
            .await
            .unwrap(),
        Finished::LeaseLost
    );
}

fn chunk(index: u64, text: &str) -> AudioChunk {
    AudioChunk {
        index,
        text: text.into(),
        format: "wav".into(),
        seconds: 0.5,
        // Bytes that are not UTF-8 come back as they went.
        audio: vec![0x52, 0x49, 0x46, 0x46, 0xff, 0x00, index as u8],
    }
}

/// Spoken chunks of a streamed reply go on its token stream once per index:
/// a chunk sent again (a lost reply) and the chunks a later run of the same
/// job speaks again (after a hand-back or a crash, same text, same seed)
/// are not written twice; a retried job starts from a clean stream; a run
/// that no longer holds the job writes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoken_chunks_are_streamed_once_per_index_across_runs() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let rec = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut a = q.consumer(&[JobKind::Chat], "a").await.unwrap();
    let first = a.next(Duration::from_millis(500)).await.unwrap().unwrap();
    let guard = LeaseGuard::new(&q, &first);
    assert!(guard
        .publish_tokens(1, &[(0, "Hi there!".into())])
        .await
        .unwrap());
    assert!(guard.publish_audio(&chunk(0, "Hi there!")).await.unwrap());
    assert!(guard.publish_audio(&chunk(0, "Hi there!")).await.unwrap());
    // Handed back; the next run says the same things again.
    assert!(a.release(&first).await.unwrap());
    assert!(!guard.publish_audio(&chunk(1, "stale")).await.unwrap());
    let second = a.next(Duration::from_secs(1)).await.unwrap().unwrap();
    let guard = LeaseGuard::new(&q, &second);
    assert!(guard.publish_audio(&chunk(0, "Hi there!")).await.unwrap());
    assert!(guard
        .publish_tokens(1, &[(0, " Bye.".into())])
        .await
        .unwrap());
    assert!(guard.publish_audio(&chunk(1, " Bye.")).await.unwrap());
    a.finish(&second, Outcome::Failed("boom".into()))
        .await
        .unwrap();
    assert_eq!(
        token_events(&q, &rec.id).await,
        vec![
            text("Hi there!"),
            TokenEvent::Audio(chunk(0, "Hi there!")),
            text(" Bye."),
            TokenEvent::Audio(chunk(1, " Bye.")),
            end("FAILED"),
        ]
    );
    // The text an earlier run streamed counts text only.
    assert_eq!(q.streamed_bytes(&rec.id).await.unwrap(), vec![14]);
    // A retry starts over: chunk 0 is written again on the clean stream.
    assert_eq!(q.retry(&rec.id).await.unwrap(), RetryOutcome::Requeued);
    let third = a.next(Duration::from_millis(500)).await.unwrap().unwrap();
    let guard = LeaseGuard::new(&q, &third);
    assert!(guard.publish_audio(&chunk(0, "Hi again!")).await.unwrap());
    a.finish(&third, Outcome::Completed(json!({})))
        .await
        .unwrap();
    assert_eq!(
        token_events(&q, &rec.id).await,
        vec![TokenEvent::Audio(chunk(0, "Hi again!")), end("COMPLETED")]
    );
}

/// A job's end event carries its record as it ended when the record is
/// small (a waiting /runsync answers without reading it back), and only the
/// id when it is large. The enqueue and the claim hand back the record as
/// stored, equal to what a read gives.
#[tokio::test(flavor = "current_thread")]
async fn end_events_carry_small_records_and_only_the_id_of_large_ones() {
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    // Current-thread runtime: the relay subscribes only once this test
    // awaits, so its first message (RESYNC) says it is listening.
    let mut events = q.spawn_relay(q.keys().events()).subscribe();
    assert_eq!(&*events.recv().await.unwrap(), pipeline::queue::RESYNC);
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    let long_input = {
        let body = json!({
            "input": {"messages": [{"id": 1, "type": "text", "text": "y".repeat(10_000), "is_processed": false}], "character": "github:a/b"},
        });
        RunRequest::parse(JobKind::Chat, body.to_string().as_bytes()).unwrap()
    };
    for (req, output, sent_along) in [
        (request(Policy::default()), json!({"ok": true}), true),
        (request(Policy::default()), json!("x".repeat(10_000)), false),
        (long_input, json!({"ok": true}), false),
    ] {
        let rec = q.enqueue(&req, "o").await.unwrap();
        assert_eq!(Some(&rec), q.get(&rec.id).await.unwrap().as_ref());
        let lease = consumer
            .next(Duration::from_millis(500))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(Some(&lease.record), q.get(&rec.id).await.unwrap().as_ref());
        assert_eq!(lease.record.state, JobState::InProgress);
        consumer
            .finish(&lease, Outcome::Completed(output.clone()))
            .await
            .unwrap();
        let message = events.recv().await.unwrap();
        let (id, ended) = pipeline::queue::job_event(&message);
        assert_eq!(id, rec.id);
        let stored = q.get(&rec.id).await.unwrap().unwrap();
        assert_eq!(stored.output, Some(output));
        if sent_along {
            assert_eq!(ended, Some(stored));
        } else {
            assert_eq!(&*message, rec.id, "a large record is read back");
        }
    }
}

/// Redis restarted without persistence: the consumer group is gone. The
/// consumer creates it again instead of failing with NOGROUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_consumer_group_is_created_again() {
    let redis = Redis::start();
    let q = queue(&redis, fast_cfg(3)).await;
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert!(consumer
        .next(Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());
    let rec = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let lease = consumer
        .next(Duration::from_secs(2))
        .await
        .unwrap()
        .expect("read after the group came back");
    assert_eq!(lease.record.id, rec.id);
}

/// Consumers of workers long gone that hold nothing are removed from the
/// group (ten lease windows idle), so consumer names do not pile up; a
/// consumer that holds an entry is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_dead_workers_are_pruned() {
    let redis = Redis::start();
    // A 200 ms lease window: pruned after 2 s idle.
    let q = queue(&redis, fast_cfg(3)).await;
    q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut holder = q.consumer(&[JobKind::Chat], "holder").await.unwrap();
    let held = holder
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap();
    let _beat = holder.spawn_heartbeat();
    // The ghost runs a job to the end, then its worker is gone.
    q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut ghost = q.consumer(&[JobKind::Chat], "ghost").await.unwrap();
    let ran = ghost
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap();
    ghost
        .finish(&ran, Outcome::Completed(json!({})))
        .await
        .unwrap();
    drop(ghost);
    let lane = q.keys().lane(JobKind::Chat, false);
    let names = |q: RedisQueue, lane: String| async move {
        let infos: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&lane)
            .arg("workers")
            .query_async(&mut q.connection())
            .await
            .unwrap();
        infos
            .iter()
            .map(|c| redis::from_redis_value::<String>(&c["name"]).unwrap())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let before = names(q.clone(), lane.clone()).await;
    assert!(before.contains("ghost"), "{before:?}");
    // The ghost's idle time grows past ten lease windows.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let mut live = q.consumer(&[JobKind::Chat], "live").await.unwrap();
    assert!(live
        .next(Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());
    let after = names(q.clone(), lane).await;
    assert!(!after.contains("ghost"), "{after:?}");
    assert!(
        after.contains("holder"),
        "an entry's holder is kept: {after:?}"
    );
    assert_eq!(
        holder
            .finish(&held, Outcome::Completed(json!({})))
            .await
            .unwrap(),
        Finished::Written
    );
}

/// Dead consumers are looked for (`XINFO CONSUMERS`, a list of every
/// consumer of the lane) by one consumer of the fleet per lane and lease
/// window, not by every slot of every worker each heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_consumer_a_lease_window_looks_for_dead_ones() {
    let redis = Redis::start();
    // Heartbeat 100 ms, lease window 200 ms.
    let q = queue(&redis, fast_cfg(3)).await;
    let looks = || async {
        redis
            .info_number("commandstats", "cmdstat_xinfo|consumers:calls=")
            .await
            .unwrap_or(0)
    };
    let before = looks().await;
    let started = std::time::Instant::now();
    let idle: Vec<_> = (0..8)
        .map(|i| {
            let q = q.clone();
            tokio::spawn(async move {
                let mut c = q
                    .consumer(&[JobKind::Chat], &format!("slot-{i}"))
                    .await
                    .unwrap();
                let until = std::time::Instant::now() + Duration::from_millis(1500);
                while std::time::Instant::now() < until {
                    assert!(c.next(Duration::from_millis(50)).await.unwrap().is_none());
                }
            })
        })
        .collect();
    for slot in idle {
        slot.await.unwrap();
    }
    let windows = started.elapsed().as_millis() as i64 / 200 + 1;
    let made = looks().await - before;
    // Two lanes (normal, low), one look each a window at most; 8 idle
    // slots looking every heartbeat made ~240.
    assert!(made >= 2, "nobody looked for dead consumers");
    assert!(
        made <= 2 * windows,
        "{made} looks in {windows} lease windows"
    );
}

/// A process's idle slots take turns waiting in Redis: at most
/// `blocking_reads` of them are blocked in `XREADGROUP` at once (Redis looks
/// at every client blocked on a lane for each entry added to it), and a
/// burst of jobs still reaches every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slots_take_turns_waiting_in_redis() {
    let redis = Redis::start();
    let cfg = QueueConfig {
        blocking_reads: 2,
        ..QueueConfig::default()
    };
    let q = queue(&redis, cfg).await;
    let slots = 8;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut idle = Vec::new();
    for i in 0..slots {
        let (q, tx) = (q.clone(), tx.clone());
        idle.push(tokio::spawn(async move {
            let mut c = q
                .consumer(&[JobKind::Chat], &format!("slot-{i}"))
                .await
                .unwrap();
            loop {
                if let Some(lease) = c.next(Duration::from_secs(30)).await.unwrap() {
                    // Held, not finished: the next job must go to another slot.
                    tx.send((i, lease.record.id.clone())).unwrap();
                    return (c, lease);
                }
            }
        }));
    }
    let blocked = || async {
        redis
            .info_number("clients", "blocked_clients:")
            .await
            .unwrap()
    };
    // Watch the idle slots for a while: turns are held and passed on (a
    // turn ends every `block`), never more than two at a time in Redis.
    let mut most = 0;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let now = blocked().await;
        assert!(now <= 2, "{now} idle slots blocked in Redis at once");
        most = most.max(now);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(most, 2, "the idle slots never waited in Redis");
    let mut ids = std::collections::HashSet::new();
    for _ in 0..slots {
        ids.insert(
            q.enqueue(&request(Policy::default()), "o")
                .await
                .unwrap()
                .id,
        );
    }
    let mut got = std::collections::HashSet::new();
    for _ in 0..slots {
        let (slot, id) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("every slot gets a job of the burst")
            .unwrap();
        assert!(got.insert(slot), "slot {slot} got two jobs");
        assert!(ids.remove(&id), "{id} run twice or never queued");
    }
    assert!(ids.is_empty());
    for slot in idle {
        slot.await.unwrap();
    }
}

/// An orphan behind more live entries than one look for orphans scans
/// (Redis looks at ten entries per entry it may claim: a hundred here) is
/// still taken over: each look goes on from where the last one stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_behind_many_live_entries_is_taken_over() {
    let redis = Redis::start();
    // A 1 s lease window: the live worker's 100 ms heartbeats keep its
    // entries well inside it.
    let cfg = QueueConfig {
        heartbeat: Duration::from_millis(100),
        missed_heartbeats: 10,
        max_attempts: 3,
        ..QueueConfig::default()
    };
    let q = queue(&redis, cfg).await;
    let mut holder = q.consumer(&[JobKind::Chat], "holder").await.unwrap();
    let _beat = holder.spawn_heartbeat();
    for _ in 0..120 {
        q.enqueue(&request(Policy::default()), "o").await.unwrap();
    }
    let mut running = Vec::new();
    for _ in 0..120 {
        running.push(
            holder
                .next(Duration::from_millis(500))
                .await
                .unwrap()
                .expect("queued above"),
        );
    }
    // The orphan, newer than all of them: its worker took it and died.
    let orphan = q.enqueue(&request(Policy::default()), "o").await.unwrap();
    let mut ghost = q.consumer(&[JobKind::Chat], "ghost").await.unwrap();
    let taken = ghost
        .next(Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.record.id, orphan.id);
    drop(ghost);
    let mut rescuer = q.consumer(&[JobKind::Chat], "rescuer").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    let lease = loop {
        if let Some(lease) = rescuer.next(Duration::from_millis(100)).await.unwrap() {
            break lease;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the orphan behind 120 live entries was never taken over"
        );
    };
    assert_eq!(lease.record.id, orphan.id, "a live worker's job was taken");
    assert_eq!(lease.attempt, 2);
    assert_eq!(running.len(), 120);
}

/// The producer side through apalis's `TaskSink`: pushed, bulk-pushed and
/// streamed requests are written as the shim writes them, in order, under
/// the sink's owner, and a worker reads them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_pushed_through_the_apalis_task_sink_reach_a_worker() {
    use apalis_core::backend::TaskSink;
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let mut sink = pipeline::queue::JobSink::new(&q, "tenant-a");
    let mut low = request(Policy::default());
    low.policy.low_priority = true;
    sink.push(request(Policy::default())).await.unwrap();
    sink.push_bulk(vec![request(Policy::default()), low.clone()])
        .await
        .unwrap();
    sink.push_stream(futures::stream::iter(vec![request(Policy::default())]))
        .await
        .unwrap();
    let ids = sink.enqueued().to_vec();
    assert_eq!(ids.len(), 4, "{ids:?}");
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    let mut read = Vec::new();
    while let Some(lease) = consumer.next(Duration::from_millis(200)).await.unwrap() {
        assert_eq!(lease.record.owner, "tenant-a");
        assert_eq!(lease.record.input, request(Policy::default()).input);
        read.push(lease.record.id.clone());
        consumer
            .finish(&lease, Outcome::Completed(json!({})))
            .await
            .unwrap();
    }
    // Normal lane first, in push order; the low-priority job last.
    let expected = vec![
        ids[0].clone(),
        ids[1].clone(),
        ids[3].clone(),
        ids[2].clone(),
    ];
    assert_eq!(read, expected);
}

/// Callbacks accepted together are settled together (one script for all
/// that are waiting): every job is called back once, and nothing stays
/// due or pending once they are in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_callbacks_are_settled_together_and_never_sent_twice() {
    use pipeline::webhook::{CallbackSender, WebhookConfig};
    let redis = Redis::start();
    let q = queue(&redis, QueueConfig::default()).await;
    let receiver = common::Receiver::start(0).await;
    let jobs = 48;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..jobs {
        let mut req = request(Policy::default());
        req.webhook = Some(receiver.url.clone());
        ids.insert(q.enqueue(&req, "o").await.unwrap().id);
    }
    let mut consumer = q.consumer(&[JobKind::Chat], "w").await.unwrap();
    assert_eq!(run_all(&mut consumer).await.len(), jobs);
    let mut conn = redis.conn().await;
    let due: usize = conn.zcard(q.keys().callbacks_due()).await.unwrap();
    assert_eq!(due, jobs);

    let sender = CallbackSender::new(
        q.clone(),
        WebhookConfig {
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            schedule: vec![Duration::ZERO, Duration::from_millis(100)],
            timeout: Duration::from_secs(10),
            // Long enough that a delivery left unsettled is not tried
            // again within the test.
            lease: Duration::from_secs(60),
            dead_letter_max: 10,
            allow: pipeline::outbound::OutboundAllow::parse("127.0.0.0/8").unwrap(),
        },
    )
    .unwrap();
    let (_wake_tx, wake) = tokio::sync::broadcast::channel(1);
    let run = tokio::spawn(sender.run(Duration::from_millis(20), wake));
    receiver.wait_for(jobs, Duration::from_secs(60)).await;
    // Settled: off the due set, the delivery hashes gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let due: usize = conn.zcard(q.keys().callbacks_due()).await.unwrap();
        let mut pending = 0;
        for id in &ids {
            let exists: bool = conn.exists(q.keys().callback(id)).await.unwrap();
            pending += exists as usize;
        }
        if due == 0 && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{due} still due, {pending} delivery hashes left"
        );
        tokio::task::yield_now().await;
    }
    run.abort();
    let got = receiver.got.lock().unwrap();
    let called: Vec<String> = got
        .iter()
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            body["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(called.len(), jobs, "one POST per job");
    assert_eq!(
        called.into_iter().collect::<std::collections::HashSet<_>>(),
        ids
    );
}
