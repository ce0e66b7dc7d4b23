//! The worker side of the queue: reads entries of the kinds a worker serves,
//! takes over orphans, claims runs, heartbeats what it holds, fences every
//! write of a run by its lease, finishes or hands back.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply,
};

use super::keys::GROUP;
use super::{AudioChunk, JobRecord, Outcome, RedisQueue};
use crate::{JobKind, JobState, PipelineError};

/// An entry this consumer holds: its run once claimed (0 before), and the
/// flag set when the lease turns out to be lost.
#[derive(Clone)]
struct Held {
    job: String,
    run: u64,
    lost: Arc<AtomicBool>,
}

/// (lane, entry id).
type EntryKey = (String, String);
type HeldMap = Arc<Mutex<HashMap<EntryKey, Held>>>;

/// A job this worker may run now, and the lease that fences its writes.
#[derive(Debug, Clone)]
pub struct Lease {
    pub record: JobRecord,
    pub attempt: u32,
    /// The lease token: the record's `run` when this run was claimed.
    pub run: u64,
    stream: String,
    entry: String,
    lost: Arc<AtomicBool>,
}

impl Lease {
    /// Whether a heartbeat found that another run holds the job now.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

/// What a run may write, checked against its lease in Redis: token deltas,
/// and (through [`LeaseGuard::holds`]) anything outside Redis such as
/// platform saves and uploads. Cheap to clone into a run's tasks.
#[derive(Clone)]
pub struct LeaseGuard {
    queue: RedisQueue,
    id: String,
    run: u64,
    lost: Arc<AtomicBool>,
}

impl LeaseGuard {
    pub fn new(queue: &RedisQueue, lease: &Lease) -> Self {
        Self {
            queue: queue.clone(),
            id: lease.record.id.clone(),
            run: lease.run,
            lost: lease.lost.clone(),
        }
    }

    pub fn job_id(&self) -> &str {
        &self.id
    }

    /// Whether the lease is known to be lost (no Redis round trip).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Whether this run still holds a running job: false once another
    /// worker took it over, or the job was cancelled. Check right before a
    /// write that Redis cannot fence (a platform save, an upload).
    pub async fn holds(&self) -> Result<bool, PipelineError> {
        if self.is_lost() {
            return Ok(false);
        }
        let held: i32 = self
            .queue
            .scripts
            .holds
            .key(self.queue.keys.job(&self.id))
            .arg(self.run)
            .invoke_async(&mut self.queue.connection())
            .await?;
        if held == 0 {
            self.mark_lost_if_taken_over().await;
        }
        Ok(held == 1)
    }

    /// Appends text deltas to the job's token stream, only while this run
    /// holds the job. False: refused (lease lost or job settled). `batch`
    /// numbers the run's batches from 1: sending a batch again (after an
    /// error that may have hidden its success) never writes it twice.
    pub async fn publish_tokens(
        &self,
        batch: u64,
        deltas: &[(usize, String)],
    ) -> Result<bool, PipelineError> {
        if deltas.is_empty() {
            return Ok(!self.is_lost());
        }
        let mut inv = self.queue.scripts.tokens.prepare_invoke();
        inv.key(self.queue.keys.job(&self.id))
            .key(self.queue.keys.tokens(&self.id))
            .arg(self.run)
            .arg(batch);
        for (option, text) in deltas {
            inv.arg(*option).arg(text);
        }
        let ok: i32 = inv.invoke_async(&mut self.queue.connection()).await?;
        if ok == 0 {
            self.mark_lost_if_taken_over().await;
        }
        Ok(ok == 1)
    }

    /// Records the run's progress (`/status` shows it as `output.progress`,
    /// `/stream` sends it as a `progress` event), only while this run holds
    /// the job. False: refused.
    pub async fn publish_progress(
        &self,
        progress: &serde_json::Value,
    ) -> Result<bool, PipelineError> {
        let ok: i32 = self
            .queue
            .scripts
            .progress
            .key(self.queue.keys.job(&self.id))
            .key(self.queue.keys.tokens(&self.id))
            .arg(self.run)
            .arg(progress.to_string())
            .invoke_async(&mut self.queue.connection())
            .await?;
        if ok == 0 {
            self.mark_lost_if_taken_over().await;
        }
        Ok(ok == 1)
    }

