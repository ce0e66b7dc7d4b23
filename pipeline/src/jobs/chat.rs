//! The chat job of seed 003: its request (`input`) and response (`output`).
//!
//! Parse, don't validate: [`ChatRespondJob::parse`] is the only way to get a
//! job, and once one exists its rules hold (`num_options` in 1..=8, no audio
//! generation with several options, every audio message names an audio file,
//! a well-formed character reference). Unknown fields are ignored.

use std::collections::BTreeMap;

use base64::Engine;
use prompts::TemplateRef;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::InputError;

pub const MAX_OPTIONS: u8 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Text,
    Audio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Originator {
    Bot,
    User,
}

/// A message as the request carries it.
#[derive(Debug, Clone, Deserialize)]
struct MessageWire {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default, rename = "type")]
    kind: Option<MessageType>,
    #[serde(default)]
    originator: Option<Originator>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    audio_file_id: Option<String>,
    #[serde(default)]
    is_processed: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
struct ChatInputWire {
    messages: Vec<MessageWire>,
    #[serde(default)]
    audio_files: Option<BTreeMap<String, String>>,
    character: String,
    #[serde(default)]
    character_params: Option<Map<String, Value>>,
    #[serde(default)]
    generate_audio: Option<bool>,
    #[serde(default)]
    num_options: Option<i64>,
    /// The instance's `assigned_voice_id` (platform API), for spoken replies.
    #[serde(default)]
    voice_id: Option<String>,
    #[serde(default)]
    generation: Option<GenerationWire>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerationWire {
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(default)]
    usage: Option<bool>,
}

pub const MAX_GENERATED_TOKENS: u32 = 2048;
pub const MAX_STOP_SEQUENCES: usize = 4;
pub const MAX_SYSTEM_CHARS: usize = 32_000;

/// Per-job generation settings (the OpenAI-compatible route's): extra
/// system instructions after the character's, sampling overrides, stop
/// sequences, and whether the output reports token usage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationParams {
    pub system: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub usage: bool,
}

fn generation_params(w: GenerationWire) -> Result<GenerationParams, InputError> {
    let f = |n: &str| format!("input.generation.{n}");
    if let Some(s) = &w.system {
        if s.chars().count() > MAX_SYSTEM_CHARS {
            return Err(err(
                f("system"),
                format!("must be at most {MAX_SYSTEM_CHARS} characters"),
            ));
        }
    }
    let max_tokens = match w.max_tokens {
        None => None,
        Some(n) if (1..=MAX_GENERATED_TOKENS as i64).contains(&n) => Some(n as u32),
        Some(_) => {
            return Err(err(
                f("max_tokens"),
                format!("must be between 1 and {MAX_GENERATED_TOKENS}"),
            ))
        }
    };
    if let Some(t) = w.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(err(f("temperature"), "must be between 0 and 2"));
        }
    }
    if let Some(p) = w.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(err(f("top_p"), "must be greater than 0 and at most 1"));
        }
    }
    let stop = w.stop.unwrap_or_default();
    if stop.len() > MAX_STOP_SEQUENCES
        || stop.iter().any(|s| s.is_empty() || s.chars().count() > 64)
    {
        return Err(err(
            f("stop"),
            format!(
                "must be at most {MAX_STOP_SEQUENCES} non-empty strings of at most 64 characters"
            ),
        ));
    }
    Ok(GenerationParams {
        system: w.system.filter(|s| !s.trim().is_empty()),
        max_tokens,
        temperature: w.temperature,
        top_p: w.top_p,
        seed: w.seed,
        stop,
        usage: w.usage.unwrap_or(false),
    })
}

/// A message of the conversation, in request order.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// Present on every unprocessed message (it is echoed back).
    pub id: Option<Value>,
    pub kind: MessageType,
    pub originator: Originator,
    /// The text, or the transcript of an audio message once known.
    pub text: Option<String>,
    pub audio_file_id: Option<String>,
    pub is_processed: bool,
}

