//! The streamed chat job: context fetched from the platform by instance id,
//! the reply generated token by token into the job's token stream, and both
//! messages saved to the platform once (idempotency keys `{job}:user` and
//! `{job}:assistant`), whether or not the client stayed.
//!
//! A client that disconnects makes the shim request a stop: generation ends
//! within one token step and the reply generated so far is saved with
//! `"partial": true` in the "Create message" body (the platform may store or
//! ignore the flag; the content is what was streamed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, FixedOffset};
use models::text::StopReason;

use pipeline::jobs::chat_stream::{ChatStreamJob, ChatStreamOutput, StreamedAudio};
use pipeline::jobs::memory::MemoryCondenseJob;
use pipeline::platform::{NewMessage, PlatformClient};
use pipeline::queue::LeaseGuard;
use prompts::macros::Gender;
use prompts::{HistoryMessage, Persona, RenderedCharacter, Role};
use tokio::sync::mpsc::UnboundedSender;

use crate::chat::{ChatContext, ChatEngine, JobError, Usage};
use crate::handlers::StreamItem;
use crate::speech::{speak_streamed, SpokenAudio};

pub struct StreamRun {
    pub engine: Arc<ChatEngine>,
    /// The platform, as the job's tenant.
    pub platform: PlatformClient,
    pub history_messages: usize,
    pub memory_max_words: u32,
    pub job_id: String,
    pub job: ChatStreamJob,
    pub seed: u64,
    pub clock: DateTime<FixedOffset>,
    pub cancel: Arc<AtomicBool>,
    /// The job's token stream: text deltas, and spoken chunks when the job
    /// asks for audio.
    pub deltas: UnboundedSender<StreamItem>,
    /// The caller's own bucket (s3Config) for the spoken reply.
    pub media: Option<Arc<pipeline::media_store::MediaStore>>,
    /// The run's lease: the platform sees a save only from the run that
    /// holds the job (None in the embedded mode, which has no queue).
    pub fence: Option<LeaseGuard>,
}

fn persona_of(p: &pipeline::platform::Persona) -> Persona {
    Persona {
        name: p.name.clone().unwrap_or_default(),
        gender: Gender::parse(p.gender.as_deref().unwrap_or_default()),
        description: p.description.clone().unwrap_or_default(),
    }
}

