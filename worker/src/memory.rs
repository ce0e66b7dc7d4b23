//! The memory condense job: the scratchpad rewritten by the text model within
//! `max_words`.
//!
//! A small model asked to condense a long scratchpad tends to echo its first
//! lines, small talk included. So the model rewrites a focused extract: the
//! sentences the hint asks for (its words and topics) and those with names
//! and numbers, de-duplicated, up to 1.5× the budget. An answer is accepted
//! when it is within `max_words` and keeps 80 % of the names and numbers
//! of the extract; otherwise a stricter second try; otherwise the
//! best sentences that fit, unchanged. Scratchpads already within the budget
//! come back as they are, without a model call.

use models::SamplingParams;
use pipeline::jobs::memory::{MemoryCondenseJob, MemoryCondenseOutput};
use prompts::memory::{condense_turns, cut_to_words, fact_tokens, select_sentences, word_count};

use crate::chat::{ChatEngine, JobError, Usage};

/// Tokens allowed per word of the budget (English averages ~1.3), plus slack.
fn token_budget(max_words: u32) -> usize {
    (max_words as usize * 2).max(16) + 16
}

/// Whether `answer` keeps at least 80 % of `facts` (names and numbers): a
/// condensed memory that loses a sister's name is worse than a cut one.
fn keeps_facts(answer: &str, facts: &[String]) -> bool {
    let kept = facts.iter().filter(|f| answer.contains(f.as_str())).count();
    kept * 5 >= facts.len() * 4
}

pub fn condense(
    engine: &ChatEngine,
    job: &MemoryCondenseJob,
    seed: u64,
    cancelled: &dyn Fn() -> bool,
) -> Result<(MemoryCondenseOutput, Usage), JobError> {
    let mut usage = Usage::default();
    let done = |content: String, usage: Usage| {
        let word_count = word_count(&content) as u32;
        Ok((
            MemoryCondenseOutput {
                content,
                word_count,
                version: job.version.clone(),
            },
            usage,
        ))
    };
    let max = job.max_words as usize;
    if word_count(&job.content) <= max {
        return done(job.content.trim().to_string(), usage);
    }
    let mut extract = select_sentences(&job.content, job.hint.as_deref(), max * 3 / 2);
    if extract.is_empty() {
        extract = job.content.clone();
    }
    let facts = fact_tokens(&extract);
    let params = SamplingParams {
        // Condensing wants faithful, not creative, text.
        temperature: 0.0,
        repetition_penalty: 1.05,
        max_new_tokens: token_budget(job.max_words),
        seed,
        ..SamplingParams::default()
    };
    for stricter in [false, true] {
        let turns = condense_turns(&extract, job.hint.as_deref(), max, stricter);
        let answer = engine.complete(&turns, &params, cancelled, &mut usage)?;
        let words = word_count(&answer);
        if words > 0 && words <= max && keeps_facts(&answer, &facts) {
            tracing::info!(stricter, words, "scratchpad condensed by the model");
            return done(answer.trim().to_string(), usage);
        }
        tracing::info!(
            stricter,
            words,
            "condensed answer refused (too long or lost facts)"
        );
    }
    let best = select_sentences(&job.content, job.hint.as_deref(), max);
    let fallback = if best.is_empty() {
        cut_to_words(&job.content, max)
    } else {
        best
    };
    tracing::info!(
        words = word_count(&fallback),
        "scratchpad cut to its best sentences"
    );
    done(fallback, usage)
}
