//! Continuous batching: many jobs' sequences decode together on one model.
//!
//! A [`Scheduler`] holds the jobs of one model and moves them one step at a
//! time: admit waiting jobs while their KV reservation fits the pool, run one
//! prefill chunk of one job (so the running sequences keep getting a token
//! every step while a long prompt is read), then one batched decode step over
//! every running sequence of every job (a job's options are sequences that
//! start from a copy of its one prefill). A finished job leaves, its blocks go
//! back to the pool, and the jobs waiting behind it are admitted.
//!
//! [`BatchEngine`] runs a scheduler on a thread of its own and implements
//! [`TextGeneration`], so the chat, streamed-chat and condense handlers of a
//! worker share one batch without knowing it. [`GgufChatModel`] runs the
//! same scheduler inline for a single job, so a job samples the same tokens
//! whether it ran alone or in a batch: every row of a batched forward pass
//! computes the same numbers as alone (see
//! [`QuantizedLlama::forward_rows`](super::quantized_llama::QuantizedLlama::forward_rows)),
//! prefill chunks start at fixed multiples of [`PREFILL_CHUNK`], and cached
//! prefixes end on those boundaries.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use candle_transformers::generation::Sampling;

use super::quantized_llama::SeqCache;
use super::{
    GeneratedOption, Generation, GgufChatModel, SamplingParams, Sequence, StopReason,
    TextGeneration,
};
use crate::ModelError;

/// Tokens per KV block: the unit the pool hands out.
pub const BLOCK_TOKENS: usize = 16;
/// Prompt tokens per prefill step. Chunks start at multiples of it from the
/// first token, whatever else runs.
pub const PREFILL_CHUNK: usize = 64;

/// How big the batch and its KV pool may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens of keys and values the running jobs may hold in all (the pool
    /// is this many tokens in blocks of [`BLOCK_TOKENS`]). A job reserves
    /// its prompt plus every option's whole reply when it is admitted, so a
    /// running job never runs out of room; a job that does not fit waits.
    pub kv_cache_tokens: usize,
    /// Sequences (options of all running jobs) decoded together at most.
    pub max_sequences: usize,
    /// Keep the KV of recent prompts' prefixes (the character card and the
    /// history) and skip that part of the prefill when a prompt starts with
    /// one; the entries live in the pool's free blocks, least recently used
    /// evicted first.
    pub prefix_cache: bool,
    /// The nice value the engine's threads (its own, rayon's and candle's
    /// barrier pool's, where the quantized kernels run) run at: above 0,
    /// other work of the process wins the CPU when both want it (a spoken
    /// reply's audio is synthesized while its text is still being
    /// generated: the listener waits on the audio, while the text is far
    /// ahead of it). 0 leaves them as they are.
    pub nice: i32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_cache_tokens: 16_384,
            max_sequences: 16,
            prefix_cache: true,
            nice: 0,
        }
    }
}

impl EngineConfig {
    /// One job at a time without limits or cache: what a bare
    /// [`GgufChatModel`] runs.
    fn inline() -> Self {
        Self {
            kv_cache_tokens: usize::MAX / 2,
            max_sequences: usize::MAX / 2,
            prefix_cache: false,
            nice: 0,
        }
    }

    fn blocks(&self) -> usize {
        self.kv_cache_tokens.div_ceil(BLOCK_TOKENS)
    }
}

/// What the engine is doing, for `/metrics` (gauges and running totals).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running_jobs: AtomicU64,
    pub waiting_jobs: AtomicU64,
    pub running_sequences: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub prefix_cache_blocks: AtomicU64,
    /// Generated tokens per second over the last second of work.
    pub tokens_per_s: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose prefill a cached prefix saved.
    pub prefix_hit_tokens: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Sum over decode steps of the rows in the batch (mean batch =
    /// this / decode_steps).
    pub batch_rows: AtomicU64,
    /// The most rows one decode step has run.
    pub peak_batch_rows: AtomicU64,
}