    /// Appends one spoken chunk of the reply to the job's token stream
    /// (`/stream` sends it as an `audio` event), only while this run holds
    /// the job; a chunk index already written (by this run's retry or an
    /// earlier run) is not written again. False: refused.
    pub async fn publish_audio(&self, chunk: &AudioChunk) -> Result<bool, PipelineError> {
        let ok: i32 = self
            .queue
            .scripts
            .audio
            .key(self.queue.keys.job(&self.id))
            .key(self.queue.keys.tokens(&self.id))
            .arg(self.run)
            .arg(chunk.index)
            .arg(&chunk.text)
            .arg(&chunk.format)
            .arg(chunk.seconds)
            .arg(chunk.audio.as_slice())
            .invoke_async(&mut self.queue.connection())
            .await?;
        if ok == 0 {
            self.mark_lost_if_taken_over().await;
        }
        Ok(ok == 1)
    }

    /// Sets the lost flag when the record's run moved on (not when the job
    /// was merely cancelled: that is seen through the state).
    async fn mark_lost_if_taken_over(&self) {
        let run: Result<Option<u64>, _> = redis::cmd("HGET")
            .arg(self.queue.keys.job(&self.id))
            .arg("run")
            .query_async(&mut self.queue.connection())
            .await;
        if let Ok(run) = run {
            if run != Some(self.run) {
                self.lost.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// How `finish` went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// The result is written (once).
    Written,
    /// The job was settled before (cancelled): nothing written.
    AlreadySettled,
    /// Another run holds the job: nothing written, nothing touched.
    LeaseLost,
}

/// The worker side: reads entries, takes over orphans, claims runs,
/// heartbeats what it holds.
pub struct Consumer {
    queue: RedisQueue,
    name: String,
    kinds: Vec<JobKind>,
    block_conn: ConnectionManager,
    streams: Vec<String>,
    /// Turns to wait in Redis, shared by the consumers of this process
    /// that read the same lanes. Redis looks at every client blocked on a
    /// lane for each entry added to it (to find who gets it), so with every
    /// idle slot of a fleet blocked there a job would cost Redis more the
    /// more workers wait for one; a process's idle slots take turns
    /// instead, at most [`super::QueueConfig::blocking_reads`] in Redis at
    /// once.
    turns: Arc<tokio::sync::Semaphore>,
    buffer: VecDeque<(String, String, String)>,
    /// Whether the lanes may hold new entries: a look in priority order
    /// (one round trip) comes before a blocking read only then. After a
    /// look that found them drained, the next read blocks at once (it
    /// returns at once too when an entry came meanwhile).
    may_have_more: bool,
    held: HeldMap,
    running: Arc<Mutex<Option<String>>>,
    last_reclaim: Option<Instant>,
    /// Per lane, the entry id the next look for orphans starts from.
    reclaim_from: HashMap<String, String>,
    /// After Redis was unreachable, orphans are not taken over for one lease
    /// window, so the workers that hold them can heartbeat first.
    reclaim_after: Option<Instant>,
    redis_was_down: bool,
}

impl RedisQueue {
    /// A consumer for a worker named `name` (unique per process) that takes
    /// jobs of `kinds` only.
    pub async fn consumer(&self, kinds: &[JobKind], name: &str) -> Result<Consumer, PipelineError> {
        for k in kinds {
            self.ensure_groups(*k).await?;
        }
        let mut streams = Vec::new();
        for k in kinds {
            streams.extend(self.keys.lanes(*k));
        }
        // Normal lanes before low ones: XREADGROUP returns streams in order.
        streams.sort_by_key(|s| is_low(s));
        let consumer = Consumer {
            queue: self.clone(),
            name: name.to_string(),
            kinds: kinds.to_vec(),
            block_conn: self.blocking_connection().await?,
            turns: self.read_turns(&streams),
            streams,
            buffer: VecDeque::new(),
            may_have_more: true,
            held: Arc::new(Mutex::new(HashMap::new())),
            running: Arc::new(Mutex::new(None)),
            last_reclaim: None,
            reclaim_from: HashMap::new(),
            reclaim_after: None,
            redis_was_down: false,
        };
        consumer.beat().await?;
        Ok(consumer)
    }

    /// This process's turns to wait in Redis on `streams` (one set of
    /// turns per set of lanes).
    fn read_turns(&self, streams: &[String]) -> Arc<tokio::sync::Semaphore> {
        let mut turns = self.read_turns.lock().expect("not poisoned");
        turns
            .entry(streams.to_vec())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Semaphore::new(self.cfg.blocking_reads.max(1)))
            })
            .clone()
    }
}

/// Whether `stream` is a low-priority lane ([`super::keys::Keys::lane`]).
fn is_low(stream: &str) -> bool {
    stream.ends_with(":low")
}

impl Consumer {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kinds(&self) -> &[JobKind] {
        &self.kinds
    }

