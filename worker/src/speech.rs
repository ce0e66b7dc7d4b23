//! Text-to-speech for `generate_audio`.
//!
//! The first backend is the espeak-ng synthesizer (Debian `espeak-ng`), run as
//! a process that writes a WAV to stdout: real speech, no model files. Piper
//! voices on ONNX Runtime replace it as the default when they land.

use std::io::Write;
use std::process::{Command, Stdio};

pub trait TextToSpeech: Send + Sync {
    /// A WAV file speaking `text`.
    fn synthesize(&self, text: &str) -> Result<Vec<u8>, String>;
}

pub struct EspeakNg {
    program: String,
    voice: String,
}

impl EspeakNg {
    /// Finds the program; None when it is not installed.
    pub fn detect(program: &str, voice: &str) -> Option<Self> {
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
        })
    }
}

impl TextToSpeech for EspeakNg {
    fn synthesize(&self, text: &str) -> Result<Vec<u8>, String> {
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
