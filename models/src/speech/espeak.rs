//! Text to IPA phonemes with espeak-ng, clause by clause, the way the
//! reference Piper (`piper-tts`) does it: each clause's phonemes, its
//! punctuation kept as a phoneme, sentences split where espeak-ng ends one.
//!
//! espeak-ng 1.52 (built from source by `espeak-rs-sys`) is linked
//! statically; the clause terminator comes from its
//! `TranslateClauseWithTerminator`, the routine behind
//! `espeak_TextToPhonemesWithTerminator` that piper's bridge calls. The data
//! folder is the one `piper-tts` ships, so dictionaries match too.
//! espeak-ng is a global state machine: every call holds one lock.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use unicode_normalization::UnicodeNormalization;

// Keep the static library linked.
use espeak_rs_sys as _;

unsafe extern "C" {
    static mut p_decoder: *mut c_void;
    static mut translator: *mut c_void;
    fn create_text_decoder() -> *mut c_void;
    fn text_decoder_decode_string_multibyte(
        decoder: *mut c_void,
        input: *const c_void,
        encoding: c_int,
        flags: c_int,
    ) -> c_int;
    fn text_decoder_get_buffer(decoder: *mut c_void) -> *const c_void;
    fn TranslateClauseWithTerminator(
        tr: *mut c_void,
        tone_out: *mut c_int,
        voice_change: *mut *mut c_char,
        terminator_out: *mut c_int,
    );
    fn GetTranslatedPhonemeString(phoneme_mode: c_int) -> *const c_char;
    fn espeak_Initialize(
        output: c_int,
        buflength: c_int,
        path: *const c_char,
        options: c_int,
    ) -> c_int;
    fn espeak_SetVoiceByName(name: *const c_char) -> c_int;
}

const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
const ESPEAK_CHARS_UTF8: c_int = 1;
const PHONEMES_IPA: c_int = 0x02;

// Clause terminators (espeak-ng's readclause.h).
const CLAUSE_TYPE_SENTENCE: c_int = 0x0008_0000;
const CLAUSE_PERIOD: c_int = 40 | CLAUSE_TYPE_SENTENCE;
const CLAUSE_COMMA: c_int = 20 | 0x1000 | 0x0004_0000;
const CLAUSE_QUESTION: c_int = 40 | 0x2000 | CLAUSE_TYPE_SENTENCE;
const CLAUSE_EXCLAMATION: c_int = 45 | 0x3000 | CLAUSE_TYPE_SENTENCE;
const CLAUSE_COLON: c_int = 30 | 0x0004_0000;
const CLAUSE_SEMICOLON: c_int = 30 | 0x1000 | 0x0004_0000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PhonemizeError {
    #[error("espeak-ng could not start with data at {0}")]
    Init(String),
    #[error("espeak-ng has no voice {0:?}")]
    Voice(String),
    #[error("text contains a NUL byte")]
    Nul,
}

struct State {
    data_dir: Option<PathBuf>,
    voice: Option<String>,
}

static ESPEAK: Mutex<State> = Mutex::new(State {
    data_dir: None,
    voice: None,
});

/// One clause as espeak-ng returned it.
#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    pub phonemes: String,
    pub terminator: &'static str,
    pub end_of_sentence: bool,
}

