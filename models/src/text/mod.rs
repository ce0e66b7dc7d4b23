//! Text generation: a GGUF chat model on candle, N options per prompt from one
//! shared prefill.

pub mod quantized_llama;
pub mod tokenizer;

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
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
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndOfSequence,
    MaxTokens,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct GeneratedOption {
    pub text: String,
    pub tokens: usize,
    pub stop: StopReason,
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
}

impl GgufChatModel {
    /// Hands out the text a sequence gained: only once it decodes to whole
    /// characters (no U+FFFD from a split UTF-8 sequence), without the
    /// leading and trailing whitespace the final text is trimmed of.
    fn emit_delta(
        &self,
        seq: &mut Sequence,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<(), ModelError> {
        let text = self
            .tokenizer
            .decode(&seq.tokens, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        if text.ends_with('\u{FFFD}') {
            return Ok(());
        }
        let visible = text.trim();
        if visible.len() > seq.emitted && visible.is_char_boundary(seq.emitted) {
            on_text(seq.option, &visible[seq.emitted..]);
            seq.emitted = visible.len();
        }
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
        let max_new = params.max_new_tokens.min(budget);
        let device = self.model.device();
        let started = Instant::now();
        let mut cache = self.model.new_cache();
        let input = Tensor::new(prompt_ids.as_slice(), device)?.unsqueeze(0)?;
        let mut logits = self.model.forward(&input, &mut cache)?;
        let prefill_secs = started.elapsed().as_secs_f64();
        if n > 1 {
            cache = cache.expand(n)?;
        }
        let sampling = if params.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            Sampling::TopKThenTopP {
                k: params.top_k.max(1),
                p: params.top_p,
                temperature: params.temperature,
            }
        };
        let mut seqs: Vec<Sequence> = (0..n)
            .map(|i| Sequence {
                option: i,
                tokens: Vec::new(),
                sampler: LogitsProcessor::from_sampling(
                    params.seed.wrapping_add(i as u64),
                    sampling.clone(),
                ),
                stop: None,
                emitted: 0,
            })
            .collect();
        let decode_started = Instant::now();
        let mut steps = 0;
        // `active[r]` is the sequence in batch row `r` of `logits` and `cache`.
        let mut active: Vec<usize> = (0..n).collect();
        loop {
            let mut next = Vec::with_capacity(active.len());
            for (row, &s) in active.iter().enumerate() {
                let seq = &mut seqs[s];
                let row_logits = logits.get(if logits.dim(0)? == 1 { 0 } else { row })?;
                let row_logits = if params.repetition_penalty != 1.0 {
                    let mut recent: Vec<u32> = prompt_ids.clone();
                    recent.extend_from_slice(&seq.tokens);
                    let start = recent.len().saturating_sub(params.repeat_last_n);
                    candle_transformers::utils::apply_repeat_penalty(
                        &row_logits,
                        params.repetition_penalty,
                        &recent[start..],
                    )?
                } else {
                    row_logits
                };
                let token = seq.sampler.sample(&row_logits)?;
                if !params.ignore_eos && self.stop_ids.contains(&token) {
                    seq.stop = Some(StopReason::EndOfSequence);
                } else {
                    seq.tokens.push(token);
                    if seq.tokens.len() >= max_new {
                        seq.stop = Some(StopReason::MaxTokens);
                    }
                    self.emit_delta(seq, on_text)?;
                }
                next.push(token);
            }
            if cancelled() {
                for &s in &active {
                    seqs[s].stop.get_or_insert(StopReason::Cancelled);
                }
            }
            let keep: Vec<u32> = (0..active.len() as u32)
                .filter(|&r| seqs[active[r as usize]].stop.is_none())
                .collect();
            if keep.is_empty() {
                break;
            }
            if keep.len() < active.len() {
                cache = cache.select_rows(&keep)?;
            }
            let tokens: Vec<u32> = keep.iter().map(|&r| next[r as usize]).collect();
            active = keep.iter().map(|&r| active[r as usize]).collect();
            let input = Tensor::new(tokens.as_slice(), device)?.unsqueeze(1)?;
            logits = self.model.forward(&input, &mut cache)?;
            steps += 1;
        }
        let decode_secs = decode_started.elapsed().as_secs_f64();
        seqs.sort_by_key(|s| s.option);
        let options = seqs
            .into_iter()
            .map(|s| {
                let text = self
                    .tokenizer
                    .decode(&s.tokens, true)
                    .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
                Ok(GeneratedOption {
                    text: text.trim().to_string(),
                    tokens: s.tokens.len(),
                    stop: s.stop.unwrap_or(StopReason::MaxTokens),
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Generation {
            options,
            prompt_tokens: prompt_ids.len(),
            prefill_secs,
            decode_secs,
            decode_steps: steps,
        })
    }
}
