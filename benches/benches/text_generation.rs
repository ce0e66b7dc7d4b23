//! Criterion: prompt processing, generation, and N options from one prefill
//! against one option, on the default model (CPU unless DEVICE says).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use models::{SamplingParams, TextGeneration};

fn text_generation(c: &mut Criterion) {
    let model = benches::load_model();
    let prompt = benches::prompt_of(&model, 128);
    let prompt_tokens = model.count_tokens(&prompt).unwrap() as u64;
    let params = |max_new_tokens| SamplingParams {
        max_new_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };

    let mut g = c.benchmark_group("text");
    g.sample_size(10);
    g.throughput(Throughput::Elements(prompt_tokens));
    g.bench_function("prefill_128_tokens", |b| {
        b.iter(|| model.generate(&prompt, 1, &params(1), &|| false).unwrap())
    });
    for options in [1usize, 3] {
        g.throughput(Throughput::Elements(32 * options as u64));
        g.bench_function(
            format!("prefill_128_then_32_tokens_x{options}_options"),
            |b| {
                b.iter(|| {
                    model
                        .generate(&prompt, options, &params(32), &|| false)
                        .unwrap()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, text_generation);
criterion_main!(benches);
