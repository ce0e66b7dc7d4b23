//! The image job (seed 000 "Generate image from skin + category"): skin,
//! category, seed, user, instance, activity, `generation_mode`,
//! `nsfw_level`, the prompts, size, options, steps, guidance and format in;
//! the uploaded images with their user-media records out.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::platform::{is_valid_id, ID_PATTERN, ID_RULE};
use crate::InputError;

pub const MAX_PROMPT_CHARS: usize = 2_000;
pub const MAX_OPTIONS: u32 = 4;
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 2048;
/// Width and height are multiples of this (the VAE's factor of every
/// supported checkpoint; the worker checks its model's own).
pub const SIDE_MULTIPLE: u32 = 8;
pub const MAX_STEPS: u32 = 100;
pub const MAX_GUIDANCE: f64 = 30.0;
pub const MAX_CONTEXT_MESSAGES: usize = 200;
pub const FORMATS: [&str; 3] = ["png", "webp", "jpeg"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageWire {
    #[serde(default)]
    skin_id: Option<String>,
    category: String,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    activity_instance_id: Option<String>,
    #[serde(default)]
    activity_id: Option<String>,
    #[serde(default)]
    generation_mode: Option<String>,
    #[serde(default)]
    nsfw_level: Option<Value>,
    #[serde(default)]
    positive_prompt: Option<String>,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
    #[serde(default)]
    num_options: Option<u32>,
    #[serde(default)]
    steps: Option<u32>,
    #[serde(default)]
    guidance_scale: Option<f64>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    generation_id: Option<String>,
    // Inline context: wins over fetching.
    #[serde(default)]
    skin: Option<Value>,
    #[serde(default)]
    activity: Option<Value>,
    #[serde(default)]
    persona: Option<Value>,
    #[serde(default)]
    messages: Option<Vec<Value>>,
}

/// A valid image job.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageJob {
    pub skin_id: Option<String>,
    /// A category id of `prompts::media::CATEGORIES`.
    pub category: String,
    /// Drawn by the worker when absent (and reported).
    pub seed: Option<u64>,
    pub user_id: Option<String>,
    pub activity_instance_id: Option<String>,
    pub activity_id: Option<String>,
    pub generation_mode: Option<String>,
    /// 0 safe, 1 suggestive, 2 explicit.
    pub nsfw_level: u8,
    pub positive_prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub num_options: u32,
    pub steps: Option<u32>,
    pub guidance_scale: Option<f64>,
    pub format: String,
    pub generation_id: Option<String>,
    pub skin: Option<Value>,
    pub activity: Option<Value>,
    pub persona: Option<Value>,
    /// Recent chat lines for `generation_mode`, oldest first.
    pub messages: Option<Vec<String>>,
}

fn id_field(name: &str, v: Option<String>) -> Result<Option<String>, InputError> {
    match v {
        Some(id) if !is_valid_id(&id) => Err(InputError::new(format!("input.{name}"), ID_RULE)),
        other => Ok(other),
    }
}

