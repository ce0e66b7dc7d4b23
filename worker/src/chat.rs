//! The chat-respond job: character template → prompt → N options → output.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use chrono::{DateTime, FixedOffset};
use models::{SamplingParams, TextGeneration};
use pipeline::jobs::chat::ReplyAudio;
use pipeline::jobs::chat::{ChatMessage, MessageType, Originator};
use pipeline::media_store::{media_key, MediaStore};
use pipeline::{ChatRespondJob, ChatRespondOutput};
use prompts::{
    assemble, CharacterCard, ChatTemplate, HistoryMessage, PromptParts, PromptReport, Role,
    TokenCounter,
};

use crate::speech::{SpokenAudio, TextToSpeech, Transcriber};

/// A job that cannot succeed as submitted. The worker fails it at once:
/// running it again would give the same error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JobError(pub String);

impl JobError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

pub struct ChatEngine {
    model: Arc<dyn TextGeneration>,
    chat_template: ChatTemplate,
    templates_dir: PathBuf,
    sampling: SamplingParams,
    tts: Option<Arc<dyn TextToSpeech>>,
    stt: Option<Arc<Transcriber>>,
    /// Where spoken replies are also stored (S3), with the tenant of keys.
    media: Option<Arc<MediaStore>>,
    media_tenant: String,
    /// Replies the token limit stops are cut back to a whole sentence.
    whole_sentences: bool,
    /// Phrases that break character (lower case), and resampling rounds.
    reject_phrases: Vec<String>,
    resample_tries: usize,
    /// The text engine's batch and KV pool, when the model runs in one.
    text_stats: Option<Arc<models::EngineStats>>,
}

/// What a chat prompt is made of.
pub struct ChatContext<'a> {
    pub character: &'a prompts::RenderedCharacter,
    pub persona: Option<&'a prompts::Persona>,
    pub memory: Option<&'a str>,
    /// Oldest first, the new message last.
    pub history: &'a [HistoryMessage],
    pub new_chat: bool,
    pub seed: u64,
    pub clock: DateTime<FixedOffset>,
}

/// What a job cost the model, for the fleet's metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub prefill_ms: u64,
    pub decode_ms: u64,
    /// Recordings transcribed, and their audio in milliseconds.
    pub transcriptions: u64,
    pub transcribed_ms: u64,
    /// Options cut back to a whole sentence, and options a stop sequence
    /// ended (the user's next line, a role header, special tokens).
    pub reply_trims: u64,
    pub stop_sequence_hits: u64,
    /// Options sampled again (near-duplicates, out of character).
    pub reply_resamples: u64,
}

impl Usage {
    /// Counts what the reply rules did to a generation's options.
    pub fn add_reply_rules(&mut self, g: &models::text::Generation) {
        self.reply_trims += g.options.iter().filter(|o| o.trimmed).count() as u64;
        self.stop_sequence_hits += g
            .options
            .iter()
            .filter(|o| o.stop == models::text::StopReason::StopSequence)
            .count() as u64;
        self.reply_resamples += g.resamples as u64;
    }

    /// Adds what one generation cost (the one place its counts are read).
    pub fn add(&mut self, g: &models::text::Generation) {
        self.prompt_tokens += g.prompt_tokens as u64;
        self.generated_tokens += g.options.iter().map(|o| o.tokens as u64).sum::<u64>();
        self.prefill_ms += (g.prefill_secs * 1000.0) as u64;
        self.decode_ms += (g.decode_secs * 1000.0) as u64;
    }
}

/// A message's text: its own, or its recording's transcript (an empty
/// recording is empty text, as in the seed's first example).
fn message_text(m: &ChatMessage, transcripts: &HashMap<String, String>) -> String {
    match m.kind {
        MessageType::Text => m.text.clone().unwrap_or_default(),
        MessageType::Audio if m.is_processed => m.text.clone().unwrap_or_default(),
        MessageType::Audio => transcripts
            .get(m.audio_file_id.as_deref().unwrap_or_default())
            .cloned()
            .unwrap_or_default(),
    }
}

/// The prompt of a job and the texts of its new messages, as resolved.
pub struct PreparedChat {
    pub prompt: String,
    /// The reply's token budget when the card sets one.
    pub max_new_tokens: Option<usize>,
    pub resolved_texts: Vec<String>,
    /// What transcribing the job's recordings cost.
    pub usage: Usage,
    pub report: PromptReport,
}

