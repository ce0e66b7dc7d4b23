//! CLIP's byte-level BPE tokenizer (what Stable Diffusion's text encoders
//! read), built from `bpe_simple_vocab_16e6.txt.gz` — the merges file
//! open-clip-torch ships (`DEFAULT_CLIP_BPE`, a file in its PyPI wheel) —
//! as a `tokenizers` tokenizer laid out like transformers' `CLIPTokenizer`:
//! whitespace collapsed and lower-cased, CLIP's split pattern, bytes mapped
//! to printable characters, BPE with `</w>` ending each word, then
//! `<|startoftext|>` … `<|endoftext|>` around the ids.

use std::io::Read;
use std::path::Path;

use serde_json::json;
use tokenizers::Tokenizer;

use crate::ModelError;

/// open-clip-torch's BPE file, fetched with `pip download`.
pub const DEFAULT_CLIP_BPE: &str =
    "pypi:open-clip-torch==2.32.0/open_clip/bpe_simple_vocab_16e6.txt.gz";

/// CLIP's context length: prompts are cut (keeping the end token) or padded
/// to it.
pub const CONTEXT_LENGTH: usize = 77;

/// How CLIP splits text into words before BPE (open_clip's and
/// transformers' pattern).
const SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2's byte → printable character table, in its order.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("a valid char")))
        .collect()
}

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
}

impl ClipTokenizer {
    /// From the gzipped merges file.
    pub fn from_bpe_gz(path: &Path) -> Result<Self, ModelError> {
        let raw =
            std::fs::read(path).map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut text)
            .map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))?;
        Self::from_merges(&text)
    }

    /// From the merges file's text: its first line is a header, then
    /// 49,152 − 256 − 2 merges (open_clip's `SimpleTokenizer`).
    pub fn from_merges(text: &str) -> Result<Self, ModelError> {
        let merges: Vec<&str> = text.split('\n').skip(1).take(49_152 - 256 - 2).collect();
        let table = bytes_to_unicode();
        let mut vocab: Vec<String> = table.iter().map(|(_, c)| c.to_string()).collect();
        vocab.extend(table.iter().map(|(_, c)| format!("{c}</w>")));
        for m in &merges {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| ModelError::Format(format!("a merge without a space: {m:?}")))?;
            vocab.push(format!("{a}{b}"));
        }
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let ids: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let bos = (vocab.len() - 2) as u32;
        let eos = (vocab.len() - 1) as u32;
        let spec = json!({
            "version": "1.0",
            "added_tokens": [
                {"id": bos, "content": "<|startoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true},
                {"id": eos, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": ids, "merges": merges
            }
        });
        let tokenizer = Tokenizer::from_bytes(spec.to_string().as_bytes())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Self {
            tokenizer,
            bos,
            eos,
        })
    }

    /// `<|startoftext|>`, the prompt's ids, `<|endoftext|>`; cut to
    /// [`CONTEXT_LENGTH`] keeping the end token (as transformers'
    /// `truncation=True` does).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(prompt.trim(), false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        ids.push(self.bos);
        ids.extend(enc.get_ids().iter().take(CONTEXT_LENGTH - 2));
        ids.push(self.eos);
        Ok(ids)
    }

    /// [`Self::encode`] padded to [`CONTEXT_LENGTH`] with `pad` (the end
    /// token for SD 1.x, `!` (id 0) for SD 2.x: the checkpoint's
    /// `tokenizer_config.json` says which).
    pub fn encode_padded(&self, prompt: &str, pad: u32) -> Result<Vec<u32>, ModelError> {
        let mut ids = self.encode(prompt)?;
        ids.resize(CONTEXT_LENGTH, pad);
        Ok(ids)
    }

    pub fn end_token(&self) -> u32 {
        self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.eos as usize + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_table_covers_every_byte_once() {
        let t = bytes_to_unicode();
        assert_eq!(t.len(), 256);
        assert_eq!(t[0], (b'!', '!'));
        let mut bytes: Vec<u8> = t.iter().map(|(b, _)| *b).collect();
        bytes.sort();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        // A space maps to 'Ġ' (U+0120), as in GPT-2.
        assert_eq!(t.iter().find(|(b, _)| *b == b' ').unwrap().1, '\u{120}');
    }
}
