//! Prompt assembly for companion chat. Pure: no I/O, no async.
//!
//! - [`template_ref`]: the `character` reference of a chat job (`github:OWNER/NAME`)
//!   and where its card lives under a templates directory.
//! - [`character`]: Character Card V2 JSON whose string fields are minijinja
//!   templates over the job's `character_params`, rendered strictly.
//! - [`macros`]: `{{char}}`, `{{user}}`, pronouns, clock, seeded random/roll.
//! - [`lorebook`]: World Info activation (keys, selective logic, regex, scan
//!   depth, recursion, token budget, positions).
//! - [`budget`]: token counting and the newest-first history budget.
//! - [`assemble`]: the whole prompt in order, fitted to the budget, with a
//!   report of what went in and why.
//! - [`chat`]: the chat-completion turns.
//! - [`media`]: image and video prompts from skin + category + style + nsfw
//!   level; [`memory`]: the scratchpad condense prompt and its word check.
//! - [`chat_template`]: the model's own Jinja chat template, rendered the way
//!   Hugging Face `transformers` renders it, with ChatML as the fallback.

pub mod assemble;
pub mod budget;
pub mod character;
pub mod chat;
pub mod chat_template;
pub mod lorebook;
pub mod macros;
pub mod media;
pub mod memory;
pub mod template_ref;

pub use assemble::{assemble, Persona, PromptParts, PromptReport};
pub use budget::TokenCounter;
pub use character::{CharacterCard, RenderedCharacter};
pub use chat::{ChatTurn, HistoryMessage, Role};
pub use chat_template::ChatTemplate;
pub use template_ref::TemplateRef;

/// Everything that can go wrong while assembling a prompt.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(
        "character must look like `github:OWNER/NAME` (letters, digits, `-`, `_`, `.`), got {0:?}"
    )]
    BadTemplateRef(String),
    #[error("character card is not valid Character Card V2 JSON: {0}")]
    BadCard(String),
    #[error("character template field `{field}` uses parameter(s) {missing} that character_params lacks")]
    MissingParameter { field: String, missing: String },
    #[error("character template field `{field}` failed to render: {message}")]
    CardRender { field: String, message: String },
    #[error("the model's chat template failed to render: {0}")]
    ChatTemplate(String),
    #[error("nothing to answer: the job has no user message with text")]
    EmptyConversation,
    #[error("unknown category {0:?}; categories: {1}")]
    UnknownCategory(String, String),
    #[error("the prompt needs at least {needed} tokens (system, instructions and the newest message) but the budget is {budget}")]
    OverBudget { needed: usize, budget: usize },
}

/// A JSON object with its null fields removed, so serde defaults apply to
/// them (the platform sends `null` for unset texts).
pub(crate) fn without_nulls(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}
