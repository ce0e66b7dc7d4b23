//! The model's own chat template (Jinja from GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`), rendered as Hugging Face `transformers` does:
//! trim_blocks and lstrip_blocks on, Python string methods, `raise_exception`,
//! `strftime_now`. ChatML when the model has no template.

use minijinja::{Environment, Error, ErrorKind};
use serde_json::json;

use crate::{ChatTurn, PromptError, Role};

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    // Python's strftime syntax, which chrono shares. UTC: the job clock is not
    // an input of this template yet.
    chrono::Utc::now().format(&format).to_string()
}

impl ChatTemplate {
    /// `source` is the Jinja text; `None` falls back to ChatML.
    pub fn new(
        source: Option<&str>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, PromptError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.unwrap_or(CHATML_TEMPLATE).to_string())
            .map_err(|e| PromptError::ChatTemplate(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders the turns with the generation prompt for the assistant appended.
    /// A template that refuses the system role gets the system text merged into
    /// the first user turn.
    pub fn render(&self, turns: &[ChatTurn]) -> Result<String, PromptError> {
        match self.render_raw(turns) {
            Ok(text) => Ok(text),
            Err(first) if turns.iter().any(|t| t.role == Role::System) => self
                .render_raw(&merge_system_into_user(turns))
                .map_err(|_| first),
            Err(e) => Err(e),
        }
    }

    fn render_raw(&self, turns: &[ChatTurn]) -> Result<String, PromptError> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(json!({
            "messages": turns,
            "add_generation_prompt": true,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }))
        .map_err(|e| PromptError::ChatTemplate(e.to_string()))
    }
}

fn merge_system_into_user(turns: &[ChatTurn]) -> Vec<ChatTurn> {
    let system: Vec<&str> = turns
        .iter()
        .filter(|t| t.role == Role::System)
        .map(|t| t.content.as_str())
        .collect();
    let mut out: Vec<ChatTurn> = turns
        .iter()
        .filter(|t| t.role != Role::System)
        .cloned()
        .collect();
    if let Some(first_user) = out.iter_mut().find(|t| t.role == Role::User) {
        first_user.content = format!("{}\n\n{}", system.join("\n\n"), first_user.content);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns() -> Vec<ChatTurn> {
        vec![
            ChatTurn {
                role: Role::System,
                content: "Be Mia.".into(),
            },
            ChatTurn {
                role: Role::User,
                content: "hi".into(),
            },
        ]
    }

    #[test]
    fn chatml_fallback_renders_generation_prompt() {
        let t = ChatTemplate::new(None, "", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&turns()).unwrap(),
            "<|im_start|>system\nBe Mia.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn template_refusing_system_role_gets_it_merged() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}[{{ m['role'] }}]{{ m['content'] | trim }}{% endfor %}";
        let t = ChatTemplate::new(Some(src), "<s>", "</s>").unwrap();
        assert_eq!(t.render(&turns()).unwrap(), "<s>[user]Be Mia.\n\nhi");
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{% for m in messages %}{{ m['content'].strip().upper() }}{% endfor %}";
        let t = ChatTemplate::new(Some(src), "", "").unwrap();
        assert_eq!(t.render(&turns()).unwrap(), "BE MIA.HI");
    }
}
