//! Speech in and out.
//!
//! - [`audio`]: decoding recordings (symphonia + libopus), resampling
//!   (rubato), encoding replies (WAV, MP3, Ogg/Opus).
//! - [`whisper`]: Whisper speech-to-text on candle, with a decoder KV cache.
//! - [`ct2`]: CTranslate2 Whisper checkpoints converted to candle's names.
//! - [`espeak`]: espeak-ng phonemes, clause by clause, as Piper makes them.
//! - [`piper`]: Piper (VITS) voices on ONNX Runtime, and a voice registry.

pub mod audio;
pub mod ct2;
pub mod espeak;
pub mod piper;
pub mod whisper;
