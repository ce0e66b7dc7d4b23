//! The video job (seed 000 "Generate video from skin + category"): the
//! image job's fields, plus where the first frame comes from
//! (`first_frame_source`: made by the image model, or the skin's reference
//! image named by `reference_image_type`), the frame count, fps and size;
//! the uploaded MP4 and poster with the user-media record out.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::image::{ImageJob, UserMedia};
use crate::InputError;

/// The most frames one job makes (Wan's 4k + 1 rule).
pub const MAX_FRAMES: u32 = 241;
pub const MAX_FPS: u32 = 60;
/// Width and height: multiples of this, at most [`MAX_SIDE`] (the worker
/// checks its model's own multiple, 16 or 32).
pub const SIDE_MULTIPLE: u32 = 16;
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 1280;

/// Where the first frame comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirstFrame {
    /// Made by the image model from the same prompt context and seed.
    Generate,
    /// The skin's reference image (`reference_image_type`).
    Reference,
}

/// A valid video job.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoJob {
    /// The fields shared with the image job, under the image job's rules
    /// (`num_options` is 1, `format` is mp4).
    pub base: ImageJob,
    pub first_frame_source: FirstFrame,
    /// Which of the skin's reference images (`reference_images` keys, or
    /// `cover` for `cover_photo_url`); `None`: `cover`.
    pub reference_image_type: Option<String>,
    pub num_frames: Option<u32>,
    pub fps: Option<u32>,
}

impl VideoJob {
    pub fn parse(input: &Value) -> Result<Self, InputError> {
        let Some(obj) = input.as_object() else {
            return Err(InputError::new("input", "must be an object"));
        };
        let mut rest = obj.clone();
        let mut take = |k: &str| rest.remove(k);
        let first = take("first_frame_source");
        let reference = take("reference_image_type");
        let frames = take("num_frames");
        let fps = take("fps");
        let format = take("format");
        match format.as_ref().and_then(|f| f.as_str()) {
            None | Some("mp4") if format.as_ref().is_none_or(|f| f.is_string()) => {}
            _ => return Err(InputError::new("input.format", "must be mp4")),
        }
        let base = ImageJob::parse(&Value::Object(rest))?;
        if base.num_options != 1 {
            return Err(InputError::new(
                "input.num_options",
                "must be 1 (a video job makes one video)",
            ));
        }
        for (name, v) in [("width", base.width), ("height", base.height)] {
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
        let first_frame_source = match first.as_ref() {
            None | Some(Value::Null) => FirstFrame::Generate,
            Some(Value::String(s)) if s == "generate" => FirstFrame::Generate,
            Some(Value::String(s)) if s == "reference" => FirstFrame::Reference,
            Some(_) => {
                return Err(InputError::new(
                    "input.first_frame_source",
                    "must be generate or reference",
                ))
            }
        };
        let reference_image_type = match reference {
            None | Some(Value::Null) => None,
            Some(Value::String(s))
                if !s.is_empty()
                    && s.len() <= 64
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                Some(s)
            }
            Some(_) => {
                return Err(InputError::new(
                    "input.reference_image_type",
                    "must be a name of 1 to 64 letters, digits, _ or -",
                ))
            }
        };
        let uint =
            |name: &str, v: Option<Value>, lo: u32, hi: u32| -> Result<Option<u32>, InputError> {
                match v {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::Number(n)) => match n.as_u64() {
                        Some(x) if (lo as u64..=hi as u64).contains(&x) => Ok(Some(x as u32)),
                        _ => Err(InputError::new(
                            format!("input.{name}"),
                            format!("must be an integer from {lo} to {hi}"),
                        )),
                    },
                    Some(_) => Err(InputError::new(
                        format!("input.{name}"),
                        format!("must be an integer from {lo} to {hi}"),
                    )),
                }
            };
        let num_frames = uint("num_frames", frames, 1, MAX_FRAMES)?;
        if num_frames.is_some_and(|n| (n - 1) % 4 != 0) {
            return Err(InputError::new(
                "input.num_frames",
                "must be 4k+1 (1, 5, 9, ..., 241): the video model's frame rule",
            ));
        }
        let fps = uint("fps", fps, 1, MAX_FPS)?;
        Ok(Self {
            base,
            first_frame_source,
            reference_image_type,
            num_frames,
            fps,
        })
    }
}