impl EngineStats {
    /// `(name, value)` pairs, gauges first.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("running_jobs", g(&self.running_jobs)),
            ("waiting_jobs", g(&self.waiting_jobs)),
            ("running_sequences", g(&self.running_sequences)),
            ("kv_blocks_used", g(&self.kv_blocks_used)),
            ("kv_blocks_total", g(&self.kv_blocks_total)),
            ("prefix_cache_blocks", g(&self.prefix_cache_blocks)),
            ("tokens_per_s", g(&self.tokens_per_s)),
            ("generated_tokens", g(&self.generated_tokens)),
            ("prompt_tokens", g(&self.prompt_tokens)),
            ("prefix_hit_tokens", g(&self.prefix_hit_tokens)),
            ("prefix_hits", g(&self.prefix_hits)),
            ("decode_steps", g(&self.decode_steps)),
            ("batch_rows", g(&self.batch_rows)),
            ("peak_batch_rows", g(&self.peak_batch_rows)),
        ]
    }
}

/// Where a job's text goes: `(option, delta)`.
pub(super) type TextSink<'a> = Box<dyn FnMut(usize, &str) + 'a>;

/// How a job talks back: text as it comes, whether it was cancelled (polled
/// once per decode step), and its result.
pub(super) struct JobIo<'a> {
    pub on_text: TextSink<'a>,
    pub cancelled: Box<dyn Fn() -> bool + 'a>,
    pub done: Box<dyn FnOnce(Result<Generation, ModelError>) + 'a>,
}

/// A job as it enters the scheduler: a prompt already checked against the
/// model ([`GgufChatModel::prepare`]).
pub(super) struct JobSpec<'a> {
    pub prompt_ids: Vec<u32>,
    pub n: usize,
    pub params: SamplingParams,
    pub max_new: usize,
    pub io: JobIo<'a>,
}

struct Row {
    cache: SeqCache,
    /// The logits its next token is sampled from, `(vocab,)`.
    logits: Tensor,
}

struct Job<'a> {
    spec: JobSpec<'a>,
    sampling: Sampling,
    blocks: usize,
    prefill: Option<SeqCache>,
    first_logits: Option<Tensor>,
    admitted: Option<Instant>,
    prefill_secs: f64,
    decode_started: Option<Instant>,
    seqs: Vec<Sequence>,
    rows: Vec<Option<Row>>,
    round: usize,
    resamples: usize,
    steps: usize,
    failed: Option<ModelError>,
}

impl Job<'_> {
    fn decoding(&self) -> bool {
        self.first_logits.is_some() && self.failed.is_none()
    }

    fn new_sequence(&self, option: usize, seed: u64) -> Sequence {
        Sequence::new(
            option,
            seed,
            self.sampling.clone(),
            self.spec.params.resample_tries > 0,
        )
    }

    fn fork_row(&self) -> Result<Row, ModelError> {
        let prefill = self.prefill.as_ref().expect("prefilled");
        let p = self.spec.prompt_ids.len();
        Ok(Row {
            cache: prefill.copy_prefix(p, p + self.spec.max_new)?,
            logits: self.first_logits.clone().expect("prefilled"),
        })
    }

    /// Options rejected by the duplicate or character check get another
    /// try from the shared prefill, while tries are left.
    fn may_resample(&self) -> bool {
        let p = &self.spec.params;
        p.resample_tries > 0
            && p.whole_sentences
            && ((self.spec.n > 1 && p.distinct_options) || !p.reject_phrases.is_empty())
    }
}

/// Reservation of a job in pool blocks: its prefill (kept for resampling)
/// and every option's prompt and reply.
fn job_blocks(prompt: usize, n: usize, max_new: usize) -> usize {
    prompt.div_ceil(BLOCK_TOKENS) + n * (prompt + max_new).div_ceil(BLOCK_TOKENS)
}

struct PrefixEntry {
    tokens: Vec<u32>,
    cache: SeqCache,
    used: u64,
    blocks: usize,
}

/// KV of prompt prefixes that end on a prefill-chunk boundary, by a hash of
/// their tokens (checked token for token on a hit).
#[derive(Default)]
struct PrefixCache {
    entries: HashMap<u64, PrefixEntry>,
    clock: u64,
    blocks: usize,
}

