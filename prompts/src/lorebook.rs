//! Lorebooks (Character Card V2/V3 `character_book`, and the platform's
//! lorebooks): which entries fire for the recent messages, and where they go.
//!
//! Rules, as SillyTavern's World Info applies them: primary keys (plain,
//! case-(in)sensitive, whole-word, or `/regex/flags`), secondary keys with a
//! selective logic (AND ANY, AND ALL, NOT ANY, NOT ALL), constant entries,
//! the enabled flag, a scan depth (how many recent messages are read),
//! recursive activation (an activated entry's text can activate others, up
//! to a limit), a token budget for all activated entries (lowest priority
//! dropped first), and the insertion order within each position.

use regex::{Regex, RegexBuilder};
use serde::Deserialize;
use serde_json::Value;

use crate::budget::TokenCounter;

/// Where an entry's text goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    BeforeCharacter,
    AfterCharacter,
    /// Among the chat history, this many messages from the end.
    AtDepth(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectiveLogic {
    AndAny,
    AndAll,
    NotAny,
    NotAll,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoreEntry {
    pub id: String,
    pub name: String,
    pub keys: Vec<String>,
    pub secondary_keys: Vec<String>,
    pub selective: bool,
    pub logic: SelectiveLogic,
    pub content: String,
    pub enabled: bool,
    pub constant: bool,
    pub case_sensitive: bool,
    pub whole_words: bool,
    pub use_regex: bool,
    pub insertion_order: i64,
    pub priority: i64,
    pub position: Position,
    /// Overrides the book's scan depth.
    pub scan_depth: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Lorebook {
    pub name: String,
    pub scan_depth: usize,
    pub token_budget: usize,
    pub recursive_scanning: bool,
    pub max_recursion: usize,
    /// Keys are compiled at the first scan; change entries before scanning.
    pub entries: Vec<LoreEntry>,
    compiled: std::sync::OnceLock<std::sync::Arc<Vec<CompiledEntry>>>,
}

impl PartialEq for Lorebook {
    fn eq(&self, other: &Self) -> bool {
        (
            self.name.as_str(),
            self.scan_depth,
            self.token_budget,
            self.recursive_scanning,
            self.max_recursion,
        ) == (
            other.name.as_str(),
            other.scan_depth,
            other.token_budget,
            other.recursive_scanning,
            other.max_recursion,
        ) && self.entries == other.entries
    }
}

/// `character_book` as cards carry it (V2 fields, V3 additions, SillyTavern's
/// extensions).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LorebookWire {
    pub name: Option<String>,
    pub scan_depth: Option<usize>,
    pub token_budget: Option<usize>,
    pub recursive_scanning: Option<bool>,
    pub entries: Vec<EntryWire>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct EntryWire {
    pub id: Option<Value>,
    pub name: Option<String>,
    pub comment: Option<String>,
    pub keys: Vec<String>,
    pub secondary_keys: Vec<String>,
    pub selective: Option<bool>,
    pub selective_logic: Option<Value>,
    pub content: String,
    pub enabled: Option<bool>,
    pub constant: Option<bool>,
    pub case_sensitive: Option<bool>,
    pub use_regex: Option<bool>,
    pub insertion_order: Option<i64>,
    pub priority: Option<i64>,
    pub position: Option<String>,
    pub depth: Option<usize>,
    pub scan_depth: Option<usize>,
    pub extensions: serde_json::Map<String, Value>,
}

pub const DEFAULT_SCAN_DEPTH: usize = 4;
pub const DEFAULT_TOKEN_BUDGET: usize = 512;
pub const DEFAULT_MAX_RECURSION: usize = 3;

fn logic_from(v: Option<&Value>) -> SelectiveLogic {
    match v {
        Some(Value::Number(n)) => match n.as_i64() {
            Some(1) => SelectiveLogic::NotAll,
            Some(2) => SelectiveLogic::NotAny,
            Some(3) => SelectiveLogic::AndAll,
            _ => SelectiveLogic::AndAny,
        },
        Some(Value::String(s)) => match s.to_lowercase().replace([' ', '_'], "").as_str() {
            "andall" => SelectiveLogic::AndAll,
            "notany" => SelectiveLogic::NotAny,
            "notall" => SelectiveLogic::NotAll,
            _ => SelectiveLogic::AndAny,
        },
        _ => SelectiveLogic::AndAny,
    }
}

impl From<LorebookWire> for Lorebook {
    fn from(w: LorebookWire) -> Self {
        let entries = w
            .entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let ext = &e.extensions;
                let depth = e
                    .depth
                    .or_else(|| ext.get("depth").and_then(Value::as_u64).map(|d| d as usize));
                // SillyTavern: extensions.position 4 is "at depth".
                let st_position = ext.get("position").and_then(Value::as_i64);
                let position = match (e.position.as_deref(), st_position) {
                    (Some("at_depth"), _) | (_, Some(4)) => {
                        Position::AtDepth(depth.unwrap_or(DEFAULT_SCAN_DEPTH))
                    }
                    (Some("after_char"), _) | (None, Some(1)) => Position::AfterCharacter,
                    _ => Position::BeforeCharacter,
                };
                let ext_bool = |k: &str| ext.get(k).and_then(Value::as_bool);
                LoreEntry {
                    id: e
                        .id
                        .map(|v| v.to_string().trim_matches('"').to_string())
                        .unwrap_or_else(|| i.to_string()),
                    name: e.name.or(e.comment).unwrap_or_default(),
                    selective: e.selective.unwrap_or(!e.secondary_keys.is_empty()),
                    logic: logic_from(
                        e.selective_logic
                            .as_ref()
                            .or_else(|| ext.get("selectiveLogic")),
                    ),
                    keys: e.keys,
                    secondary_keys: e.secondary_keys,
                    content: e.content,
                    enabled: e.enabled.unwrap_or(true),
                    constant: e.constant.unwrap_or(false),
                    case_sensitive: e
                        .case_sensitive
                        .or_else(|| ext_bool("case_sensitive"))
                        .unwrap_or(false),
                    whole_words: ext_bool("match_whole_words").unwrap_or(false),
                    use_regex: e.use_regex.unwrap_or(false),
                    insertion_order: e.insertion_order.unwrap_or(100),
                    priority: e.priority.unwrap_or(10),
                    position,
                    scan_depth: e.scan_depth.or_else(|| {
                        ext.get("scan_depth")
                            .and_then(Value::as_u64)
                            .map(|d| d as usize)
                    }),
                }
            })
            .collect();
        Lorebook {
            name: w.name.unwrap_or_default(),
            scan_depth: w.scan_depth.unwrap_or(DEFAULT_SCAN_DEPTH),
            token_budget: w.token_budget.unwrap_or(DEFAULT_TOKEN_BUDGET),
            recursive_scanning: w.recursive_scanning.unwrap_or(false),
            max_recursion: DEFAULT_MAX_RECURSION,
            entries,
            compiled: Default::default(),
        }
    }
}

/// An entry that fired, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivatedEntry {
    pub id: String,
    pub name: String,
    pub content: String,
    pub position: Position,
    pub insertion_order: i64,
    pub priority: i64,
    pub reason: String,
}

