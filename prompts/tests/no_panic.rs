//! The fuzz target's properties on stable, with proptest: no input panics
//! macro expansion or template rendering, and protecting macros round-trips.

use prompts::macros::{expand_macros, protect_macros, restore_macros, MacroContext};
use prompts::{ChatTemplate, ChatTurn, Role};
use proptest::prelude::*;

fn template_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{{".to_string()),
        Just("}}".to_string()),
        Just("{%".to_string()),
        Just("%}".to_string()),
        Just("{{char}}".to_string()),
        Just("{{random:a,b}}".to_string()),
        Just("{{roll:d".to_string()),
        Just("{% for m in messages %}".to_string()),
        Just("{% endfor %}".to_string()),
        Just("{{ m['content'] }}".to_string()),
        Just("{{ raise_exception('x') }}".to_string()),
        "[a-z :,|'\"()\\[\\]0-9]{0,8}",
        any::<char>().prop_map(|c| c.to_string()),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn macros_never_panic_and_protection_round_trips(text in template_like()) {
        let _ = expand_macros(&text, &MacroContext::default());
        let (p, saved) = protect_macros(&text);
        prop_assert_eq!(restore_macros(&p, &saved), text);
    }

    #[test]
    fn templates_never_panic(template in template_like(), body in template_like()) {
        if let Ok(t) = ChatTemplate::new(Some(&template), "<s>", "</s>") {
            let _ = t.render(&[ChatTurn { role: Role::User, content: body.clone() }]);
        }
        let card = serde_json::json!({"spec": "chara_card_v2", "data": {"name": "x", "description": body}});
        let card = prompts::CharacterCard::from_json(&card.to_string()).unwrap();
        let _ = card.render(&serde_json::Map::new());
    }
}
