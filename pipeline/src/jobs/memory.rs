//! The memory condense job (seed 000 "Get memory scratchpad" with
//! `max_words`): `{content, max_words, hint?, version?}` in,
//! `{content, word_count, version?}` out, `word_count <= max_words` always.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::InputError;

pub const MAX_SCRATCHPAD_CHARS: usize = 200_000;
pub const MAX_WORDS_LIMIT: u32 = 10_000;

#[derive(Debug, Deserialize)]
struct CondenseWire {
    content: String,
    max_words: i64,
    #[serde(default)]
    hint: Option<String>,
    #[serde(default)]
    version: Option<Value>,
}

/// A valid condense job.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryCondenseJob {
    pub content: String,
    pub max_words: u32,
    pub hint: Option<String>,
    /// The scratchpad version the caller read, echoed back.
    pub version: Option<Value>,
}

impl MemoryCondenseJob {
    pub fn parse(input: &Value) -> Result<Self, InputError> {
        let w: CondenseWire = serde_path_to_error::deserialize(input).map_err(|e| {
            crate::field_error("input", &e.path().to_string(), e.into_inner().to_string())
        })?;
        if !(1..=MAX_WORDS_LIMIT as i64).contains(&w.max_words) {
            return Err(InputError::new(
                "input.max_words",
                format!("must be between 1 and {MAX_WORDS_LIMIT}"),
            ));
        }
        if w.content.len() > MAX_SCRATCHPAD_CHARS {
            return Err(InputError::new(
                "input.content",
                format!("must be at most {MAX_SCRATCHPAD_CHARS} bytes"),
            ));
        }
        if let Some(v) = &w.version {
            // Scratchpad versions are integers (seed 000) or opaque strings.
            if !(v.is_i64() || v.is_u64() || v.is_string() || v.is_null()) {
                return Err(InputError::new(
                    "input.version",
                    "must be an integer or a string",
                ));
            }
        }
        Ok(Self {
            content: w.content,
            max_words: w.max_words as u32,
            hint: w.hint.filter(|h| !h.trim().is_empty()),
            version: w.version.filter(|v| !v.is_null()),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryCondenseOutput {
    pub content: String,
    pub word_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Value>,
}

impl super::JobContract for MemoryCondenseJob {
    const KIND: super::JobKind = super::JobKind::Memory;
    type Output = MemoryCondenseOutput;

    fn parse(input: &Value) -> Result<Self, InputError> {
        MemoryCondenseJob::parse(input)
    }

    fn input_schema() -> Value {
        serde_json::json!({"type": "object", "required": ["content", "max_words"], "properties": {
            "content": {"type": "string", "maxLength": MAX_SCRATCHPAD_CHARS},
            "max_words": {"type": "integer", "minimum": 1, "maximum": MAX_WORDS_LIMIT},
            "hint": {"type": "string", "description": "what to keep first"},
            "version": {"type": ["integer", "string"], "description": "echoed back"}}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_checks_the_rules() {
        let j = MemoryCondenseJob::parse(
            &json!({"content": "a b", "max_words": 80, "hint": " ", "version": 3}),
        )
        .unwrap();
        assert_eq!((j.max_words, j.hint, j.version), (80, None, Some(json!(3))));
        let e = MemoryCondenseJob::parse(&json!({"content": "a", "max_words": 0})).unwrap_err();
        assert_eq!(e.field, "input.max_words");
        let e = MemoryCondenseJob::parse(&json!({"max_words": 5})).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.rule.as_str()),
            ("input.content", "is required")
        );
        let e = MemoryCondenseJob::parse(&json!({"content": 5, "max_words": 5})).unwrap_err();
        assert_eq!(e.field, "input.content");
    }
}
