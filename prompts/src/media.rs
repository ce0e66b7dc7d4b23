//! Image and video prompts from skin + category + style + nsfw level (seed
//! 000 "Generate image/video from skin + category"), and the text-model
//! prompt of `generation_mode`, whose answer is cleaned and merged with the
//! character's own text.

use crate::{ChatTurn, PromptError, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Anime,
    Realistic,
}

impl Style {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_lowercase().as_str() {
            "anime" => Some(Style::Anime),
            "realistic" | "real" | "photo" => Some(Style::Realistic),
            _ => None,
        }
    }

    fn wording(self) -> &'static str {
        match self {
            Style::Anime => "anime style, detailed illustration, clean line art, vibrant colors",
            Style::Realistic => {
                "photorealistic, natural lighting, 35mm photograph, detailed skin texture"
            }
        }
    }

    fn negative(self) -> &'static str {
        match self {
            Style::Anime => "photo, photorealistic, 3d render",
            Style::Realistic => "anime, cartoon, illustration, drawing, 3d render",
        }
    }
}

/// How explicit a generation may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NsfwLevel {
    Safe,
    Suggestive,
    Explicit,
}

impl NsfwLevel {
    /// 0 / "safe" / "none" / "sfw", 1 / "suggestive" / "soft", 2 / "explicit" / "nsfw".
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_lowercase().as_str() {
            "0" | "safe" | "none" | "sfw" => Some(NsfwLevel::Safe),
            "1" | "suggestive" | "soft" | "mild" => Some(NsfwLevel::Suggestive),
            "2" | "explicit" | "nsfw" | "hard" => Some(NsfwLevel::Explicit),
            _ => None,
        }
    }
}

/// A pre-defined category: framing, what it shows, what to avoid, and the
/// motion a video of it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Category {
    pub id: &'static str,
    pub framing: &'static str,
    pub shows_outfit: bool,
    pub shows_footwear: bool,
    pub negative: &'static str,
    pub motion: &'static str,
}

pub const CATEGORIES: &[Category] = &[
    Category {
        id: "selfie",
        framing: "selfie, front camera, arm's length, looking at the viewer, upper body",
        shows_outfit: true,
        shows_footwear: false,
        negative: "full body, visible phone screen, distant shot",
        motion: "holds the phone steady, smiles and tilts the head slightly",
    },
    Category {
        id: "portrait",
        framing: "portrait, head and shoulders, shallow depth of field, looking at the viewer",
        shows_outfit: false,
        shows_footwear: false,
        negative: "full body, wide shot, cropped face",
        motion: "slow blink, gentle smile, hair moving softly",
    },
    Category {
        id: "full_body",
        framing: "full body shot, standing, head to toe in frame",
        shows_outfit: true,
        shows_footwear: true,
        negative: "cropped feet, close-up, cut off head",
        motion: "shifts weight and turns slightly toward the camera",
    },
    Category {
        id: "outfit",
        framing: "fashion shot, full body, outfit in focus, posing",
        shows_outfit: true,
        shows_footwear: true,
        negative: "close-up, cropped body, blurry clothing",
        motion: "turns around slowly to show the outfit",
    },
    Category {
        id: "location",
        framing: "wide shot, character in a detailed environment, establishing view",
        shows_outfit: true,
        shows_footwear: false,
        negative: "plain background, close-up",
        motion: "the camera pans slowly across the scene",
    },
    Category {
        id: "activity",
        framing: "candid shot, mid-action, dynamic pose, medium shot",
        shows_outfit: true,
        shows_footwear: false,
        negative: "static pose, looking at the camera, blurry motion",
        motion: "continues the activity with natural movement",
    },
];

const COMMON_NEGATIVE: &str =
    "lowres, bad anatomy, bad hands, extra fingers, deformed, watermark, text, signature";
const SAFE_NEGATIVE: &str = "nsfw, nudity, cleavage, lingerie";