/// A valid chat job.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRespondJob {
    pub messages: Vec<ChatMessage>,
    /// The recordings, decoded from base64 once, here (empty for an empty
    /// string, as the seed's first example sends).
    pub audio_files: BTreeMap<String, std::sync::Arc<Vec<u8>>>,
    pub character: TemplateRef,
    pub character_params: Map<String, Value>,
    pub generate_audio: bool,
    pub num_options: u8,
    /// Voice for the spoken reply; the worker's default when absent.
    pub voice_id: Option<String>,
    /// Per-job generation settings (absent in seed 003's jobs).
    pub generation: Option<GenerationParams>,
}

static MAX_AUDIO_BYTES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_AUDIO_BYTES);

/// The default largest recording a chat job may carry (decoded bytes).
pub const DEFAULT_MAX_AUDIO_BYTES: usize = 8 * 1024 * 1024;

/// Sets the largest recording [`ChatRespondJob::parse`] accepts (the shim's
/// and the worker's `MAX_AUDIO_BYTES`).
pub fn set_max_audio_bytes(n: usize) {
    MAX_AUDIO_BYTES.store(n, std::sync::atomic::Ordering::Relaxed);
}

pub fn max_audio_bytes() -> usize {
    MAX_AUDIO_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `b` starts like a container or stream the worker decodes: RIFF
/// WAVE, MP3 (ID3 tag or frame sync), raw ADTS AAC, Ogg, Matroska/WebM
/// (EBML), MP4/M4A (`ftyp`), FLAC.
pub fn looks_like_audio(b: &[u8]) -> bool {
    (b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WAVE")
        || b.starts_with(b"ID3")
        || (b.len() >= 2 && b[0] == 0xFF && (b[1] & 0xE0) == 0xE0)
        || b.starts_with(b"OggS")
        || b.starts_with(&[0x1A, 0x45, 0xDF, 0xA3])
        || (b.len() >= 8 && &b[4..8] == b"ftyp")
        || b.starts_with(b"fLaC")
}

fn err(field: impl Into<String>, rule: impl Into<String>) -> InputError {
    InputError::new(field, rule)
}

impl ChatRespondJob {
    /// Parses the `input` object of a chat job. Field names in errors are
    /// given from the request body's root (`input.messages[3].text`).
    pub fn parse(input: &Value) -> Result<Self, InputError> {
        let wire: ChatInputWire = serde_path_to_error::deserialize(input).map_err(|e| {
            let path = e.path().to_string();
            crate::field_error("input", &path, e.into_inner().to_string())
        })?;
        let num_options = match wire.num_options {
            None => 1,
            Some(n) if (1..=MAX_OPTIONS as i64).contains(&n) => n as u8,
            Some(_) => {
                return Err(err(
                    "input.num_options",
                    format!("must be between 1 and {MAX_OPTIONS}"),
                ))
            }
        };
        let generate_audio = wire.generate_audio.unwrap_or(false);
        if generate_audio && num_options > 1 {
            return Err(err(
                "input.generate_audio",
                "must be false when num_options is greater than 1 (audio is generated for a single response only)",
            ));
        }
        let character = TemplateRef::parse(&wire.character).map_err(|_| {
            err(
                "input.character",
                "must be a template reference like github:OWNER/NAME",
            )
        })?;
        let encoded = wire.audio_files.unwrap_or_default();
        let max_audio = max_audio_bytes();
        let mut audio_files = BTreeMap::new();
        for (key, data) in &encoded {
            if data.is_empty() {
                audio_files.insert(key.clone(), std::sync::Arc::new(Vec::new()));
                continue;
            }
            let field = format!("input.audio_files.{key}");
            // base64 is 4 characters for 3 bytes: refuse before decoding.
            if data.len() / 4 * 3 > max_audio + 2 {
                return Err(err(
                    field,
                    format!("must be at most {max_audio} bytes of audio once decoded"),
                ));
            }
            let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data.as_bytes())
            else {
                return Err(err(field, "must be base64-encoded audio"));
            };
            if bytes.len() > max_audio {
                return Err(err(
                    field,
                    format!("must be at most {max_audio} bytes of audio once decoded"),
                ));
            }
            if !looks_like_audio(&bytes) {
                return Err(err(
                    field,
                    "must be a wav, mp3, ogg (vorbis or opus), webm, m4a/aac or flac recording",
                ));
            }
            audio_files.insert(key.clone(), std::sync::Arc::new(bytes));
        }
        if wire.messages.is_empty() {
            return Err(err("input.messages", "must hold at least one message"));
        }
        let messages = wire
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| validate_message(i, m, &audio_files))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            messages,
            audio_files,
            character,
            character_params: wire.character_params.unwrap_or_default(),
            generate_audio,
            num_options,
            voice_id: wire.voice_id.filter(|v| !v.is_empty()),
            generation: wire.generation.map(generation_params).transpose()?,
        })
    }

    /// The unprocessed messages, which the response echoes.
    pub fn new_messages(&self) -> impl Iterator<Item = &ChatMessage> {
        self.messages.iter().filter(|m| !m.is_processed)
    }
}