/// The uploaded MP4.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoFile {
    #[serde(rename = "cdnUrl")]
    pub cdn_url: String,
    pub sha256: String,
    pub bytes: u64,
    #[serde(rename = "contentType")]
    pub content_type: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoOutput {
    pub generation_id: String,
    pub seed: u64,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub num_frames: u32,
    pub duration_s: f64,
    pub steps: u32,
    pub guidance_scale: f64,
    /// `generate` or `reference`.
    pub first_frame_source: FirstFrame,
    pub video: VideoFile,
    /// The first frame as a JPEG.
    pub poster: VideoFile,
    pub media: Vec<UserMedia>,
    /// The message that delivered the video to the instance, when one was
    /// saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Value>,
}

impl super::JobContract for VideoJob {
    const KIND: super::JobKind = super::JobKind::Video;
    type Output = VideoOutput;

    fn parse(input: &Value) -> Result<Self, InputError> {
        VideoJob::parse(input)
    }

    fn input_schema() -> Value {
        let mut schema = ImageJob::input_schema();
        let props = schema["properties"]
            .as_object_mut()
            .expect("the image schema's properties");
        let side = json!({"type": "integer", "minimum": MIN_SIDE, "maximum": MAX_SIDE, "multipleOf": SIDE_MULTIPLE});
        props.insert("width".into(), side.clone());
        props.insert("height".into(), side);
        props.insert(
            "num_options".into(),
            json!({"type": "integer", "minimum": 1, "maximum": 1}),
        );
        props.insert("format".into(), json!({"type": "string", "enum": ["mp4"]}));
        props.insert(
            "first_frame_source".into(),
            json!({"type": "string", "enum": ["generate", "reference"], "description": "whether to generate the first frame or use the skin's reference image"}),
        );
        props.insert(
            "reference_image_type".into(),
            json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$", "description": "which skin reference image to use (a key of the skin's reference_images, or cover for cover_photo_url)"}),
        );
        props.insert(
            "num_frames".into(),
            json!({"type": "integer", "minimum": 1, "maximum": MAX_FRAMES, "description": "4k+1"}),
        );
        props.insert(
            "fps".into(),
            json!({"type": "integer", "minimum": 1, "maximum": MAX_FPS}),
        );
        schema
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(input: Value) -> (String, String) {
        let e = VideoJob::parse(&input).unwrap_err();
        (e.field, e.rule)
    }

    #[test]
    fn parses_a_job_and_names_each_broken_rule() {
        let j = VideoJob::parse(&json!({"skin_id": "s1", "category": "selfie", "positive_prompt": "waves",
            "first_frame_source": "reference", "reference_image_type": "face", "num_frames": 17, "fps": 16}))
        .unwrap();
        assert_eq!(j.first_frame_source, FirstFrame::Reference);
        assert_eq!(j.reference_image_type.as_deref(), Some("face"));
        assert_eq!((j.num_frames, j.fps), (Some(17), Some(16)));
        assert_eq!(j.base.category, "selfie");
        let ok = json!({"category": "selfie", "positive_prompt": "x"});
        assert_eq!(
            VideoJob::parse(&ok).unwrap().first_frame_source,
            FirstFrame::Generate
        );
        let with = |k: &str, v: Value| {
            let mut o = ok.clone();
            o[k] = v;
            o
        };
        assert_eq!(field(with("num_frames", json!(16))).0, "input.num_frames");
        assert_eq!(field(with("num_frames", json!(245))).0, "input.num_frames");
        assert_eq!(field(with("fps", json!(0))).0, "input.fps");
        assert_eq!(field(with("fps", json!("x"))).0, "input.fps");
        assert_eq!(
            field(with("first_frame_source", json!("upload"))).0,
            "input.first_frame_source"
        );
        assert_eq!(
            field(with("reference_image_type", json!("../x"))).0,
            "input.reference_image_type"
        );
        assert_eq!(field(with("width", json!(1920))).0, "input.width");
        assert_eq!(field(with("height", json!(72))).0, "input.height");
        assert_eq!(field(with("num_options", json!(2))).0, "input.num_options");
        assert_eq!(field(with("format", json!("gif"))).0, "input.format");
        assert_eq!(field(with("bogus", json!(1))).0, "input.bogus");
        assert_eq!(field(json!({"positive_prompt": "x"})).0, "input.category");
        assert_eq!(field(json!([1])).0, "input");
    }
}