/// The model's tokenizer as the prompt budget's counter.
struct ModelTokens<'a>(&'a dyn TextGeneration);

impl TokenCounter for ModelTokens<'_> {
    fn count(&self, text: &str) -> usize {
        // A text the tokenizer refuses still costs about a token per 4 bytes.
        self.0.count_tokens(text).unwrap_or(text.len() / 4 + 1)
    }
}

impl ChatEngine {
    pub fn new(
        model: Arc<dyn TextGeneration>,
        templates_dir: PathBuf,
        sampling: SamplingParams,
        tts: Option<Arc<dyn TextToSpeech>>,
    ) -> anyhow::Result<Self> {
        let chat_template =
            ChatTemplate::new(model.chat_template(), model.bos_token(), model.eos_token())?;
        Ok(Self {
            model,
            chat_template,
            templates_dir,
            sampling,
            tts,
            stt: None,
            media: None,
            media_tenant: "default".into(),
            text_stats: None,
            whole_sentences: true,
            reject_phrases: models::text::reply::DEFAULT_REJECT_PHRASES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            resample_tries: 2,
        })
    }

    /// Whether replies stopped by the token limit are cut back to a whole
    /// sentence (`WHOLE_SENTENCES`).
    pub fn with_whole_sentences(mut self, on: bool) -> Self {
        self.whole_sentences = on;
        self
    }

    /// The character-breaking phrases (`REJECT_PHRASES`; empty keeps the
    /// default list) and resampling rounds (`RESAMPLE_TRIES`).
    pub fn with_reply_rules(mut self, phrases: &[String], tries: usize) -> Self {
        let phrases: Vec<String> = phrases
            .iter()
            .map(|p| p.trim().to_lowercase())
            .filter(|p| !p.is_empty())
            .collect();
        if !phrases.is_empty() {
            self.reject_phrases = phrases;
        }
        self.resample_tries = tries;
        self
    }

    /// Transcribe audio messages with `stt`.
    pub fn with_stt(mut self, stt: Option<Transcriber>) -> Self {
        self.stt = stt.map(Arc::new);
        self
    }

    /// Also store spoken replies in `store`, under keys of `tenant`.
    pub fn with_media(mut self, store: Option<MediaStore>, tenant: String) -> Self {
        self.media = store.map(Arc::new);
        self.media_tenant = tenant;
        self
    }

    pub fn with_text_stats(mut self, stats: Arc<models::EngineStats>) -> Self {
        self.text_stats = Some(stats);
        self
    }

    /// What the heartbeat reports of the text engine.
    pub fn text_stats(&self) -> Option<&Arc<models::EngineStats>> {
        self.text_stats.as_ref()
    }

    pub fn model(&self) -> &dyn TextGeneration {
        self.model.as_ref()
    }

    /// The text-to-speech backend (None: `TTS_BACKEND=none`).
    pub fn tts(&self) -> Option<&Arc<dyn TextToSpeech>> {
        self.tts.as_ref()
    }

    /// Whether replies are streamed in whole sentences (`WHOLE_SENTENCES`).
    pub fn whole_sentences(&self) -> bool {
        self.whole_sentences
    }