fn prefix_key(tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    /// The longest cached prefix of `ids` shorter than `ids` (one token at
    /// least is left to compute the next token's logits).
    fn lookup(&mut self, ids: &[u32]) -> Option<(usize, &SeqCache)> {
        let longest = (ids.len().saturating_sub(1) / PREFILL_CHUNK) * PREFILL_CHUNK;
        self.clock += 1;
        let clock = self.clock;
        let hit = (1..=longest / PREFILL_CHUNK)
            .rev()
            .map(|c| c * PREFILL_CHUNK)
            .find(|&len| {
                self.entries
                    .get(&prefix_key(&ids[..len]))
                    .is_some_and(|e| e.tokens == ids[..len])
            })?;
        let e = self.entries.get_mut(&prefix_key(&ids[..hit]))?;
        e.used = clock;
        Some((hit, &e.cache))
    }

    fn contains(&self, ids: &[u32]) -> bool {
        self.entries
            .get(&prefix_key(ids))
            .is_some_and(|e| e.tokens == ids)
    }

    fn insert(&mut self, tokens: Vec<u32>, cache: SeqCache) {
        let blocks = tokens.len().div_ceil(BLOCK_TOKENS);
        self.clock += 1;
        self.blocks += blocks;
        if let Some(old) = self.entries.insert(
            prefix_key(&tokens),
            PrefixEntry {
                tokens,
                cache,
                used: self.clock,
                blocks,
            },
        ) {
            self.blocks -= old.blocks;
        }
    }

    /// Drops the least recently used entry; false when none is left.
    fn evict(&mut self) -> bool {
        let Some(key) = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.used)
            .map(|(k, _)| *k)
        else {
            return false;
        };
        if let Some(e) = self.entries.remove(&key) {
            self.blocks -= e.blocks;
        }
        true
    }
}

/// The jobs of one model, moved along one step at a time.
pub(super) struct Scheduler<'a> {
    model: &'a GgufChatModel,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    waiting: VecDeque<Job<'a>>,
    jobs: Vec<Job<'a>>,
    prefix: PrefixCache,
    blocks_used: usize,
    window: (Instant, u64),
}

impl<'a> Scheduler<'a> {
    pub fn new(model: &'a GgufChatModel, config: EngineConfig, stats: Arc<EngineStats>) -> Self {
        stats
            .kv_blocks_total
            .store(config.blocks() as u64, Ordering::Relaxed);
        Self {
            model,
            config,
            stats,
            waiting: VecDeque::new(),
            jobs: Vec::new(),
            prefix: PrefixCache::default(),
            blocks_used: 0,
            window: (Instant::now(), 0),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.jobs.is_empty()
    }

    pub fn submit(&mut self, spec: JobSpec<'a>) {
        let params = &spec.params;
        let sampling = if params.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            Sampling::TopKThenTopP {
                k: params.top_k.max(1),
                p: params.top_p,
                temperature: params.temperature,
            }
        };
        let blocks = job_blocks(spec.prompt_ids.len(), spec.n, spec.max_new);
        self.waiting.push_back(Job {
            spec,
            sampling,
            blocks,
            prefill: None,
            first_logits: None,
            admitted: None,
            prefill_secs: 0.0,
            decode_started: None,
            seqs: Vec::new(),
            rows: Vec::new(),
            round: 0,
            resamples: 0,
            steps: 0,
            failed: None,
        });
        self.publish();
    }

    /// Admits what fits, runs one prefill chunk and one decode step, and
    /// hands out the jobs that finished.
    pub fn step(&mut self) {
        self.admit();
        self.drop_cancelled_waiting();
        self.prefill_chunk();
        self.decode_step();
        // Publishes the gauges (before any result goes out).
        self.finish_jobs();
    }