    pub fn queue(&self) -> &RedisQueue {
        &self.queue
    }

    fn lease_window(&self) -> Duration {
        self.queue.cfg.heartbeat * self.queue.cfg.missed_heartbeats
    }

    /// Records this worker as alive and refreshes the idle time of every entry
    /// it still holds, so nobody takes them over; entries taken over by
    /// another worker are dropped and their runs told they lost the lease.
    pub async fn beat(&self) -> Result<(), PipelineError> {
        heartbeat(
            &self.queue,
            &self.name,
            &self.kinds,
            &self.held,
            &self.running,
        )
        .await
    }

    /// Heartbeats every `heartbeat` until the returned handle is aborted.
    pub fn spawn_heartbeat(&self) -> tokio::task::JoinHandle<()> {
        let (queue, name, kinds, held, running) = (
            self.queue.clone(),
            self.name.clone(),
            self.kinds.clone(),
            self.held.clone(),
            self.running.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(queue.cfg.heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = heartbeat(&queue, &name, &kinds, &held, &running).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
        })
    }

    /// Waits up to `block` for a job to run. Entries whose job must not run
    /// (cancelled, expired, out of attempts) are settled and skipped.
    pub async fn next(&mut self, block: Duration) -> Result<Option<Lease>, PipelineError> {
        match self.next_inner(block).await {
            Ok(lease) => {
                if std::mem::take(&mut self.redis_was_down) {
                    self.reclaim_after = Some(Instant::now() + self.lease_window());
                }
                Ok(lease)
            }
            Err(e) => {
                if super::is_unavailable(&e) {
                    self.redis_was_down = true;
                }
                Err(e)
            }
        }
    }

    async fn next_inner(&mut self, block: Duration) -> Result<Option<Lease>, PipelineError> {
        let deadline = Instant::now() + block;
        loop {
            self.reclaim_orphans().await?;
            // A look in priority order when nothing is at hand, or only a
            // low lane's entry (a normal one may have come since).
            let only_low = self.buffer.front().is_some_and(|(s, _, _)| is_low(s));
            if self.may_have_more && (self.buffer.is_empty() || only_low) {
                self.read_in_priority_order().await?;
            }
            if self.buffer.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                // Block at most one heartbeat, so orphans are looked for as
                // often while idle.
                self.read_blocking(left.min(self.queue.cfg.heartbeat))
                    .await?;
                continue;
            }
            let (stream, entry, id) = self.buffer.pop_front().expect("checked non-empty");
            if let Some(lease) = self.claim(stream, entry, id).await? {
                return Ok(Some(lease));
            }
        }
    }

    /// Creates the groups again when a Redis restart lost them (NOGROUP).
    async fn recover_groups(&self, e: redis::RedisError) -> Result<(), PipelineError> {
        if e.code() == Some("NOGROUP") {
            tracing::warn!("consumer groups are gone (Redis restarted without persistence?): creating them again");
            for k in &self.kinds {
                self.queue.ensure_groups(*k).await?;
            }
            Ok(())
        } else {
            Err(e.into())
        }
    }

    /// One entry from the first lane that has one (normal before low), in
    /// one round trip; notes whether more may be waiting.
    async fn read_in_priority_order(&mut self) -> Result<(), PipelineError> {
        let mut inv = self.queue.scripts.take.prepare_invoke();
        for stream in &self.streams {
            inv.key(stream);
        }
        inv.arg(GROUP).arg(&self.name);
        type Taken = (String, String, HashMap<String, redis::Value>, i64);
        let reply: Option<Taken> = match inv.invoke_async(&mut self.block_conn).await {
            Ok(r) => r,
            Err(e) => return self.recover_groups(e).await,
        };
        self.may_have_more = false;
        if let Some((stream, id, map, more)) = reply {
            self.may_have_more = more == 1;
            self.take(stream, redis::streams::StreamId { id, map });
        }
        Ok(())
    }

