//! The `character` field of a chat job: a reference to a character template.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::PromptError;

/// A parsed `github:OWNER/NAME` reference. Both parts are restricted to a safe
/// character set so a reference can never escape the templates directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRef {
    pub owner: String,
    pub name: String,
}

fn valid_part(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 100
        && part != "."
        && part != ".."
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl TemplateRef {
    pub fn parse(raw: &str) -> Result<Self, PromptError> {
        let bad = || PromptError::BadTemplateRef(raw.to_string());
        let rest = raw.strip_prefix("github:").ok_or_else(bad)?;
        let (owner, name) = rest.split_once('/').ok_or_else(bad)?;
        if !valid_part(owner) || !valid_part(name) {
            return Err(bad());
        }
        Ok(Self {
            owner: owner.to_string(),
            name: name.to_string(),
        })
    }

    /// `DIR/OWNER/NAME/card.json`.
    pub fn card_path(&self, templates_dir: &Path) -> PathBuf {
        templates_dir
            .join(&self.owner)
            .join(&self.name)
            .join("card.json")
    }
}

impl fmt::Display for TemplateRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "github:{}/{}", self.owner, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_reference() {
        let r = TemplateRef::parse("github:partner/character").unwrap();
        assert_eq!(r.owner, "partner");
        assert_eq!(r.name, "character");
        assert_eq!(
            r.card_path(Path::new("/t")),
            PathBuf::from("/t/partner/character/card.json")
        );
        assert_eq!(r.to_string(), "github:partner/character");
    }

    #[test]
    fn refuses_paths_that_escape_or_other_schemes() {
        for bad in [
            "partner/character",
            "gitlab:a/b",
            "github:../etc",
            "github:a/..",
            "github:a/b/c",
            "github:/b",
            "github:a/",
            "github:a b/c",
        ] {
            assert!(TemplateRef::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
