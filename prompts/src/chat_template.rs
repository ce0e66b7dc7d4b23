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

    /// From a Hugging Face `tokenizer_config.json`: `chat_template` (a string,
    /// or a list of named templates, "default" preferred) and the bos/eos
    /// tokens (strings or `{"content": ...}`).
    pub fn from_tokenizer_config(raw: &str) -> Result<Self, PromptError> {
        let cfg: serde_json::Value = serde_json::from_str(raw)
            .map_err(|e| PromptError::ChatTemplate(format!("tokenizer_config.json: {e}")))?;
        let token = |k: &str| match &cfg[k] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        let template = match &cfg["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or_else(|| list.first())
                .and_then(|t| t["template"].as_str())
                .map(str::to_owned),
            _ => None,
        };
        Self::new(
            template.as_deref(),
            &token("bos_token"),
            &token("eos_token"),
        )
    }

    /// Renders the turns with the generation prompt for the assistant appended.
    /// A template that refuses the system role gets the system text merged into
    /// the first user turn.
    pub fn render(&self, turns: &[ChatTurn]) -> Result<String, PromptError> {
        let first = match self.render_raw(turns) {
            Ok(text) => return Ok(text),
            Err(e) => e,
        };
        // Templates that refuse a system role get it merged into the first
        // user turn; those that also demand strict user/assistant alternation
        // starting with the user get leading bot turns folded in as well.
        let merged = merge_system_into_user(turns);
        if let Ok(text) = self.render_raw(&merged) {
            return Ok(text);
        }
        self.render_raw(&alternating(merged)).map_err(|_| first)
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

/// User first, then strictly alternating: leading assistant turns become
/// context in the first user turn; consecutive turns of one role merge.
fn alternating(turns: Vec<ChatTurn>) -> Vec<ChatTurn> {
    let mut lead = Vec::new();
    let mut rest = turns.into_iter().peekable();
    while rest.peek().is_some_and(|t| t.role == Role::Assistant) {
        lead.push(rest.next().expect("peeked").content);
    }
    let mut out: Vec<ChatTurn> = Vec::new();
    for t in rest {
        match out.last_mut() {
            Some(last) if last.role == t.role => {
                last.content.push_str("\n\n");
                last.content.push_str(&t.content);
            }
            _ => out.push(t),
        }
    }
    if !lead.is_empty() {
        let context = format!("(Earlier, you said: {})", lead.join(" "));
        match out.first_mut() {
            Some(first) => first.content = format!("{context}\n\n{}", first.content),
            None => out.push(ChatTurn {
                role: Role::User,
                content: context,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Today Date: \" + strftime_now(\"%d %b %Y\") + \"\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";

    const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}";

    #[test]
    fn llama3_template_with_slicing_trim_and_strftime_now() {
        let t = ChatTemplate::new(Some(LLAMA3), "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&turns()).unwrap();
        let today = chrono::Utc::now().format("%d %b %Y").to_string();
        assert_eq!(
            out,
            format!("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: {today}\n\nBe Mia.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        );
    }

    #[test]
    fn gemma_template_gets_system_merged_and_alternation() {
        let t = ChatTemplate::new(Some(GEMMA), "<bos>", "<eos>").unwrap();
        let conversation = vec![
            ChatTurn {
                role: Role::System,
                content: "Be Mia.".into(),
            },
            ChatTurn {
                role: Role::Assistant,
                content: "Hello!".into(),
            },
            ChatTurn {
                role: Role::User,
                content: "hi".into(),
            },
        ];
        assert_eq!(
            t.render(&conversation).unwrap(),
            "<bos><start_of_turn>user\n(Earlier, you said: Hello!)\n\nBe Mia.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn tojson_loop_controls_and_eos() {
        let src = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(Some(src), "", "</s>").unwrap();
        assert_eq!(
            t.render(&turns()).unwrap(),
            "{\"content\":\"Be Mia.\",\"role\":\"system\"}</s>"
        );
    }

    #[test]
    fn tokenizer_config_json_supplies_template_and_tokens() {
        let cfg = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}"}
            ]
        });
        let t = ChatTemplate::from_tokenizer_config(&cfg.to_string()).unwrap();
        assert_eq!(
            t.render(&turns()).unwrap(),
            "<s>[system]Be Mia.[user]hi</s>"
        );
        let plain = ChatTemplate::from_tokenizer_config(r#"{"eos_token": "</s>"}"#).unwrap();
        assert!(
            plain
                .render(&turns())
                .unwrap()
                .starts_with("<|im_start|>system"),
            "ChatML fallback"
        );
    }

    #[test]
    fn a_template_error_is_reported() {
        let t = ChatTemplate::new(Some("{{ raise_exception('no') }}"), "", "").unwrap();
        assert!(t.render(&turns()).unwrap_err().to_string().contains("no"));
        assert!(ChatTemplate::new(Some("{% for %}"), "", "").is_err());
    }

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
