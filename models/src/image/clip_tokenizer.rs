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

/// The vocabulary (index = id) and merges CLIP's BPE file defines, in
/// open_clip's order: bytes, bytes ending a word, one token per merge, then
/// the start and end tokens.
pub fn vocab_from_bpe(text: &str) -> Result<(Vec<String>, Vec<String>), ModelError> {
    let merges: Vec<String> = text
        .split('\n')
        .skip(1)
        .take(49_152 - 256 - 2)
        .map(String::from)
        .collect();
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
    Ok((vocab, merges))
}

/// Reads the gzipped BPE file.
pub fn read_bpe_gz(path: &Path) -> Result<String, ModelError> {
    let raw =
        std::fs::read(path).map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_string(&mut text)
        .map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))?;
    Ok(text)
}

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
}

impl ClipTokenizer {
    /// From the gzipped merges file.
    pub fn from_bpe_gz(path: &Path) -> Result<Self, ModelError> {
        Self::from_merges(&read_bpe_gz(path)?)
    }

    /// From the merges file's text: its first line is a header, then
    /// 49,152 − 256 − 2 merges (open_clip's `SimpleTokenizer`).
    pub fn from_merges(text: &str) -> Result<Self, ModelError> {
        let (vocab, merges) = vocab_from_bpe(text)?;
        Self::from_vocab(&vocab, &merges)
    }

    /// From a checkpoint's `tokenizer/` folder (`vocab.json`, `merges.txt`,
    /// as transformers' `CLIPTokenizer` saves them).
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| ModelError::Io(format!("{}: {e}", p.display())))
        };
        let ids: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&read("vocab.json")?)
                .map_err(|e| ModelError::Format(format!("{}/vocab.json: {e}", dir.display())))?;
        let mut vocab = vec![String::new(); ids.len()];
        for (t, i) in &ids {
            let i = i
                .as_u64()
                .filter(|i| (*i as usize) < vocab.len())
                .ok_or_else(|| ModelError::Format(format!("vocab.json: bad id for {t:?}")))?;
            vocab[i as usize] = t.clone();
        }
        let merges_text = read("merges.txt")?;
        let merges: Vec<String> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.is_empty())
            .map(String::from)
            .collect();
        Self::from_vocab(&vocab, &merges)
    }

    /// The tokenizer for a vocabulary (index = id, ending with the start
    /// and end tokens) and its merges.
    pub fn from_vocab(vocab: &[String], merges: &[String]) -> Result<Self, ModelError> {
        let find = |t: &str| {
            vocab
                .iter()
                .position(|v| v == t)
                .map(|i| i as u32)
                .ok_or_else(|| ModelError::Format(format!("the vocabulary lacks {t}")))
        };
        let bos = find("<|startoftext|>")?;
        let eos = find("<|endoftext|>")?;
        let ids: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
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

    /// The id of a token (the pad token a checkpoint's
    /// `tokenizer_config.json` names).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
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