    /// Waits for an entry on any lane. Entries that arrive on several lanes
    /// during one wait are all kept, the higher lane first; entries on
    /// several lanes mean a backlog, and the next read looks in priority
    /// order first again.
    async fn read_blocking(&mut self, block: Duration) -> Result<(), PipelineError> {
        // A turn to wait in Redis first (see `turns`); the wait for it
        // counts against `block`. An entry that comes meanwhile waits in
        // the lane for whoever reads next: `>` hands out every entry once.
        let started = Instant::now();
        let turn = match self.turns.clone().try_acquire_owned() {
            Ok(turn) => turn,
            Err(_) => match tokio::time::timeout(block, self.turns.clone().acquire_owned()).await {
                Ok(Ok(turn)) => turn,
                _ => return Ok(()),
            },
        };
        let block = block.saturating_sub(started.elapsed());
        let opts = StreamReadOptions::default()
            .group(GROUP, &self.name)
            .count(1)
            .block(block.as_millis().max(1) as usize);
        let ids: Vec<&str> = self.streams.iter().map(|_| ">").collect();
        let reply: Option<StreamReadReply> = match redis::AsyncCommands::xread_options(
            &mut self.block_conn,
            &self.streams,
            &ids,
            &opts,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => return self.recover_groups(e).await,
        };
        drop(turn);
        let mut keys = reply.map(|r| r.keys).unwrap_or_default();
        keys.retain(|k| !k.ids.is_empty());
        self.may_have_more = keys.len() > 1;
        keys.sort_by_key(|k| self.streams.iter().position(|s| *s == k.key));
        for key in keys {
            for entry in key.ids {
                self.take(key.key.clone(), entry);
            }
        }
        Ok(())
    }

    fn take(&mut self, stream: String, entry: redis::streams::StreamId) {
        let job: String = entry.get("job").unwrap_or_default();
        self.held.lock().expect("not poisoned").insert(
            (stream.clone(), entry.id.clone()),
            Held {
                job: job.clone(),
                run: 0,
                lost: Arc::new(AtomicBool::new(false)),
            },
        );
        // Normal lanes' entries before low ones', each in the order read.
        let at = match is_low(&stream) {
            true => self.buffer.len(),
            false => self
                .buffer
                .iter()
                .position(|(s, _, _)| is_low(s))
                .unwrap_or(self.buffer.len()),
        };
        self.buffer.insert(at, (stream, entry.id, job));
    }