/// What a scan decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Activation {
    /// In insertion order.
    pub entries: Vec<ActivatedEntry>,
    /// Entries that fired but did not fit the token budget.
    pub dropped_for_budget: Vec<String>,
}

/// A compiled key: `/pattern/flags` (or any key of a `use_regex` entry) is a
/// regex; other keys are plain text, compared case-(in)sensitively and, if
/// asked, as whole words. Plain keys need no regex, which keeps a scan of many
/// entries fast.
#[derive(Debug)]
enum Matcher {
    Plain {
        needle: String,
        case_sensitive: bool,
        whole_words: bool,
    },
    Regex(Regex),
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

impl Matcher {
    fn new(key: &str, entry: &LoreEntry) -> Option<Self> {
        let key = key.trim();
        if key.is_empty() {
            return None;
        }
        if let Some(body) = key.strip_prefix('/') {
            if let Some(end) = body.rfind('/') {
                let (pattern, flags) = (&body[..end], &body[end + 1..]);
                return RegexBuilder::new(pattern)
                    .case_insensitive(flags.contains('i'))
                    .multi_line(flags.contains('m'))
                    .dot_matches_new_line(flags.contains('s'))
                    .size_limit(1 << 20)
                    .build()
                    .ok()
                    .map(Matcher::Regex);
            }
        }
        if entry.use_regex {
            return RegexBuilder::new(key)
                .case_insensitive(!entry.case_sensitive)
                .size_limit(1 << 20)
                .build()
                .ok()
                .map(Matcher::Regex);
        }
        Some(Matcher::Plain {
            needle: if entry.case_sensitive {
                key.to_string()
            } else {
                key.to_lowercase()
            },
            case_sensitive: entry.case_sensitive,
            whole_words: entry.whole_words,
        })
    }