fn clauses(data_dir: &Path, voice: &str, text: &str) -> Result<Vec<Clause>, PhonemizeError> {
    let text = CString::new(text).map_err(|_| PhonemizeError::Nul)?;
    let mut state = ESPEAK.lock().unwrap_or_else(|p| p.into_inner());
    if state.data_dir.as_deref() != Some(data_dir) {
        let path =
            CString::new(data_dir.to_string_lossy().as_bytes()).map_err(|_| PhonemizeError::Nul)?;
        // SAFETY: espeak-ng is only touched under the ESPEAK lock.
        let rate = unsafe { espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, path.as_ptr(), 0) };
        if rate <= 0 {
            return Err(PhonemizeError::Init(data_dir.display().to_string()));
        }
        state.data_dir = Some(data_dir.to_path_buf());
        state.voice = None;
    }
    if state.voice.as_deref() != Some(voice) {
        let name = CString::new(voice).map_err(|_| PhonemizeError::Nul)?;
        // SAFETY: as above.
        if unsafe { espeak_SetVoiceByName(name.as_ptr()) } != 0 {
            return Err(PhonemizeError::Voice(voice.into()));
        }
        state.voice = Some(voice.into());
    }
    let mut out = Vec::new();
    let mut ptr = text.as_ptr() as *const c_void;
    // SAFETY: `ptr` walks `text`, which outlives the loop; espeak-ng sets it
    // to NULL after the last clause. Globals are used under the lock.
    unsafe {
        while !ptr.is_null() {
            if p_decoder.is_null() {
                p_decoder = create_text_decoder();
            }
            if text_decoder_decode_string_multibyte(p_decoder, ptr, 0, ESPEAK_CHARS_UTF8) != 0 {
                break;
            }
            let mut terminator: c_int = 0;
            TranslateClauseWithTerminator(
                translator,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut terminator,
            );
            ptr = text_decoder_get_buffer(p_decoder);
            let phonemes = GetTranslatedPhonemeString(PHONEMES_IPA);
            let phonemes = if phonemes.is_null() {
                String::new()
            } else {
                CStr::from_ptr(phonemes).to_string_lossy().into_owned()
            };
            let kind = terminator & 0x000F_FFFF;
            let mark = match kind {
                CLAUSE_PERIOD => ".",
                CLAUSE_QUESTION => "?",
                CLAUSE_EXCLAMATION => "!",
                CLAUSE_COMMA => ",",
                CLAUSE_COLON => ":",
                CLAUSE_SEMICOLON => ";",
                _ => "",
            };
            out.push(Clause {
                phonemes,
                terminator: mark,
                end_of_sentence: terminator & CLAUSE_TYPE_SENTENCE == CLAUSE_TYPE_SENTENCE,
            });
        }
    }
    Ok(out)
}

/// Drops espeak-ng's `(lang)` switch flags around foreign words.
fn strip_language_flags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('(') {
        match rest[open..].find(')') {
            Some(close) if close > 1 => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Text → phonemes grouped by sentence, each phoneme one Unicode code point
/// after NFD (accents become their own phonemes), punctuation kept, and
/// `vowel_clusters` merged into single phonemes.
pub fn phonemize(
    data_dir: &Path,
    voice: &str,
    text: &str,
    vowel_clusters: &[Vec<String>],
) -> Result<Vec<Vec<String>>, PhonemizeError> {
    let mut sentences = Vec::new();
    let mut current: Vec<String> = Vec::new();
    for clause in clauses(data_dir, voice, text)? {
        let mut ph = strip_language_flags(&clause.phonemes);
        ph.push_str(clause.terminator);
        if matches!(clause.terminator, "," | ":" | ";") {
            ph.push(' ');
        }
        current.extend(ph.nfd().map(String::from));
        if clause.end_of_sentence {
            sentences.push(merge_clusters(std::mem::take(&mut current), vowel_clusters));
        }
    }
    if !current.is_empty() {
        sentences.push(merge_clusters(current, vowel_clusters));
    }
    Ok(sentences)
}

fn merge_clusters(phones: Vec<String>, clusters: &[Vec<String>]) -> Vec<String> {
    if clusters.is_empty() {
        return phones;
    }
    let max_len = clusters.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::with_capacity(phones.len());
    let mut i = 0;
    while i < phones.len() {
        let found = (2..=max_len.min(phones.len() - i))
            .rev()
            .find(|&n| clusters.iter().any(|c| c.as_slice() == &phones[i..i + n]));
        match found {
            Some(n) => {
                out.push(phones[i..i + n].concat());
                i += n;
            }
            None => {
                out.push(phones[i].clone());
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_flags_are_dropped_and_parens_kept_otherwise() {
        assert_eq!(strip_language_flags("(en)hˈaɪ(fr) bɔ̃"), "hˈaɪ bɔ̃");
        assert_eq!(strip_language_flags("a(b"), "a(b");
    }

    #[test]
    fn clusters_merge_longest_first() {
        let p = |s: &str| s.chars().map(String::from).collect::<Vec<_>>();
        let clusters = vec![p("aɪ"), p("aɪə")];
        assert_eq!(merge_clusters(p("taɪəd"), &clusters), vec!["t", "aɪə", "d"]);
    }
}
