//! The whole chat prompt, in order: the system block (system prompt, persona,
//! lorebook entries before the character, description, personality,
//! scenario, entries after the character), example dialogue, the memory
//! scratchpad, the chat history (opened by the greeting in a new chat) with
//! lorebook entries at their depth, and the post-history instructions last —
//! fitted to the token budget, with a report of what went in and why.

use chrono::{DateTime, FixedOffset};

use crate::budget::{keep_newest, TokenCounter};
use crate::lorebook::{ActivatedEntry, Lorebook, Position};
use crate::macros::{expand_macros, Gender, MacroContext};
use crate::{ChatTurn, HistoryMessage, PromptError, RenderedCharacter, Role};

/// The user's persona (seed 000 "persona").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Persona {
    pub name: String,
    pub gender: Gender,
    pub description: String,
}

/// Used when the card has no system prompt of its own.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are {{char}}, a companion chatting with {{user}}. \
Stay in character and answer {{user}}'s last message in one or two short sentences.";

/// Closes each example conversation (as SillyTavern does).
const NEW_CHAT_MARKER: &str = "[Start a new chat]";

/// Tokens a chat template adds around each turn (role markers).
const TURN_OVERHEAD: usize = 4;

pub struct PromptParts<'a> {
    pub character: &'a RenderedCharacter,
    pub persona: Option<&'a Persona>,
    pub memory: Option<&'a str>,
    /// Oldest first; the job's new messages last.
    pub history: &'a [HistoryMessage],
    /// The platform's lorebooks (`lorebook_ids`), besides the card's own.
    pub lorebooks: &'a [Lorebook],
    /// `None`: [`DEFAULT_SYSTEM_PROMPT`].
    pub default_system_prompt: Option<&'a str>,
    /// No earlier conversation: the greeting opens the chat.
    pub new_chat: bool,
    pub clock: DateTime<FixedOffset>,
    pub seed: u64,
    /// Context length minus the reply's max tokens.
    pub budget: usize,
}

/// One part of the prompt and what happened to it.
#[derive(Debug, Clone, PartialEq)]
pub struct PartReport {
    pub part: String,
    pub tokens: usize,
    pub included: bool,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptReport {
    pub parts: Vec<PartReport>,
    pub lore_fired: Vec<ActivatedEntry>,
    pub lore_dropped_for_budget: Vec<String>,
    pub tokens: usize,
    pub budget: usize,
}

impl PromptReport {
    /// Human-readable lines for `worker render-prompt --explain`.
    pub fn explain(&self) -> String {
        let mut out = format!("prompt: {} of {} budget tokens\n", self.tokens, self.budget);
        for p in &self.parts {
            let mark = if p.included { "+" } else { "-" };
            out.push_str(&format!(
                "{mark} {:<28} {:>5} tokens  {}\n",
                p.part, p.tokens, p.note
            ));
        }
        for e in &self.lore_fired {
            out.push_str(&format!(
                "lore fired: {} ({}) at {:?}: {}\n",
                e.id, e.name, e.position, e.reason
            ));
        }
        for id in &self.lore_dropped_for_budget {
            out.push_str(&format!("lore dropped for the lorebook budget: {id}\n"));
        }
        out
    }
}

fn turn(role: Role, content: impl Into<String>) -> ChatTurn {
    ChatTurn {
        role,
        content: content.into(),
    }
}

/// Example dialogue: blocks split on `<START>`, lines `{{user}}: ...` and
/// `{{char}}: ...` (continuation lines join the previous turn).
fn example_blocks(raw: &str, ctx: &MacroContext) -> Vec<Vec<ChatTurn>> {
    let mut blocks = Vec::new();
    for block in raw.split("<START>").flat_map(|b| b.split("<start>")) {
        let mut turns: Vec<ChatTurn> = Vec::new();
        for line in block.lines() {
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continue;
            }
            let lower = trimmed.to_lowercase();
            let (role, text) = if lower.starts_with("{{user}}:") {
                (Some(Role::User), &trimmed[9..])
            } else if lower.starts_with("{{char}}:") {
                (Some(Role::Assistant), &trimmed[9..])
            } else {
                (None, trimmed)
            };
            let text = expand_macros(text.trim(), ctx);
            match (role, turns.last_mut()) {
                (Some(r), _) => turns.push(turn(r, text)),
                (None, Some(last)) => {
                    last.content.push('\n');
                    last.content.push_str(&text);
                }
                (None, None) => turns.push(turn(Role::Assistant, text)),
            }
        }
        if !turns.is_empty() {
            blocks.push(turns);
        }
    }
    blocks
}

