//! Speech for chat jobs: replies spoken by Piper voices (or espeak-ng as a
//! fallback backend), audio messages transcribed by Whisper.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

use models::speech::audio::{self, AudioFormat, Pcm};
use models::speech::piper::{SynthesisConfig, VoiceRegistry};
use models::speech::whisper::{TranscribeOptions, Whisper};
use pipeline::queue::AudioChunk;

/// A spoken reply, encoded.
pub struct SpokenAudio {
    pub bytes: Vec<u8>,
    pub format: AudioFormat,
    pub seconds: f64,
}

pub trait TextToSpeech: Send + Sync {
    /// `text` spoken by `voice` (the instance's `assigned_voice_id`; the
    /// backend's default when `None` or unknown), as samples.
    fn speak(&self, text: &str, voice: Option<&str>) -> Result<Pcm, String>;

    /// The format replies are encoded in (`TTS_FORMAT`).
    fn format(&self) -> AudioFormat;

    /// How many texts the backend speaks at once at full speed (Piper's
    /// lanes, `TTS_LANES`).
    fn lanes(&self) -> usize {
        1
    }

    /// A reply's `text` spoken (what [`speakable`] keeps of it) and encoded.
    fn synthesize(&self, text: &str, voice: Option<&str>) -> Result<SpokenAudio, String> {
        SpokenAudio::encode(&self.speak(&speakable(text), voice)?, self.format())
    }
}

