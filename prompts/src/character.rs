//! Character Card V2 templates rendered with the job's `character_params`.
//!
//! Every string field of the card may hold minijinja expressions. Rendering is
//! strict: printing a parameter the request does not carry is an error that
//! names the parameter, while `{% if x is defined %}` still works for optional
//! ones.

use minijinja::{Environment, UndefinedBehavior};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::PromptError;

/// The parts of a Character Card V2 (`spec: "chara_card_v2"`) the prompt uses.
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
    /// Never sent to the model.
    pub creator_notes: String,
}

/// A card with every field rendered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RenderedCharacter {
    pub name: String,
    pub description: String,
    pub personality: String,
    pub scenario: String,
    pub system_prompt: String,
    pub post_history_instructions: String,
}

impl CharacterCard {
    pub fn from_json(raw: &str) -> Result<Self, PromptError> {
        let card: CharacterCard =
            serde_json::from_str(raw).map_err(|e| PromptError::BadCard(e.to_string()))?;
        if card.spec != "chara_card_v2" {
            return Err(PromptError::BadCard(format!(
                "spec must be \"chara_card_v2\", got {:?}",
                card.spec
            )));
        }
        Ok(card)
    }

    /// Renders every prompt field over `params`.
    pub fn render(&self, params: &Map<String, Value>) -> Result<RenderedCharacter, PromptError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        let ctx = Value::Object(params.clone());
        let render = |field: &str, source: &str| -> Result<String, PromptError> {
            render_field(&env, field, source, &ctx, params)
        };
        let d = &self.data;
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
    if !source.contains("{{") && !source.contains("{%") && !source.contains("{#") {
        return Ok(source.trim().to_string());
    }
    let render_err = |e: minijinja::Error| PromptError::CardRender {
        field: field.to_string(),
        message: e.to_string(),
    };
    let tmpl = env.template_from_str(source).map_err(render_err)?;
    match tmpl.render(ctx) {
        Ok(s) => Ok(s.trim().to_string()),
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
}