fn validate_message(
    i: usize,
    m: MessageWire,
    audio_files: &BTreeMap<String, std::sync::Arc<Vec<u8>>>,
) -> Result<ChatMessage, InputError> {
    let at = |f: &str| format!("input.messages[{i}].{f}");
    let is_processed = m.is_processed.ok_or_else(|| {
        err(
            at("is_processed"),
            "is required (true for history, false for a message to answer)",
        )
    })?;
    let kind = m.kind.unwrap_or(MessageType::Text);
    let originator = match (m.originator, is_processed) {
        (Some(o), _) => o,
        (None, false) => Originator::User,
        (None, true) => {
            return Err(err(
                at("originator"),
                "is required on processed messages (bot or user)",
            ))
        }
    };
    if !is_processed {
        match &m.id {
            Some(Value::Number(_)) | Some(Value::String(_)) => {}
            Some(_) => return Err(err(at("id"), "must be a number or a string")),
            None => {
                return Err(err(
                    at("id"),
                    "is required on unprocessed messages (it is echoed in the response)",
                ))
            }
        }
        if m.kind.is_none() {
            return Err(err(
                at("type"),
                "is required on unprocessed messages (text or audio)",
            ));
        }
    }
    match kind {
        MessageType::Text => {
            if !is_processed && m.text.is_none() {
                return Err(err(
                    at("text"),
                    "is required on an unprocessed text message",
                ));
            }
        }
        MessageType::Audio => {
            let key = m
                .audio_file_id
                .as_deref()
                .ok_or_else(|| err(at("audio_file_id"), "is required on an audio message"))?;
            if !is_processed && !audio_files.contains_key(key) {
                return Err(err(
                    at("audio_file_id"),
                    format!("must name a key of input.audio_files; {key:?} is not one"),
                ));
            }
        }
    }
    Ok(ChatMessage {
        id: m.id,
        kind,
        originator,
        text: m.text,
        audio_file_id: m.audio_file_id,
        is_processed,
    })
}

/// One variant of the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseOption {
    #[serde(rename = "type")]
    pub kind: MessageType,
    pub text: String,
    /// Why the option ended: `stop`, `length-trimmed`, `length`,
    /// `cancelled` (an extra key beside seed 003's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The seed of an option sampled again (it nearly repeated another or
    /// broke character).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resampled_seed: Option<u64>,
}

/// A message of the response: an echoed input message, or the new bot
/// message (no `id`, with `options`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    #[serde(rename = "type")]
    pub kind: MessageType,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_file_id: Option<String>,
    /// The spoken reply's URL, when the worker stores media (S3 / CDN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<ResponseOption>>,
}

/// The spoken reply: base64 audio, and its URL when it was also stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyAudio {
    pub base64: String,
    pub url: Option<String>,
}

/// The `output` of a chat job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRespondOutput {
    pub messages: Vec<OutputMessage>,
    pub audio_files: BTreeMap<String, String>,
    /// Token counts, when the job's `generation.usage` asks for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ChatUsage>,
}

/// What a reply cost, and why each option ended (`stop`: end of turn or a
/// stop sequence; `length`: `max_tokens`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub finish_reasons: Vec<String>,
}