    fn drop_cancelled_waiting(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            if (self.waiting[i].spec.io.cancelled)() {
                let job = self.waiting.remove(i).expect("index in range");
                let result = cancelled_before_decoding(&job.spec);
                (job.spec.io.done)(Ok(result));
            } else {
                i += 1;
            }
        }
    }

    /// First come, first served: a job that does not fit holds the ones
    /// behind it (no starvation of big jobs). A job bigger than the whole
    /// pool runs when it is alone.
    fn admit(&mut self) {
        while let Some(job) = self.waiting.front() {
            let running: usize = self.jobs.iter().map(|j| j.spec.n).sum();
            if !self.jobs.is_empty() && running + job.spec.n > self.config.max_sequences {
                break;
            }
            let total = self.config.blocks();
            if self.blocks_used + job.blocks > total && !self.jobs.is_empty() {
                break;
            }
            // Cached prefixes make room for a job that fits.
            while self.blocks_used + self.prefix.blocks + job.blocks > total && self.prefix.evict()
            {
            }
            let mut job = self.waiting.pop_front().expect("front exists");
            if job.blocks > total {
                tracing::warn!(
                    blocks = job.blocks,
                    pool = total,
                    "a job larger than the KV pool runs alone"
                );
            }
            self.blocks_used += job.blocks;
            job.admitted = Some(Instant::now());
            match self.model.model.new_cache(job.spec.prompt_ids.len()) {
                Ok(c) => job.prefill = Some(c),
                Err(e) => job.failed = Some(e.into()),
            }
            self.jobs.push(job);
        }
    }

    /// One chunk of the oldest job still reading its prompt.
    fn prefill_chunk(&mut self) {
        let Some(ji) = self
            .jobs
            .iter()
            .position(|j| j.first_logits.is_none() && j.failed.is_none())
        else {
            return;
        };
        let use_prefix = self.config.prefix_cache;
        let job = &mut self.jobs[ji];
        let ids = &job.spec.prompt_ids;
        let p = ids.len();
        let cache = job.prefill.as_mut().expect("admitted jobs have a cache");
        if cache.is_empty() {
            self.stats
                .prompt_tokens
                .fetch_add(p as u64, Ordering::Relaxed);
            if use_prefix {
                if let Some((len, hit)) = self.prefix.lookup(ids) {
                    match hit.copy_prefix(len, p) {
                        Ok(c) => {
                            *cache = c;
                            self.stats
                                .prefix_hit_tokens
                                .fetch_add(len as u64, Ordering::Relaxed);
                            self.stats.prefix_hits.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            job.failed = Some(e.into());
                            return;
                        }
                    }
                }
            }
        } else if (job.spec.io.cancelled)() {
            // Between chunks of a long prompt: nothing to hand out yet.
            job.failed = Some(ModelError::Cancelled);
            return;
        }
        let from = cache.len();
        let to = ((from / PREFILL_CHUNK + 1) * PREFILL_CHUNK).min(p);
        let logits = match self.model.model.forward(&ids[from..to], cache) {
            Ok(l) => l,
            Err(e) => {
                job.failed = Some(e.into());
                return;
            }
        };
        if to < p {
            return;
        }
        let first = match logits.get(0) {
            Ok(l) => l,
            Err(e) => {
                job.failed = Some(e.into());
                return;
            }
        };
        job.first_logits = Some(first);
        job.prefill_secs = job
            .admitted
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or_default();
        // The prompt's prefix up to its last chunk boundary, for the next
        // turn of the same conversation.
        let keep = ((p - 1) / PREFILL_CHUNK) * PREFILL_CHUNK;
        if use_prefix && keep > 0 && !self.prefix.contains(&ids[..keep]) {
            let blocks = keep.div_ceil(BLOCK_TOKENS);
            let total = self.config.blocks();
            while self.blocks_used + self.prefix.blocks + blocks > total && self.prefix.evict() {}
            if self.blocks_used + self.prefix.blocks + blocks <= total {
                if let Ok(c) = cache.copy_prefix(keep, keep) {
                    self.prefix.insert(ids[..keep].to_vec(), c);
                }
            }
        }
        let mut seqs = Vec::with_capacity(job.spec.n);
        let mut rows = Vec::with_capacity(job.spec.n);
        for i in 0..job.spec.n {
            seqs.push(job.new_sequence(i, job.spec.params.seed.wrapping_add(i as u64)));
            match job.fork_row() {
                Ok(r) => rows.push(Some(r)),
                Err(e) => {
                    job.failed = Some(e);
                    return;
                }
            }
        }
        job.seqs = seqs;
        job.rows = rows;
        job.decode_started = Some(Instant::now());
    }

    /// Samples a token for every running sequence, then one batched
    /// forward pass over those still running.
    fn decode_step(&mut self) {
        let model = self.model;
        // (job, sequence, token) of each row of the forward pass.
        let mut batch: Vec<(usize, usize, u32)> = Vec::new();
        let mut generated = 0u64;
        for (ji, job) in self.jobs.iter_mut().enumerate() {
            if !job.decoding() || job.rows.iter().all(Option::is_none) {
                continue;
            }
            let start = batch.len();
            for s in 0..job.seqs.len() {
                let Some(logits) = job.rows[s].as_ref().map(|r| r.logits.clone()) else {
                    continue;
                };
                match sample(model, job, s, &logits) {
                    Ok(Some(token)) => {
                        generated += 1;
                        batch.push((ji, s, token));
                    }
                    Ok(None) => {
                        generated += u64::from(job.seqs[s].stop != Some(StopReason::EndOfSequence));
                        job.rows[s] = None;
                    }
                    Err(e) => {
                        job.failed = Some(e);
                        break;
                    }
                }
            }
            if job.failed.is_some() {
                batch.truncate(start);
                continue;
            }
            if (job.spec.io.cancelled)() {
                for s in 0..job.seqs.len() {
                    if job.rows[s].take().is_some() {
                        job.seqs[s].stop.get_or_insert(StopReason::Cancelled);
                        if let Err(e) = model.finish_sequence(
                            &mut job.seqs[s],
                            &job.spec.params,
                            &mut *job.spec.io.on_text,
                        ) {
                            job.failed = Some(e);
                        }
                    }
                }
                batch.truncate(start);
            } else if batch.len() > start {
                job.steps += 1;
            }
        }
        self.stats
            .generated_tokens
            .fetch_add(generated, Ordering::Relaxed);
        if batch.is_empty() {
            return;
        }
        let mut taken: Vec<Row> = batch
            .iter()
            .map(|&(j, s, _)| self.jobs[j].rows[s].take().expect("running row"))
            .collect();
        let tokens: Vec<u32> = batch.iter().map(|&(_, _, t)| t).collect();
        let result = {
            let mut caches: Vec<&mut SeqCache> = taken.iter_mut().map(|r| &mut r.cache).collect();
            model.model.forward_rows(&tokens, 1, &mut caches)
        };
        self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .batch_rows
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.stats
            .peak_batch_rows
            .fetch_max(batch.len() as u64, Ordering::Relaxed);
        match result {
            Ok(logits) => {
                for (r, (&(j, s, _), mut row)) in batch.iter().zip(taken).enumerate() {
                    match logits.get(r) {
                        Ok(l) => {
                            row.logits = l;
                            self.jobs[j].rows[s] = Some(row);
                        }
                        Err(e) => self.jobs[j].failed = Some(e.into()),
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for &(j, _, _) in &batch {
                    self.jobs[j].failed =
                        Some(ModelError::Candle(candle_core::Error::Msg(msg.clone())));
                }
            }
        }
    }

    /// Jobs whose sequences all ended: another round for rejected options
    /// while tries are left, else the result.
    fn finish_jobs(&mut self) {
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.jobs.len() {
            let job = &mut self.jobs[i];
            let ended = job.failed.is_some()
                || (job.first_logits.is_some() && job.rows.iter().all(Option::is_none));
            if !ended {
                i += 1;
                continue;
            }
            if job.failed.is_none()
                && job.may_resample()
                && job.round < job.spec.params.resample_tries
            {
                let bad: Vec<usize> = job
                    .seqs
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.stop == Some(StopReason::Rejected))
                    .map(|(i, _)| i)
                    .collect();
                if !bad.is_empty() && !(job.spec.io.cancelled)() {
                    job.round += 1;
                    let n = job.spec.n;
                    for &b in &bad {
                        let seed = job
                            .spec
                            .params
                            .seed
                            .wrapping_add((job.round * n + b) as u64)
                            .wrapping_add(0x5EED);
                        let mut seq = job.new_sequence(b, seed);
                        seq.resampled = true;
                        seq.may_reject = job.round < job.spec.params.resample_tries;
                        job.seqs[b] = seq;
                        match job.fork_row() {
                            Ok(r) => job.rows[b] = Some(r),
                            Err(e) => job.failed = Some(e),
                        }
                    }
                    job.resamples += bad.len();
                    if job.failed.is_none() {
                        i += 1;
                        continue;
                    }
                }
            }
            let job = self.jobs.remove(i);
            self.blocks_used -= job.blocks;
            done.push(job);
        }
        // The gauges first: a caller that has its result sees them without
        // its job.
        self.publish();
        for job in done {
            self.model.conclude(job);
        }
    }

    fn publish(&mut self) {
        let s = &self.stats;
        let set = |a: &AtomicU64, v: usize| a.store(v as u64, Ordering::Relaxed);
        set(&s.running_jobs, self.jobs.len());
        set(&s.waiting_jobs, self.waiting.len());
        set(
            &s.running_sequences,
            self.jobs
                .iter()
                .map(|j| j.rows.iter().flatten().count())
                .sum(),
        );
        set(&s.kv_blocks_used, self.blocks_used + self.prefix.blocks);
        set(&s.prefix_cache_blocks, self.prefix.blocks);
        let now = Instant::now();
        let total = s.generated_tokens.load(Ordering::Relaxed);
        let elapsed = now.duration_since(self.window.0);
        if elapsed >= Duration::from_secs(1) || self.jobs.is_empty() {
            let rate = if self.jobs.is_empty() && elapsed < Duration::from_secs(1) {
                0
            } else {
                ((total - self.window.1) as f64 / elapsed.as_secs_f64()).round() as u64
            };
            set(&s.tokens_per_s, rate as usize);
            self.window = (now, total);
        }
    }
}

