//! SillyTavern-style macros in character and persona texts: `{{char}}`,
//! `{{user}}`, `{{persona}}`, `{{scenario}}`, `{{personality}}`, pronouns of
//! the persona (`{{user_they}}`, `{{user_them}}`, `{{user_their}}`), the job's
//! clock (`{{time}}`, `{{date}}`, `{{weekday}}`), and `{{random:a,b,c}}` /
//! `{{roll:d6}}` drawn from the job's seed, so a retry renders the same
//! prompt. Names are case-insensitive; unknown macros stay as written.

use chrono::{DateTime, FixedOffset};
use rand::{Rng, SeedableRng};

/// The persona's gender, for pronouns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gender {
    Male,
    Female,
    #[default]
    Other,
}

impl Gender {
    /// Lenient: "male", "man", "m", "he" → Male; "female", "woman", "f",
    /// "she" → Female; anything else → Other (they/them).
    pub fn parse(s: &str) -> Self {
        match s.trim().to_lowercase().as_str() {
            "male" | "man" | "m" | "he" | "boy" => Gender::Male,
            "female" | "woman" | "f" | "she" | "girl" => Gender::Female,
            _ => Gender::Other,
        }
    }

    /// (they, them, their)
    pub fn pronouns(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Gender::Male => ("he", "him", "his"),
            Gender::Female => ("she", "her", "her"),
            Gender::Other => ("they", "them", "their"),
        }
    }
}

/// What macros expand to for one job.
#[derive(Debug, Clone)]
pub struct MacroContext {
    pub char_name: String,
    pub user_name: String,
    pub persona: String,
    pub scenario: String,
    pub personality: String,
    pub user_gender: Gender,
    /// The job's clock, in the user's time zone.
    pub now: DateTime<FixedOffset>,
    pub seed: u64,
}

impl Default for MacroContext {
    fn default() -> Self {
        Self {
            char_name: String::new(),
            user_name: "User".into(),
            persona: String::new(),
            scenario: String::new(),
            personality: String::new(),
            user_gender: Gender::Other,
            now: DateTime::from_timestamp(0, 0)
                .expect("epoch")
                .fixed_offset(),
            seed: 0,
        }
    }
}

