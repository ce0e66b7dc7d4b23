//! Prompt-processing and generation speed of the text model, printed as JSON,
//! measured like llama.cpp's `llama-bench` (pp: one forward pass over an
//! N-token prompt; tg: tokens generated one step at a time), so
//! `benches/compare_llama_cpp.sh` can set the two side by side.
//!
//! `text_bench [PROMPT_TOKENS] [GEN_TOKENS] [OPTIONS] [REPS]` (defaults 128 32 1 3)
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
