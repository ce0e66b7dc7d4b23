//! Prompt assembly for companion chat. Pure: no I/O, no async.
//!
//! - [`template_ref`]: the `character` reference of a chat job (`github:OWNER/NAME`)
//!   and where its card lives under a templates directory.
//! - [`character`]: Character Card V2 JSON whose string fields are minijinja
//!   templates over the job's `character_params`, rendered strictly.
//! - [`chat`]: the chat-completion turns a job becomes (system block, history,
//!   the new user messages).
//! - [`chat_template`]: the model's own Jinja chat template, rendered the way
//!   Hugging Face `transformers` renders it, with ChatML as the fallback.

pub mod character;
pub mod chat;
pub mod chat_template;
pub mod template_ref;

pub use character::{CharacterCard, RenderedCharacter};
pub use chat::{build_chat_turns, ChatTurn, HistoryMessage, Role};
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
    #[error("nothing to answer: the job has no message with text")]
    EmptyConversation,
}
