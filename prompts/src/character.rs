//! Character Card V2 and V3 templates rendered with the job's
//! `character_params`.
//!
//! Every string field of the card (lorebook entries included) may hold
//! minijinja expressions. Rendering is strict: printing a parameter the
//! request does not carry is an error that names the parameter, while
//! `{% if x is defined %}` still works for optional ones. SillyTavern macros
//! (`{{char}}`, `{{user}}`, ...) pass through untouched for the macro pass.

use minijinja::{Environment, UndefinedBehavior};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::lorebook::{Lorebook, LorebookWire};
use crate::macros::{protect_macros, restore_macros};
use crate::PromptError;

/// A Character Card V2 (`chara_card_v2`) or V3 (`chara_card_v3`).
#[derive(Debug, Clone, Deserialize)]
pub struct CharacterCard {
    pub spec: String,
    pub data: CardData,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CardData {
    pub name: String,
    pub description: String,
    pub personality: String,
    pub scenario: String,
    pub first_mes: String,
    pub mes_example: String,
    pub system_prompt: String,
    pub post_history_instructions: String,
    pub alternate_greetings: Vec<String>,
    /// Never sent to the model.
    pub creator_notes: String,
    pub tags: Vec<String>,
    pub character_book: Option<LorebookWire>,
    /// Card extensions; `max_new_tokens` (or `companion.max_new_tokens`)
    /// sets the reply's token budget.
    pub extensions: Map<String, Value>,
}

/// A card with every field rendered.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RenderedCharacter {
    pub name: String,
    pub description: String,
    pub personality: String,
    pub scenario: String,
    pub system_prompt: String,
    pub post_history_instructions: String,
    pub example_dialogue: String,
    pub first_message: String,
    pub alternate_greetings: Vec<String>,
    pub lorebook: Option<Lorebook>,
    /// The reply's token budget when the card (or activity) sets one.
    pub max_new_tokens: Option<usize>,
}

/// A token budget from a card's extensions or an activity: a positive
/// integer under `max_new_tokens`, `max_response_tokens` or
/// `companion.max_new_tokens`.
fn token_budget(v: &Map<String, Value>) -> Option<usize> {
    ["max_new_tokens", "max_response_tokens"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|x| x.as_u64()))
        .or_else(|| {
            v.get("companion")
                .and_then(|c| c["max_new_tokens"].as_u64())
        })
        .filter(|n| (1..=4096).contains(n))
        .map(|n| n as usize)
}

impl CharacterCard {
    pub fn from_json(raw: &str) -> Result<Self, PromptError> {
        let card: CharacterCard =
            serde_json::from_str(raw).map_err(|e| PromptError::BadCard(e.to_string()))?;
        if card.spec != "chara_card_v2" && card.spec != "chara_card_v3" {
            return Err(PromptError::BadCard(format!(
                "spec must be \"chara_card_v2\" or \"chara_card_v3\", got {:?}",
                card.spec
            )));
        }
        Ok(card)
    }

    /// Renders every prompt field (and lorebook entry) over `params`.
    pub fn render(&self, params: &Map<String, Value>) -> Result<RenderedCharacter, PromptError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        let ctx = Value::Object(params.clone());
        let render = |field: &str, source: &str| render_field(&env, field, source, &ctx, params);
        let d = &self.data;
        let lorebook = match &d.character_book {
            None => None,
            Some(book) => {
                let mut book: Lorebook = book.clone().into();
                for (i, e) in book.entries.iter_mut().enumerate() {
                    e.content =
                        render(&format!("character_book.entries[{i}].content"), &e.content)?;
                }
                Some(book)
            }
        };
        Ok(RenderedCharacter {
            name: render("name", &d.name)?,
            description: render("description", &d.description)?,
            personality: render("personality", &d.personality)?,
            scenario: render("scenario", &d.scenario)?,
            system_prompt: render("system_prompt", &d.system_prompt)?,
            post_history_instructions: render(
                "post_history_instructions",
                &d.post_history_instructions,
            )?,
            example_dialogue: render("mes_example", &d.mes_example)?,
            first_message: render("first_mes", &d.first_mes)?,
            alternate_greetings: d
                .alternate_greetings
                .iter()
                .enumerate()
                .map(|(i, g)| render(&format!("alternate_greetings[{i}]"), g))
                .collect::<Result<_, _>>()?,
            lorebook,
            max_new_tokens: token_budget(&d.extensions),
        })
    }
}

