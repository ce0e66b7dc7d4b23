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

    /// `text` spoken and encoded.
    fn synthesize(&self, text: &str, voice: Option<&str>) -> Result<SpokenAudio, String> {
        SpokenAudio::encode(&self.speak(text, voice)?, self.format())
    }
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

/// Speaks a reply while its text streams in: each sentence is spoken as
/// soon as it is complete and handed out as a chunk (a whole file in the
/// TTS's format, numbered from 0), so the first audio follows the first
/// sentence instead of the whole reply. The first sentence is spoken in two
/// chunks when it has a clause break (see [`first_clause_end`]): synthesis
/// time grows with the length of what is spoken, and the first chunk is
/// the one a listener waits for; the rest is synthesized while it plays. Chunk texts, joined, are the text
/// pushed (whitespace included; a sentence the voice gives no samples for
/// makes no chunk); the samples of every chunk together are the whole
/// reply's audio.
pub struct SentenceSpeaker<'a> {
    tts: &'a dyn TextToSpeech,
    voice: Option<String>,
    /// Deltas end where sentences end (whole-sentence streaming), so an end
    /// at the very end of the text so far is a real one; otherwise a
    /// sentence counts once more text follows its end.
    settled: bool,
    /// Text pushed and not yet spoken.
    pending: String,
    next_index: u64,
    samples: Vec<f32>,
    sample_rate: u32,
}

impl<'a> SentenceSpeaker<'a> {
    pub fn new(tts: &'a dyn TextToSpeech, voice: Option<String>, settled: bool) -> Self {
        Self {
            tts,
            voice,
            settled,
            pending: String::new(),
            next_index: 0,
            samples: Vec::new(),
            sample_rate: 0,
        }
    }

    /// Adds streamed text; speaks every sentence it completes, one chunk
    /// each, in order.
    pub fn push(&mut self, delta: &str, out: &mut dyn FnMut(AudioChunk)) -> Result<(), String> {
        use models::text::reply::{first_sentence_end, sentence_end, settled_sentence_end};
        self.pending.push_str(delta);
        let complete = if self.settled {
            sentence_end(&self.pending)
        } else {
            settled_sentence_end(&self.pending)
        };
        let Some(complete) = complete else {
            return Ok(());
        };
        let mut rest: String = self.pending.split_off(complete);
        std::mem::swap(&mut rest, &mut self.pending);
        // `rest` now holds the complete sentences: one chunk each, and the
        // reply's first sentence cut after its first clause.
        let mut text = rest.as_str();
        while !text.is_empty() {
            let end = first_sentence_end(text).unwrap_or(text.len());
            let end = match self.next_index {
                0 => first_clause_end(&text[..end]).unwrap_or(end),
                _ => end,
            };
            // Whitespace after the last end belongs to that sentence.
            let end = end + text[end..].len() - text[end..].trim_start().len();
            self.speak(&text[..end], out)?;
            text = &text[end..];
        }
        Ok(())
    }

    /// Speaks what is left (a last sentence without an end); the whole
    /// reply's audio, None when nothing was spoken.
    pub fn finish(mut self, out: &mut dyn FnMut(AudioChunk)) -> Result<Option<Pcm>, String> {
        let rest = std::mem::take(&mut self.pending);
        self.speak(&rest, out)?;
        Ok((!self.samples.is_empty()).then_some(Pcm {
            samples: self.samples,
            sample_rate: self.sample_rate,
        }))
    }

    fn speak(&mut self, text: &str, out: &mut dyn FnMut(AudioChunk)) -> Result<(), String> {
        if text.trim().is_empty() {
            // Nothing to say: the whitespace goes with the next sentence.
            self.pending.insert_str(0, text);
            return Ok(());
        }
        let pcm = self.tts.speak(text.trim(), self.voice.as_deref())?;
        if pcm.samples.is_empty() {
            return Ok(());
        }
        let format = self.tts.format();
        let audio = audio::encode(&pcm, format).map_err(|e| e.to_string())?;
        out(AudioChunk {
            index: self.next_index,
            text: text.to_string(),
            format: format.extension().to_string(),
            seconds: pcm.seconds(),
            audio,
        });
        self.next_index += 1;
        self.sample_rate = pcm.sample_rate;
        self.samples.extend(pcm.samples);
        Ok(())
    }
}

/// Fewest characters on each side of a clause break the first sentence is
/// cut at: no one- or two-word chunk.
const MIN_CLAUSE_CHARS: usize = 12;

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
        let mut chunks = Vec::new();
        let mut speaker = SentenceSpeaker::new(&tts, None, settled);
        for d in deltas {
            speaker.push(d, &mut |c| chunks.push(c)).expect("speaks");
        }
        let pcm = speaker.finish(&mut |c| chunks.push(c)).expect("speaks");
        (tts.0.into_inner().unwrap(), chunks, pcm)
    }

    #[test]
    fn whole_sentence_deltas_are_spoken_one_sentence_per_chunk_as_they_come() {
        let tts = Counting(Mutex::default());
        let mut chunks = Vec::new();
        let mut speaker = SentenceSpeaker::new(&tts, Some("joe".into()), true);
        speaker.push("Hi there! ", &mut |c| chunks.push(c)).unwrap();
        // Spoken at once: the delta ended on a sentence end.
        assert_eq!(chunks.len(), 1);
        speaker
            .push("How are you, my friend? *smiles* Fine.", &mut |c| {
                chunks.push(c)
            })
            .unwrap();
        assert_eq!(chunks.len(), 4);
        let pcm = speaker.finish(&mut |c| chunks.push(c)).unwrap().unwrap();
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
            tts.0.lock().unwrap().as_slice(),
            ["Hi there!", "How are you, my friend?", "*smiles*", "Fine."]
        );
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.index, i as u64);
            assert_eq!(c.format, "wav");
            // Each chunk is a whole file of its own.
            let decoded = audio::decode(&c.audio, f64::INFINITY).unwrap();
            assert_eq!(decoded.samples.len(), 10 * c.text.trim().chars().count());
            assert!((c.seconds - decoded.seconds()).abs() < 1e-9);
        }
        // The whole reply is every chunk's samples.
        let total: usize = chunks
            .iter()
            .map(|c| 10 * c.text.trim().chars().count())
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
    fn nothing_spoken_gives_no_audio() {
        let (calls, chunks, pcm) = run(true, &["  ", "\n"]);
        assert!(calls.is_empty() && chunks.is_empty() && pcm.is_none());
    }
}
