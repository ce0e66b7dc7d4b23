//! Rules on a reply's text that every chat path shares: where the last
//! whole sentence ends, where a stop sequence begins, how much of a tail
//! must wait because it may become one, and the special-token text that
//! must never reach a client.

/// Characters that end a sentence (Latin, CJK full-width, ellipsis).
const SENTENCE_END: &[char] = &['.', '!', '?', '…', '。', '！', '？', '‼', '⁉'];
/// What may follow a sentence end and still belong to it.
const CLOSERS: &[char] = &['"', '\'', '”', '’', ')', ']', '»', '」', '』', '*', '~'];

/// Whether `c` is an emoji (or a part of one: joiner, variation selector,
/// skin tone) — a run of them ends a chat sentence.
fn is_emoji(c: char) -> bool {
    matches!(c as u32,
        0x1F300..=0x1FAFF | 0x2600..=0x27BF | 0x1F000..=0x1F2FF | 0x2B00..=0x2BFF
        | 0xFE0F | 0x200D | 0x2190..=0x21FF | 0x2300..=0x23FF)
}

/// Byte index just past the last complete sentence of `text` (after its
/// closing quotes), counting a closed `*action*` and an emoji run as ends;
/// None when no sentence is complete.
pub fn sentence_end(text: &str) -> Option<usize> {
    sentence_ends(text).last().copied()
}

/// The last sentence end that more text already follows (an end at the
/// very end of a text still being written may turn out not to be one).
pub fn settled_sentence_end(text: &str) -> Option<usize> {
    sentence_ends(text)
        .into_iter()
        .rev()
        .find(|&e| e < text.len())
}

/// Byte index just past the first complete sentence of `text`.
pub fn first_sentence_end(text: &str) -> Option<usize> {
    sentence_ends(text).first().copied()
}

/// Where each complete sentence of `text` ends, in order.
fn sentence_ends(text: &str) -> Vec<usize> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut ends = Vec::new();
    let mut stars = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let (_, c) = chars[i];
        if c == '*' {
            stars += 1;
            if stars.is_multiple_of(2) {
                // A closed *action*.
                ends.push(chars[i].0 + c.len_utf8());
            }
            i += 1;
            continue;
        }
        if SENTENCE_END.contains(&c) || is_emoji(c) {
            let emoji = is_emoji(c);
            let mut j = i + 1;
            // The rest of the run ("?!", "...", an emoji sequence), then closers.
            while j < chars.len()
                && (SENTENCE_END.contains(&chars[j].1) || (emoji && is_emoji(chars[j].1)))
            {
                j += 1;
            }
            while j < chars.len() && CLOSERS.contains(&chars[j].1) && chars[j].1 != '*' {
                j += 1;
            }
            // Full-width (CJK) ends need no space after them; a decimal
            // point inside a number is no end.
            let full_width = matches!(c, '。' | '！' | '？');
            let next_is_boundary =
                j == chars.len() || chars[j].1.is_whitespace() || emoji || full_width;
            let decimal = c == '.'
                && i > 0
                && chars[i - 1].1.is_ascii_digit()
                && j < chars.len()
                && chars[j].1.is_ascii_digit();
            if next_is_boundary && !decimal {
                ends.push(if j == chars.len() {
                    text.len()
                } else {
                    chars[j].0
                });
            }
            i = j;
            continue;
        }
        i += 1;
    }
    ends
}

/// `text` cut back to its last whole sentence when it has one (a reply the
/// token limit stopped); never to nothing. True when something was cut.
pub fn trim_to_sentence(text: &str) -> (String, bool) {
    match sentence_end(text) {
        Some(end) if end < text.trim_end().len() => (text[..end].trim_end().to_string(), true),
        _ => (text.to_string(), false),
    }
}

/// Where the first of `stops` begins in `text`.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// How many bytes at the end of `text` may be the start of one of `stops`
/// (they wait until the next token says).
pub fn stop_hold(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(|k| s.is_char_boundary(*k))
                .map(move |k| &s[..k])
        })
        .filter(|prefix| text.ends_with(prefix))
        .map(|p| p.len())
        .max()
        .unwrap_or(0)
}

