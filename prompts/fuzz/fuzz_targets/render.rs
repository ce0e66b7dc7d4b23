//! No input may panic template rendering or macro expansion:
//! `cargo +nightly fuzz run render` from prompts/.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prompts::macros::{expand_macros, protect_macros, restore_macros, MacroContext};
use prompts::{ChatTemplate, ChatTurn, Role};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (template, body) = text.split_at(text.len() / 2);
    let _ = expand_macros(text, &MacroContext::default());
    let (p, saved) = protect_macros(text);
    assert_eq!(restore_macros(&p, &saved), text);
    let card = serde_json::json!({"spec": "chara_card_v2", "data": {"name": "x", "description": body}});
    if let Ok(card) = prompts::CharacterCard::from_json(&card.to_string()) {
        let _ = card.render(&serde_json::Map::new());
    }
    if let Ok(t) = ChatTemplate::new(Some(template), "<s>", "</s>") {
        let _ = t.render(&[ChatTurn { role: Role::User, content: body.to_string() }]);
    }
});
