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

/// Words a hint topic also covers, so "family" finds a sister and "pets"
/// a cat. Lexical, and deliberately small: a first pass before the model.
const TOPIC_WORDS: &[(&str, &[&str])] = &[
    (
        "family",
        &[
            "sister",
            "brother",
            "mother",
            "father",
            "mom",
            "dad",
            "mum",
            "parent",
            "wife",
            "husband",
            "son",
            "daughter",
            "aunt",
            "uncle",
            "cousin",
            "grandma",
            "grandpa",
            "grandmother",
            "grandfather",
            "family",
        ],
    ),
    (
        "pet",
        &[
            "cat", "dog", "kitten", "puppy", "hamster", "parrot", "rabbit", "bird", "fish", "pet",
        ],
    ),
    (
        "allerg",
        &["allergic", "allergy", "allergies", "intolerant"],
    ),
    ("birthday", &["birthday", "born", "birth"]),
    (
        "work",
        &[
            "job",
            "works",
            "work",
            "office",
            "boss",
            "colleague",
            "shift",
            "career",
        ],
    ),
    (
        "health",
        &[
            "doctor",
            "sick",
            "ill",
            "hospital",
            "medication",
            "allergic",
        ],
    ),
    (
        "food",
        &[
            "likes",
            "loves",
            "hates",
            "favorite",
            "favourite",
            "vegetarian",
            "vegan",
        ],
    ),
];

fn stem(word: &str) -> String {
    let w: String = word
        .chars()
        .filter(|c| c.is_alphanumeric())
        .collect::<String>()
        .to_lowercase();
    w.chars().take(5).collect()
}

/// The stems a hint asks for: its own words and the words of its topics.
fn hint_stems(hint: &str) -> Vec<String> {
    let mut stems = Vec::new();
    for w in hint
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 3)
    {
        let lw = w.to_lowercase();
        if matches!(
            lw.as_str(),
            "and" | "the" | "his" | "her" | "their" | "about"
        ) {
            continue;
        }
        stems.push(stem(&lw));
        for (topic, words) in TOPIC_WORDS {
            if lw.starts_with(topic) || topic.starts_with(&stem(&lw)) {
                stems.extend(words.iter().map(|w| stem(w)));
            }
        }
    }
    stems.sort();
    stems.dedup();
    stems
}

/// Names and numbers: capitalized words that do not open a sentence, and
/// words with digits. A condensed scratchpad should keep these.
pub fn fact_tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for sentence in text.split_inclusive(['.', '!', '?', '\n']) {
        for (i, w) in sentence.split_whitespace().enumerate() {
            let w = w.trim_matches(|c: char| !c.is_alphanumeric());
            let w = w.strip_suffix("'s").unwrap_or(w);
            let is_name = i > 0 && w.chars().next().is_some_and(char::is_uppercase) && w.len() > 1;
            if (is_name || w.chars().any(|c| c.is_ascii_digit())) && !out.iter().any(|o| o == w) {
                out.push(w.to_string());
            }
        }
    }
    out
}

/// The sentences that matter most, within `max_words`, in their original
/// order: scored by the hint (its words and topics) and by names and numbers;
/// repeated sentences counted once; small talk (no hint, no fact) left out.
pub fn select_sentences(text: &str, hint: Option<&str>, max_words: usize) -> String {
    let stems = hint.map(hint_stems).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let sentences: Vec<&str> = text
        .split_inclusive(['.', '!', '?', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty() && seen.insert(s.to_lowercase()))
        .collect();
    // A hint word found in most sentences (the user's own name) tells
    // nothing apart.
    let stems: Vec<String> = stems
        .into_iter()
        .filter(|st| {
            let df = sentences
                .iter()
                .filter(|s| s.split_whitespace().any(|w| stem(w) == *st))
                .count();
            df * 2 <= sentences.len()
        })
        .collect();
    let mut scored: Vec<(usize, usize)> = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let hint_hits = s
                .split_whitespace()
                .filter(|w| stems.contains(&stem(w)))
                .count();
            (i, 3 * hint_hits + fact_tokens(s).len())
        })
        .filter(|(_, score)| *score > 0)
        .collect();
    scored.sort_by_key(|(i, score)| (std::cmp::Reverse(*score), *i));
    let mut chosen = Vec::new();
    let mut words = 0;
    for (i, _) in scored {
        let n = word_count(sentences[i]);
        if words + n <= max_words {
            words += n;
            chosen.push(i);
        }
    }
    chosen.sort();
    chosen
        .iter()
        .map(|&i| sentences[i])
        .collect::<Vec<_>>()
        .join(" ")
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

    const NOTES: &str = "They chatted about the rain again. Sam's younger sister is named Ana. \
        They chatted about the rain again. Sam is allergic to peanuts. The bus was late. \
        Sam's birthday is on March 3. Sam adopted a grey cat named Pixel. They joked about a video.";

    #[test]
    fn facts_are_names_and_numbers_not_sentence_openers() {
        assert_eq!(fact_tokens(NOTES), ["Ana", "March", "3", "Pixel"]);
    }

    #[test]
    fn selection_keeps_hinted_facts_in_order_and_drops_small_talk() {
        let picked = select_sentences(
            NOTES,
            Some("Sam's family, allergies, birthday and pets"),
            40,
        );
        assert_eq!(
            picked,
            "Sam's younger sister is named Ana. Sam is allergic to peanuts. Sam's birthday is on March 3. Sam adopted a grey cat named Pixel."
        );
        // A tight budget keeps the highest scores.
        let tight = select_sentences(NOTES, Some("pets"), 8);
        assert_eq!(tight, "Sam adopted a grey cat named Pixel.");
        assert!(word_count(&select_sentences(NOTES, None, 10)) <= 10);
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