/// The platform's activity or instance snapshot (seed 000), which carries
/// the character without a card: plain fields or `snapshot_`-prefixed ones.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct ActivityWire {
    #[serde(alias = "snapshot_title")]
    title: String,
    #[serde(alias = "snapshot_description")]
    description: String,
    #[serde(alias = "snapshot_personality")]
    personality: String,
    #[serde(alias = "snapshot_scenario")]
    scenario: String,
    #[serde(alias = "snapshot_example_dialogue")]
    example_dialogue: String,
    #[serde(alias = "snapshot_first_message")]
    first_message: String,
    #[serde(alias = "snapshot_alternate_greetings")]
    alternate_greetings: Vec<String>,
    #[serde(alias = "snapshot_system_prompt")]
    system_prompt: String,
    #[serde(alias = "snapshot_post_history_instructions")]
    post_history_instructions: String,
}

impl RenderedCharacter {
    /// The character of a platform activity or instance snapshot.
    /// `creator_notes` is never read: it is not for the model.
    pub fn from_activity(v: &Value) -> Result<Self, PromptError> {
        let a: ActivityWire = serde_json::from_value(crate::without_nulls(v))
            .map_err(|e| PromptError::BadCard(e.to_string()))?;
        Ok(Self {
            name: a.title,
            description: a.description,
            personality: a.personality,
            scenario: a.scenario,
            system_prompt: a.system_prompt,
            post_history_instructions: a.post_history_instructions,
            example_dialogue: a.example_dialogue,
            first_message: a.first_message,
            alternate_greetings: a.alternate_greetings,
            lorebook: None,
            max_new_tokens: v.as_object().and_then(token_budget),
        })
    }
}

