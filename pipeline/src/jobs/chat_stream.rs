//! The streamed chat job (seed 000 "Stream chat response"): a user message to
//! an activity instance, answered token by token.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::platform::{Instance, Message, Persona};
use crate::InputError;

pub const MAX_MESSAGE_CHARS: usize = 20_000;

#[derive(Debug, Deserialize)]
struct StreamWire {
    instance_id: String,
    content: String,
    #[serde(default)]
    medium: Option<String>,
    #[serde(default)]
    skin_id: Option<String>,
    #[serde(default)]
    context: Option<StreamContext>,
    #[serde(default)]
    generate_audio: Option<bool>,
    #[serde(default)]
    voice_id: Option<String>,
}

/// Longest `voice_id` accepted.
pub const MAX_VOICE_ID_CHARS: usize = 128;

/// Context a job may carry inline instead of having the worker fetch it;
/// each part given wins over fetching that part.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct StreamContext {
    /// The instance snapshot (seed 000 field names).
    pub instance: Option<Instance>,
    pub persona: Option<Persona>,
    /// Earlier messages, oldest first (`role`, `medium`, `content`).
    pub messages: Option<Vec<Message>>,
    pub scratchpad: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatStreamJob {
    pub instance_id: String,
    pub content: String,
    /// `text` unless said otherwise.
    pub medium: String,
    /// Passed through to the saved messages (XP scoping).
    pub skin_id: Option<String>,
    pub context: StreamContext,
    /// Speak the reply as it streams: each sentence's audio follows its
    /// text on the stream, the whole reply's audio is in the output.
    pub generate_audio: bool,
    /// The voice; the instance's `assigned_voice_id` when absent.
    pub voice_id: Option<String>,
}

impl ChatStreamJob {
    pub fn parse(input: &Value) -> Result<Self, InputError> {
        let w: StreamWire = serde_path_to_error::deserialize(input).map_err(|e| {
            crate::field_error("input", &e.path().to_string(), e.into_inner().to_string())
        })?;
        // Ids go into platform URLs: a stated charset, nothing that could
        // name another path.
        if !crate::platform::is_valid_id(&w.instance_id) {
            return Err(InputError::new(
                "input.instance_id",
                crate::platform::ID_RULE,
            ));
        }
        if let Some(skin) = &w.skin_id {
            if !crate::platform::is_valid_id(skin) {
                return Err(InputError::new("input.skin_id", crate::platform::ID_RULE));
            }
        }
        if w.content.trim().is_empty() {
            return Err(InputError::new("input.content", "must not be empty"));
        }
        if w.content.chars().count() > MAX_MESSAGE_CHARS {
            return Err(InputError::new(
                "input.content",
                format!("must be at most {MAX_MESSAGE_CHARS} characters"),
            ));
        }
        if let Some(v) = &w.voice_id {
            if v.chars().count() > MAX_VOICE_ID_CHARS {
                return Err(InputError::new(
                    "input.voice_id",
                    format!("must be at most {MAX_VOICE_ID_CHARS} characters"),
                ));
            }
        }
        let medium = w.medium.unwrap_or_else(|| "text".into());
        if !matches!(medium.as_str(), "text" | "audio" | "image" | "video") {
            return Err(InputError::new(
                "input.medium",
                "must be text, audio, image or video",
            ));
        }
        Ok(Self {
            instance_id: w.instance_id,
            content: w.content,
            medium,
            skin_id: w.skin_id,
            context: w.context.unwrap_or_default(),
            generate_audio: w.generate_audio.unwrap_or(false),
            voice_id: w.voice_id.filter(|v| !v.trim().is_empty()),
        })
    }
}

/// The output of a streamed chat job: the assistant's whole reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatStreamOutput {
    pub content: String,
    /// The client went away before the end: generation stopped early.
    pub partial: bool,
    pub user_message: Value,
    pub assistant_message: Value,
    /// Words of the memory scratchpad the prompt included (condensed to the
    /// worker's MEMORY_MAX_WORDS when longer); absent without a scratchpad.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_words: Option<u32>,
    /// The spoken reply (`generate_audio`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<StreamedAudio>,
}