/// The result of a job cancelled before its first token: every option
/// empty and cancelled.
fn cancelled_before_decoding(spec: &JobSpec<'_>) -> Generation {
    let options = (0..spec.n)
        .map(|o| GeneratedOption {
            text: String::new(),
            tokens: 0,
            stop: StopReason::Cancelled,
            trimmed: false,
            seed: spec.params.seed.wrapping_add(o as u64),
            resampled: false,
        })
        .collect();
    Generation {
        options,
        prompt_tokens: spec.prompt_ids.len(),
        prefill_secs: 0.0,
        decode_secs: 0.0,
        decode_steps: 0,
        resamples: 0,
    }
}

/// Samples sequence `s` of `job` from `logits`: `Some(token)` while it goes
/// on, `None` once it ended (its text handed out).
fn sample(
    model: &GgufChatModel,
    job: &mut Job<'_>,
    s: usize,
    logits: &Tensor,
) -> Result<Option<u32>, ModelError> {
    let params = &job.spec.params;
    // The other options' first sentences, while this one has none.
    let others: Vec<String> = if params.distinct_options && job.seqs[s].first.is_none() {
        job.seqs
            .iter()
            .enumerate()
            .filter(|(j, q)| *j != s && q.stop != Some(StopReason::Rejected))
            .filter_map(|(_, q)| q.first.clone())
            .collect()
    } else {
        Vec::new()
    };
    let seq = &mut job.seqs[s];
    let logits = if params.repetition_penalty != 1.0 {
        let mut recent: Vec<u32> = job.spec.prompt_ids.clone();
        recent.extend_from_slice(&seq.tokens);
        let start = recent.len().saturating_sub(params.repeat_last_n);
        candle_transformers::utils::apply_repeat_penalty(
            logits,
            params.repetition_penalty,
            &recent[start..],
        )?
    } else {
        logits.clone()
    };
    let token = seq.sampler.sample(&logits)?;
    let on_text = &mut *job.spec.io.on_text;
    if !params.ignore_eos && model.stop_ids.contains(&token) {
        seq.stop = Some(StopReason::EndOfSequence);
    } else {
        seq.tokens.push(token);
        if seq.tokens.len() >= job.spec.max_new {
            seq.stop = Some(StopReason::MaxTokens);
        }
        model.emit_delta(seq, params, &others, on_text)?;
    }
    if seq.stop.is_some() {
        model.finish_sequence(seq, params, on_text)?;
        return Ok(None);
    }
    Ok(Some(token))
}

