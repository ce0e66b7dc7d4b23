//! Any bytes as a recording: decoding (and resampling to Whisper's 16 kHz)
//! returns audio within the limit or an error, and never panics. Run with
//! `cd models/fuzz && cargo +nightly fuzz run audio_decode`; seed the corpus
//! with real WAV, MP3, Ogg and WebM files for header-level damage.

#![no_main]

use libfuzzer_sys::fuzz_target;

const MAX_SECONDS: f64 = 30.0;

fuzz_target!(|data: &[u8]| {
    if let Ok(pcm) = models::speech::audio::decode_to(data, 16_000, MAX_SECONDS) {
        assert_eq!(pcm.sample_rate, 16_000);
        assert!(pcm.seconds() <= MAX_SECONDS + 0.1);
    }
});
