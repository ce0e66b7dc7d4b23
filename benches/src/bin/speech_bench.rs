//! Times our speech models on the inputs `benches/compare_speech.sh` gives
//! the Python peers: Piper synthesis (real-time factor) and Whisper
//! transcription of one recording. Prints one JSON line.
//!
//! speech_bench TEXT_FILE AUDIO_FILE RUNS (`WHISPER_COMPUTE=int8`: Whisper in int8)

use std::time::Instant;

use models::speech::audio::decode_to;
use models::speech::piper::{self, SynthesisConfig, VoiceRegistry};
use models::speech::whisper::{resolve_whisper, TranscribeOptions, Whisper, DEFAULT_WHISPER_MODEL};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1])?;
    let recording = std::fs::read(&args[2])?;
    let runs: usize = args.get(3).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let models_dir = models::registry::default_models_dir();

    let voices = VoiceRegistry::new(
        [("joe".to_string(), piper::DEFAULT_VOICE.to_string())].into(),
        "joe",
        piper::DEFAULT_ONNXRUNTIME,
        piper::DEFAULT_ESPEAK_DATA,
        &models_dir,
        0,
        // The worker's default lanes (TTS_LANES).
        std::env::var("TTS_LANES")
            .ok()
            .and_then(|l| l.parse().ok())
            .unwrap_or(2),
    )
    .await?;
    let voice = voices.voice(None).await?;
    let cfg = SynthesisConfig::deterministic();
    voice.synthesize(&text, &cfg)?; // warm-up
    let mut tts_best = f64::MAX;
    let mut audio_s = 0.0;
    for _ in 0..runs {
        let t = Instant::now();
        let pcm = voice.synthesize(&text, &cfg)?;
        tts_best = tts_best.min(t.elapsed().as_secs_f64());
        audio_s = pcm.seconds();
    }

    let dir = resolve_whisper(DEFAULT_WHISPER_MODEL, &models_dir).await?;
    // WHISPER_COMPUTE=int8 for the int8 row.
    let compute = match std::env::var("WHISPER_COMPUTE") {
        Ok(c) => c.parse().map_err(anyhow::Error::msg)?,
        Err(_) => Default::default(),
    };
    let whisper = Whisper::load_with(&dir, &candle_core::Device::Cpu, compute)?;
    let opts = TranscribeOptions {
        language: Some("en".into()),
    };
    let pcm = decode_to(&recording, 16_000, 3600.0)?;
    whisper.transcribe(&pcm.samples, &opts)?; // warm-up
    let mut stt_best = f64::MAX;
    let mut transcript = String::new();
    for _ in 0..runs {
        let t = Instant::now();
        transcript = whisper.transcribe(&pcm.samples, &opts)?.text;
        stt_best = stt_best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "tts_seconds": tts_best, "tts_audio_seconds": audio_s, "tts_rtf": tts_best / audio_s,
            "stt_seconds": stt_best, "stt_audio_seconds": pcm.seconds(), "transcript": transcript,
        })
    );
    Ok(())
}
