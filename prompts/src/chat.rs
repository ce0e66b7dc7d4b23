//! The chat-completion turns of a chat job: one system block made from the
//! character, then the conversation, then the post-history instructions.

use serde::Serialize;

use crate::{PromptError, RenderedCharacter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatTurn {
    pub role: Role,
    pub content: String,
}

/// One message of the conversation, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryMessage {
    pub role: Role,
    pub text: String,
}

/// Used when the card has no system prompt of its own.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are {name}, a companion chatting with the user. \
Stay in character and answer the user's last message in one or two short sentences.";

fn system_block(character: &RenderedCharacter) -> String {
    let name = if character.name.is_empty() {
        "the character"
    } else {
        &character.name
    };
    let mut parts = Vec::new();
    if character.system_prompt.is_empty() {
        parts.push(DEFAULT_SYSTEM_PROMPT.replace("{name}", name));
    } else {
        parts.push(character.system_prompt.clone());
    }
    if !character.description.is_empty() {
        parts.push(character.description.clone());
    }
    if !character.personality.is_empty() {
        parts.push(format!("{name}'s personality: {}", character.personality));
    }
    if !character.scenario.is_empty() {
        parts.push(format!("Scenario: {}", character.scenario));
    }
    parts.join("\n\n")
}

/// Builds the turns: system block, history with consecutive turns of one role
/// merged (many chat templates demand alternation) and empty texts dropped,
/// then the post-history instructions as a final system turn.
pub fn build_chat_turns(
    character: &RenderedCharacter,
    history: &[HistoryMessage],
) -> Result<Vec<ChatTurn>, PromptError> {
    let mut turns = vec![ChatTurn {
        role: Role::System,
        content: system_block(character),
    }];
    for msg in history {
        let text = msg.text.trim();
        if text.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some(last) if last.role == msg.role && msg.role != Role::System => {
                last.content.push('\n');
                last.content.push_str(text);
            }
            _ => turns.push(ChatTurn {
                role: msg.role,
                content: text.to_string(),
            }),
        }
    }
    if turns.len() == 1 {
        return Err(PromptError::EmptyConversation);
    }
    if !character.post_history_instructions.is_empty() {
        turns.push(ChatTurn {
            role: Role::System,
            content: character.post_history_instructions.clone(),
        });
    }
    Ok(turns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, text: &str) -> HistoryMessage {
        HistoryMessage {
            role,
            text: text.into(),
        }
    }

    #[test]
    fn merges_consecutive_user_messages_and_drops_empty_ones() {
        let character = RenderedCharacter {
            name: "Mia".into(),
            description: "A barista.".into(),
            ..Default::default()
        };
        let turns = build_chat_turns(
            &character,
            &[
                msg(Role::Assistant, "Great! You?"),
                msg(Role::User, "Me too!!"),
                msg(Role::User, "What are you doing tonight?"),
                msg(Role::User, ""),
            ],
        )
        .unwrap();
        assert_eq!(turns.len(), 3);
        assert_eq!(
            turns[0].content,
            "You are Mia, a companion chatting with the user. Stay in character and answer the user's last message in one or two short sentences.\n\nA barista."
        );
        assert_eq!(turns[1].role, Role::Assistant);
        assert_eq!(turns[2].content, "Me too!!\nWhat are you doing tonight?");
    }

    #[test]
    fn post_history_instructions_come_last_and_empty_chat_is_refused() {
        let character = RenderedCharacter {
            system_prompt: "Be Mia.".into(),
            post_history_instructions: "Reply briefly.".into(),
            ..Default::default()
        };
        let turns = build_chat_turns(&character, &[msg(Role::User, "hi")]).unwrap();
        assert_eq!(turns.last().unwrap().content, "Reply briefly.");
        assert_eq!(turns[0].content, "Be Mia.");
        assert!(matches!(
            build_chat_turns(&character, &[msg(Role::User, "  ")]),
            Err(PromptError::EmptyConversation)
        ));
    }
}