pub fn category(id: &str) -> Result<&'static Category, PromptError> {
    let norm = id.trim().to_lowercase().replace([' ', '-'], "_");
    CATEGORIES.iter().find(|c| c.id == norm).ok_or_else(|| {
        PromptError::UnknownCategory(
            id.to_string(),
            CATEGORIES
                .iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
                .join(", "),
        )
    })
}

/// The character's image fields, named as the platform's activity carries
/// them (seed 000).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(default)]
pub struct ImageCharacter {
    #[serde(rename = "image_gen_character_short_text")]
    pub short_text: String,
    #[serde(rename = "image_gen_character_clothed_text")]
    pub clothed_text: String,
    #[serde(rename = "image_gen_character_naked_text")]
    pub naked_text: String,
    pub default_outfit_text: String,
    pub default_footwear_text: String,
    #[serde(rename = "llm_image_prompt_generation_help_text")]
    pub llm_help_text: String,
    #[serde(rename = "video_character_prompt")]
    pub video_prompt: String,
    #[serde(rename = "nsfw_video_character_prompt")]
    pub nsfw_video_prompt: String,
}

impl ImageCharacter {
    /// From an activity or instance object of the platform (nulls read as
    /// empty texts; other fields ignored).
    pub fn from_activity(v: &serde_json::Value) -> Result<Self, PromptError> {
        serde_json::from_value(crate::without_nulls(v))
            .map_err(|e| PromptError::BadCard(e.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePrompt {
    pub positive: String,
    pub negative: String,
    pub seed: u64,
}

/// The skin's style wins; the persona's preference is the fallback; anime
/// when neither says.
pub fn choose_style(skin: Option<Style>, persona: Option<Style>) -> Style {
    skin.or(persona).unwrap_or(Style::Anime)
}

fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

fn negative(style: Style, cat: &Category, nsfw: NsfwLevel) -> String {
    let safe = if nsfw == NsfwLevel::Safe {
        SAFE_NEGATIVE
    } else {
        ""
    };
    join(&[style.negative(), cat.negative, COMMON_NEGATIVE, safe])
}

/// The image prompt for a category. The naked text is used at the explicit
/// level only (when the character has one); the default outfit and footwear
/// appear when the category shows them and the character is clothed.
pub fn image_prompt(
    ch: &ImageCharacter,
    style: Style,
    cat: &Category,
    nsfw: NsfwLevel,
    seed: u64,
) -> ImagePrompt {
    let naked = nsfw == NsfwLevel::Explicit && !ch.naked_text.trim().is_empty();
    let body = if naked {
        &ch.naked_text
    } else {
        &ch.clothed_text
    };
    let outfit = if cat.shows_outfit && !naked {
        ch.default_outfit_text.as_str()
    } else {
        ""
    };
    let footwear = if cat.shows_footwear && !naked {
        ch.default_footwear_text.as_str()
    } else {
        ""
    };
    ImagePrompt {
        positive: join(&[
            style.wording(),
            cat.framing,
            &ch.short_text,
            body,
            outfit,
            footwear,
        ]),
        negative: negative(style, cat, nsfw),
        seed,
    }
}

/// `generation_mode`: the text model writes the scene from the chat.
pub fn image_prompt_request(
    ch: &ImageCharacter,
    cat: &Category,
    nsfw: NsfwLevel,
    recent: &[String],
) -> Vec<ChatTurn> {
    let rating = match nsfw {
        NsfwLevel::Safe => "Keep it fully clothed and safe for work.",
        NsfwLevel::Suggestive => "It may be flirty and suggestive, without nudity.",
        NsfwLevel::Explicit => "Explicit content is allowed.",
    };
    let mut system = String::from(
        "You write prompts for an image generator. Answer with one line: comma-separated visual details \
         of the scene (pose, expression, place, light). No names, no quotes, no explanations.",
    );
    if !ch.llm_help_text.trim().is_empty() {
        system.push_str("\n\n");
        system.push_str(ch.llm_help_text.trim());
    }
    let chat = recent
        .iter()
        .map(|m| m.trim())
        .filter(|m| !m.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    vec![
        ChatTurn { role: Role::System, content: system },
        ChatTurn {
            role: Role::User,
            content: format!(
                "Character: {}\nFraming: {}\n{rating}\n\nRecent conversation:\n{chat}\n\nWrite the image prompt for this moment.",
                ch.short_text.trim(),
                cat.framing
            ),
        },
    ]
}

/// The model's answer as a prompt fragment: its first line, quotes and
/// labels stripped, whitespace collapsed, at most `max_chars` (cut at a comma
/// or a word).
pub fn clean_generated_prompt(answer: &str, max_chars: usize) -> String {
    let line = answer
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut line = line.to_string();
    for label in ["image prompt:", "prompt:"] {
        if line.to_lowercase().starts_with(label) {
            line = line[label.len()..].to_string();
        }
    }
    let cleaned: String = line
        .chars()
        .filter(|c| !matches!(c, '"' | '`' | '“' | '”'))
        .collect();
    let mut cleaned = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    cleaned = cleaned
        .trim_matches(|c: char| c == '\'' || c == '.' || c == ' ')
        .to_string();
    if cleaned.chars().count() <= max_chars {
        return cleaned;
    }
    let cut: String = cleaned.chars().take(max_chars).collect();
    let at = cut
        .rfind(',')
        .or_else(|| cut.rfind(' '))
        .unwrap_or(cut.len());
    cut[..at].trim_end_matches([',', ' ']).to_string()
}

/// The generated scene merged with the character's own text.
pub fn merge_generated(
    ch: &ImageCharacter,
    style: Style,
    cat: &Category,
    nsfw: NsfwLevel,
    generated: &str,
    seed: u64,
) -> ImagePrompt {
    let base = image_prompt(ch, style, cat, nsfw, seed);
    ImagePrompt {
        positive: join(&[&base.positive, generated]),
        ..base
    }
}

/// The video prompt: the (nsfw) video character prompt by level, plus the
/// category's motion.
pub fn video_prompt(ch: &ImageCharacter, cat: &Category, nsfw: NsfwLevel) -> String {
    let character = if nsfw == NsfwLevel::Explicit && !ch.nsfw_video_prompt.trim().is_empty() {
        &ch.nsfw_video_prompt
    } else {
        &ch.video_prompt
    };
    join(&[character, cat.motion])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mia() -> ImageCharacter {
        ImageCharacter {
            short_text: "young woman, long silver hair, green eyes".into(),
            clothed_text: "slim build".into(),
            naked_text: "NAKED-TEXT".into(),
            default_outfit_text: "white sundress".into(),
            default_footwear_text: "sandals".into(),
            llm_help_text: "Mia is always at the beach.".into(),
            video_prompt: "Mia, silver hair".into(),
            nsfw_video_prompt: "NSFW-VIDEO".into(),
        }
    }

    #[test]
    fn full_body_realistic_safe_prompt() {
        let p = image_prompt(
            &mia(),
            Style::Realistic,
            category("Full Body").unwrap(),
            NsfwLevel::Safe,
            7,
        );
        assert_eq!(
            p.positive,
            "photorealistic, natural lighting, 35mm photograph, detailed skin texture, full body shot, standing, head to toe in frame, young woman, long silver hair, green eyes, slim build, white sundress, sandals"
        );
        assert_eq!(
            p.negative,
            "anime, cartoon, illustration, drawing, 3d render, cropped feet, close-up, cut off head, lowres, bad anatomy, bad hands, extra fingers, deformed, watermark, text, signature, nsfw, nudity, cleavage, lingerie"
        );
        assert_eq!(p.seed, 7);
    }

    #[test]
    fn portrait_hides_outfit_and_selfie_hides_footwear() {
        let p = image_prompt(
            &mia(),
            Style::Anime,
            category("portrait").unwrap(),
            NsfwLevel::Safe,
            0,
        );
        assert!(!p.positive.contains("sundress") && !p.positive.contains("sandals"));
        assert!(p.positive.starts_with("anime style"));
        let s = image_prompt(
            &mia(),
            Style::Anime,
            category("selfie").unwrap(),
            NsfwLevel::Safe,
            0,
        );
        assert!(s.positive.contains("sundress") && !s.positive.contains("sandals"));
    }

    #[test]
    fn naked_text_only_at_the_explicit_level() {
        let cat = category("full_body").unwrap();
        for level in [NsfwLevel::Safe, NsfwLevel::Suggestive] {
            let p = image_prompt(&mia(), Style::Anime, cat, level, 0);
            assert!(!p.positive.contains("NAKED-TEXT"), "{level:?}");
        }
        let p = image_prompt(&mia(), Style::Anime, cat, NsfwLevel::Explicit, 0);
        assert!(p.positive.contains("NAKED-TEXT") && !p.positive.contains("sundress"));
        assert!(!p.negative.contains("nudity"));
        assert_eq!(NsfwLevel::parse("2"), Some(NsfwLevel::Explicit));
        assert_eq!(NsfwLevel::parse("soft"), Some(NsfwLevel::Suggestive));
    }

    #[test]
    fn style_comes_from_skin_then_persona() {
        assert_eq!(
            choose_style(Some(Style::Realistic), Some(Style::Anime)),
            Style::Realistic
        );
        assert_eq!(choose_style(None, Some(Style::Realistic)), Style::Realistic);
        assert_eq!(choose_style(None, None), Style::Anime);
        assert_eq!(Style::parse("Realistic"), Some(Style::Realistic));
    }

    #[test]
    fn unknown_category_names_the_known_ones() {
        assert_eq!(
            category("bath").unwrap_err().to_string(),
            "unknown category \"bath\"; categories: selfie, portrait, full_body, outfit, location, activity"
        );
    }

    #[test]
    fn generated_prompt_is_cleaned_and_merged() {
        assert_eq!(
            clean_generated_prompt(
                "\n  Prompt: \"smiling,   sitting on a pier, sunset light.\"\nExplanation: ...",
                200
            ),
            "smiling, sitting on a pier, sunset light"
        );
        assert_eq!(
            clean_generated_prompt("one, two, three, four", 14),
            "one, two"
        );
        let cat = category("location").unwrap();
        let m = merge_generated(
            &mia(),
            Style::Anime,
            cat,
            NsfwLevel::Safe,
            "on a pier at sunset",
            3,
        );
        assert!(m.positive.ends_with("young woman, long silver hair, green eyes, slim build, white sundress, on a pier at sunset"));
        let req = image_prompt_request(
            &mia(),
            cat,
            NsfwLevel::Safe,
            &["let's go to the pier".into()],
        );
        assert!(req[0].content.ends_with("Mia is always at the beach."));
        assert!(req[1]
            .content
            .contains("Recent conversation:\nlet's go to the pier"));
        assert!(req[1].content.contains("safe for work"));
    }

    #[test]
    fn image_fields_parse_from_the_platform_activity() {
        let ch = ImageCharacter::from_activity(&serde_json::json!({
            "title": "Mia",
            "image_gen_character_short_text": "silver hair",
            "image_gen_character_naked_text": null,
            "default_footwear_text": "boots",
            "nsfw_video_character_prompt": "v"
        }))
        .unwrap();
        assert_eq!(ch.short_text, "silver hair");
        assert_eq!(ch.default_footwear_text, "boots");
        assert_eq!(ch.nsfw_video_prompt, "v");
    }

    #[test]
    fn video_prompt_by_level_with_motion() {
        let cat = category("outfit").unwrap();
        assert_eq!(
            video_prompt(&mia(), cat, NsfwLevel::Suggestive),
            "Mia, silver hair, turns around slowly to show the outfit"
        );
        assert!(video_prompt(&mia(), cat, NsfwLevel::Explicit).starts_with("NSFW-VIDEO"));
    }
}
