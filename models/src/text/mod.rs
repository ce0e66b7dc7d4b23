//! Text generation: a GGUF chat model on candle, N options per prompt from one
//! shared prefill.

pub(crate) mod cpu_ops;
pub mod engine;
pub mod q4;
pub mod q8;
pub mod quantized_llama;
pub mod tokenizer;

pub mod reply;

use std::path::Path;

use candle_core::Device;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokenizers::Tokenizer;

use crate::ModelError;
use quantized_llama::QuantizedLlama;

/// How tokens are drawn. `seed` makes a run reproducible; option `i` of a
/// job samples with `seed + i`.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Keep generating past end-of-turn tokens (benchmarks and load tests).
    pub ignore_eos: bool,
    /// Texts that end an option where they begin (never part of it): the
    /// user's next line, role headers, special-token markup.
    pub stop: Vec<String>,
    /// An option the token limit stops is trimmed back to its last whole
    /// sentence, and only whole sentences are handed out while it runs.
    pub whole_sentences: bool,
    /// Resample an option that nearly repeats another (same first sentence
    /// or most of its words).
    pub distinct_options: bool,
    /// Lower-case phrases that break character ("as an ai"): an option
    /// whose first sentence has one is resampled; a later sentence with one
    /// ends the option before it (needs `whole_sentences`).
    pub reject_phrases: Vec<String>,
    /// Rounds of resampling, each from the shared prefill.
    pub resample_tries: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            repetition_penalty: 1.1,
            repeat_last_n: 64,
            max_new_tokens: 80,
            seed: 299_792_458,
            ignore_eos: false,
            stop: Vec::new(),
            whole_sentences: false,
            distinct_options: false,
            reject_phrases: Vec::new(),
            resample_tries: 0,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndOfSequence,
    MaxTokens,
    Cancelled,
    /// One of [`SamplingParams::stop`] began.
    StopSequence,
    /// Its first sentence broke character ([`SamplingParams::reject_phrases`])
    /// and no resample was left.
    Rejected,
}

#[derive(Debug, Clone)]
pub struct GeneratedOption {
    pub text: String,
    pub tokens: usize,
    pub stop: StopReason,
    /// Cut back to its last whole sentence ([`SamplingParams::whole_sentences`]).
    pub trimmed: bool,
    /// The seed it was sampled with.
    pub seed: u64,
    /// Sampled again (a near-duplicate or out of character).
    pub resampled: bool,
}

/// The options of one prompt and what they cost.
#[derive(Debug, Clone)]
pub struct Generation {
    pub options: Vec<GeneratedOption>,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Batched forward passes after the prefill.
    pub decode_steps: usize,
    /// Options sampled again.
    pub resamples: usize,
}

/// A chat model: its prompt format and a way to continue a prompt N ways.
pub trait TextGeneration: Send + Sync {
    /// The Jinja chat template shipped with the model, if any.
    fn chat_template(&self) -> Option<&str>;
    fn bos_token(&self) -> &str;
    fn eos_token(&self) -> &str;
    fn context_length(&self) -> usize;
    fn count_tokens(&self, text: &str) -> Result<usize, ModelError>;
    /// Continues `prompt` `n` times. `cancelled` is polled between steps.
    fn generate(
        &self,
        prompt: &str,
        n: usize,
        params: &SamplingParams,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Generation, ModelError> {
        self.generate_streaming(prompt, n, params, cancelled, &mut |_, _| {})
    }

    /// As [`TextGeneration::generate`], handing each option's new text to
    /// `on_text(option, delta)` as it is produced. Deltas are whole UTF-8
    /// characters; their concatenation is the option's final text (leading
    /// and trailing whitespace held back).
    fn generate_streaming(
        &self,
        prompt: &str,
        n: usize,
        params: &SamplingParams,
        cancelled: &dyn Fn() -> bool,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Generation, ModelError>;
}

/// A GGUF model whose tokenizer and chat template come from its metadata.
pub struct GgufChatModel {
    model: QuantizedLlama,
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    stop_ids: Vec<u32>,
}

/// Tokens that end a turn in the common chat formats.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "</s>",
    "<end_of_turn>",
];

/// How a model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// On CPU, re-quantize tensors whose type has no SIMD kernel in candle
    /// (Q4_1, Q5_0, Q5_1) to Q8_0: about 6× faster prompt processing and 3×
    /// faster generation for the default model, for twice the memory of Q4.
    pub cpu_repack: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { cpu_repack: true }
    }
}