/// The key of the generated reply in `audio_files`.
pub const RESPONSE_AUDIO_KEY: &str = "response";

impl ChatRespondOutput {
    /// Echoes the job's unprocessed messages (with their texts as resolved,
    /// transcripts included) and appends the reply built from `options`; its
    /// `text` is the first option. `audio` is the spoken first option.
    pub fn build(
        job: &ChatRespondJob,
        resolved_texts: &[String],
        options: Vec<String>,
        audio: Option<ReplyAudio>,
    ) -> Self {
        let mut messages: Vec<OutputMessage> = job
            .new_messages()
            .zip(resolved_texts)
            .map(|(m, text)| OutputMessage {
                id: m.id.clone(),
                kind: m.kind,
                text: text.clone(),
                audio_file_id: m.audio_file_id.clone(),
                audio_url: None,
                options: None,
            })
            .collect();
        let kind = if audio.is_some() {
            MessageType::Audio
        } else {
            MessageType::Text
        };
        messages.push(OutputMessage {
            id: None,
            kind,
            text: options.first().cloned().unwrap_or_default(),
            audio_file_id: audio.as_ref().map(|_| RESPONSE_AUDIO_KEY.to_string()),
            audio_url: audio.as_ref().and_then(|a| a.url.clone()),
            options: Some(
                options
                    .into_iter()
                    .map(|text| ResponseOption {
                        kind,
                        text,
                        finish_reason: None,
                        resampled_seed: None,
                    })
                    .collect(),
            ),
        });
        let mut audio_files = BTreeMap::new();
        if let Some(a) = audio {
            audio_files.insert(RESPONSE_AUDIO_KEY.to_string(), a.base64);
        }
        Self {
            messages,
            audio_files,
            usage: None,
        }
    }
}

impl super::JobContract for ChatRespondJob {
    const KIND: super::JobKind = super::JobKind::Chat;
    type Output = ChatRespondOutput;

    fn parse(input: &Value) -> Result<Self, InputError> {
        ChatRespondJob::parse(input)
    }

    fn input_schema() -> Value {
        serde_json::json!({"type": "object", "required": ["messages", "character"], "properties": {
            "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["is_processed"], "properties": {
                "id": {"type": ["integer", "string"]},
                "type": {"type": "string", "enum": ["text", "audio"]},
                "originator": {"type": "string", "enum": ["bot", "user"]},
                "text": {"type": ["string", "null"]},
                "audio_file_id": {"type": "string"},
                "is_processed": {"type": "boolean"}}}},
            "audio_files": {"type": "object", "additionalProperties": {"type": "string", "contentEncoding": "base64"}},
            "character": {"type": "string", "pattern": "^github:[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$"},
            "character_params": {"type": "object"},
            "generate_audio": {"type": "boolean", "description": "must be false when num_options > 1"},
            "num_options": {"type": "integer", "minimum": 1, "maximum": MAX_OPTIONS, "default": 1},
            "voice_id": {"type": "string", "description": "the instance's assigned_voice_id"},
            "generation": {"type": "object", "additionalProperties": false, "description": "per-job generation settings (the OpenAI-compatible route's)", "properties": {
                "system": {"type": "string", "maxLength": MAX_SYSTEM_CHARS, "description": "instructions after the character's system prompt"},
                "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_GENERATED_TOKENS},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "seed": {"type": "integer", "minimum": 0},
                "stop": {"type": "array", "maxItems": MAX_STOP_SEQUENCES, "items": {"type": "string", "minLength": 1, "maxLength": 64}},
                "usage": {"type": "boolean", "description": "report token usage in the output"}}}}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed_multi() -> Value {
        json!({
            "messages": [
                {"originator": "user", "text": "What should we do tonight?", "is_processed": true},
                {"id": 1, "type": "text", "text": "I'm feeling adventurous!", "is_processed": false}
            ],
            "character": "github:partner/character",
            "num_options": 3,
            "generate_audio": false,
            "some_future_field": {"ignored": true}
        })
    }