impl GgufChatModel {
    /// A finished job's result, handed to its `done`.
    fn conclude(&self, job: Job<'_>) {
        let Job {
            spec,
            mut seqs,
            failed,
            prefill_secs,
            decode_started,
            steps,
            resamples,
            ..
        } = job;
        if let Some(e) = failed {
            let result = match e {
                ModelError::Cancelled => Ok(cancelled_before_decoding(&spec)),
                e => Err(e),
            };
            (spec.io.done)(result);
            return;
        }
        let JobSpec {
            prompt_ids, mut io, ..
        } = spec;
        // Still out of character after the last try: its text rather than
        // nothing.
        for s in seqs.iter_mut() {
            if s.stop == Some(StopReason::Rejected) && s.final_text.as_deref() == Some("") {
                let t = match self.tokenizer.decode(&s.tokens, true) {
                    Ok(t) => t.trim().to_string(),
                    Err(e) => {
                        (io.done)(Err(ModelError::Tokenizer(e.to_string())));
                        return;
                    }
                };
                if !t.is_empty() {
                    (io.on_text)(s.option, &t);
                }
                s.final_text = Some(t);
            }
        }
        let options = seqs
            .into_iter()
            .map(|s| GeneratedOption {
                text: s.final_text.unwrap_or_default(),
                tokens: s.tokens.len(),
                stop: s.stop.unwrap_or(StopReason::MaxTokens),
                trimmed: s.trimmed,
                seed: s.seed,
                resampled: s.resampled,
            })
            .collect();
        (io.done)(Ok(Generation {
            options,
            prompt_tokens: prompt_ids.len(),
            prefill_secs,
            decode_secs: decode_started
                .map(|t| t.elapsed().as_secs_f64())
                .unwrap_or_default(),
            decode_steps: steps,
            resamples,
        }));
    }