fn cost(counter: &dyn TokenCounter, turns: &[ChatTurn]) -> usize {
    turns
        .iter()
        .map(|t| counter.count(&t.content) + TURN_OVERHEAD)
        .sum()
}

/// Merges consecutive turns of one role (many templates demand alternation).
fn merge_same_role(turns: Vec<ChatTurn>) -> Vec<ChatTurn> {
    let mut out: Vec<ChatTurn> = Vec::with_capacity(turns.len());
    for t in turns {
        match out.last_mut() {
            Some(last) if last.role == t.role && t.role != Role::System => {
                last.content.push('\n');
                last.content.push_str(&t.content);
            }
            _ => out.push(t),
        }
    }
    out
}

/// Builds the chat turns and the report.
pub fn assemble(
    parts: &PromptParts<'_>,
    counter: &dyn TokenCounter,
) -> Result<(Vec<ChatTurn>, PromptReport), PromptError> {
    let c = parts.character;
    let persona = parts.persona.cloned().unwrap_or_default();
    let ctx = MacroContext {
        char_name: if c.name.is_empty() {
            "Assistant".into()
        } else {
            c.name.clone()
        },
        user_name: if persona.name.is_empty() {
            "User".into()
        } else {
            persona.name.clone()
        },
        persona: persona.description.clone(),
        scenario: c.scenario.clone(),
        personality: c.personality.clone(),
        user_gender: persona.gender,
        now: parts.clock,
        seed: parts.seed,
    };
    let x = |s: &str| expand_macros(s, &ctx);
    let mut report = PromptReport {
        budget: parts.budget,
        ..Default::default()
    };
    let mut note = |part: &str, tokens: usize, included: bool, n: &str| {
        report.parts.push(PartReport {
            part: part.into(),
            tokens,
            included,
            note: n.into(),
        });
    };

    // Lorebooks scan the recent history.
    let recent: Vec<&str> = parts.history.iter().map(|m| m.text.as_str()).collect();
    let mut fired: Vec<ActivatedEntry> = Vec::new();
    let mut lore_dropped = Vec::new();
    for book in c.lorebook.iter().chain(parts.lorebooks) {
        let act = book.activate(&recent, counter);
        fired.extend(act.entries);
        lore_dropped.extend(act.dropped_for_budget);
    }
    let lore_at = |pos: Position| -> Vec<String> {
        fired
            .iter()
            .filter(|e| e.position == pos)
            .map(|e| x(&e.content))
            .collect()
    };

    // The system block.
    let system_prompt = x(if !c.system_prompt.is_empty() {
        &c.system_prompt
    } else {
        parts.default_system_prompt.unwrap_or(DEFAULT_SYSTEM_PROMPT)
    });
    // The character is the speaker: a card's own system prompt that never
    // names it gets the name first.
    let system_prompt = if system_prompt.contains(&ctx.char_name) {
        system_prompt
    } else {
        format!("You are {}. {system_prompt}", ctx.char_name)
    };
    let mut system = vec![system_prompt];
    if !persona.description.is_empty() {
        system.push(x(&persona.description));
    }
    system.extend(lore_at(Position::BeforeCharacter));
    if !c.description.is_empty() {
        system.push(x(&c.description));
    }
    if !c.personality.is_empty() {
        system.push(format!(
            "{}'s personality: {}",
            ctx.char_name,
            x(&c.personality)
        ));
    }
    if !c.scenario.is_empty() {
        system.push(format!("Scenario: {}", x(&c.scenario)));
    }
    system.extend(lore_at(Position::AfterCharacter));
    let system_turn = turn(Role::System, system.join("\n\n"));
    let system_cost = cost(counter, std::slice::from_ref(&system_turn));
    note(
        "system block",
        system_cost,
        true,
        "system prompt, persona, character, scenario, lore before/after",
    );

    let memory_turn = parts
        .memory
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| {
            turn(
                Role::System,
                format!(
                    "What {} remembers about {}:\n{m}",
                    ctx.char_name, ctx.user_name
                ),
            )
        });
    let post_turn = (!c.post_history_instructions.is_empty())
        .then(|| turn(Role::System, x(&c.post_history_instructions)));

    // History, opened by the greeting in a new chat.
    let mut history: Vec<ChatTurn> = Vec::new();
    if parts.new_chat {
        let greetings: Vec<&String> = std::iter::once(&c.first_message)
            .chain(&c.alternate_greetings)
            .filter(|g| !g.is_empty())
            .collect();
        if !greetings.is_empty() {
            let g = greetings[(parts.seed % greetings.len() as u64) as usize];
            history.push(turn(Role::Assistant, x(g)));
            note(
                "greeting",
                counter.count(g),
                true,
                "a new chat opens with the character's greeting",
            );
        }
    }
    history.extend(
        parts
            .history
            .iter()
            .filter(|m| !m.text.trim().is_empty())
            .map(|m| turn(m.role, m.text.trim())),
    );
    let history = merge_same_role(history);
    if history.iter().all(|t| t.role != Role::User) {
        return Err(PromptError::EmptyConversation);
    }

    // Lorebook entries at a depth sit among the history; they are protected
    // with it as fixed costs.
    let depth_entries: Vec<(usize, ChatTurn)> = fired
        .iter()
        .filter_map(|e| match e.position {
            Position::AtDepth(d) => Some((d, turn(Role::System, x(&e.content)))),
            _ => None,
        })
        .collect();

    let fixed = system_cost
        + memory_turn
            .as_ref()
            .map_or(0, |t| cost(counter, std::slice::from_ref(t)))
        + post_turn
            .as_ref()
            .map_or(0, |t| cost(counter, std::slice::from_ref(t)))
        + depth_entries
            .iter()
            .map(|(_, t)| cost(counter, std::slice::from_ref(t)))
            .sum::<usize>();
    let history_costs: Vec<usize> = history
        .iter()
        .map(|t| cost(counter, std::slice::from_ref(t)))
        .collect();

    // Examples go first when the budget is short, last block first.
    let mut blocks = example_blocks(&c.example_dialogue, &ctx);
    let all_history: usize = history_costs.iter().sum();
    let separator = turn(Role::System, NEW_CHAT_MARKER);
    let separator_cost = cost(counter, std::slice::from_ref(&separator));
    let block_costs: Vec<usize> = blocks
        .iter()
        .map(|b| cost(counter, b) + separator_cost)
        .collect();
    let mut examples_cost: usize = block_costs.iter().sum();
    while !blocks.is_empty() && fixed + examples_cost + all_history > parts.budget {
        blocks.pop();
        examples_cost -= block_costs[blocks.len()];
        note(
            "example dialogue block",
            block_costs[blocks.len()],
            false,
            "dropped: the budget is short",
        );
    }
    for cost in &block_costs[..blocks.len()] {
        note("example dialogue block", *cost, true, "");
    }
    let start = keep_newest(fixed + examples_cost, &history_costs, parts.budget)?;
    if start > 0 {
        note(
            "older history",
            history_costs[..start].iter().sum(),
            false,
            &format!("{start} oldest turn(s) dropped for the budget"),
        );
    }
    note(
        "history",
        history_costs[start..].iter().sum(),
        true,
        &format!("{} turn(s)", history.len() - start),
    );
    if let Some(m) = &memory_turn {
        note(
            "memory scratchpad",
            cost(counter, std::slice::from_ref(m)),
            true,
            "",
        );
    }
    for (d, t) in &depth_entries {
        note(
            "lore at depth",
            cost(counter, std::slice::from_ref(t)),
            true,
            &format!("depth {d}"),
        );
    }
    if let Some(p) = &post_turn {
        note(
            "post-history instructions",
            cost(counter, std::slice::from_ref(p)),
            true,
            "",
        );
    }

    // Put it together.
    let mut turns = vec![system_turn];
    for block in blocks {
        turns.extend(block);
        turns.push(separator.clone());
    }
    if let Some(m) = memory_turn {
        turns.push(m);
    }
    let mut kept: Vec<ChatTurn> = history[start..].to_vec();
    let mut by_depth = depth_entries;
    by_depth.sort_by_key(|(d, _)| std::cmp::Reverse(*d));
    for (d, t) in by_depth {
        let at = kept.len().saturating_sub(d);
        kept.insert(at, t);
    }
    turns.extend(kept);
    if let Some(p) = post_turn {
        turns.push(p);
    }
    report.tokens = cost(counter, &turns);
    report.lore_fired = fired;
    report.lore_dropped_for_budget = lore_dropped;
    Ok((turns, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::WordCounter;
    use crate::lorebook::LorebookWire;
    use chrono::TimeZone;
    use serde_json::json;

    fn luna() -> RenderedCharacter {
        RenderedCharacter {
            name: "Luna".into(),
            description: "{{char}} is a barista.".into(),
            personality: "warm".into(),
            scenario: "{{user}} visits the cafe.".into(),
            system_prompt: String::new(),
            post_history_instructions: "Reply as {{char}} only.".into(),
            example_dialogue: "<START>\n{{user}}: Hi!\n{{char}}: Welcome in!\n<START>\n{{user}}: Coffee?\n{{char}}: Coming up.".into(),
            first_message: "Hey {{user}}, the usual?".into(),
            alternate_greetings: vec![],
            lorebook: None,
            max_new_tokens: None,
        }
    }

    fn msg(role: Role, text: &str) -> HistoryMessage {
        HistoryMessage {
            role,
            text: text.into(),
        }
    }

    fn parts<'a>(
        c: &'a RenderedCharacter,
        persona: Option<&'a Persona>,
        history: &'a [HistoryMessage],
        budget: usize,
    ) -> PromptParts<'a> {
        PromptParts {
            character: c,
            persona,
            memory: None,
            history,
            lorebooks: &[],
            default_system_prompt: None,
            new_chat: false,
            clock: FixedOffset::east_opt(0)
                .unwrap()
                .with_ymd_and_hms(2026, 11, 24, 9, 0, 0)
                .unwrap(),
            seed: 1,
            budget,
        }
    }

    fn sam() -> Persona {
        Persona {
            name: "Sam".into(),
            gender: Gender::Female,
            description: "{{user}} is a nurse; {{user_they}} works nights.".into(),
        }
    }

    #[test]
    fn a_card_system_prompt_without_the_name_gets_it_first() {
        let mut c = luna();
        c.system_prompt = "Be kind and brief.".into();
        let (turns, _) = assemble(
            &parts(&c, None, &[msg(Role::User, "Hi")], 10_000),
            &WordCounter,
        )
        .unwrap();
        assert!(
            turns[0]
                .content
                .starts_with("You are Luna. Be kind and brief."),
            "{}",
            turns[0].content
        );
        c.system_prompt = "{{char}} is playful.".into();
        let (turns, _) = assemble(
            &parts(&c, None, &[msg(Role::User, "Hi")], 10_000),
            &WordCounter,
        )
        .unwrap();
        assert!(
            turns[0].content.starts_with("Luna is playful."),
            "{}",
            turns[0].content
        );
    }

    #[test]
    fn full_order_with_persona_examples_and_post_history() {
        let c = luna();
        let p = sam();
        let h = [msg(Role::User, "Good morning!")];
        let (turns, _) = assemble(&parts(&c, Some(&p), &h, 10_000), &WordCounter).unwrap();
        let shown: Vec<(Role, &str)> = turns.iter().map(|t| (t.role, t.content.as_str())).collect();
        assert_eq!(
            shown,
            [
                (Role::System, "You are Luna, a companion chatting with Sam. Stay in character and answer Sam's last message in one or two short sentences.\n\nSam is a nurse; she works nights.\n\nLuna is a barista.\n\nLuna's personality: warm\n\nScenario: Sam visits the cafe."),
                (Role::User, "Hi!"),
                (Role::Assistant, "Welcome in!"),
                (Role::System, "[Start a new chat]"),
                (Role::User, "Coffee?"),
                (Role::Assistant, "Coming up."),
                (Role::System, "[Start a new chat]"),
                (Role::User, "Good morning!"),
                (Role::System, "Reply as Luna only."),
            ]
        );
    }

    #[test]
    fn new_chat_opens_with_the_greeting_and_memory_comes_before_history() {
        let c = luna();
        let h = [msg(Role::User, "Yes please")];
        let mut pp = parts(&c, None, &h, 10_000);
        pp.new_chat = true;
        pp.memory = Some("User likes oat milk.");
        let (turns, _) = assemble(&pp, &WordCounter).unwrap();
        let n = turns.len();
        assert_eq!(
            turns[n - 4].content,
            "What Luna remembers about User:\nUser likes oat milk."
        );
        assert_eq!(
            (turns[n - 3].role, turns[n - 3].content.as_str()),
            (Role::Assistant, "Hey User, the usual?")
        );
        assert_eq!(turns[n - 2].content, "Yes please");
    }

    #[test]
    fn the_cards_system_prompt_replaces_the_default() {
        let mut c = luna();
        c.system_prompt = "Be {{char}}.".into();
        let h = [msg(Role::User, "hi")];
        let (turns, _) = assemble(&parts(&c, None, &h, 10_000), &WordCounter).unwrap();
        assert!(turns[0]
            .content
            .starts_with("Be Luna.\n\nLuna is a barista."));
        let c2 = luna();
        let mut pp = parts(&c2, None, &h, 10_000);
        pp.default_system_prompt = Some("Custom default for {{char}}.");
        let (turns, _) = assemble(&pp, &WordCounter).unwrap();
        assert!(turns[0].content.starts_with("Custom default for Luna."));
    }

    #[test]
    fn examples_are_dropped_first_then_oldest_history() {
        let c = luna();
        let h: Vec<HistoryMessage> = (0..6)
            .map(|i| {
                msg(
                    if i % 2 == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    },
                    &format!("message number {i}"),
                )
            })
            .collect();
        let (full, _) = assemble(&parts(&c, None, &h, 10_000), &WordCounter).unwrap();
        assert!(full.iter().any(|t| t.content == "Coming up."));
        let need = cost(&WordCounter, &full);
        // A little short: the second example block goes.
        let (turns, report) = assemble(&parts(&c, None, &h, need - 5), &WordCounter).unwrap();
        assert!(!turns.iter().any(|t| t.content == "Coming up."));
        assert!(turns.iter().any(|t| t.content == "Welcome in!"));
        assert!(
            turns.iter().any(|t| t.content == "message number 0"),
            "history untouched"
        );
        assert!(report
            .parts
            .iter()
            .any(|p| p.part == "example dialogue block" && !p.included));
        // Much shorter: no examples, and the oldest history goes.
        let (turns, report) = assemble(&parts(&c, None, &h, 75), &WordCounter).unwrap();
        assert!(!turns.iter().any(|t| t.content == "Welcome in!"));
        assert!(!turns.iter().any(|t| t.content == "message number 0"));
        assert!(turns.iter().any(|t| t.content == "message number 5"));
        assert!(report.tokens <= 75, "{}", report.explain());
        assert!(report.explain().contains("oldest turn(s) dropped"));
    }

    #[test]
    fn protected_parts_that_cannot_fit_are_an_error() {
        let c = luna();
        let h = [msg(Role::User, "hello there")];
        let e = assemble(&parts(&c, None, &h, 20), &WordCounter).unwrap_err();
        assert!(matches!(e, PromptError::OverBudget { .. }), "{e}");
    }

    #[test]
    fn lore_goes_before_after_and_at_depth() {
        let mut c = luna();
        c.example_dialogue.clear();
        c.lorebook = Some(
            serde_json::from_value::<LorebookWire>(json!({"entries": [
                {"id": "b", "keys": ["cafe"], "content": "BEFORE", "position": "before_char"},
                {"id": "a", "keys": ["cafe"], "content": "AFTER", "position": "after_char"},
                {"id": "d", "keys": ["cafe"], "content": "DEPTH1", "extensions": {"position": 4, "depth": 1}}
            ]}))
            .unwrap()
            .into(),
        );
        let h = [
            msg(Role::User, "to the cafe?"),
            msg(Role::Assistant, "sure"),
            msg(Role::User, "now"),
        ];
        let (turns, report) = assemble(&parts(&c, None, &h, 10_000), &WordCounter).unwrap();
        let sys = &turns[0].content;
        assert!(sys.find("BEFORE").unwrap() < sys.find("Luna is a barista").unwrap());
        assert!(sys.find("AFTER").unwrap() > sys.find("Scenario:").unwrap());
        let contents: Vec<&str> = turns.iter().map(|t| t.content.as_str()).collect();
        assert_eq!(
            contents[1..],
            [
                "to the cafe?",
                "sure",
                "DEPTH1",
                "now",
                "Reply as Luna only."
            ]
        );
        assert_eq!(report.lore_fired.len(), 3);
        assert!(report.explain().contains("lore fired: d"));
    }

    #[test]
    fn consecutive_user_messages_merge_and_empty_ones_drop() {
        let mut c = luna();
        c.example_dialogue.clear();
        c.post_history_instructions.clear();
        let h = [
            msg(Role::Assistant, "Great! You?"),
            msg(Role::User, "Me too!!"),
            msg(Role::User, "What are you doing tonight?"),
            msg(Role::User, ""),
        ];
        let (turns, _) = assemble(&parts(&c, None, &h, 10_000), &WordCounter).unwrap();
        assert_eq!(turns.len(), 3);
        assert_eq!(turns[2].content, "Me too!!\nWhat are you doing tonight?");
        let only_bot = [msg(Role::Assistant, "hello")];
        assert!(matches!(
            assemble(&parts(&c, None, &only_bot, 10_000), &WordCounter),
            Err(PromptError::EmptyConversation)
        ));
    }
}