impl GgufChatModel {
    pub fn load(path: &Path, device: &Device, options: LoadOptions) -> Result<Self, ModelError> {
        crate::device::cpu_math_init();
        let mut file = std::fs::File::open(path)
            .map_err(|e| ModelError::Io(format!("opening {}: {e}", path.display())))?;
        let ct = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| {
            ModelError::Format(format!("{} is not a GGUF file: {e}", path.display()))
        })?;
        let tokenizer = tokenizer::tokenizer_from_gguf(&ct)?;
        let vocab = tokenizer::vocabulary(&ct)?;
        let id = |key: &str| ct.metadata.get(key).and_then(|v| v.to_u32().ok());
        let token = |id: Option<u32>| {
            id.and_then(|i| vocab.get(i as usize))
                .cloned()
                .unwrap_or_default()
        };
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        for t in END_OF_TURN_TOKENS {
            if let Some(i) = vocab.iter().position(|v| v == t) {
                if !stop_ids.contains(&(i as u32)) {
                    stop_ids.push(i as u32);
                }
            }
        }
        let chat_template = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let model = QuantizedLlama::from_gguf(&ct, &mut file, device, options.cpu_repack)?;
        tracing::info!(
            path = %path.display(),
            arch = %model.config.architecture,
            layers = model.config.n_layer,
            context = model.config.context_length,
            "text model loaded"
        );
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            bos_token: token(id("tokenizer.ggml.bos_token_id")),
            eos_token: token(eos_id),
            stop_ids,
        })
    }

    /// The prompt's token ids and the reply's token limit, or why the
    /// prompt cannot run.
    fn prepare(
        &self,
        prompt: &str,
        n: usize,
        params: &SamplingParams,
    ) -> Result<(Vec<u32>, usize), ModelError> {
        if n == 0 {
            return Err(ModelError::Invalid("at least one option is needed".into()));
        }
        let prompt_ids = self.encode(prompt)?;
        if prompt_ids.is_empty() {
            return Err(ModelError::Invalid("the prompt is empty".into()));
        }
        let budget = self.context_length().saturating_sub(prompt_ids.len());
        if budget == 0 {
            return Err(ModelError::Invalid(format!(
                "the prompt has {} tokens, the model's context holds {}",
                prompt_ids.len(),
                self.context_length()
            )));
        }
        let max_new = params.max_new_tokens.min(budget).max(1);
        Ok((prompt_ids, max_new))
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }
}

struct Sequence {
    option: usize,
    tokens: Vec<u32>,
    sampler: LogitsProcessor,
    stop: Option<StopReason>,
    /// Bytes of the (trimmed) text already handed out.
    emitted: usize,
    /// The option's text once it ended.
    final_text: Option<String>,
    trimmed: bool,
    /// Bytes of whole sentences already checked against reject phrases.
    checked: usize,
    /// Where a sentence with a reject phrase begins (the option ends there).
    cut_at: Option<usize>,
    seed: u64,
    resampled: bool,
    /// Its first whole sentence, once written (for the duplicate check).
    first: Option<String>,
    /// Whether this try may still be rejected (false on the last try).
    may_reject: bool,
}

impl Sequence {
    fn new(option: usize, seed: u64, sampling: Sampling, may_reject: bool) -> Self {
        Self {
            option,
            tokens: Vec::new(),
            sampler: LogitsProcessor::from_sampling(seed, sampling),
            stop: None,
            emitted: 0,
            final_text: None,
            trimmed: false,
            checked: 0,
            cut_at: None,
            seed,
            resampled: false,
            first: None,
            may_reject,
        }
    }
}