    /// Runs one job to its end on this thread: the scheduler of
    /// [`BatchEngine`] with nothing else in it.
    pub(super) fn run_inline(
        &self,
        prompt_ids: Vec<u32>,
        n: usize,
        params: &SamplingParams,
        max_new: usize,
        cancelled: &dyn Fn() -> bool,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Generation, ModelError> {
        let mut out = None;
        {
            let mut scheduler = Scheduler::new(
                self,
                EngineConfig::inline(),
                Arc::new(EngineStats::default()),
            );
            scheduler.submit(JobSpec {
                prompt_ids,
                n,
                params: params.clone(),
                max_new,
                io: JobIo {
                    on_text: Box::new(on_text),
                    cancelled: Box::new(cancelled),
                    done: Box::new(|r| out = Some(r)),
                },
            });
            while !scheduler.is_idle() {
                scheduler.step();
            }
        }
        out.unwrap_or_else(|| Err(ModelError::Invalid("the job ended without a result".into())))
    }
}

enum Event {
    Text(usize, String),
    Done(Result<Generation, ModelError>),
}

/// A job as it crosses to the engine thread, which builds its [`JobIo`].
struct Submission {
    prompt_ids: Vec<u32>,
    n: usize,
    params: SamplingParams,
    max_new: usize,
    events: mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
}

impl Submission {
    fn into_spec(self) -> JobSpec<'static> {
        let (text_tx, done_tx, flag) = (self.events.clone(), self.events, self.cancel);
        JobSpec {
            prompt_ids: self.prompt_ids,
            n: self.n,
            params: self.params,
            max_new: self.max_new,
            io: JobIo {
                on_text: Box::new(move |o, t| {
                    let _ = text_tx.send(Event::Text(o, t.to_string()));
                }),
                cancelled: Box::new(move || flag.load(Ordering::Relaxed)),
                done: Box::new(move |r| {
                    let _ = done_tx.send(Event::Done(r));
                }),
            },
        }
    }
}