    /// Takes over entries whose holder stopped heartbeating, and prunes
    /// consumers of workers long gone.
    async fn reclaim_orphans(&mut self) -> Result<(), PipelineError> {
        let every = self.queue.cfg.heartbeat;
        if self.last_reclaim.is_some_and(|t| t.elapsed() < every) {
            return Ok(());
        }
        if self.reclaim_after.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        self.last_reclaim = Some(Instant::now());
        let min_idle = self.lease_window().as_millis() as usize;
        let mut conn = self.queue.connection();
        for stream in self.streams.clone() {
            // Where the last look stopped: one look scans at most ten
            // entries per entry it may claim (Redis's own bound), so from
            // the start every time an orphan behind a hundred live
            // entries was never reached.
            let from = self
                .reclaim_from
                .get(&stream)
                .cloned()
                .unwrap_or_else(|| "0-0".to_string());
            let reply: StreamAutoClaimReply = match redis::AsyncCommands::xautoclaim_options(
                &mut conn,
                &stream,
                GROUP,
                &self.name,
                min_idle,
                &from,
                StreamAutoClaimOptions::default().count(10),
            )
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    self.recover_groups(e).await?;
                    continue;
                }
            };
            // "0-0": the look went round; the next starts over.
            self.reclaim_from
                .insert(stream.clone(), reply.next_stream_id.clone());
            for entry in reply.claimed {
                tracing::warn!(stream = %stream, entry = %entry.id, "taking over a job whose worker stopped heartbeating");
                self.take(stream.clone(), entry);
            }
            // Consumers idle for ten lease windows and holding nothing,
            // looked for by one consumer of the fleet a lease window.
            if self
                .queue
                .prune_turn(&stream, &self.name, self.lease_window())
                .await?
            {
                self.queue
                    .prune_consumers(&stream, min_idle as u64 * 10)
                    .await?;
            }
        }
        Ok(())
    }

    async fn claim(
        &mut self,
        stream: String,
        entry: String,
        id: String,
    ) -> Result<Option<Lease>, PipelineError> {
        let q = &self.queue;
        let mut inv = q.scripts.claim.prepare_invoke();
        for k in q.terminal_keys(&id) {
            inv.key(k);
        }
        // A run comes back with the record as the claim left it.
        let reply: Vec<redis::Value> = inv
            .arg(&id)
            .arg(q.keys.events())
            .arg(&self.name)
            .arg(q.result_ttl_ms())
            .invoke_async(&mut q.connection())
            .await?;
        let mut reply = reply.into_iter();
        let mut next = || reply.next().unwrap_or(redis::Value::Nil);
        let verdict: String = redis::from_redis_value(&next())?;
        let attempt: u32 = redis::from_redis_value(&next())?;
        let run: u64 = redis::from_redis_value(&next())?;
        let stored: HashMap<String, String> = redis::from_redis_value(&next())?;
        if verdict != "run" {
            tracing::info!(job = %id, verdict = %verdict, "queue entry settled without a run");
            self.settle(&stream, &entry).await?;
            return Ok(None);
        }
        let lost = {
            let mut held = self.held.lock().expect("not poisoned");
            let h = held
                .entry((stream.clone(), entry.clone()))
                .or_insert_with(|| Held {
                    job: id.clone(),
                    run: 0,
                    lost: Arc::new(AtomicBool::new(false)),
                });
            h.run = run;
            h.lost.clone()
        };
        let record = JobRecord::from_hash(&id, stored)?;
        *self.running.lock().expect("not poisoned") = Some(id);
        Ok(Some(Lease {
            record,
            attempt,
            run,
            stream,
            entry,
            lost,
        }))
    }

    async fn settle(&self, stream: &str, entry: &str) -> Result<(), PipelineError> {
        let mut conn = self.queue.connection();
        let _: i64 = redis::AsyncCommands::xack(&mut conn, stream, GROUP, &[entry]).await?;
        let _: i64 = redis::AsyncCommands::xdel(&mut conn, stream, &[entry]).await?;
        self.forget(stream, entry);
        Ok(())
    }

    /// A handle for finishing, handing back and checking runs, usable
    /// while the consumer reads on (a worker runtime holds the consumer).
    pub fn control(&self) -> RunControl {
        RunControl {
            queue: self.queue.clone(),
            held: self.held.clone(),
            running: self.running.clone(),
        }
    }

    fn forget(&self, stream: &str, entry: &str) {
        self.control().forget(stream, entry)
    }

    /// See [`RunControl::finish`].
    pub async fn finish(&self, lease: &Lease, outcome: Outcome) -> Result<Finished, PipelineError> {
        self.control().finish(lease, outcome).await
    }

    /// See [`RunControl::release`].
    pub async fn release(&self, lease: &Lease) -> Result<bool, PipelineError> {
        self.control().release(lease).await
    }

    /// Hands back every entry read but not claimed (a stopping worker), and
    /// leaves the worker list.
    pub async fn deregister(&mut self) -> Result<(), PipelineError> {
        // Entries read but never claimed go back to the group at once: a
        // claimed run is handed back with `release`.
        let unclaimed: Vec<(String, String)> = self
            .buffer
            .drain(..)
            .map(|(stream, entry, _)| (stream, entry))
            .collect();
        let mut conn = self.queue.connection();
        for (stream, entry) in unclaimed {
            // XCLAIM to nobody is impossible; re-adding and settling keeps
            // the job queued without waiting for its idle time.
            let job: Option<String> = self
                .held
                .lock()
                .expect("not poisoned")
                .get(&(stream.clone(), entry.clone()))
                .map(|h| h.job.clone());
            if let Some(job) = job {
                let _: () = redis::pipe()
                    .atomic()
                    .cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg("job")
                    .arg(&job)
                    .ignore()
                    .xack(&stream, GROUP, &[&entry])
                    .ignore()
                    .xdel(&stream, &[&entry])
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
            }
            self.forget(&stream, &entry);
        }
        self.queue.deregister_worker(&self.name).await
    }
}

/// Finishes, hands back and checks the runs of one consumer; cheap to clone.
#[derive(Clone)]
pub struct RunControl {
    queue: RedisQueue,
    held: HeldMap,
    running: Arc<Mutex<Option<String>>>,
}

impl RunControl {
    fn forget(&self, stream: &str, entry: &str) {
        self.held
            .lock()
            .expect("not poisoned")
            .remove(&(stream.to_string(), entry.to_string()));
    }

    /// Writes the result (once, and only while this run holds the job) and
    /// releases the entry.
    pub async fn finish(&self, lease: &Lease, outcome: Outcome) -> Result<Finished, PipelineError> {
        self.finish_counting(lease, outcome, &[]).await
    }

