//! The Redis queue against a real redis-server: one test per apalis-redis
//! defect DESIGN.md lists, plus lanes, TTL, cancel and retry.

mod common;

use std::time::{Duration, Instant};

use common::Redis;
use pipeline::queue::{Outcome, QueueConfig, RedisQueue, RetryOutcome};
use pipeline::{JobKind, JobState, Policy, RunRequest};
use serde_json::json;

fn request(policy: Policy) -> RunRequest {
    RunRequest {
        kind: JobKind::Chat,
        input: json!({"messages": [], "character": "github:a/b"}),
        webhook: None,
        policy,
    }
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
        assert!(consumer
            .finish(lease, Outcome::Completed(json!({})))
            .await
            .unwrap());
        done += 1;
    }
    assert_eq!(done, n);
    let counts = q.counts().await.unwrap();
    assert_eq!(counts["COMPLETED"], n as i64);
    assert_eq!(counts["IN_QUEUE"], 0);
    assert_eq!(counts["IN_PROGRESS"], 0);
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
    let mut order = vec![];
    while let Some(lease) = consumer.next(Duration::from_millis(200)).await.unwrap() {
        order.push(lease.record.id.clone());
        consumer
            .finish(lease, Outcome::Completed(json!({})))
            .await
            .unwrap();
    }
    assert_eq!(order, [a.id, b.id, low.id]);
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
    assert!(!consumer
        .finish(lease, Outcome::Completed(json!({"late": true})))
        .await
        .unwrap());
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
        .finish(lease, Outcome::Failed("boom".into()))
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
        .finish(lease, Outcome::Completed(json!({})))
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
    assert!(a
        .finish(lease, Outcome::Completed(json!({})))
        .await
        .unwrap());
    beat.abort();
}
