//! The memory scratchpad condense prompt, and the check that the model's
//! answer is within `max_words`: count words; over → a second, stricter try;
//! still over → cut at a sentence boundary.

use crate::{ChatTurn, Role};

pub fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

/// The turns asking the model to condense `scratchpad` to `max_words`,
/// keeping what `hint` names. `stricter` is the second try.
pub fn condense_turns(
    scratchpad: &str,
    hint: Option<&str>,
    max_words: usize,
    stricter: bool,
) -> Vec<ChatTurn> {
    let mut system = format!(
        "You condense a companion's memory notes about the user. Keep concrete facts (names, dates, \
         preferences, plans, relationships); drop small talk. Write plain sentences. Use at most {max_words} words."
    );
    if let Some(h) = hint.map(str::trim).filter(|h| !h.is_empty()) {
        system.push_str(&format!(" Most important to keep: {h}."));
    }
    if stricter {
        system.push_str(&format!(
            " Your last answer was too long. Count the words: no more than {max_words}, fewer is fine."
        ));
    }
    vec![
        ChatTurn {
            role: Role::System,
            content: system,
        },
        ChatTurn {
            role: Role::User,
            content: format!("Notes:\n{}\n\nCondensed notes:", scratchpad.trim()),
        },
    ]
}

/// At most `max_words` words, ending at the last sentence end that fits; if
/// not even one sentence fits, at a word boundary.
pub fn cut_to_words(text: &str, max_words: usize) -> String {
    if word_count(text) <= max_words {
        return text.trim().to_string();
    }
    let mut kept = String::new();
    let mut words = 0;
    for sentence in text.split_inclusive(['.', '!', '?']) {
        let n = word_count(sentence);
        if words + n > max_words {
            break;
        }
        kept.push_str(sentence);
        words += n;
    }
    if words > 0 {
        return kept.trim().to_string();
    }
    text.split_whitespace()
        .take(max_words)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condense_prompt_carries_budget_hint_and_strictness() {
        let t = condense_turns(
            "Sam likes tea. Sam's sister is Ana.",
            Some("family"),
            80,
            false,
        );
        assert_eq!(
            t[0].content,
            "You condense a companion's memory notes about the user. Keep concrete facts (names, dates, preferences, plans, relationships); drop small talk. Write plain sentences. Use at most 80 words. Most important to keep: family."
        );
        assert_eq!(
            t[1].content,
            "Notes:\nSam likes tea. Sam's sister is Ana.\n\nCondensed notes:"
        );
        let strict = condense_turns("x", None, 10, true);
        assert!(strict[0]
            .content
            .ends_with("no more than 10, fewer is fine."));
        assert!(!strict[0].content.contains("Most important"));
    }

    #[test]
    fn cut_keeps_whole_sentences_within_the_limit() {
        let text = "Sam likes tea. Sam works nights at the clinic! Her sister Ana lives in Lyon.";
        assert_eq!(word_count(text), 15);
        assert_eq!(
            cut_to_words(text, 11),
            "Sam likes tea. Sam works nights at the clinic!"
        );
        assert_eq!(cut_to_words(text, 15), text);
        assert_eq!(cut_to_words("one two three four five", 3), "one two three");
        assert!(word_count(&cut_to_words(text, 2)) <= 2);
    }
}
