//! Token counting and the history budget.
//!
//! The budget is the model's context length minus the reply's max tokens.
//! Newest messages are kept first; the protected parts (system block,
//! post-history instructions, the newest user turn) are never dropped; a
//! prompt that cannot fit even those is an error.

use crate::PromptError;

/// Counts tokens the way the model will. The worker passes the model's
/// tokenizer; tests use [`WordCounter`].
pub trait TokenCounter {
    fn count(&self, text: &str) -> usize;
}

/// One token per whitespace-separated word.
pub struct WordCounter;

impl TokenCounter for WordCounter {
    fn count(&self, text: &str) -> usize {
        text.split_whitespace().count()
    }
}

/// The start index of the longest suffix of `history` (token costs, oldest
/// first) that fits in `budget` after `protected` tokens. The newest message
/// is part of the protected set: if it does not fit, the prompt cannot be
/// built.
pub fn keep_newest(
    protected: usize,
    history: &[usize],
    budget: usize,
) -> Result<usize, PromptError> {
    let newest = history.last().copied().unwrap_or(0);
    if protected + newest > budget {
        return Err(PromptError::OverBudget {
            needed: protected + newest,
            budget,
        });
    }
    let mut used = protected;
    let mut start = history.len();
    for (i, cost) in history.iter().enumerate().rev() {
        if used + cost > budget {
            break;
        }
        used += cost;
        start = i;
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_the_newest_messages_that_fit() {
        assert_eq!(keep_newest(10, &[5, 5, 5, 5], 25).unwrap(), 1);
        assert_eq!(keep_newest(10, &[5, 5, 5, 5], 100).unwrap(), 0);
        assert_eq!(keep_newest(10, &[50, 5], 20).unwrap(), 1);
    }

    #[test]
    fn a_prompt_that_cannot_fit_its_protected_parts_is_an_error() {
        let e = keep_newest(10, &[5, 30], 35).unwrap_err();
        assert_eq!(e.to_string(), "the prompt needs at least 40 tokens (system, instructions and the newest message) but the budget is 35");
    }

    proptest! {
        #[test]
        fn never_over_budget_and_a_contiguous_newest_suffix(
            protected in 0usize..50,
            history in proptest::collection::vec(0usize..40, 1..30),
            budget in 0usize..400,
        ) {
            match keep_newest(protected, &history, budget) {
                Ok(start) => {
                    let kept: usize = history[start..].iter().sum();
                    prop_assert!(protected + kept <= budget, "over budget");
                    prop_assert!(start < history.len(), "the newest message is always kept");
                    // Maximal: one more older message would not fit.
                    if start > 0 {
                        prop_assert!(protected + kept + history[start - 1] > budget);
                    }
                }
                Err(_) => prop_assert!(protected + history.last().unwrap() > budget),
            }
        }
    }
}