    /// `lower` is `text` lowercased (computed once per scan).
    fn is_match(&self, text: &str, lower: &str) -> bool {
        match self {
            Matcher::Regex(r) => r.is_match(text),
            Matcher::Plain {
                needle,
                case_sensitive,
                whole_words,
            } => {
                let hay = if *case_sensitive { text } else { lower };
                if !whole_words {
                    return hay.contains(needle.as_str());
                }
                hay.match_indices(needle.as_str()).any(|(i, m)| {
                    let before = hay[..i].chars().next_back();
                    let after = hay[i + m.len()..].chars().next();
                    !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
                })
            }
        }
    }
}

/// An entry's keys, compiled once per scan.
#[derive(Debug)]
struct CompiledEntry {
    keys: Vec<(String, Matcher)>,
    secondary: Vec<Matcher>,
}

impl CompiledEntry {
    fn new(e: &LoreEntry) -> Self {
        Self {
            keys: e
                .keys
                .iter()
                .filter_map(|k| Matcher::new(k, e).map(|m| (k.clone(), m)))
                .collect(),
            secondary: e
                .secondary_keys
                .iter()
                .filter_map(|k| Matcher::new(k, e))
                .collect(),
        }
    }

    fn fires(&self, entry: &LoreEntry, text: &str, lower: &str) -> Option<String> {
        if entry.constant {
            return Some("constant".into());
        }
        let (key, _) = self.keys.iter().find(|(_, m)| m.is_match(text, lower))?;
        if !entry.selective || self.secondary.is_empty() {
            return Some(format!("key {key:?}"));
        }
        let hits: Vec<bool> = self
            .secondary
            .iter()
            .map(|m| m.is_match(text, lower))
            .collect();
        let (any, all) = (hits.iter().any(|h| *h), hits.iter().all(|h| *h));
        let (ok, logic) = match entry.logic {
            SelectiveLogic::AndAny => (any, "AND ANY"),
            SelectiveLogic::AndAll => (all, "AND ALL"),
            SelectiveLogic::NotAny => (!any, "NOT ANY"),
            SelectiveLogic::NotAll => (!all, "NOT ALL"),
        };
        ok.then(|| format!("key {key:?}, secondary keys {logic}"))
    }
}

impl Lorebook {
    /// Scans `recent` (oldest first; the last `scan_depth` are read) and
    /// returns the entries that fire, within the token budget.
    pub fn activate(&self, recent: &[&str], counter: &dyn TokenCounter) -> Activation {
        let compiled = self
            .compiled
            .get_or_init(|| {
                std::sync::Arc::new(self.entries.iter().map(CompiledEntry::new).collect())
            })
            .clone();
        let window = |depth: usize| recent[recent.len().saturating_sub(depth)..].join("\n");
        // Scan texts by depth, lowercased once.
        let mut windows: std::collections::HashMap<usize, (String, String)> =
            std::collections::HashMap::new();
        let mut fired: Vec<(usize, String)> = Vec::new();
        let mut extra = String::new();
        let passes = if self.recursive_scanning {
            1 + self.max_recursion
        } else {
            1
        };
        for pass in 0..passes {
            let before = fired.len();
            let mut added = String::new();
            for (i, e) in self.entries.iter().enumerate() {
                if !e.enabled || fired.iter().any(|(j, _)| *j == i) {
                    continue;
                }
                let depth = e.scan_depth.unwrap_or(self.scan_depth);
                let (text, lower) = windows.entry(depth).or_insert_with(|| {
                    let t = format!("{}\n{extra}", window(depth));
                    let l = t.to_lowercase();
                    (t, l)
                });
                if let Some(reason) = compiled[i].fires(e, text, lower) {
                    let reason = if pass > 0 {
                        format!("{reason} (recursion {pass})")
                    } else {
                        reason
                    };
                    fired.push((i, reason));
                    added.push('\n');
                    added.push_str(&e.content);
                }
            }
            if fired.len() == before {
                break;
            }
            extra.push_str(&added);
            // The next pass also reads what this one activated.
            windows.clear();
        }
        // Budget: keep the highest priority first (then the earlier order).
        let mut by_priority = fired.clone();
        by_priority.sort_by_key(|(i, _)| {
            (
                -self.entries[*i].priority,
                self.entries[*i].insertion_order,
                *i,
            )
        });
        let mut used = 0;
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for (i, reason) in by_priority {
            let e = &self.entries[i];
            let cost = counter.count(&e.content);
            if used + cost <= self.token_budget {
                used += cost;
                kept.push((i, reason));
            } else {
                dropped.push(e.id.clone());
            }
        }
        kept.sort_by_key(|(i, _)| (self.entries[*i].insertion_order, *i));
        Activation {
            entries: kept
                .into_iter()
                .map(|(i, reason)| {
                    let e = &self.entries[i];
                    ActivatedEntry {
                        id: e.id.clone(),
                        name: e.name.clone(),
                        content: e.content.clone(),
                        position: e.position,
                        insertion_order: e.insertion_order,
                        priority: e.priority,
                        reason,
                    }
                })
                .collect(),
            dropped_for_budget: dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::WordCounter;
    use serde_json::json;

    fn book(entries: Value) -> Lorebook {
        serde_json::from_value::<LorebookWire>(
            json!({"scan_depth": 2, "token_budget": 100, "entries": entries}),
        )
        .unwrap()
        .into()
    }

    fn ids(b: &Lorebook, recent: &[&str]) -> Vec<String> {
        b.activate(recent, &WordCounter)
            .entries
            .into_iter()
            .map(|e| e.id)
            .collect()
    }

    #[test]
    fn primary_keys_fire_case_insensitively_by_default() {
        let b = book(json!([
            {"id": "cafe", "keys": ["Cafe"], "content": "The cafe is on Elm Street."},
            {"id": "cs", "keys": ["Moon"], "case_sensitive": true, "content": "Luna loves the moon."}
        ]));
        assert_eq!(
            ids(&b, &["let's meet at the CAFE", "look at the moon"]),
            ["cafe"]
        );
        assert_eq!(ids(&b, &["the Moon is full"]), ["cs"]);
    }

    #[test]
    fn whole_words_and_regex_keys() {
        let b = book(json!([
            {"id": "cat", "keys": ["cat"], "extensions": {"match_whole_words": true}, "content": "Luna has a cat."},
            {"id": "re", "keys": ["/stars?|galax(y|ies)/i"], "content": "Luna owns a telescope."}
        ]));
        assert_eq!(ids(&b, &["concatenate this"]), Vec::<String>::new());
        assert_eq!(ids(&b, &["my cat sleeps"]), ["cat"]);
        assert_eq!(ids(&b, &["So many GALAXIES"]), ["re"]);
    }

    #[test]
    fn secondary_keys_follow_the_selective_logic() {
        let entry = |logic: &str| {
            book(
                json!([{"id": logic, "keys": ["dinner"], "secondary_keys": ["pizza", "pasta"],
                         "selective": true, "selective_logic": logic, "content": "x"}]),
            )
        };
        let text = ["dinner with pizza"];
        assert_eq!(ids(&entry("AND ANY"), &text), ["AND ANY"]);
        assert!(ids(&entry("AND ALL"), &text).is_empty());
        assert_eq!(
            ids(&entry("AND ALL"), &["dinner: pizza, pasta"]),
            ["AND ALL"]
        );
        assert!(ids(&entry("NOT ANY"), &text).is_empty());
        assert_eq!(ids(&entry("NOT ANY"), &["dinner at eight"]), ["NOT ANY"]);
        assert_eq!(ids(&entry("NOT ALL"), &text), ["NOT ALL"]);
        assert!(ids(&entry("NOT ALL"), &["dinner: pizza, pasta"]).is_empty());
        // SillyTavern's numeric form in extensions: 3 = AND ALL.
        let st = book(
            json!([{"id": "st", "keys": ["dinner"], "secondary_keys": ["pizza", "pasta"],
                              "selective": true, "extensions": {"selectiveLogic": 3}, "content": "x"}]),
        );
        assert!(ids(&st, &text).is_empty());
    }

    #[test]
    fn constant_and_disabled_entries() {
        let b = book(json!([
            {"id": "always", "keys": [], "constant": true, "content": "Luna is 25."},
            {"id": "off", "keys": ["cafe"], "enabled": false, "content": "x"}
        ]));
        assert_eq!(ids(&b, &["the cafe"]), ["always"]);
        assert_eq!(b.activate(&[], &WordCounter).entries[0].reason, "constant");
    }

    #[test]
    fn scan_depth_limits_what_is_read() {
        let b = book(json!([
            {"id": "old", "keys": ["volcano"], "content": "x"},
            {"id": "deep", "keys": ["volcano"], "scan_depth": 3, "content": "y"}
        ]));
        // Book depth 2: the first of three messages is not read.
        assert_eq!(ids(&b, &["a volcano!", "hi", "ok"]), ["deep"]);
    }

    #[test]
    fn recursion_activates_entries_named_by_activated_text_up_to_the_limit() {
        let mut b = book(json!([
            {"id": "a", "keys": ["cafe"], "content": "The cafe belongs to Marco.", "insertion_order": 1},
            {"id": "b", "keys": ["Marco"], "content": "Marco is Luna's uncle from Naples.", "insertion_order": 2},
            {"id": "c", "keys": ["Naples"], "content": "Naples is by the sea.", "insertion_order": 3}
        ]));
        assert_eq!(ids(&b, &["the cafe"]), ["a"], "no recursion unless asked");
        b.recursive_scanning = true;
        assert_eq!(ids(&b, &["the cafe"]), ["a", "b", "c"]);
        b.max_recursion = 1;
        let act = b.activate(&["the cafe"], &WordCounter);
        assert_eq!(
            act.entries
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(act.entries[1].reason, "key \"Marco\" (recursion 1)");
    }

    #[test]
    fn budget_drops_lowest_priority_and_output_keeps_insertion_order() {
        let mut b = book(json!([
            {"id": "low", "keys": ["tea"], "priority": 1, "insertion_order": 1, "content": "one two three four"},
            {"id": "high", "keys": ["tea"], "priority": 9, "insertion_order": 3, "content": "five six seven"},
            {"id": "mid", "keys": ["tea"], "priority": 5, "insertion_order": 2, "content": "eight nine"}
        ]));
        b.token_budget = 5;
        let act = b.activate(&["tea time"], &WordCounter);
        assert_eq!(
            act.entries
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>(),
            ["mid", "high"]
        );
        assert_eq!(act.dropped_for_budget, ["low"]);
    }

    #[test]
    fn positions_from_v2_strings_and_sillytavern_depth() {
        let b = book(json!([
            {"id": "a", "keys": ["x"], "position": "after_char", "content": "a"},
            {"id": "d", "keys": ["x"], "extensions": {"position": 4, "depth": 2}, "content": "d"},
            {"id": "b", "keys": ["x"], "content": "b"}
        ]));
        let pos: Vec<Position> = b
            .activate(&["x"], &WordCounter)
            .entries
            .iter()
            .map(|e| e.position)
            .collect();
        assert_eq!(
            pos,
            [
                Position::AfterCharacter,
                Position::AtDepth(2),
                Position::BeforeCharacter
            ]
        );
    }
}