    /// Stores a spoken reply as `response.EXT` of the job, in the caller's
    /// own bucket (s3Config) or else the worker's media store; its URL, or
    /// None when neither is configured.
    pub async fn store_spoken_reply(
        &self,
        job_store: Option<&MediaStore>,
        job_id: &str,
        spoken: &SpokenAudio,
    ) -> Result<Option<String>, JobError> {
        let Some(store) = job_store.or(self.media.as_deref()) else {
            return Ok(None);
        };
        let name = format!("response.{}", spoken.format.extension());
        let key = media_key(&self.media_tenant, chrono::Utc::now(), job_id, &name);
        let stored = store
            .put(&key, spoken.bytes.clone(), spoken.format.content_type())
            .await
            .map_err(|e| JobError::new(e.to_string()))?;
        Ok(Some(stored.url))
    }

    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat_template
    }

    /// Assembles the turns within the model's context (less the reply's
    /// tokens) and renders them with the model's chat template.
    pub fn render_prompt(
        &self,
        chat: &ChatContext<'_>,
    ) -> Result<(String, PromptReport), JobError> {
        let counter = ModelTokens(self.model.as_ref());
        let parts = PromptParts {
            character: chat.character,
            persona: chat.persona,
            memory: chat.memory,
            history: chat.history,
            lorebooks: &[],
            default_system_prompt: None,
            new_chat: chat.new_chat,
            clock: chat.clock,
            seed: chat.seed,
            budget: self
                .model
                .context_length()
                .saturating_sub(self.sampling.max_new_tokens),
        };
        let (turns, report) =
            assemble(&parts, &counter).map_err(|e| JobError::new(e.to_string()))?;
        let prompt = self
            .chat_template
            .render(&turns)
            .map_err(|e| JobError::new(e.to_string()))?;
        Ok((prompt, report))
    }

    /// The sampling of a reply: whole sentences, the user's next line and
    /// special tokens as stops, the card's token budget over the worker's.
    pub fn reply_params(
        &self,
        seed: u64,
        card_budget: Option<usize>,
        user: &str,
    ) -> SamplingParams {
        let mut p = SamplingParams {
            seed,
            stop: reply_stops(user),
            whole_sentences: self.whole_sentences,
            distinct_options: true,
            reject_phrases: self.reject_phrases.clone(),
            resample_tries: self.resample_tries,
            ..self.sampling.clone()
        };
        if let Some(n) = card_budget {
            p.max_new_tokens = n;
        }
        p
    }

    /// One answer to `turns` (rendered with the model's chat template), its
    /// cost added to `usage`.
    pub fn complete(
        &self,
        turns: &[prompts::ChatTurn],
        params: &SamplingParams,
        cancelled: &dyn Fn() -> bool,
        usage: &mut Usage,
    ) -> Result<String, JobError> {
        let prompt = self
            .chat_template()
            .render(turns)
            .map_err(|e| JobError::new(e.to_string()))?;
        let g = self
            .model()
            .generate(&prompt, 1, params, cancelled)
            .map_err(|e| JobError::new(format!("text generation failed: {e}")))?;
        usage.add(&g);
        Ok(g.options
            .into_iter()
            .next()
            .map(|o| o.text)
            .unwrap_or_default())
    }

    /// Resolves message texts and renders the prompt the model will see.
    pub fn prepare(
        &self,
        job: &ChatRespondJob,
        seed: u64,
        clock: DateTime<FixedOffset>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<PreparedChat, JobError> {
        let card_path = job.character.card_path(&self.templates_dir);
        let raw = std::fs::read_to_string(&card_path).map_err(|e| {
            // The path is the worker's business: logged, not sent back.
            tracing::warn!(path = %card_path.display(), error = %e, "character template not readable");
            JobError::new(format!(
                "character template {} not found on this worker",
                job.character
            ))
        })?;
        let card = CharacterCard::from_json(&raw)
            .map_err(|e| JobError::new(format!("character template {}: {e}", job.character)))?;
        let mut character = card
            .render(&job.character_params)
            .map_err(|e| JobError::new(format!("character template {}: {e}", job.character)))?;
        // A job's own system instructions come after the character's.
        if let Some(extra) = job.generation.as_ref().and_then(|g| g.system.as_deref()) {
            character.system_prompt = if character.system_prompt.trim().is_empty() {
                extra.to_string()
            } else {
                format!("{}\n\n{extra}", character.system_prompt.trim_end())
            };
        }
        let (transcripts, usage) = self.transcribe_recordings(job, cancelled)?;
        let mut history = Vec::with_capacity(job.messages.len());
        let mut resolved_texts = Vec::new();
        for m in &job.messages {
            let text = message_text(m, &transcripts);
            if !m.is_processed {
                resolved_texts.push(text.clone());
            }
            history.push(HistoryMessage {
                role: match m.originator {
                    Originator::Bot => Role::Assistant,
                    Originator::User => Role::User,
                },
                text,
            });
        }
        let new_chat = !job.messages.iter().any(|m| m.is_processed);
        let (prompt, report) = self.render_prompt(&ChatContext {
            character: &character,
            persona: None,
            memory: None,
            history: &history,
            new_chat,
            seed,
            clock,
        })?;
        Ok(PreparedChat {
            prompt,
            max_new_tokens: character.max_new_tokens,
            resolved_texts,
            usage,
            report,
        })
    }

    /// The transcript of every recording an unprocessed audio message names:
    /// each key once however many messages name it, all of them together
    /// within `MAX_JOB_AUDIO_SECONDS` (checked after decoding, before any
    /// is transcribed), stopping between windows when the run is cancelled.
    fn transcribe_recordings(
        &self,
        job: &ChatRespondJob,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(HashMap<String, String>, Usage), JobError> {
        let mut keys: Vec<(&str, String)> = Vec::new();
        for m in &job.messages {
            if m.kind != MessageType::Audio || m.is_processed {
                continue;
            }
            let key = m.audio_file_id.as_deref().unwrap_or_default();
            let has_audio = job.audio_files.get(key).is_some_and(|b| !b.is_empty());
            if has_audio && !keys.iter().any(|(k, _)| *k == key) {
                let id = m.id.as_ref().map(|v| v.to_string()).unwrap_or_default();
                keys.push((key, id));
            }
        }
        let mut usage = Usage::default();
        if keys.is_empty() {
            return Ok((HashMap::new(), usage));
        }
        let Some(stt) = &self.stt else {
            return Err(JobError::new(format!(
                "message {}: speech-to-text is not configured on this worker (STT_BACKEND=none), so audio messages with audio cannot be transcribed",
                keys[0].1
            )));
        };
        let mut decoded = Vec::with_capacity(keys.len());
        let mut total = 0.0;
        for (key, id) in &keys {
            // Decoded from base64 once, when the job was parsed.
            let pcm = stt
                .decode(&job.audio_files[*key])
                .map_err(|e| JobError::new(format!("message {id}: audio_files.{key}: {e}")))?;
            total += pcm.seconds();
            if total > stt.max_job_seconds() {
                return Err(JobError::new(format!(
                    "audio_files: the job's recordings hold more than {} s of audio, the limit per job (MAX_JOB_AUDIO_SECONDS)",
                    stt.max_job_seconds()
                )));
            }
            decoded.push(pcm);
        }
        let mut transcripts = HashMap::new();
        for ((key, id), pcm) in keys.iter().zip(&decoded) {
            if cancelled() {
                return Err(JobError::new("cancelled while transcribing"));
            }
            let text = stt
                .transcribe(pcm, cancelled)
                .map_err(|e| JobError::new(format!("message {id}: audio_files.{key}: {e}")))?;
            usage.transcriptions += 1;
            usage.transcribed_ms += (pcm.seconds() * 1000.0) as u64;
            transcripts.insert(key.to_string(), text);
        }
        Ok((transcripts, usage))
    }

    /// Runs the whole job. `seed` makes it reproducible (the worker derives it
    /// from the job id, so a re-run after a crash gives the same answer).
    pub fn respond(
        &self,
        job: &ChatRespondJob,
        run: &ChatRun<'_>,
        cancelled: &dyn Fn() -> bool,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<(ChatRespondOutput, Usage), JobError> {
        let (job_id, seed, clock, job_store) = (run.job_id, run.seed, run.clock, run.job_store);
        if job.generate_audio && self.tts.is_none() {
            return Err(JobError::new(
                "generate_audio: text-to-speech is not configured on this worker (TTS_BACKEND=none)",
            ));
        }
        let prepared = self.prepare(job, seed, clock, cancelled)?;
        let user = job
            .character_params
            .get("user")
            .and_then(|u| u.as_str())
            .unwrap_or("User");
        let mut params = self.reply_params(seed, prepared.max_new_tokens, user);
        if let Some(g) = &job.generation {
            if let Some(t) = g.temperature {
                params.temperature = t;
            }
            if let Some(p) = g.top_p {
                params.top_p = p;
            }
            if let Some(n) = g.max_tokens {
                params.max_new_tokens = n as usize;
            }
            if let Some(s) = g.seed {
                params.seed = s;
            }
            params.stop.extend(g.stop.iter().cloned());
        }
        let generation = self
            .model
            .generate_streaming(
                &prepared.prompt,
                job.num_options as usize,
                &params,
                cancelled,
                on_text,
            )
            .map_err(|e| JobError::new(format!("text generation failed: {e}")))?;
        tracing::info!(
            prompt_tokens = generation.prompt_tokens,
            prefill_ms = (generation.prefill_secs * 1000.0) as u64,
            decode_ms = (generation.decode_secs * 1000.0) as u64,
            decode_steps = generation.decode_steps,
            options = generation.options.len(),
            "generated"
        );
        let mut usage = Usage {
            transcriptions: prepared.usage.transcriptions,
            transcribed_ms: prepared.usage.transcribed_ms,
            ..Usage::default()
        };
        usage.add(&generation);
        let finish_reasons: Vec<String> = generation
            .options
            .iter()
            .map(|o| finish_reason(o).to_string())
            .collect();
        usage.add_reply_rules(&generation);
        let options: Vec<String> = generation.options.iter().map(|o| o.text.clone()).collect();
        let chat_usage =
            job.generation
                .as_ref()
                .filter(|g| g.usage)
                .map(|_| pipeline::jobs::chat::ChatUsage {
                    prompt_tokens: generation.prompt_tokens as u64,
                    completion_tokens: generation.options.iter().map(|o| o.tokens as u64).sum(),
                    finish_reasons: finish_reasons.clone(),
                });
        let audio = match (&self.tts, job.generate_audio) {
            (Some(tts), true) => {
                let spoken = tts
                    .synthesize(
                        options.first().map(String::as_str).unwrap_or_default(),
                        job.voice_id.as_deref(),
                    )
                    .map_err(|e| JobError::new(format!("text-to-speech failed: {e}")))?;
                tracing::info!(
                    seconds = spoken.seconds,
                    bytes = spoken.bytes.len(),
                    format = spoken.format.extension(),
                    "reply spoken"
                );
                // A blocking-pool thread: wait for the upload here.
                let url = tokio::runtime::Handle::current()
                    .block_on(self.store_spoken_reply(job_store, job_id, &spoken))?;
                Some(ReplyAudio {
                    base64: base64::engine::general_purpose::STANDARD.encode(&spoken.bytes),
                    url,
                })
            }
            _ => None,
        };
        let mut output = ChatRespondOutput::build(job, &prepared.resolved_texts, options, audio);
        if let Some(reply) = output.messages.last_mut().and_then(|m| m.options.as_mut()) {
            for ((o, reason), g) in reply
                .iter_mut()
                .zip(&finish_reasons)
                .zip(&generation.options)
            {
                o.finish_reason = Some(reason.clone());
                if g.resampled {
                    o.resampled_seed = Some(g.seed);
                }
            }
        }
        output.usage = chat_usage;
        Ok((output, usage))
    }
}

/// Why an option ended, in the output's words: `stop` (end of turn or a
/// stop sequence), `length-trimmed` (the token limit, cut back to a whole
/// sentence), `length` (the limit, no sentence to cut back to),
/// `cancelled`.
pub fn finish_reason(o: &models::text::GeneratedOption) -> &'static str {
    use models::text::StopReason;
    match o.stop {
        StopReason::EndOfSequence | StopReason::StopSequence => "stop",
        StopReason::MaxTokens if o.trimmed => "length-trimmed",
        StopReason::MaxTokens => "length",
        StopReason::Cancelled => "cancelled",
        StopReason::Rejected => "stop",
    }
}

/// The stop sequences of a reply: the user's next line in the usual
/// spellings (never speak for the user), and special-token markup.
pub fn reply_stops(user: &str) -> Vec<String> {
    let mut stops: Vec<String> = vec!["\nUser:".into(), "\nuser:".into(), "\n{{user}}:".into()];
    let user = user.trim();
    if !user.is_empty() && user != "User" {
        stops.push(format!("\n{user}:"));
        stops.push(format!("\n**{user}:**"));
    }
    stops.extend(
        models::text::reply::SPECIAL_TOKEN_STOPS
            .iter()
            .map(|s| s.to_string()),
    );
    stops
}

/// What a chat run knows besides its job.
pub struct ChatRun<'a> {
    pub job_id: &'a str,
    /// Sampling seed (the job's own `generation.seed` wins).
    pub seed: u64,
    /// The job's clock (its submission time).
    pub clock: DateTime<FixedOffset>,
    /// The caller's own bucket (RunPod's `s3Config`), over the worker's.
    pub job_store: Option<&'a MediaStore>,
}

/// A stable 64-bit seed from a job id (FNV-1a).
pub fn seed_from_job_id(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