/// The first sentence, lower-cased, without punctuation (for comparing).
fn first_sentence(text: &str) -> String {
    let end = first_sentence_end(text).unwrap_or(text.len());
    let first = &text[..end.min(text.len())];
    first
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace())
        .collect::<String>()
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn words(text: &str) -> std::collections::HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// Whether two options are near-duplicates: the same first sentence, or
/// more than 80 % of their words in common (Jaccard).
pub fn near_duplicate(a: &str, b: &str) -> bool {
    let (fa, fb) = (first_sentence(a), first_sentence(b));
    if !fa.is_empty() && fa == fb {
        return true;
    }
    let (wa, wb) = (words(a), words(b));
    if wa.is_empty() || wb.is_empty() {
        return a.trim() == b.trim();
    }
    let common = wa.intersection(&wb).count() as f64;
    common / wa.union(&wb).count() as f64 > 0.8
}

/// The default phrases that break a companion's character.
pub const DEFAULT_REJECT_PHRASES: &[&str] = &[
    "as an ai",
    "as a language model",
    "i'm just a chatbot",
    "i am just a chatbot",
    "i'm an ai",
    "i am an ai",
    "i'm a language model",
    "i am a language model",
    "as an artificial intelligence",
    "i'm just an ai",
    "i don't have personal feelings",
    "i do not have personal feelings",
];

/// Special-token markup of the common chat formats, which a reply must
/// never carry: generation stops before any of it.
pub const SPECIAL_TOKEN_STOPS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<end_of_turn>",
    "<start_of_turn>",
    "</s>",
    "[INST]",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(t: &str) -> String {
        trim_to_sentence(t).0
    }

    #[test]
    fn trims_to_the_last_whole_sentence() {
        assert_eq!(
            cut("I'd love that. No worries if you want to"),
            "I'd love that."
        );
        assert_eq!(cut("Really?! Then let's go and"), "Really?!");
        assert_eq!(
            cut("She said \"Come here.\" and then she"),
            "She said \"Come here.\""
        );
        assert_eq!(cut("Well... maybe. I think we"), "Well... maybe.");
        assert_eq!(cut("Sure thing 😊 let me"), "Sure thing 😊");
        assert_eq!(
            cut("*smiles softly* I was just about to"),
            "*smiles softly*"
        );
        assert_eq!(cut("好的。我们走吧，然后"), "好的。");
        assert_eq!(cut("¿Vamos? ¡Claro! Y luego"), "¿Vamos? ¡Claro!");
        assert_eq!(
            cut("It costs 3.50 dollars and"),
            "It costs 3.50 dollars and",
            "no sentence: kept whole"
        );
        assert_eq!(cut("Done."), "Done.");
        assert_eq!(cut(""), "");
        assert!(!trim_to_sentence("All good!").1);
        assert!(trim_to_sentence("All good! And").1);
        assert_eq!(settled_sentence_end("Nice scenery..."), None);
        assert_eq!(settled_sentence_end("Nice. Scenery..."), Some(5));
    }

    #[test]
    fn near_duplicates_and_what_to_resample() {
        assert!(near_duplicate(
            "Hi there! How are you?",
            "Hi there! What a day."
        ));
        assert!(near_duplicate(
            "I love the stars at night",
            "I love the stars at night too"
        ));
        assert!(!near_duplicate(
            "Let's go to the beach.",
            "How about a movie instead?"
        ));
    }

    #[test]
    fn stop_sequences_and_their_prefixes() {
        let stops = vec!["\nUser:".to_string(), "<|im_start|>".to_string()];
        assert_eq!(find_stop("Hi there!\nUser: hey", &stops), Some(9));
        assert_eq!(find_stop("Hi there! <|im_start|>user", &stops), Some(10));
        assert_eq!(find_stop("Hi there!", &stops), None);
        assert_eq!(stop_hold("Hi there!\nUs", &stops), 3);
        assert_eq!(stop_hold("Hi there! <|im", &stops), 4);
        assert_eq!(stop_hold("Hi there!", &stops), 0);
    }
}