/// Raises the calling thread's nice value to `nice` (Linux keeps one per
/// thread); nothing for 0 or elsewhere.
fn lower_thread_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice > 0 {
        // SAFETY: plain system calls on the calling thread's own id.
        let rc =
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
        if rc != 0 {
            tracing::warn!(nice, error = %std::io::Error::last_os_error(), "could not lower the text engine's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// A model shared by every text job of a worker: jobs submitted from any
/// thread join one running batch ([`Scheduler`] on a thread of its own).
pub struct BatchEngine {
    model: Arc<GgufChatModel>,
    submit: mpsc::Sender<Submission>,
    stats: Arc<EngineStats>,
    config: EngineConfig,
}

impl BatchEngine {
    pub fn start(model: Arc<GgufChatModel>, config: EngineConfig) -> Self {
        let stats = Arc::new(EngineStats::default());
        let (submit, rx) = mpsc::channel::<Submission>();
        let (m, s, c) = (model.clone(), stats.clone(), config.clone());
        if config.nice > 0 {
            rayon::broadcast(|_| lower_thread_priority(config.nice));
        }
        std::thread::Builder::new()
            .name("text-engine".into())
            .spawn(move || loop {
                lower_thread_priority(c.nice);
                if c.nice > 0 && m.model.device().is_cpu() {
                    // The model's kernels (q4, q8, attention) run on candle's
                    // barrier pool: every one of its threads takes part in
                    // `execute`, this one as well. Left at nice 0, its
                    // spinning threads halved the CPU a spoken reply's
                    // first chunk got beside them.
                    candle_core::utils::barrier_pool().execute(|_| lower_thread_priority(c.nice));
                }
                // A panic drops the jobs in flight (their callers get an
                // error) and the engine starts over for the next ones.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut scheduler = Scheduler::new(&m, c.clone(), s.clone());
                    loop {
                        if scheduler.is_idle() {
                            match rx.recv() {
                                Ok(sub) => scheduler.submit(sub.into_spec()),
                                Err(_) => return,
                            }
                        }
                        while let Ok(sub) = rx.try_recv() {
                            scheduler.submit(sub.into_spec());
                        }
                        scheduler.step();
                    }
                }));
                match run {
                    Ok(()) => return,
                    Err(_) => tracing::error!("text engine panicked; starting over"),
                }
            })
            .expect("spawning the text engine thread");
        tracing::info!(
            kv_cache_tokens = config.kv_cache_tokens,
            max_sequences = config.max_sequences,
            prefix_cache = config.prefix_cache,
            "text engine started"
        );
        Self {
            model,
            submit,
            stats,
            config,
        }
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn model(&self) -> &GgufChatModel {
        &self.model
    }
}

impl TextGeneration for BatchEngine {
    fn chat_template(&self) -> Option<&str> {
        self.model.chat_template()
    }
    fn bos_token(&self) -> &str {
        self.model.bos_token()
    }
    fn eos_token(&self) -> &str {
        self.model.eos_token()
    }
    fn context_length(&self) -> usize {
        self.model.context_length()
    }
    fn count_tokens(&self, text: &str) -> Result<usize, ModelError> {
        self.model.count_tokens(text)
    }

    fn generate_streaming(
        &self,
        prompt: &str,
        n: usize,
        params: &SamplingParams,
        cancelled: &dyn Fn() -> bool,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Generation, ModelError> {
        let (prompt_ids, max_new) = self.model.prepare(prompt, n, params)?;
        let (events, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stopped = || ModelError::Invalid("the text engine stopped".into());
        self.submit
            .send(Submission {
                prompt_ids,
                n,
                params: params.clone(),
                max_new,
                events,
                cancel: cancel.clone(),
            })
            .map_err(|_| stopped())?;
        loop {
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(Event::Text(o, t)) => on_text(o, &t),
                Ok(Event::Done(r)) => return r,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(stopped()),
            }
            if !cancel.load(Ordering::Relaxed) && cancelled() {
                cancel.store(true, Ordering::Relaxed);
            }
        }
    }
}