fn text_field(name: &str, v: Option<String>) -> Result<Option<String>, InputError> {
    match v {
        Some(t) if t.chars().count() > MAX_PROMPT_CHARS => Err(InputError::new(
            format!("input.{name}"),
            format!("must be at most {MAX_PROMPT_CHARS} characters"),
        )),
        Some(t) if t.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

fn object_field(name: &str, v: Option<Value>) -> Result<Option<Value>, InputError> {
    match v {
        Some(Value::Null) | None => Ok(None),
        Some(o @ Value::Object(_)) => Ok(Some(o)),
        Some(_) => Err(InputError::new(
            format!("input.{name}"),
            "must be an object",
        )),
    }
}

/// `nsfw_level`: 0–2 or safe / suggestive / explicit.
fn nsfw(v: Option<Value>) -> Result<u8, InputError> {
    let bad = || {
        InputError::new(
            "input.nsfw_level",
            "must be 0, 1, 2 or one of safe, suggestive, explicit",
        )
    };
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(l @ 0..=2) => Ok(l as u8),
            _ => Err(bad()),
        },
        Some(Value::String(s)) => match s.trim().to_lowercase().as_str() {
            "0" | "safe" | "none" | "sfw" => Ok(0),
            "1" | "suggestive" | "soft" | "mild" => Ok(1),
            "2" | "explicit" | "nsfw" | "hard" => Ok(2),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

impl ImageJob {
    pub fn parse(input: &Value) -> Result<Self, InputError> {
        let w: ImageWire = serde_path_to_error::deserialize(input).map_err(|e| {
            crate::field_error("input", &e.path().to_string(), e.into_inner().to_string())
        })?;
        let category = w.category.trim().to_lowercase().replace([' ', '-'], "_");
        if !prompts::media::CATEGORIES.iter().any(|c| c.id == category) {
            return Err(InputError::new(
                "input.category",
                format!("must be one of {}", category_names()),
            ));
        }
        let generation_mode = text_field("generation_mode", w.generation_mode)?;
        if generation_mode
            .as_ref()
            .is_some_and(|m| m.chars().count() > 64)
        {
            return Err(InputError::new(
                "input.generation_mode",
                "must be at most 64 characters",
            ));
        }
        let positive_prompt = text_field("positive_prompt", w.positive_prompt)?;
        let negative_prompt = text_field("negative_prompt", w.negative_prompt)?;
        if generation_mode.is_none() && positive_prompt.is_none() {
            return Err(InputError::new(
                "input.positive_prompt",
                "is required when generation_mode is not set",
            ));
        }
        for (name, v) in [("width", w.width), ("height", w.height)] {
            if let Some(v) = v {
                if !(MIN_SIDE..=MAX_SIDE).contains(&v) || v % SIDE_MULTIPLE != 0 {
                    return Err(InputError::new(
                        format!("input.{name}"),
                        format!(
                            "must be a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}"
                        ),
                    ));
                }
            }
        }
        let num_options = w.num_options.unwrap_or(1);
        if !(1..=MAX_OPTIONS).contains(&num_options) {
            return Err(InputError::new(
                "input.num_options",
                format!("must be between 1 and {MAX_OPTIONS}"),
            ));
        }
        if let Some(s) = w.steps {
            if !(1..=MAX_STEPS).contains(&s) {
                return Err(InputError::new(
                    "input.steps",
                    format!("must be between 1 and {MAX_STEPS}"),
                ));
            }
        }
        if let Some(g) = w.guidance_scale {
            if !(0.0..=MAX_GUIDANCE).contains(&g) {
                return Err(InputError::new(
                    "input.guidance_scale",
                    format!("must be between 0 and {MAX_GUIDANCE}"),
                ));
            }
        }
        let format = w.format.unwrap_or_else(|| "png".into()).to_lowercase();
        let format = if format == "jpg" {
            "jpeg".into()
        } else {
            format
        };
        if !FORMATS.contains(&format.as_str()) {
            return Err(InputError::new(
                "input.format",
                format!("must be one of {}", FORMATS.join(", ")),
            ));
        }
        if let Some(seed) = w.seed {
            // Seeds travel as JSON numbers: keep them exact in every client.
            if seed > (1u64 << 53) {
                return Err(InputError::new(
                    "input.seed",
                    "must be an integer from 0 to 2^53",
                ));
            }
        }
        let messages = match w.messages {
            None => None,
            Some(list) if list.len() > MAX_CONTEXT_MESSAGES => {
                return Err(InputError::new(
                    "input.messages",
                    format!("must have at most {MAX_CONTEXT_MESSAGES} entries"),
                ))
            }
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(i, m)| match m {
                        Value::String(s) => Ok(s.clone()),
                        Value::Object(o) => o
                            .get("content")
                            .and_then(|c| c.as_str())
                            .map(String::from)
                            .ok_or_else(|| {
                                InputError::new(
                                    format!("input.messages[{i}]"),
                                    "must be a string or an object with a content string",
                                )
                            }),
                        _ => Err(InputError::new(
                            format!("input.messages[{i}]"),
                            "must be a string or an object with a content string",
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let activity_instance_id = id_field("activity_instance_id", w.activity_instance_id)?;
        if generation_mode.is_some() && activity_instance_id.is_none() && messages.is_none() {
            return Err(InputError::new(
                "input.generation_mode",
                "needs activity_instance_id or messages (the chat the prompt is written from)",
            ));
        }
        Ok(Self {
            skin_id: id_field("skin_id", w.skin_id)?,
            category,
            seed: w.seed,
            user_id: id_field("user_id", w.user_id)?,
            activity_instance_id,
            activity_id: id_field("activity_id", w.activity_id)?,
            generation_mode,
            nsfw_level: nsfw(w.nsfw_level)?,
            positive_prompt,
            negative_prompt,
            width: w.width,
            height: w.height,
            num_options,
            steps: w.steps,
            guidance_scale: w.guidance_scale,
            format,
            generation_id: id_field("generation_id", w.generation_id)?,
            skin: object_field("skin", w.skin)?,
            activity: object_field("activity", w.activity)?,
            persona: object_field("persona", w.persona)?,
            messages,
        })
    }
}

fn category_names() -> String {
    prompts::media::CATEGORIES
        .iter()
        .map(|c| c.id)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One uploaded image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedImage {
    #[serde(rename = "cdnUrl")]
    pub cdn_url: String,
    pub sha256: String,
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    #[serde(rename = "contentType")]
    pub content_type: String,
}

/// A user-media record (seed 000's collection item shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserMedia {
    pub id: String,
    #[serde(rename = "mediaId")]
    pub media_id: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    #[serde(rename = "cdnUrl")]
    pub cdn_url: String,
    #[serde(rename = "relationType")]
    pub relation_type: String,
    #[serde(rename = "isFavorite")]
    pub is_favorite: bool,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(rename = "userId", default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageOutput {
    pub generation_id: String,
    pub seed: u64,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub images: Vec<GeneratedImage>,
    pub media: Vec<UserMedia>,
    /// The message that delivered the image to the instance, when one was
    /// saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Value>,
}

impl super::JobContract for ImageJob {
    const KIND: super::JobKind = super::JobKind::Image;
    type Output = ImageOutput;

    fn parse(input: &Value) -> Result<Self, InputError> {
        ImageJob::parse(input)
    }

    fn input_schema() -> Value {
        let id = json!({"type": "string", "pattern": ID_PATTERN});
        let text = json!({"type": "string", "maxLength": MAX_PROMPT_CHARS});
        let side = json!({"type": "integer", "minimum": MIN_SIDE, "maximum": MAX_SIDE, "multipleOf": SIDE_MULTIPLE});
        let categories: Vec<&str> = prompts::media::CATEGORIES.iter().map(|c| c.id).collect();
        json!({"type": "object", "required": ["category"], "additionalProperties": false, "properties": {
            "skin_id": id, "category": {"type": "string", "enum": categories, "description": "pre-defined category for prompt generation"},
            "seed": {"type": "integer", "minimum": 0, "maximum": 1u64 << 53, "description": "drawn and reported when absent; option i uses seed + i"},
            "user_id": id, "activity_instance_id": id, "activity_id": id, "generation_id": id,
            "generation_mode": {"type": "string", "maxLength": 64, "description": "the text model writes the prompt from the chat"},
            "nsfw_level": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 2}, {"type": "string", "enum": ["safe", "suggestive", "explicit"]}]},
            "positive_prompt": text, "negative_prompt": text,
            "width": side, "height": side,
            "num_options": {"type": "integer", "minimum": 1, "maximum": MAX_OPTIONS},
            "steps": {"type": "integer", "minimum": 1, "maximum": MAX_STEPS},
            "guidance_scale": {"type": "number", "minimum": 0, "maximum": MAX_GUIDANCE},
            "format": {"type": "string", "enum": FORMATS},
            "skin": {"type": "object"}, "activity": {"type": "object"}, "persona": {"type": "object"},
            "messages": {"type": "array", "maxItems": MAX_CONTEXT_MESSAGES, "items": {"oneOf": [{"type": "string"}, {"type": "object", "required": ["content"], "properties": {"content": {"type": "string"}}}]}}
        }})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(input: Value) -> (String, String) {
        let e = ImageJob::parse(&input).unwrap_err();
        (e.field, e.rule)
    }

    #[test]
    fn parses_a_job_and_names_each_broken_rule() {
        let j = ImageJob::parse(&json!({"skin_id": "s1", "category": "Full Body", "positive_prompt": "on a beach", "nsfw_level": "suggestive", "format": "jpg"})).unwrap();
        assert_eq!(
            (
                j.category.as_str(),
                j.nsfw_level,
                j.format.as_str(),
                j.num_options
            ),
            ("full_body", 1, "jpeg", 1)
        );
        let ok = json!({"category": "selfie", "positive_prompt": "x"});
        let with = |k: &str, v: Value| {
            let mut o = ok.clone();
            o[k] = v;
            o
        };
        assert_eq!(field(json!({"positive_prompt": "x"})).0, "input.category");
        assert_eq!(field(with("category", json!("nope"))).0, "input.category");
        assert_eq!(
            field(json!({"category": "selfie"})).0,
            "input.positive_prompt"
        );
        assert_eq!(field(with("width", json!(100))).0, "input.width");
        assert_eq!(field(with("height", json!(4096))).0, "input.height");
        assert_eq!(field(with("num_options", json!(5))).0, "input.num_options");
        assert_eq!(field(with("steps", json!(0))).0, "input.steps");
        assert_eq!(
            field(with("guidance_scale", json!(31))).0,
            "input.guidance_scale"
        );
        assert_eq!(field(with("format", json!("gif"))).0, "input.format");
        assert_eq!(field(with("nsfw_level", json!(3))).0, "input.nsfw_level");
        assert_eq!(field(with("skin_id", json!("../x"))).0, "input.skin_id");
        assert_eq!(field(with("seed", json!(-1))).0, "input.seed");
        assert_eq!(field(with("bogus", json!(1))).0, "input.bogus");
        assert_eq!(
            field(json!({"category": "selfie", "generation_mode": "chat"})).0,
            "input.generation_mode"
        );
        assert!(ImageJob::parse(
            &json!({"category": "selfie", "generation_mode": "chat", "activity_instance_id": "i1"})
        )
        .is_ok());
        assert_eq!(field(with("messages", json!([1]))).0, "input.messages[0]");
    }
}
