//! Speech for chat jobs: replies spoken by Piper voices (or espeak-ng as a
//! fallback backend), audio messages transcribed by Whisper.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

use models::speech::audio::{self, AudioFormat, Pcm};
use models::speech::piper::{SynthesisConfig, VoiceRegistry};
use models::speech::whisper::{TranscribeOptions, Whisper};

/// A spoken reply, encoded.
pub struct SpokenAudio {
    pub bytes: Vec<u8>,
    pub format: AudioFormat,
    pub seconds: f64,
}

pub trait TextToSpeech: Send + Sync {
    /// `text` spoken by `voice` (the instance's `assigned_voice_id`; the
    /// backend's default when `None` or unknown).
    fn synthesize(&self, text: &str, voice: Option<&str>) -> Result<SpokenAudio, String>;
}

fn encoded(pcm: &Pcm, format: AudioFormat) -> Result<SpokenAudio, String> {
    Ok(SpokenAudio {
        bytes: audio::encode(pcm, format).map_err(|e| e.to_string())?,
        format,
        seconds: pcm.seconds(),
    })
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
    fn synthesize(&self, text: &str, voice: Option<&str>) -> Result<SpokenAudio, String> {
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
        encoded(&pcm, self.format)
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
    fn synthesize(&self, text: &str, _voice: Option<&str>) -> Result<SpokenAudio, String> {
        let pcm = audio::decode(&self.wav(text)?, f64::INFINITY).map_err(|e| e.to_string())?;
        encoded(&pcm, self.format)
    }
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