impl GgufChatModel {
    /// Hands out the text a sequence gained: only once it decodes to whole
    /// characters (no U+FFFD from a split UTF-8 sequence), without the
    /// leading and trailing whitespace the final text is trimmed of.
    /// Text that could still become a stop sequence, and with
    /// `whole_sentences` an unfinished sentence, wait for the next tokens.
    fn emit_delta(
        &self,
        seq: &mut Sequence,
        params: &SamplingParams,
        others: &[String],
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<(), ModelError> {
        let text = self
            .tokenizer
            .decode(&seq.tokens, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        if text.ends_with('\u{FFFD}') {
            return Ok(());
        }
        let visible = text.trim_start();
        if reply::find_stop(visible, &params.stop).is_some() {
            seq.stop = Some(StopReason::StopSequence);
            return self.finish_sequence(seq, params, on_text);
        }
        // Each newly whole sentence, against the character-breaking
        // phrases; the first one also against the other options' first.
        if params.whole_sentences {
            if let Some(end) = reply::settled_sentence_end(visible) {
                if end > seq.checked {
                    let fresh = visible[seq.checked..end].to_lowercase();
                    let breaks = params
                        .reject_phrases
                        .iter()
                        .any(|p| fresh.contains(p.as_str()));
                    let repeats = seq.checked == 0
                        && params.distinct_options
                        && others
                            .iter()
                            .any(|o| reply::near_duplicate(o, &visible[..end]));
                    if breaks && seq.checked > 0 {
                        seq.cut_at = Some(seq.checked);
                        seq.stop = Some(StopReason::StopSequence);
                        return self.finish_sequence(seq, params, on_text);
                    }
                    if (breaks || repeats) && seq.may_reject {
                        seq.stop = Some(StopReason::Rejected);
                        return self.finish_sequence(seq, params, on_text);
                    }
                    if seq.checked == 0 {
                        seq.first = Some(visible[..end].to_string());
                    }
                    seq.checked = end;
                }
            }
        }
        let mut safe = visible
            .trim_end()
            .len()
            .min(visible.len() - reply::stop_hold(visible, &params.stop));
        if params.whole_sentences {
            // Only a settled end: one the text goes on past (a "..." at the
            // very end may still continue without a space).
            safe = safe.min(reply::settled_sentence_end(visible).unwrap_or(0));
        }
        if safe > seq.emitted
            && visible.is_char_boundary(safe)
            && visible.is_char_boundary(seq.emitted)
        {
            on_text(seq.option, &visible[seq.emitted..safe]);
            seq.emitted = safe;
        }
        Ok(())
    }

    /// An ended option's text (cut at a stop sequence, trimmed to a whole
    /// sentence when the limit stopped it), and what of it was held back.
    fn finish_sequence(
        &self,
        seq: &mut Sequence,
        params: &SamplingParams,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<(), ModelError> {
        if seq.final_text.is_some() {
            return Ok(());
        }
        let text = self
            .tokenizer
            .decode(&seq.tokens, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let visible = text.trim();
        let cut = match reply::find_stop(visible, &params.stop) {
            Some(at) => visible[..at].trim_end(),
            None => visible,
        };
        let cut = match seq.cut_at {
            Some(at) if at <= cut.len() && cut.is_char_boundary(at) => cut[..at].trim_end(),
            _ => cut,
        };
        // A rejected first sentence is never handed out (a resample comes).
        let cut = if seq.stop == Some(StopReason::Rejected) && seq.emitted == 0 {
            ""
        } else {
            cut
        };
        let (final_text, trimmed) =
            if params.whole_sentences && seq.stop == Some(StopReason::MaxTokens) {
                reply::trim_to_sentence(cut)
            } else {
                (cut.to_string(), false)
            };
        if final_text.len() > seq.emitted && final_text.is_char_boundary(seq.emitted) {
            on_text(seq.option, &final_text[seq.emitted..]);
        }
        seq.emitted = final_text.len();
        seq.trimmed = trimmed;
        seq.final_text = Some(final_text);
        Ok(())
    }
}

impl TextGeneration for GgufChatModel {
    fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    fn bos_token(&self) -> &str {
        &self.bos_token
    }
    fn eos_token(&self) -> &str {
        &self.eos_token
    }
    fn context_length(&self) -> usize {
        self.model.config.context_length
    }
    fn count_tokens(&self, text: &str) -> Result<usize, ModelError> {
        Ok(self.encode(text)?.len())
    }

    fn generate_streaming(
        &self,
        prompt: &str,
        n: usize,
        params: &SamplingParams,
        cancelled: &dyn Fn() -> bool,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Generation, ModelError> {
        let (prompt_ids, max_new) = self.prepare(prompt, n, params)?;
        self.run_inline(prompt_ids, n, params, max_new, cancelled, on_text)
    }
}