    #[test]
    fn parses_the_multiple_options_seed() {
        let job = ChatRespondJob::parse(&seed_multi()).unwrap();
        assert_eq!(job.num_options, 3);
        assert!(!job.generate_audio);
        assert_eq!(job.messages.len(), 2);
        assert_eq!(job.messages[0].originator, Originator::User);
        assert_eq!(job.new_messages().count(), 1);
        assert_eq!(job.character.to_string(), "github:partner/character");
    }

    #[test]
    fn unprocessed_message_without_originator_is_the_users() {
        let mut v = seed_multi();
        v["messages"][1]
            .as_object_mut()
            .unwrap()
            .remove("originator");
        let job = ChatRespondJob::parse(&v).unwrap();
        assert_eq!(job.messages[1].originator, Originator::User);
    }

    fn rule_of(v: Value) -> (String, String) {
        let e = ChatRespondJob::parse(&v).unwrap_err();
        (e.field, e.rule)
    }

    #[test]
    fn refuses_broken_rules_naming_the_field() {
        let mut v = seed_multi();
        v["num_options"] = json!(9);
        assert_eq!(rule_of(v.clone()).0, "input.num_options");
        v["num_options"] = json!(0);
        assert_eq!(rule_of(v.clone()).0, "input.num_options");
        v["num_options"] = json!(2);
        v["generate_audio"] = json!(true);
        assert_eq!(rule_of(v.clone()).0, "input.generate_audio");
        let mut v = seed_multi();
        v["character"] = json!("partner/character");
        assert_eq!(rule_of(v).0, "input.character");
        let mut v = seed_multi();
        v["messages"][1] =
            json!({"id": 2, "type": "audio", "audio_file_id": "nope", "is_processed": false});
        assert_eq!(rule_of(v).0, "input.messages[1].audio_file_id");
        let mut v = seed_multi();
        v["messages"][1]["type"] = json!("video");
        let (field, rule) = rule_of(v);
        assert_eq!(field, "input.messages[1].type");
        assert!(rule.contains("unknown variant"), "{rule}");
        let mut v = seed_multi();
        v["num_options"] = json!("three");
        assert_eq!(rule_of(v).0, "input.num_options");
        let mut v = seed_multi();
        v.as_object_mut().unwrap().remove("character");
        assert_eq!(rule_of(v), ("input.character".into(), "is required".into()));
    }

    #[test]
    fn output_echoes_new_messages_then_the_reply_with_options() {
        let job = ChatRespondJob::parse(&seed_multi()).unwrap();
        let out = ChatRespondOutput::build(
            &job,
            &["I'm feeling adventurous!".into()],
            vec!["a".into(), "b".into(), "c".into()],
            None,
        );
        assert_eq!(
            serde_json::to_value(&out).unwrap(),
            json!({
                "messages": [
                    {"id": 1, "type": "text", "text": "I'm feeling adventurous!"},
                    {"type": "text", "text": "a", "options": [
                        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}, {"type": "text", "text": "c"}]}
                ],
                "audio_files": {}
            })
        );
    }

    #[test]
    fn recordings_must_be_audio_and_within_the_size_limit() {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let job = |data: String| {
            json!({
                "messages": [{"id": 1, "type": "audio", "originator": "user", "audio_file_id": "a", "is_processed": false}],
                "audio_files": {"a": data},
                "character": "github:org/luna"
            })
        };
        let mut wav = b"RIFF\0\0\0\0WAVEfmt ".to_vec();
        wav.resize(64, 0);
        assert!(ChatRespondJob::parse(&job(b64(&wav))).is_ok());
        assert!(ChatRespondJob::parse(&job(b64(b"OggS\0\x02rest"))).is_ok());
        let e = ChatRespondJob::parse(&job(b64(b"hello, not audio"))).unwrap_err();
        assert_eq!(e.field, "input.audio_files.a");
        assert!(e.rule.contains("wav, mp3"), "{}", e.rule);
        let mut big = b"fLaC".to_vec();
        big.resize(DEFAULT_MAX_AUDIO_BYTES + 1, 0);
        let e = ChatRespondJob::parse(&job(b64(&big))).unwrap_err();
        assert!(e.rule.contains("at most"), "{}", e.rule);
    }
}