    /// [`finish`](Self::finish), adding the run's totals (`/metrics`' fleet
    /// counters) in the same script, before the result is visible; nothing
    /// is added when the lease was lost.
    pub async fn finish_counting(
        &self,
        lease: &Lease,
        outcome: Outcome,
        totals: &[(&str, u64)],
    ) -> Result<Finished, PipelineError> {
        let q = &self.queue;
        let (state, field, payload) = match outcome {
            Outcome::Completed(v) => (JobState::Completed, "output", v.to_string()),
            Outcome::Failed(e) => (JobState::Failed, "error", e),
            Outcome::TimedOut(e) => (JobState::TimedOut, "error", e),
        };
        let mut inv = q.scripts.finish.prepare_invoke();
        for k in q.terminal_keys(&lease.record.id) {
            inv.key(k);
        }
        inv.key(&lease.stream)
            .key(q.keys.worker_stats())
            .arg(&lease.record.id)
            .arg(q.keys.events())
            .arg(q.result_ttl_ms())
            .arg(state.as_str())
            .arg(field)
            .arg(payload)
            .arg(lease.run)
            .arg(GROUP)
            .arg(&lease.entry);
        for (total, n) in totals.iter().filter(|(_, n)| *n > 0) {
            inv.arg(*total).arg(*n);
        }
        let written: i32 = inv.invoke_async(&mut q.connection()).await?;
        self.forget(&lease.stream, &lease.entry);
        *self.running.lock().expect("not poisoned") = None;
        Ok(match written {
            1 => Finished::Written,
            0 => Finished::AlreadySettled,
            _ => {
                lease.lost.store(true, Ordering::SeqCst);
                Finished::LeaseLost
            }
        })
    }

    /// Hands a job back to the queue without spending an attempt (a draining
    /// worker past its deadline): another worker starts it at once. False
    /// when the lease was already lost.
    pub async fn release(&self, lease: &Lease) -> Result<bool, PipelineError> {
        let q = &self.queue;
        let done: i32 = q
            .scripts
            .release
            .key(q.keys.job(&lease.record.id))
            .key(q.keys.counts())
            .key(&lease.stream)
            .arg(&lease.record.id)
            .arg(lease.run)
            .arg(GROUP)
            .arg(&lease.entry)
            .invoke_async(&mut q.connection())
            .await?;
        // Nobody heartbeats it from here on, whatever happened.
        lease.lost.store(true, Ordering::SeqCst);
        self.forget(&lease.stream, &lease.entry);
        *self.running.lock().expect("not poisoned") = None;
        Ok(done == 1)
    }

    pub fn queue(&self) -> &RedisQueue {
        &self.queue
    }

    /// The job's current state (to notice a cancel while it runs).
    pub async fn state_of(&self, id: &str) -> Result<Option<JobState>, PipelineError> {
        let st: Option<String> = redis::AsyncCommands::hget(
            &mut self.queue.connection(),
            self.queue.keys.job(id),
            "state",
        )
        .await?;
        Ok(st.and_then(|s| JobState::parse(&s)))
    }
}

async fn heartbeat(
    queue: &RedisQueue,
    name: &str,
    kinds: &[JobKind],
    held: &Mutex<HashMap<EntryKey, Held>>,
    running: &Mutex<Option<String>>,
) -> Result<(), PipelineError> {
    let mut conn = queue.connection();
    let entries: Vec<(EntryKey, Held)> = held
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|(k, h)| (k.clone(), h.clone()))
        .collect();
    for ((stream, entry), Held { job, run, lost }) in entries {
        let kept: Result<i32, _> = queue
            .scripts
            .heartbeat
            .key(&stream)
            .key(queue.keys.job(&job))
            .arg(GROUP)
            .arg(&entry)
            .arg(name)
            .arg(run)
            .invoke_async(&mut conn)
            .await;
        let kept = match kept {
            Ok(k) => k == 1,
            // The group is gone (Redis restarted empty): so is the entry.
            Err(e) if e.to_string().contains("NOGROUP") => false,
            Err(e) => return Err(e.into()),
        };
        if !kept {
            tracing::warn!(job = %job, run, "lease lost: another worker holds this job now; stopping its run, writing nothing");
            lost.store(true, Ordering::SeqCst);
            held.lock()
                .expect("not poisoned")
                .remove(&(stream.clone(), entry.clone()));
            let mut r = running.lock().expect("not poisoned");
            if r.as_deref() == Some(job.as_str()) {
                *r = None;
            }
        }
    }
    let job = running.lock().expect("not poisoned").clone();
    queue.register_worker(name, kinds, job.as_deref()).await
}