/// FNV-1a, so each text gets its own stream of draws from the job seed.
fn text_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Expands every known macro of `text`.
pub fn expand_macros(text: &str, ctx: &MacroContext) -> String {
    if !text.contains("{{") {
        return text.to_string();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(ctx.seed ^ text_hash(text));
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = &after[..end];
        match expand_one(inner.trim(), ctx, &mut rng) {
            Some(value) => out.push_str(&value),
            None => {
                out.push_str("{{");
                out.push_str(inner);
                out.push_str("}}");
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

const KNOWN: &[&str] = &[
    "char",
    "user",
    "persona",
    "scenario",
    "personality",
    "user_they",
    "user_them",
    "user_their",
    "time",
    "date",
    "weekday",
];
const KNOWN_WITH_ARG: &[&str] = &["random", "roll"];

fn is_known(inner: &str) -> bool {
    let inner = inner.trim().to_lowercase();
    match inner.split_once(':') {
        Some((name, _)) => KNOWN_WITH_ARG.contains(&name.trim()),
        None => KNOWN.contains(&inner.as_str()),
    }
}

/// Swaps every known macro for a placeholder, so a template engine that also
/// uses `{{ }}` (the minijinja of character templates) leaves them alone.
/// [`restore_macros`] puts them back.
pub fn protect_macros(text: &str) -> (String, Vec<String>) {
    let mut saved = Vec::new();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) if is_known(&after[..end]) => {
                out.push_str(&format!("\u{E000}{}\u{E001}", saved.len()));
                saved.push(format!("{{{{{}}}}}", &after[..end]));
                rest = &after[end + 2..];
            }
            _ => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    (out, saved)
}

pub fn restore_macros(text: &str, saved: &[String]) -> String {
    let mut out = text.to_string();
    for (i, m) in saved.iter().enumerate() {
        out = out.replace(&format!("\u{E000}{i}\u{E001}"), m);
    }
    out
}

fn expand_one(inner: &str, ctx: &MacroContext, rng: &mut impl Rng) -> Option<String> {
    let (name, arg) = match inner.split_once(':') {
        Some((n, a)) => (n.trim().to_lowercase(), Some(a)),
        None => (inner.to_lowercase(), None),
    };
    let (they, them, their) = ctx.user_gender.pronouns();
    Some(match (name.as_str(), arg) {
        ("char", None) => ctx.char_name.clone(),
        ("user", None) => ctx.user_name.clone(),
        ("persona", None) => ctx.persona.clone(),
        ("scenario", None) => ctx.scenario.clone(),
        ("personality", None) => ctx.personality.clone(),
        ("user_they", None) => they.into(),
        ("user_them", None) => them.into(),
        ("user_their", None) => their.into(),
        ("time", None) => ctx.now.format("%-I:%M %p").to_string(),
        ("date", None) => ctx.now.format("%B %-d, %Y").to_string(),
        ("weekday", None) => ctx.now.format("%A").to_string(),
        ("random", Some(list)) => {
            // `{{random:a,b}}` or SillyTavern's `{{random::a::b}}`.
            let items: Vec<&str> = if let Some(l) = list.strip_prefix(':') {
                l.split("::").collect()
            } else {
                list.split(',').collect()
            };
            items[rng.gen_range(0..items.len())].trim().to_string()
        }
        ("roll", Some(dice)) => roll(dice.trim(), rng)?.to_string(),
        _ => return None,
    })
}

/// `d6`, `6`, `2d6`, `1d20+3`.
fn roll(spec: &str, rng: &mut impl Rng) -> Option<i64> {
    let spec = spec.to_lowercase();
    let (dice, bonus) = match spec.split_once('+') {
        Some((d, b)) => (d.to_string(), b.trim().parse::<i64>().ok()?),
        None => (spec.clone(), 0),
    };
    let (count, sides) = match dice.split_once('d') {
        Some(("", s)) => (1, s.parse::<i64>().ok()?),
        Some((c, s)) => (c.parse::<i64>().ok()?, s.parse::<i64>().ok()?),
        None => (1, dice.parse::<i64>().ok()?),
    };
    if !(1..=100).contains(&count) || !(1..=1_000_000).contains(&sides) {
        return None;
    }
    Some((0..count).map(|_| rng.gen_range(1..=sides)).sum::<i64>() + bonus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ctx(gender: Gender) -> MacroContext {
        MacroContext {
            char_name: "Luna".into(),
            user_name: "Sam".into(),
            persona: "Sam is a night-shift nurse.".into(),
            scenario: "A rainy evening.".into(),
            personality: "warm".into(),
            user_gender: gender,
            now: FixedOffset::east_opt(3600)
                .unwrap()
                .with_ymd_and_hms(2026, 11, 24, 21, 5, 0)
                .unwrap(),
            seed: 42,
        }
    }

    #[test]
    fn names_and_texts_expand_case_insensitively() {
        assert_eq!(
            expand_macros(
                "{{char}} greets {{USER}}. {{Persona}} {{scenario}} {{ personality }}",
                &ctx(Gender::Other)
            ),
            "Luna greets Sam. Sam is a night-shift nurse. A rainy evening. warm"
        );
    }

    #[test]
    fn pronouns_follow_the_persona_gender() {
        let t = "{{user_they}} lost {{user_their}} keys; find them for {{user_them}}";
        assert_eq!(
            expand_macros(t, &ctx(Gender::Male)),
            "he lost his keys; find them for him"
        );
        assert_eq!(
            expand_macros(t, &ctx(Gender::Female)),
            "she lost her keys; find them for her"
        );
        assert_eq!(
            expand_macros(t, &ctx(Gender::Other)),
            "they lost their keys; find them for them"
        );
        assert_eq!(Gender::parse("Woman"), Gender::Female);
        assert_eq!(Gender::parse("non-binary"), Gender::Other);
    }

    #[test]
    fn clock_macros_use_the_job_clock() {
        assert_eq!(
            expand_macros("{{time}} on {{weekday}}, {{date}}", &ctx(Gender::Other)),
            "9:05 PM on Tuesday, November 24, 2026"
        );
    }

    #[test]
    fn random_and_roll_are_seeded() {
        let t = "{{random:tea,coffee,cocoa}} and {{roll:2d6}} and {{random::a b::c d}}";
        let a = expand_macros(t, &ctx(Gender::Other));
        assert_eq!(
            a,
            expand_macros(t, &ctx(Gender::Other)),
            "same seed, same text"
        );
        let drink = a.split(" and ").next().unwrap();
        assert!(["tea", "coffee", "cocoa"].contains(&drink), "{a}");
        let rolled: i64 = a.split(" and ").nth(1).unwrap().parse().unwrap();
        assert!((2..=12).contains(&rolled));
        assert!(["a b", "c d"].contains(&a.split(" and ").nth(2).unwrap()));
        let mut other = ctx(Gender::Other);
        let draws: std::collections::HashSet<String> = (0..20)
            .map(|s| {
                other.seed = s;
                expand_macros("{{roll:d1000}}", &other)
            })
            .collect();
        assert!(draws.len() > 10, "different seeds draw differently");
    }

    #[test]
    fn protected_macros_survive_a_jinja_render_and_come_back() {
        let (p, saved) = protect_macros("{{char}} likes {{ tier }} and {{random:a,b}}");
        assert_eq!(saved, ["{{char}}", "{{random:a,b}}"]);
        assert!(p.contains("{{ tier }}") && !p.contains("{{char}}"));
        assert_eq!(
            restore_macros(&p, &saved),
            "{{char}} likes {{ tier }} and {{random:a,b}}"
        );
    }

    #[test]
    fn unknown_and_unclosed_macros_stay_as_written() {
        let c = ctx(Gender::Other);
        assert_eq!(
            expand_macros("{{ user_tier }} {{roll:dx}} {{char", &c),
            "{{ user_tier }} {{roll:dx}} {{char"
        );
        assert_eq!(expand_macros("no macros", &c), "no macros");
    }
}