/// The whole spoken reply of a streamed chat: its chunks went out on the
/// stream as each was spoken; this is all of it as one file, at `url` when
/// the worker stores media, else inline in `base64`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamedAudio {
    pub format: String,
    pub seconds: f64,
    /// How many chunks were streamed.
    pub chunks: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
}

impl super::JobContract for ChatStreamJob {
    const KIND: super::JobKind = super::JobKind::ChatStream;
    type Output = ChatStreamOutput;

    fn parse(input: &Value) -> Result<Self, InputError> {
        ChatStreamJob::parse(input)
    }

    fn input_schema() -> Value {
        serde_json::json!({
            "type": "object",
            "required": ["instance_id", "content"],
            "properties": {
                "instance_id": {"type": "string", "pattern": crate::platform::ID_PATTERN},
                "content": {"type": "string", "maxLength": MAX_MESSAGE_CHARS},
                "medium": {"type": "string"},
                "skin_id": {"type": "string", "pattern": crate::platform::ID_PATTERN},
                "generate_audio": {"type": "boolean", "description": "speak the reply as it streams: `audio` events on the stream, the whole reply in output.audio"},
                "voice_id": {"type": "string", "maxLength": MAX_VOICE_ID_CHARS, "description": "the voice; the instance's assigned_voice_id when absent"},
                "context": {"type": "object", "description": "inline instance, persona, messages, scratchpad: each wins over fetching it"}
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_names_broken_fields() {
        let j = ChatStreamJob::parse(&json!({"instance_id": "i", "content": "hi", "skin_id": "s"}))
            .unwrap();
        assert_eq!(
            (j.medium.as_str(), j.skin_id.as_deref()),
            ("text", Some("s"))
        );
        let e = ChatStreamJob::parse(&json!({"instance_id": "i", "content": " "})).unwrap_err();
        assert_eq!(e.field, "input.content");
        let e = ChatStreamJob::parse(&json!({"instance_id": "i", "content": "x", "medium": "fax"}))
            .unwrap_err();
        assert_eq!(e.field, "input.medium");
        let e = ChatStreamJob::parse(&json!({"content": "x"})).unwrap_err();
        assert_eq!(e.field, "input.instance_id");
        assert!(!j.generate_audio && j.voice_id.is_none());
        let j = ChatStreamJob::parse(
            &json!({"instance_id": "i", "content": "hi", "generate_audio": true, "voice_id": "joe"}),
        )
        .unwrap();
        assert!(j.generate_audio);
        assert_eq!(j.voice_id.as_deref(), Some("joe"));
        let e = ChatStreamJob::parse(
            &json!({"instance_id": "i", "content": "hi", "generate_audio": "yes"}),
        )
        .unwrap_err();
        assert_eq!(e.field, "input.generate_audio");
        let e = ChatStreamJob::parse(
            &json!({"instance_id": "i", "content": "hi", "voice_id": "v".repeat(129)}),
        )
        .unwrap_err();
        assert_eq!(e.field, "input.voice_id");
    }

    #[test]
    fn ids_that_could_name_another_platform_path_are_refused() {
        for bad in [
            "..",
            "../admin",
            "a/b",
            "a?x=1",
            "..%2F..%2Fv1",
            "a b",
            "",
            "é",
        ] {
            let e = ChatStreamJob::parse(&json!({"instance_id": bad, "content": "x"})).unwrap_err();
            assert_eq!(e.field, "input.instance_id", "{bad:?}");
            assert!(e.rule.contains("A-Z"), "{e:?}");
        }
        let long = "a".repeat(129);
        assert!(ChatStreamJob::parse(&json!({"instance_id": long, "content": "x"})).is_err());
        let e =
            ChatStreamJob::parse(&json!({"instance_id": "i", "content": "x", "skin_id": "../s"}))
                .unwrap_err();
        assert_eq!(e.field, "input.skin_id");
        assert!(ChatStreamJob::parse(&json!({"instance_id": "inst_9-A", "content": "x"})).is_ok());
    }
}