impl StreamRun {
    /// Fails the run when another run holds the job now (or it was
    /// cancelled): nothing more reaches the platform.
    async fn check_lease(&self) -> Result<(), JobError> {
        let Some(fence) = &self.fence else {
            return Ok(());
        };
        match fence.holds().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(JobError::new(
                "this run no longer holds the job (taken over or cancelled): nothing saved",
            )),
            Err(e) => Err(JobError::new(format!("checking the job's lease: {e}"))),
        }
    }

    pub async fn run(self) -> Result<(ChatStreamOutput, Usage), JobError> {
        let job = &self.job;
        let platform = &self.platform;
        let pe = |e: pipeline::platform::PlatformError| JobError::new(e.to_string());
        let tts = match (job.generate_audio, self.engine.tts()) {
            (false, _) => None,
            (true, Some(tts)) => Some(tts.clone()),
            (true, None) => {
                return Err(JobError::new(
                    "generate_audio: text-to-speech is not configured on this worker (TTS_BACKEND=none)",
                ))
            }
        };
        // Context the job carries inline wins over fetching it.
        let ctx = &job.context;
        let instance = match &ctx.instance {
            Some(i) => i.clone(),
            None => platform
                .instance(&job.instance_id, None)
                .await
                .map_err(pe)?,
        };
        let voice = job
            .voice_id
            .clone()
            .or_else(|| instance.assigned_voice_id.clone().filter(|v| !v.is_empty()));
        let instance = serde_json::to_value(&instance).expect("instance serializes");
        let character = RenderedCharacter::from_activity(&instance)
            .map_err(|e| JobError::new(e.to_string()))?;
        let persona = match &ctx.persona {
            Some(p) => Some(persona_of(p)),
            None => platform
                .default_persona()
                .await
                .map_err(pe)?
                .map(|p| persona_of(&p)),
        };
        let earlier = match &ctx.messages {
            Some(m) => m.clone(),
            None => platform
                .recent_messages(&job.instance_id, self.history_messages)
                .await
                .map_err(pe)?,
        };
        let mut history: Vec<HistoryMessage> = earlier
            .iter()
            .filter_map(|m| {
                let role = match m.role.as_str() {
                    "user" => Role::User,
                    "assistant" | "bot" | "character" => Role::Assistant,
                    _ => return None,
                };
                Some(HistoryMessage {
                    role,
                    text: m.content.clone().unwrap_or_default(),
                })
            })
            .collect();
        let new_chat = history.is_empty();
        history.push(HistoryMessage {
            role: Role::User,
            text: job.content.clone(),
        });
        // The scratchpad, condensed when longer than the prompt may spend.
        let mut usage = Usage::default();
        let scratchpad = match &ctx.scratchpad {
            Some(s) => Some(s.clone()).filter(|s| !s.trim().is_empty()),
            None => platform.scratchpad(&job.instance_id).await.map_err(pe)?,
        };
        let memory = match scratchpad {
            None => None,
            Some(pad) => {
                let engine = self.engine.clone();
                let condense = MemoryCondenseJob {
                    content: pad,
                    max_words: self.memory_max_words,
                    hint: None,
                    version: None,
                };
                let seed = self.seed;
                let (out, u) = tokio::task::spawn_blocking(move || {
                    crate::memory::condense(&engine, &condense, seed, &|| false)
                })
                .await
                .map_err(|e| JobError::new(format!("condense task: {e}")))??;
                usage = u;
                Some(out)
            }
        };
        let (prompt, _) = self.engine.render_prompt(&ChatContext {
            character: &character,
            persona: persona.as_ref(),
            memory: memory.as_ref().map(|m| m.content.as_str()),
            history: &history,
            new_chat,
            seed: self.seed,
            clock: self.clock,
        })?;

        let budget = character.max_new_tokens;
        let user = persona
            .as_ref()
            .map(|p| p.name.clone())
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| "User".into());
        let (engine, cancel, deltas, seed) = (
            self.engine.clone(),
            self.cancel.clone(),
            self.deltas.clone(),
            self.seed,
        );
        // The reply spoken while it streams: each sentence's text goes to
        // the speaker as it is handed out, its audio follows on the stream.
        let speaker = tts.map(|tts| {
            let (text_tx, text_rx) = std::sync::mpsc::channel::<String>();
            let (cancel, deltas) = (self.cancel.clone(), self.deltas.clone());
            let settled = self.engine.whole_sentences();
            let task = tokio::task::spawn_blocking(move || {
                let send = |chunk| {
                    let _ = deltas.send(StreamItem::Audio(chunk));
                };
                // A client that left hears nothing more.
                let stop = || cancel.load(Ordering::Relaxed);
                let spoken = speak_streamed(
                    tts.as_ref(),
                    voice.as_deref(),
                    settled,
                    text_rx,
                    &stop,
                    &send,
                )?;
                let format = tts.format();
                Ok::<_, String>(spoken.map(|(pcm, chunks)| (pcm, format, chunks)))
            });
            (text_tx, task)
        });
        let (text_tx, speaking) = match speaker {
            Some((tx, task)) => (Some(tx), Some(task)),
            None => (None, None),
        };
        let generation = tokio::task::spawn_blocking(move || {
            let params = engine.reply_params(seed, budget, &user);
            engine.model().generate_streaming(
                &prompt,
                1,
                &params,
                &|| cancel.load(Ordering::Relaxed),
                &mut |i, d| {
                    // The text first: a sentence's audio never comes
                    // before it on the stream.
                    let _ = deltas.send(StreamItem::Text(i, d.to_string()));
                    if let Some(tx) = &text_tx {
                        let _ = tx.send(d.to_string());
                    }
                },
            )
        })
        .await
        .map_err(|e| JobError::new(format!("generation task: {e}")))?
        .map_err(|e| JobError::new(format!("text generation failed: {e}")))?;
        usage.add(&generation);
        usage.add_reply_rules(&generation);
        let option =
            generation
                .options
                .into_iter()
                .next()
                .unwrap_or(models::text::GeneratedOption {
                    text: String::new(),
                    tokens: 0,
                    stop: StopReason::Cancelled,
                    trimmed: false,
                    seed: 0,
                    resampled: false,
                });
        let partial = option.stop == StopReason::Cancelled;
        // The whole spoken reply, once its last chunk is out.
        let audio = match speaking {
            None => None,
            Some(task) => {
                let spoken = task
                    .await
                    .map_err(|e| JobError::new(format!("speech task: {e}")))?
                    .map_err(|e| JobError::new(format!("text-to-speech failed: {e}")))?;
                match spoken {
                    None => None,
                    Some((pcm, format, chunks)) => {
                        let spoken =
                            tokio::task::spawn_blocking(move || SpokenAudio::encode(&pcm, format))
                                .await
                                .map_err(|e| JobError::new(format!("audio encoding task: {e}")))?
                                .map_err(|e| {
                                    JobError::new(format!("encoding the reply's audio: {e}"))
                                })?;
                        self.check_lease().await?;
                        let url = self
                            .engine
                            .store_spoken_reply(self.media.as_deref(), &self.job_id, &spoken)
                            .await?;
                        tracing::info!(
                            seconds = spoken.seconds,
                            chunks,
                            bytes = spoken.bytes.len(),
                            "streamed reply spoken"
                        );
                        Some(StreamedAudio {
                            format: format.extension().to_string(),
                            seconds: spoken.seconds,
                            chunks,
                            base64: url.is_none().then(|| {
                                use base64::Engine as _;
                                base64::engine::general_purpose::STANDARD.encode(&spoken.bytes)
                            }),
                            url,
                        })
                    }
                }
            }
        };
        let skin = job.skin_id.as_deref();
        self.check_lease().await?;
        let user_message = platform
            .create_message(
                &job.instance_id,
                &NewMessage {
                    role: "user",
                    medium: &job.medium,
                    content: &job.content,
                    skin_id: skin,
                    partial: false,
                },
                &format!("{}:user", self.job_id),
            )
            .await
            .map_err(pe)?;
        self.check_lease().await?;
        let assistant_message = platform
            .create_message(
                &job.instance_id,
                &NewMessage {
                    role: "assistant",
                    medium: if audio.is_some() { "audio" } else { "text" },
                    content: &option.text,
                    skin_id: skin,
                    partial,
                },
                &format!("{}:assistant", self.job_id),
            )
            .await
            .map_err(pe)?;
        Ok((
            ChatStreamOutput {
                content: option.text,
                partial,
                user_message,
                assistant_message,
                memory_words: memory.map(|m| m.word_count),
                audio,
            },
            usage,
        ))
    }
}