fn render_field(
    env: &Environment<'_>,
    field: &str,
    source: &str,
    ctx: &Value,
    params: &Map<String, Value>,
) -> Result<String, PromptError> {
    let (protected, saved) = protect_macros(source);
    if !protected.contains("{{") && !protected.contains("{%") && !protected.contains("{#") {
        return Ok(source.trim().to_string());
    }
    let render_err = |e: minijinja::Error| PromptError::CardRender {
        field: field.to_string(),
        message: e.to_string(),
    };
    let tmpl = env.template_from_str(&protected).map_err(render_err)?;
    match tmpl.render(ctx) {
        Ok(s) => Ok(restore_macros(s.trim(), &saved)),
        Err(e) if e.kind() == minijinja::ErrorKind::UndefinedError => {
            let mut missing: Vec<String> = tmpl
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| !params.contains_key(v))
                .collect();
            missing.sort();
            if missing.is_empty() {
                return Err(render_err(e));
            }
            Err(PromptError::MissingParameter {
                field: field.to_string(),
                missing: missing
                    .iter()
                    .map(|m| format!("`{m}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
        Err(e) => Err(render_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_reply_token_budget_comes_from_the_card_or_the_activity() {
        let card = CharacterCard::from_json(
            &json!({"spec": "chara_card_v2", "data": {"name": "Luna", "extensions": {"companion": {"max_new_tokens": 120}}}}).to_string(),
        )
        .unwrap();
        assert_eq!(card.render(&Map::new()).unwrap().max_new_tokens, Some(120));
        let plain = CharacterCard::from_json(
            &json!({"spec": "chara_card_v2", "data": {"name": "Luna"}}).to_string(),
        )
        .unwrap();
        assert_eq!(plain.render(&Map::new()).unwrap().max_new_tokens, None);
        let a =
            RenderedCharacter::from_activity(&json!({"title": "Luna", "max_response_tokens": 64}))
                .unwrap();
        assert_eq!(a.max_new_tokens, Some(64));
        let bad = RenderedCharacter::from_activity(&json!({"title": "Luna", "max_new_tokens": 0}))
            .unwrap();
        assert_eq!(bad.max_new_tokens, None);
    }

    fn card(system: &str) -> CharacterCard {
        CharacterCard::from_json(
            &json!({
                "spec": "chara_card_v2",
                "spec_version": "2.0",
                "data": {"name": "Mia", "description": "Hair: {{ user_hair_color }}",
                         "system_prompt": system, "creator_notes": "{{ never_rendered }}"}
            })
            .to_string(),
        )
        .unwrap()
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn renders_fields_with_params() {
        let c = card("You are Mia.{% if user_tier is defined %} Tier: {{ user_tier }}.{% endif %}");
        let r = c
            .render(&params(
                json!({"user_tier": "Premium", "user_hair_color": "Blonde"}),
            ))
            .unwrap();
        assert_eq!(r.system_prompt, "You are Mia. Tier: Premium.");
        assert_eq!(r.description, "Hair: Blonde");
        assert_eq!(r.name, "Mia");
    }

    #[test]
    fn optional_params_may_be_absent_but_used_ones_must_be_present() {
        let c = card("You are Mia.{% if user_tier is defined %} Tier: {{ user_tier }}.{% endif %}");
        let err = c.render(&Map::new()).unwrap_err().to_string();
        assert_eq!(
            err,
            "character template field `description` uses parameter(s) `user_hair_color` that character_params lacks"
        );
    }

    #[test]
    fn refuses_other_specs_and_bad_json() {
        assert!(CharacterCard::from_json(r#"{"spec":"chara_card_v1","data":{}}"#).is_err());
        assert!(CharacterCard::from_json("{").is_err());
    }

    #[test]
    fn instance_snapshot_becomes_a_character() {
        let r = RenderedCharacter::from_activity(&json!({
            "id": "i1", "snapshot_title": "Luna", "snapshot_description": "A barista.",
            "snapshot_personality": null, "snapshot_first_message": "Hi!",
            "snapshot_alternate_greetings": ["Yo"], "creator_notes": "secret",
            "snapshot_lorebook_ids": ["lb1"]
        }))
        .unwrap();
        assert_eq!(r.name, "Luna");
        assert_eq!(r.description, "A barista.");
        assert_eq!(r.personality, "");
        assert_eq!(r.alternate_greetings, ["Yo"]);
        let a = RenderedCharacter::from_activity(&json!({"title": "Mia", "scenario": "Beach."}))
            .unwrap();
        assert_eq!((a.name.as_str(), a.scenario.as_str()), ("Mia", "Beach."));
    }

    #[test]
    fn v3_card_with_character_book_and_macros_renders() {
        let c = CharacterCard::from_json(
            &json!({
                "spec": "chara_card_v3", "spec_version": "3.0",
                "data": {
                    "name": "Mia",
                    "description": "{{char}} serves {{ drink }} to {{user}}.",
                    "first_mes": "Hi {{user}}!",
                    "alternate_greetings": ["Welcome back, {{ title }} {{user}}."],
                    "mes_example": "<START>\n{{user}}: hi\n{{char}}: {{random:hey,hello}}",
                    "character_book": {"entries": [
                        {"keys": ["menu"], "content": "Today: {{ drink }}.", "use_regex": false}
                    ]}
                }
            })
            .to_string(),
        )
        .unwrap();
        let r = c
            .render(&params(json!({"drink": "matcha", "title": "Dr."})))
            .unwrap();
        assert_eq!(r.description, "{{char}} serves matcha to {{user}}.");
        assert_eq!(r.alternate_greetings, ["Welcome back, Dr. {{user}}."]);
        assert_eq!(
            r.example_dialogue,
            "<START>\n{{user}}: hi\n{{char}}: {{random:hey,hello}}"
        );
        assert_eq!(r.lorebook.unwrap().entries[0].content, "Today: matcha.");
        let err = c
            .render(&params(json!({"drink": "tea"})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("alternate_greetings[0]") && err.contains("`title`"),
            "{err}"
        );
    }
}
