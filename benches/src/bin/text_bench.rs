//! Prompt-processing and generation speed of the text model, printed as JSON,
//! measured like llama.cpp's `llama-bench` (pp: one forward pass over an
//! N-token prompt; tg: tokens generated one step at a time), so
//! `benches/compare_llama_cpp.sh` can set the two side by side.
//!
//! `text_bench [PROMPT_TOKENS] [GEN_TOKENS] [OPTIONS] [REPS]` (defaults 128 32 1 3)
//!
//! `text_bench jobs [PROMPT_TOKENS] [GEN_TOKENS] [JOBS]` (defaults 128 128 8):
//! JOBS one-option jobs with different prompts submitted at once to the
//! worker's continuous-batching engine (prefix cache off), as a worker
//! serving JOBS conversations runs them; prints the aggregate generation
//! rate over the whole run, prefills included.
//!
//! `text_bench replay [TURNS]` (default 8): a conversation replayed turn by
//! turn (each prompt is the last one, its reply and a new user line), with
//! the prefix cache on and off: prints the share of prompt tokens the cache
//! saved and the prefill time with and without it.
//!
//! `text_bench path` prints the GGUF file it runs (`TEXT_MODEL`, fetched
//! like the worker does): the comparison scripts hand the same file to the
//! peer.

use std::time::Instant;

use models::{SamplingParams, TextGeneration};

fn main() {
    if std::env::args().nth(1).as_deref() == Some("path") {
        println!("{}", benches::model_path().display());
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("jobs") {
        return jobs();
    }
    if std::env::args().nth(1).as_deref() == Some("replay") {
        return replay();
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (pp, tg, options, reps) = (arg(0, 128), arg(1, 32), arg(2, 1), arg(3, 3));
    let model = benches::load_model();
    let prompt = benches::prompt_of(&model, pp);
    let params = |max_new_tokens| SamplingParams {
        max_new_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    // Warm-up.
    model
        .generate(&prompt, 1, &params(2), &|| false)
        .expect("generates");
    let (mut pp_rates, mut tg_rates, mut totals) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let started = Instant::now();
        let g = model
            .generate(&prompt, options, &params(tg), &|| false)
            .expect("generates");
        totals.push(started.elapsed().as_secs_f64());
        pp_rates.push(g.prompt_tokens as f64 / g.prefill_secs);
        tg_rates.push((g.decode_steps * options) as f64 / g.decode_secs);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "prompt_tokens": model.count_tokens(&prompt).expect("tokenizes"),
            "gen_tokens": tg,
            "options": options,
            "reps": reps,
            "pp_tok_s": mean(&pp_rates),
            "tg_tok_s": mean(&tg_rates),
            "seconds_per_job": mean(&totals),
        })
    );
}

fn jobs() {
    let args: Vec<usize> = std::env::args()
        .skip(2)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (pp, tg, jobs) = (arg(0, 128), arg(1, 128), arg(2, 8));
    let engine = models::BatchEngine::start(
        std::sync::Arc::new(benches::load_model()),
        models::EngineConfig {
            max_sequences: jobs.max(1),
            prefix_cache: false,
            ..models::EngineConfig::default()
        },
    );
    // Different prompts of the same length: no job shares another's prefill.
    let prompts: Vec<String> = (0..jobs)
        .map(|i| format!("Guest {i}. {}", benches::prompt_of(&engine, pp)))
        .collect();
    let params = |seed, max_new_tokens| SamplingParams {
        max_new_tokens,
        ignore_eos: true,
        seed,
        ..SamplingParams::default()
    };
    engine
        .generate(&prompts[0], 1, &params(0, 2), &|| false)
        .expect("generates");
    let started = Instant::now();
    let generations: Vec<models::Generation> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (engine, params) = (&engine, params(i as u64, tg));
                s.spawn(move || {
                    engine
                        .generate(p, 1, &params, &|| false)
                        .expect("generates")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("joins"))
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let generated: usize = generations.iter().map(|g| g.options[0].tokens).sum();
    let prompt_tokens: usize = generations.iter().map(|g| g.prompt_tokens).sum();
    let stats: std::collections::HashMap<_, _> = engine.stats().snapshot().into_iter().collect();
    println!(
        "{}",
        serde_json::json!({
            "jobs": jobs,
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated,
            "seconds": wall,
            "tg_tok_s_e2e": generated as f64 / wall,
            "all_tok_s": (generated + prompt_tokens) as f64 / wall,
            "mean_batch_rows": stats["batch_rows"] as f64 / stats["decode_steps"].max(1) as f64,
        })
    );
}

fn replay() {
    let turns: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse().expect("a number"))
        .unwrap_or(8);
    let model = std::sync::Arc::new(benches::load_model());
    let run = |prefix_cache: bool| {
        let engine = models::BatchEngine::start(
            model.clone(),
            models::EngineConfig {
                prefix_cache,
                ..models::EngineConfig::default()
            },
        );
        let mut prompt = String::from(
            "<|im_start|>system\nYou are Luna, a warm and curious companion who remembers every detail of what the user tells her about their day.<|im_end|>\n",
        );
        let (mut prefill, mut replies) = (0.0, Vec::new());
        for turn in 0..turns {
            prompt.push_str(&format!(
                "<|im_start|>user\nHere is part {turn} of my story: I walked by the river, met an old friend and we talked about the summer.<|im_end|>\n<|im_start|>assistant\n"
            ));
            let params = SamplingParams {
                max_new_tokens: 24,
                seed: turn as u64,
                ..SamplingParams::default()
            };
            let g = engine
                .generate(&prompt, 1, &params, &|| false)
                .expect("generates");
            prefill += g.prefill_secs;
            let reply = g.options[0].text.clone();
            prompt.push_str(&format!("{reply}<|im_end|>\n"));
            replies.push(reply);
        }
        let stats: std::collections::HashMap<_, _> =
            engine.stats().snapshot().into_iter().collect();
        (prefill, stats, replies)
    };
    let (with, stats, replies_with) = run(true);
    let (without, _, replies_without) = run(false);
    assert_eq!(replies_with, replies_without, "the cache changes no reply");
    println!(
        "{}",
        serde_json::json!({
            "turns": turns,
            "prompt_tokens": stats["prompt_tokens"],
            "prefix_hit_tokens": stats["prefix_hit_tokens"],
            "hit_rate": stats["prefix_hit_tokens"] as f64 / stats["prompt_tokens"] as f64,
            "prefill_s_with_cache": with,
            "prefill_s_without": without,
        })
    );
}
