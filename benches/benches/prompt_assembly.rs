//! Criterion: a long chat — 200 history messages and 50 lorebook entries
//! (plain, whole-word, regex and selective keys, recursion on) — assembled
//! into chat turns and rendered with the model's chat template.

use chrono::TimeZone;
use criterion::{criterion_group, criterion_main, Criterion};
use prompts::budget::WordCounter;
use prompts::lorebook::{Lorebook, LorebookWire};
use prompts::{
    assemble, ChatTemplate, HistoryMessage, Persona, PromptParts, RenderedCharacter, Role,
};
use serde_json::json;

fn lorebook() -> Lorebook {
    let entries: Vec<_> = (0..50)
        .map(|i| {
            let key = match i % 4 {
                0 => json!([format!("place{i}")]),
                1 => json!([format!("/friend{i}|buddy{i}/i")]),
                2 => json!([format!("item{i}"), format!("thing{i}")]),
                _ => json!([format!("Topic{i}")]),
            };
            json!({
                "id": i, "keys": key, "secondary_keys": if i % 5 == 0 { json!(["today"]) } else { json!([]) },
                "selective": i % 5 == 0, "case_sensitive": i % 4 == 3,
                "extensions": {"match_whole_words": i % 2 == 0, "position": if i % 7 == 0 { 4 } else { 0 }, "depth": 2},
                "content": format!("Lore entry {i}: place{} is near the river and item{} is kept there.", i + 1, i + 2),
                "insertion_order": i, "priority": i % 10
            })
        })
        .collect();
    let mut book: Lorebook = serde_json::from_value::<LorebookWire>(json!({
        "scan_depth": 6, "token_budget": 400, "recursive_scanning": true, "entries": entries
    }))
    .unwrap()
    .into();
    book.max_recursion = 2;
    book
}

fn history() -> Vec<HistoryMessage> {
    (0..200)
        .map(|i| HistoryMessage {
            role: if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            },
            text: format!(
                "Message {i}: we talked about place{} and my friend{} today, it was lovely.",
                i % 50,
                i % 50
            ),
        })
        .collect()
}

fn prompt_assembly(c: &mut Criterion) {
    let character = RenderedCharacter {
        name: "Luna".into(),
        description: "{{char}} is a barista who loves astronomy.".into(),
        personality: "warm, playful".into(),
        scenario: "{{user}} visits the cafe after {{user_their}} shift.".into(),
        post_history_instructions: "Stay in character as {{char}}.".into(),
        example_dialogue: "<START>\n{{user}}: Hi!\n{{char}}: Welcome in!".into(),
        first_message: "Hey {{user}}!".into(),
        lorebook: Some(lorebook()),
        ..Default::default()
    };
    let persona = Persona {
        name: "Sam".into(),
        description: "{{user}} is a nurse.".into(),
        ..Default::default()
    };
    let history = history();
    let clock = chrono::FixedOffset::east_opt(0)
        .unwrap()
        .with_ymd_and_hms(2026, 11, 24, 9, 0, 0)
        .unwrap();
    let parts = PromptParts {
        character: &character,
        persona: Some(&persona),
        memory: Some("Sam likes oat milk."),
        history: &history,
        lorebooks: &[],
        default_system_prompt: None,
        new_chat: false,
        clock,
        seed: 1,
        budget: 8_000,
    };
    let template = ChatTemplate::new(None, "", "<|im_end|>").unwrap();
    let (turns, report) = assemble(&parts, &WordCounter).unwrap();
    println!(
        "{} turns, {} lorebook entries fired",
        turns.len(),
        report.lore_fired.len()
    );
    assert!(
        report.lore_fired.len() >= 4 && turns.len() > 100,
        "a realistic load"
    );
    c.bench_function("assemble_200_messages_50_lore_entries", |b| {
        b.iter(|| assemble(&parts, &WordCounter).unwrap())
    });
    c.bench_function("assemble_and_render_chat_template", |b| {
        b.iter(|| {
            template
                .render(&assemble(&parts, &WordCounter).unwrap().0)
                .unwrap()
        })
    });
}

criterion_group!(benches, prompt_assembly);
criterion_main!(benches);