/// What a voice is given of a reply's text: the marks of chat markup that
/// espeak-ng (so Piper and piper-tts) would read out by name left out.
/// `*smiles*` was spoken "asterisk smiles asterisk" (1.92 s of speech
/// against 0.57 s for the word), `~` as "tilde", a heading's `#` as a
/// word and an emoji as its long name ("Hi there 😊." 2.45 s against 0.71
/// s): an action is spoken without its asterisks (as SillyTavern's speech
/// does by default), emoji and their joiners and selectors are silent, and
/// the spaces left around them are one. A `#` inside a line ("#1") stays.
pub fn speakable(text: &str) -> String {
    use unicode_properties::UnicodeEmoji;
    let mut out = String::with_capacity(text.len());
    let mut line_start = true;
    for c in text.chars() {
        let heading = c == '#' && line_start;
        let mark = matches!(c, '*' | '~') || heading;
        let emoji = !c.is_ascii() && c.is_emoji_char_or_emoji_component();
        if c == '\n' {
            line_start = true;
        } else if !c.is_whitespace() && !heading {
            line_start = false;
        }
        if mark || emoji {
            continue;
        }
        // Runs of whitespace (those left around what was dropped too)
        // become one space, none at either end.
        if c.is_whitespace() {
            if !out.is_empty() && !out.ends_with(' ') {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
    }
    out.truncate(out.trim_end().len());
    out
}

impl SpokenAudio {
    /// Samples encoded in `format`.
    pub fn encode(pcm: &Pcm, format: AudioFormat) -> Result<Self, String> {
        Ok(Self {
            bytes: audio::encode(pcm, format).map_err(|e| e.to_string())?,
            format,
            seconds: pcm.seconds(),
        })
    }
}

/// Piper voices on ONNX Runtime, synthesized sentence by sentence.
pub struct PiperTts {
    voices: Arc<VoiceRegistry>,
    format: AudioFormat,
    config: SynthesisConfig,
    handle: tokio::runtime::Handle,
}

impl PiperTts {
    pub fn new(voices: VoiceRegistry, format: AudioFormat, config: SynthesisConfig) -> Self {
        Self {
            voices: Arc::new(voices),
            format,
            config,
            handle: tokio::runtime::Handle::current(),
        }
    }
}

impl TextToSpeech for PiperTts {
    fn format(&self) -> AudioFormat {
        self.format
    }

    fn lanes(&self) -> usize {
        self.voices.lanes()
    }

    fn speak(&self, text: &str, voice: Option<&str>) -> Result<Pcm, String> {
        // Called on a blocking-pool thread: a voice not yet loaded is loaded
        // (and fetched) here.
        let voice = self
            .handle
            .block_on(self.voices.voice(voice))
            .map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        let mut samples = Vec::new();
        let mut first = None;
        voice
            .synthesize_each(text, &self.config, |pcm| {
                first.get_or_insert_with(|| started.elapsed());
                samples.extend(pcm.samples);
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        let pcm = Pcm {
            samples,
            sample_rate: voice.config.sample_rate,
        };
        tracing::info!(
            seconds = pcm.seconds(),
            first_sentence_ms = first.map(|d| d.as_millis() as u64),
            total_ms = started.elapsed().as_millis() as u64,
            "spoken"
        );
        Ok(pcm)
    }
}

/// espeak-ng as a process (no model files), for machines without the Piper
/// voice.
pub struct EspeakNg {
    program: String,
    voice: String,
    format: AudioFormat,
}

impl EspeakNg {
    /// Finds the program; None when it is not installed.
    pub fn detect(program: &str, voice: &str, format: AudioFormat) -> Option<Self> {
        let ok = Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Self {
            program: program.into(),
            voice: voice.into(),
            format,
        })
    }

    fn wav(&self, text: &str) -> Result<Vec<u8>, String> {
        // Text goes through stdin, never the command line.
        let mut child = Command::new(&self.program)
            .args(["-v", &self.voice, "--stdout", "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", self.program))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() || !out.stdout.starts_with(b"RIFF") {
            return Err(format!(
                "{} failed: {}",
                self.program,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(fix_streamed_wav_sizes(out.stdout))
    }
}

impl TextToSpeech for EspeakNg {
    fn format(&self) -> AudioFormat {
        self.format
    }

    fn speak(&self, text: &str, _voice: Option<&str>) -> Result<Pcm, String> {
        audio::decode(&self.wav(text)?, f64::INFINITY).map_err(|e| e.to_string())
    }
}

/// Cuts streamed text into the chunks a reply is spoken in: one per
/// sentence, as soon as the sentence is complete, and the reply's first
/// sentence cut shorter (see [`first_chunk_end`]): synthesis time grows
/// with the length of what is spoken, and the first chunk is the one a
/// listener waits for; the rest is synthesized while it plays. Chunk texts,
/// joined, are the text pushed (whitespace included).
pub struct SentenceSplitter {
    /// Deltas end where sentences end (whole-sentence streaming), so an end
    /// at the very end of the text so far is a real one; otherwise a
    /// sentence counts once more text follows its end.
    settled: bool,
    /// Text pushed and not yet in a chunk.
    pending: String,
    /// Chunks handed out so far.
    chunks: u64,
}

/// One chunk to speak: its share of the reply's text (whitespace included)
/// and what the voice is given for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkText {
    pub text: String,
    pub spoken: String,
}

impl SentenceSplitter {
    pub fn new(settled: bool) -> Self {
        Self {
            settled,
            pending: String::new(),
            chunks: 0,
        }
    }

    /// Adds streamed text; the chunks of every sentence it completes, in
    /// order.
    pub fn push(&mut self, delta: &str) -> Vec<ChunkText> {
        use models::text::reply::{sentence_end, settled_sentence_end};
        self.pending.push_str(delta);
        let complete = if self.settled {
            sentence_end(&self.pending)
        } else {
            settled_sentence_end(&self.pending)
        };
        let Some(complete) = complete else {
            return Vec::new();
        };
        let mut rest: String = self.pending.split_off(complete);
        std::mem::swap(&mut rest, &mut self.pending);
        // `rest` now holds the complete sentences.
        self.sentences(&rest)
    }

    /// One chunk per sentence of `text`, the reply's first sentence cut
    /// shorter.
    fn sentences(&mut self, mut text: &str) -> Vec<ChunkText> {
        use models::text::reply::first_sentence_end;
        let mut out = Vec::new();
        while !text.is_empty() {
            let end = first_sentence_end(text).unwrap_or(text.len());
            let (end, cut_in_phrase) = match self.chunks {
                0 => first_chunk_end(&text[..end]).unwrap_or((end, false)),
                _ => (end, false),
            };
            // Whitespace after the last end belongs to that chunk.
            let end = end + text[end..].len() - text[end..].trim_start().len();
            self.chunk(&text[..end], cut_in_phrase, &mut out);
            text = &text[end..];
        }
        out
    }

    /// The chunks of what is left (a last sentence without an end; the
    /// whole reply when none had one, its first part cut shorter).
    pub fn finish(mut self) -> Vec<ChunkText> {
        // Whitespace alone stays unspoken (`chunk` makes no chunk of it).
        let rest = std::mem::take(&mut self.pending);
        self.sentences(&rest)
    }

    fn chunk(&mut self, text: &str, cut_in_phrase: bool, out: &mut Vec<ChunkText>) {
        if text.trim().is_empty() {
            // Nothing to say: the whitespace goes with the next sentence.
            self.pending.insert_str(0, text);
            return;
        }
        let mut spoken = speakable(text);
        if cut_in_phrase && !spoken.is_empty() {
            // A cut between two words is spoken like a comma (a phrase that
            // goes on), not like the end of a sentence.
            spoken.push(',');
        }
        out.push(ChunkText {
            text: text.to_string(),
            spoken,
        });
        self.chunks += 1;
    }
}

/// Speaks a reply while its text streams in (`deltas`, ending when the
/// generation does): each chunk of [`SentenceSplitter`] goes to the voice
/// as soon as its text is complete, on as many threads as the backend has
/// lanes ([`TextToSpeech::lanes`]; the first chunk alone, as the others
/// would slow the one a listener waits for), and `out` gets the chunks in
/// order (a whole file in the TTS's format each, numbered from 0) as soon
/// as each and those before it are spoken. A chunk the voice gives no samples for
/// makes none. Stops when `stop` says so (a client that left hears
/// nothing more). The whole reply's audio (every chunk's samples) and the
/// number of chunks; None when nothing was spoken.
pub fn speak_streamed(
    tts: &dyn TextToSpeech,
    voice: Option<&str>,
    settled: bool,
    deltas: impl IntoIterator<Item = String>,
    stop: &(dyn Fn() -> bool + Sync),
    out: &(dyn Fn(AudioChunk) + Sync),
) -> Result<Option<(Pcm, u64)>, String> {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Mutex};

    /// Chunks spoken, handed out in the order their texts came.
    struct InOrder {
        /// Sequence number of the next chunk text to hand out.
        next: u64,
        /// Spoken chunks waiting for those before them.
        ready: BTreeMap<u64, Result<Option<(AudioChunk, Pcm)>, String>>,
        index: u64,
        samples: Vec<f32>,
        sample_rate: u32,
        error: Option<String>,
    }
    let lanes = tts.lanes().max(1);
    let format = tts.format();
    let (job_tx, job_rx) = mpsc::channel::<(u64, ChunkText)>();
    let job_rx = Mutex::new(job_rx);
    let failed = AtomicBool::new(false);
    let first_done = (Mutex::new(false), std::sync::Condvar::new());
    let order = Mutex::new(InOrder {
        next: 0,
        ready: BTreeMap::new(),
        index: 0,
        samples: Vec::new(),
        sample_rate: 0,
        error: None,
    });
    let speak = |chunk: ChunkText| -> Result<Option<(AudioChunk, Pcm)>, String> {
        if chunk.spoken.is_empty() {
            // Markup alone (an emoji): nothing to say.
            return Ok(None);
        }
        let pcm = tts.speak(&chunk.spoken, voice)?;
        if pcm.samples.is_empty() {
            return Ok(None);
        }
        let audio = audio::encode(&pcm, format).map_err(|e| e.to_string())?;
        let chunk = AudioChunk {
            index: 0,
            text: chunk.text,
            format: format.extension().to_string(),
            seconds: pcm.seconds(),
            audio,
        };
        Ok(Some((chunk, pcm)))
    };
    std::thread::scope(|scope| {
        for _ in 0..lanes {
            scope.spawn(|| loop {
                // One lane waits for the next chunk at a time.
                let job = job_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok((seq, chunk)) = job else { break };
                if seq > 0 {
                    // The first chunk, the one a listener waits for, is
                    // spoken alone.
                    let (lock, cv) = &first_done;
                    let mut done = lock.lock().unwrap_or_else(|p| p.into_inner());
                    while !*done {
                        done = cv.wait(done).unwrap_or_else(|p| p.into_inner());
                    }
                }
                let spoken = if failed.load(Ordering::Relaxed) || stop() {
                    Ok(None)
                } else {
                    // A panic in the voice fails the speaking, never leaves
                    // the other lanes waiting.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| speak(chunk)))
                        .unwrap_or_else(|_| Err("text-to-speech panicked".to_string()))
                };
                if seq == 0 {
                    let (lock, cv) = &first_done;
                    *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
                    cv.notify_all();
                }
                let mut guard = order.lock().unwrap_or_else(|p| p.into_inner());
                let o = &mut *guard;
                o.ready.insert(seq, spoken);
                while let Some(done) = o.ready.remove(&o.next) {
                    o.next += 1;
                    match done {
                        Ok(Some((mut chunk, pcm))) if o.error.is_none() => {
                            chunk.index = o.index;
                            o.index += 1;
                            o.sample_rate = pcm.sample_rate;
                            o.samples.extend(pcm.samples);
                            out(chunk);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            o.error.get_or_insert(e);
                        }
                    }
                }
            });
        }
        let mut splitter = SentenceSplitter::new(settled);
        let mut seq = 0u64;
        let mut send = |chunk: ChunkText| {
            let _ = job_tx.send((seq, chunk));
            seq += 1;
        };
        for delta in deltas {
            if stop() || failed.load(Ordering::Relaxed) {
                break;
            }
            splitter.push(&delta).into_iter().for_each(&mut send);
        }
        if !stop() && !failed.load(Ordering::Relaxed) {
            splitter.finish().into_iter().for_each(&mut send);
        }
        drop(job_tx);
    });
    let o = order.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = o.error {
        return Err(e);
    }
    let pcm = Pcm {
        samples: o.samples,
        sample_rate: o.sample_rate,
    };
    Ok((o.index > 0).then_some((pcm, o.index)))
}

/// Fewest characters on each side of a cut in the first sentence: no one-
/// or two-word chunk.
const MIN_CLAUSE_CHARS: usize = 12;

/// Longest first chunk, in characters, cut between two words when it has
/// no clause break before: about 2 s of speech at Piper's pace (up to 2.6
/// with numbers), which Piper on one thread speaks in 40–50 ms a second
/// beside the text model on 2 cores. At 40 characters (up to 3.3 s of
/// speech) the slowest first audio of 20 replies was 172–185 ms in two of
/// four runs; at 34, 105–112 ms.
const FIRST_CHUNK_MAX_CHARS: usize = 34;

/// Words a phrase starts with: a cut in a sentence goes before one of them
/// when it can.
const PHRASE_STARTS: &[&str] = &[
    "and", "but", "or", "so", "because", "when", "while", "with", "to", "that", "which", "who",
    "if", "as", "for", "in", "on", "at", "of", "about", "from", "into", "after", "before", "until",
    "since", "though", "although", "like", "than", "where", "just", "then",
];

/// Where the reply's first chunk ends in its first sentence: after its
/// first clause break (see [`first_clause_end`]), and in any case within
/// [`FIRST_CHUNK_MAX_CHARS`] characters, cut between two words (before a
/// word a phrase starts with when there is one; `true` then). None when the
/// sentence stays whole.
fn first_chunk_end(sentence: &str) -> Option<(usize, bool)> {
    let end = first_clause_end(sentence);
    let head = &sentence[..end.unwrap_or(sentence.len())];
    if head.trim_end().chars().count() <= FIRST_CHUNK_MAX_CHARS {
        return end.map(|e| (e, false));
    }
    word_cut(head)
        .map(|e| (e, true))
        .or(end.map(|e| (e, false)))
}

/// A cut between two words of `text` with at most [`FIRST_CHUNK_MAX_CHARS`]
/// characters before it and at least [`MIN_CLAUSE_CHARS`] on each side: the
/// last one before a word a phrase starts with, else the last one; the
/// byte index of the word after it.
fn word_cut(text: &str) -> Option<usize> {
    let total = text.trim_end().chars().count();
    let mut last = None;
    let mut before_phrase = None;
    let mut prev_space = false;
    for (chars, (i, c)) in text.char_indices().enumerate() {
        if prev_space && !c.is_whitespace() {
            let left = text[..i].trim_end().chars().count();
            if left > FIRST_CHUNK_MAX_CHARS {
                break;
            }
            if left >= MIN_CLAUSE_CHARS && total - chars >= MIN_CLAUSE_CHARS {
                last = Some(i);
                let word: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_alphabetic() || *c == '\'')
                    .collect::<String>()
                    .to_lowercase();
                if PHRASE_STARTS.contains(&word.as_str()) {
                    before_phrase = Some(i);
                }
            }
        }
        prev_space = c.is_whitespace();
    }
    before_phrase.or(last)
}

/// Byte index just past the first clause break of `sentence` (a comma,
/// semicolon, colon or dash followed by a space, its whitespace included)
/// with at least [`MIN_CLAUSE_CHARS`] characters before and after it.
fn first_clause_end(sentence: &str) -> Option<usize> {
    let mut chars = sentence.char_indices().peekable();
    let mut before = 0usize;
    while let Some((i, c)) = chars.next() {
        before += 1;
        let brk = matches!(c, ',' | ';' | ':' | '–' | '—')
            && chars.peek().is_some_and(|(_, n)| n.is_whitespace());
        if brk && before >= MIN_CLAUSE_CHARS {
            let rest = &sentence[i + c.len_utf8()..];
            let end = sentence.len() - rest.trim_start().len();
            if rest.trim().chars().count() >= MIN_CLAUSE_CHARS {
                return Some(end);
            }
            return None;
        }
    }
    None
}

/// Why an audio message has no transcript.
#[derive(Debug, thiserror::Error)]
pub enum TranscribeError {
    #[error("{0}")]
    Audio(#[from] audio::AudioError),
    #[error("the recording is {bytes} bytes; the limit is {max}")]
    TooBig { bytes: usize, max: usize },
    #[error("speech-to-text failed: {0}")]
    Model(String),
}

/// Whisper with its limits: per recording (bytes, seconds) and per job
/// (seconds of every recording together).
pub struct Transcriber {
    whisper: Whisper,
    language: Option<String>,
    max_seconds: f64,
    max_bytes: usize,
    max_job_seconds: f64,
}

impl Transcriber {
    pub fn new(
        whisper: Whisper,
        language: Option<String>,
        max_seconds: f64,
        max_bytes: usize,
        max_job_seconds: f64,
    ) -> Self {
        Self {
            whisper,
            language,
            max_seconds,
            max_bytes,
            max_job_seconds,
        }
    }

    /// Seconds of audio one job may have transcribed, all recordings together.
    pub fn max_job_seconds(&self) -> f64 {
        self.max_job_seconds
    }

    /// A recording (any common format) → 16 kHz mono, within the
    /// per-recording limits (checked before anything large is allocated).
    pub fn decode(&self, recording: &[u8]) -> Result<audio::Pcm, TranscribeError> {
        if recording.len() > self.max_bytes {
            return Err(TranscribeError::TooBig {
                bytes: recording.len(),
                max: self.max_bytes,
            });
        }
        Ok(audio::decode_to(recording, 16_000, self.max_seconds)?)
    }

    /// Decoded audio → its transcript (silence is `""`); `cancelled` is
    /// checked between 30-second windows.
    pub fn transcribe(
        &self,
        pcm: &audio::Pcm,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<String, TranscribeError> {
        let started = std::time::Instant::now();
        let opts = TranscribeOptions {
            language: self.language.clone(),
        };
        let t = self
            .whisper
            .transcribe_until(&pcm.samples, &opts, cancelled)
            .map_err(|e| TranscribeError::Model(e.to_string()))?;
        tracing::info!(
            audio_s = pcm.seconds(),
            ms = started.elapsed().as_millis() as u64,
            language = t.language.as_deref().unwrap_or(""),
            windows = t.windows,
            silent = t.silent_windows,
            "transcribed"
        );
        Ok(t.text)
    }
}

/// espeak-ng writing to a pipe cannot seek back, so its RIFF and data sizes
/// are placeholders; set them from the actual length.
fn fix_streamed_wav_sizes(mut wav: Vec<u8>) -> Vec<u8> {
    if wav.len() < 44 || &wav[8..12] != b"WAVE" {
        return wav;
    }
    let total = wav.len() as u32;
    wav[4..8].copy_from_slice(&(total - 8).to_le_bytes());
    // Walk the chunks to the "data" chunk.
    let mut pos = 12;
    while pos + 8 <= wav.len() {
        let id = &wav[pos..pos + 4];
        let size = u32::from_le_bytes(wav[pos + 4..pos + 8].try_into().expect("4 bytes"));
        if id == b"data" {
            let actual = (wav.len() - pos - 8) as u32;
            wav[pos + 4..pos + 8].copy_from_slice(&actual.to_le_bytes());
            break;
        }
        pos += 8 + size as usize;
    }
    wav
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Ten samples per character, the calls recorded.
    struct Counting(Mutex<Vec<String>>);

    impl TextToSpeech for Counting {
        fn speak(&self, text: &str, _voice: Option<&str>) -> Result<Pcm, String> {
            self.0.lock().unwrap().push(text.to_string());
            Ok(Pcm {
                samples: vec![0.25; 10 * text.chars().count()],
                sample_rate: 16_000,
            })
        }
        fn format(&self) -> AudioFormat {
            AudioFormat::Wav
        }
    }

    fn run(settled: bool, deltas: &[&str]) -> (Vec<String>, Vec<AudioChunk>, Option<Pcm>) {
        let tts = Counting(Mutex::default());
        let chunks = Mutex::new(Vec::new());
        let spoken = speak_streamed(
            &tts,
            None,
            settled,
            deltas.iter().map(|d| d.to_string()),
            &|| false,
            &|c| chunks.lock().unwrap().push(c),
        )
        .expect("speaks");
        let chunks = chunks.into_inner().unwrap();
        if let Some((_, n)) = &spoken {
            assert_eq!(*n, chunks.len() as u64);
        }
        (
            tts.0.into_inner().unwrap(),
            chunks,
            spoken.map(|(pcm, _)| pcm),
        )
    }

    #[test]
    fn whole_sentence_deltas_are_spoken_one_sentence_per_chunk_as_they_come() {
        let mut splitter = SentenceSplitter::new(true);
        // A chunk at once: the delta ended on a sentence end.
        assert_eq!(splitter.push("Hi there! ").len(), 1);
        assert_eq!(
            splitter
                .push("How are you, my friend? *smiles* Fine.")
                .len(),
            3
        );
        assert!(splitter.finish().is_empty());

        let (calls, chunks, pcm) = run(
            true,
            &["Hi there! ", "How are you, my friend? *smiles* Fine."],
        );
        let pcm = pcm.unwrap();
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        // Only the first sentence is cut at a clause (this one has none).
        assert_eq!(
            texts,
            [
                "Hi there!",
                " How are you, my friend? ",
                "*smiles* ",
                "Fine."
            ]
        );
        assert_eq!(
            calls,
            ["Hi there!", "How are you, my friend?", "smiles", "Fine."]
        );
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.index, i as u64);
            assert_eq!(c.format, "wav");
            // Each chunk is a whole file of its own.
            let decoded = audio::decode(&c.audio, f64::INFINITY).unwrap();
            assert_eq!(
                decoded.samples.len(),
                10 * speakable(&c.text).chars().count()
            );
            assert!((c.seconds - decoded.seconds()).abs() < 1e-9);
        }
        // The whole reply is every chunk's samples.
        let total: usize = chunks
            .iter()
            .map(|c| 10 * speakable(&c.text).chars().count())
            .sum();
        assert_eq!(pcm.samples.len(), total);
        assert_eq!(pcm.sample_rate, 16_000);
    }

    #[test]
    fn token_deltas_wait_for_text_after_a_sentence_end_and_the_tail_is_spoken_at_the_end() {
        let (calls, chunks, _) = run(
            false,
            &["It costs 3", ".", "50 today", ". Really", " cheap"],
        );
        // "3." was not an end: "50" followed it.
        assert_eq!(calls, ["It costs 3.50 today.", "Really cheap"]);
        let joined: String = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(joined, "It costs 3.50 today. Really cheap");
    }

    #[test]
    fn the_first_sentence_is_spoken_in_two_chunks_at_its_first_clause_break() {
        let (calls, chunks, _) = run(
            true,
            &["Well, I just closed the café, and the stars are out tonight. Want to see them, love?"],
        );
        // "Well," is too short a chunk; the next break is taken. The second
        // sentence stays whole.
        assert_eq!(
            calls,
            [
                "Well, I just closed the café,",
                "and the stars are out tonight.",
                "Want to see them, love?"
            ]
        );
        let joined: String = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            joined,
            "Well, I just closed the café, and the stars are out tonight. Want to see them, love?"
        );
        assert_eq!(
            first_clause_end("Sure: yes."),
            None,
            "too short either side"
        );
        assert_eq!(first_clause_end("I'd love that, honestly."), None);
        assert_eq!(
            first_clause_end("I'd love that — more than anything, really."),
            Some("I'd love that — ".len())
        );
    }

    #[test]
    fn a_long_first_sentence_without_a_clause_break_is_cut_between_two_words() {
        let sentence =
            "I have been thinking about you all evening long while wiping down the counters. ";
        let (calls, chunks, _) = run(true, &[sentence, "Come by!"]);
        // Cut before "about" (a word a phrase starts with) within 34
        // characters, the first part spoken as a phrase that goes on.
        assert_eq!(
            calls,
            [
                "I have been thinking,",
                "about you all evening long while wiping down the counters.",
                "Come by!"
            ]
        );
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "I have been thinking ",
                "about you all evening long while wiping down the counters.",
                " Come by!"
            ]
        );
        // A reply with no sentence end at all is cut the same way when it
        // ends.
        let (calls, _, _) = run(false, &[sentence.trim_end().trim_end_matches('.')]);
        assert_eq!(
            calls,
            [
                "I have been thinking,",
                "about you all evening long while wiping down the counters"
            ]
        );
        // Without such a word, the last space within the limit; a short
        // first sentence, or a long one after the first, stays whole.
        let plain = "Absolutely everything tastes better here tonight honestly darling friend.";
        let cut = word_cut(plain).unwrap();
        assert_eq!(&plain[..cut], "Absolutely everything tastes ");
        assert_eq!(first_chunk_end("Sure thing, I will."), None);
        let (calls, _, _) = run(true, &["Yes. ", sentence]);
        assert_eq!(calls, ["Yes.", sentence.trim()]);
        // A long clause before the first break is cut too.
        let (end, in_phrase) = first_chunk_end(
            "The moon over the harbor looked enormous tonight from the pier, truly.",
        )
        .unwrap();
        assert!(in_phrase);
        assert_eq!(
            &"The moon over the harbor looked enormous tonight from the pier, truly."[..end],
            "The moon over the harbor looked "
        );
    }

    /// Two lanes; "Slow…" is spoken only once "Quick…" has started on the
    /// other lane (an error after 30 s if it does not).
    struct TwoLanes {
        started: Mutex<std::sync::mpsc::Sender<()>>,
        other_started: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl TextToSpeech for TwoLanes {
        fn speak(&self, text: &str, _voice: Option<&str>) -> Result<Pcm, String> {
            if text.starts_with("Slow") {
                self.other_started
                    .lock()
                    .unwrap()
                    .recv_timeout(std::time::Duration::from_secs(30))
                    .map_err(|_| "the second lane never started".to_string())?;
            } else if text.starts_with("Quick") {
                let _ = self.started.lock().unwrap().send(());
            }
            if text.starts_with("Silent") {
                return Ok(Pcm {
                    samples: Vec::new(),
                    sample_rate: 16_000,
                });
            }
            if text.starts_with("Broken") {
                return Err("voice failed".into());
            }
            Ok(Pcm {
                samples: vec![0.5; 10 * text.chars().count()],
                sample_rate: 16_000,
            })
        }
        fn format(&self) -> AudioFormat {
            AudioFormat::Wav
        }
        fn lanes(&self) -> usize {
            2
        }
    }

    fn two_lanes() -> TwoLanes {
        let (tx, rx) = std::sync::mpsc::channel();
        TwoLanes {
            started: Mutex::new(tx),
            other_started: Mutex::new(rx),
        }
    }

    #[test]
    fn chunks_are_spoken_on_every_lane_at_once_and_handed_out_in_order() {
        let tts = two_lanes();
        let chunks = Mutex::new(Vec::new());
        let deltas = [
            "Hi there. Slow sentence second. ",
            "Silent one. Quick one. Another quick one.",
        ];
        let (pcm, n) = speak_streamed(
            &tts,
            None,
            true,
            deltas.map(String::from),
            &|| false,
            &|c| chunks.lock().unwrap().push(c),
        )
        .unwrap()
        .unwrap();
        let chunks = chunks.into_inner().unwrap();
        // The first chunk was spoken alone; the slow second one while a
        // later one was (else it fails), and still came before it; the
        // silent one made no chunk and took no index.
        let got: Vec<(u64, &str)> = chunks.iter().map(|c| (c.index, c.text.as_str())).collect();
        assert_eq!(
            got,
            [
                (0, "Hi there. "),
                (1, "Slow sentence second."),
                (2, "Quick one. "),
                (3, "Another quick one.")
            ]
        );
        assert_eq!(n, 4);
        let expected: usize = chunks
            .iter()
            .map(|c| 10 * c.text.trim().chars().count())
            .sum();
        assert_eq!(pcm.samples.len(), expected);
    }

    #[test]
    fn a_failed_chunk_fails_the_speaking_and_nothing_after_it_is_handed_out() {
        let tts = two_lanes();
        let chunks = Mutex::new(Vec::new());
        let err = speak_streamed(
            &tts,
            None,
            true,
            ["Fine first. Broken here. Fine after.".to_string()],
            &|| false,
            &|c| chunks.lock().unwrap().push(c),
        )
        .unwrap_err();
        assert_eq!(err, "voice failed");
        let texts: Vec<String> = chunks
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|c| c.text)
            .collect();
        assert_eq!(texts, ["Fine first. "]);
    }

    #[test]
    fn speaking_stops_when_told() {
        let tts = Counting(Mutex::default());
        let stopped = std::sync::atomic::AtomicBool::new(false);
        let (spoken_tx, spoken_rx) = std::sync::mpsc::channel();
        let spoken_tx = Mutex::new(spoken_tx);
        let deltas = ["One. ", "Two. ", "Three."].into_iter().map(|d| {
            // The client leaves once the first sentence is heard and the
            // second generated.
            if d.starts_with("Two") {
                spoken_rx
                    .recv_timeout(std::time::Duration::from_secs(30))
                    .expect("One.");
                stopped.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            d.to_string()
        });
        let (_, n) = speak_streamed(
            &tts,
            None,
            true,
            deltas,
            &|| stopped.load(std::sync::atomic::Ordering::Relaxed),
            &|c| spoken_tx.lock().unwrap().send(c.text).unwrap(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(tts.0.into_inner().unwrap(), ["One."]);
        assert_eq!(n, 1);
    }

    #[test]
    fn nothing_spoken_gives_no_audio() {
        let (calls, chunks, pcm) = run(true, &["  ", "\n"]);
        assert!(calls.is_empty() && chunks.is_empty() && pcm.is_none());
    }

    #[test]
    fn markup_a_voice_would_read_out_is_left_out() {
        assert_eq!(
            speakable("*smiles softly* Hi there~ 😊 I ❤️ you!"),
            "smiles softly Hi there I you!"
        );
        // A heading's marks, not a number's.
        assert_eq!(
            speakable("## Tonight\n# Plans\nWe're #1 fans, 100%."),
            "Tonight Plans We're #1 fans, 100%."
        );
        // Joined emoji, skin tones, flags and keycaps: their digits stay.
        assert_eq!(
            speakable("Family 👨‍👩‍👧 wave 👋🏽 from 🇫🇷, call 1️⃣ now"),
            "Family wave from , call 1 now"
        );
        // Plain text as it was, words and punctuation alike.
        let plain = "It's 3.50 (today) — \"really\" cheap: snake_case & <3.";
        assert_eq!(speakable(plain), plain);
        // What a chunk gives the voice; markup alone says nothing and
        // makes no chunk, like silence.
        let (calls, chunks, _) = run(true, &["*laughs* ", "😊 ", "Yes!"]);
        assert_eq!(calls, ["laughs", "Yes!"]);
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["*laughs*", " Yes!"]);
    }
}
