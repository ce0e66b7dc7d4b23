//! Audio header bombs: recordings whose headers claim absurd sample rates,
//! channel counts or lengths, and random header damage over real WAV, MP3,
//! Ogg/Opus and WebM/Opus files. The decoder (with resampling to Whisper's
//! 16 kHz) never panics, never allocates past a bound, and never returns
//! more audio than its limit.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use models::speech::audio::{decode_to, encode, AudioError, AudioFormat, Pcm};
use proptest::prelude::*;

/// Bytes allocated and the peak, per thread (decoding is single-threaded).
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grow(n: usize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + n;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn shrink(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrink(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grow(new_size);
        shrink(layout.size());
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Decoding 30 s of the largest accepted audio (192 kHz, 8 channels)
/// stays well under this.
const PEAK_LIMIT: usize = 256 << 20;
const MAX_SECONDS: f64 = 30.0;

/// Decodes to 16 kHz and returns the result with the peak bytes allocated
/// above what was live before.
fn decode_measured(bytes: &[u8]) -> (Result<Pcm, AudioError>, usize) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let out = decode_to(bytes, 16_000, MAX_SECONDS);
    let peak = PEAK.with(|p| p.get()) - base;
    (out, peak)
}

fn tone(rate: u32, seconds: f64) -> Pcm {
    let n = (rate as f64 * seconds) as usize;
    Pcm {
        samples: (0..n)
            .map(|i| (i as f32 * 440.0 * std::f32::consts::TAU / rate as f32).sin() * 0.3)
            .collect(),
        sample_rate: rate,
    }
}

/// One real file per container: WAV, MP3, Ogg/Opus from our encoder, and
/// WebM/Opus (a browser's recording) from ffmpeg.
fn samples() -> Vec<(&'static str, Vec<u8>)> {
    static SAMPLES: std::sync::OnceLock<Vec<(&'static str, Vec<u8>)>> = std::sync::OnceLock::new();
    SAMPLES
        .get_or_init(|| {
            let pcm = tone(22_050, 1.0);
            let wav = encode(&pcm, AudioFormat::Wav).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (wav_path, webm_path) = (dir.path().join("a.wav"), dir.path().join("a.webm"));
            std::fs::write(&wav_path, &wav).unwrap();
            let made = std::process::Command::new("ffmpeg")
                .args(["-hide_banner", "-loglevel", "error", "-y", "-i"])
                .arg(&wav_path)
                .args(["-c:a", "libopus", "-b:a", "32k"])
                .arg(&webm_path)
                .status()
                .expect("ffmpeg (installed by scripts/setup) makes the WebM sample");
            assert!(made.success());
            vec![
                ("wav", wav),
                ("mp3", encode(&pcm, AudioFormat::Mp3).unwrap()),
                ("ogg", encode(&pcm, AudioFormat::OggOpus).unwrap()),
                ("webm", std::fs::read(&webm_path).unwrap()),
            ]
        })
        .clone()
}

/// A canonical 44-byte-header PCM WAV with the given header fields.
fn wav_with(rate: u32, channels: u16, data_len: u32, body: &[u8]) -> Vec<u8> {
    let mut w = Vec::new();
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + body.len() as u32).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&channels.to_le_bytes());
    w.extend_from_slice(&rate.to_le_bytes());
    let block = channels.wrapping_mul(2);
    w.extend_from_slice(&rate.wrapping_mul(block as u32).to_le_bytes());
    w.extend_from_slice(&block.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    w.extend_from_slice(body);
    w
}

#[test]
fn the_headers_from_the_issue_are_refused_before_anything_is_sized_from_them() {
    let body = vec![0u8; 3000];
    for (what, wav) in [
        ("a 4 GHz rate", wav_with(4_294_967_291, 1, 3000, &body)),
        ("65,535 channels", wav_with(16_000, 65_535, 3000, &body)),
        ("a rate of 1 Hz", wav_with(1, 1, 3000, &body)),
    ] {
        let (out, peak) = decode_measured(&wav);
        assert!(
            matches!(
                out,
                Err(AudioError::OutOfBounds(_)) | Err(AudioError::Unrecognised(_))
            ),
            "{what}: {out:?}"
        );
        assert!(peak < PEAK_LIMIT, "{what}: {peak} bytes");
    }
    // A data chunk that claims 4 GB of a 3 KB file: an error, or the little
    // audio that is there; never 4 GB.
    let (out, peak) = decode_measured(&wav_with(16_000, 1, u32::MAX, &body));
    if let Ok(pcm) = out {
        assert!(pcm.seconds() < 0.2, "{}", pcm.seconds());
    }
    assert!(peak < PEAK_LIMIT, "{peak} bytes");
    // Longer than the limit: refused, without keeping it all first.
    let long = encode(&tone(16_000, MAX_SECONDS + 5.0), AudioFormat::Wav).unwrap();
    let (out, peak) = decode_measured(&long);
    assert!(matches!(out, Err(AudioError::TooLong { .. })), "{out:?}");
    assert!(peak < PEAK_LIMIT, "{peak} bytes");
}

#[test]
fn undamaged_samples_decode() {
    for (name, bytes) in samples() {
        let (out, _) = decode_measured(&bytes);
        let pcm = out.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            (pcm.seconds() - 1.0).abs() < 0.1,
            "{name}: {}",
            pcm.seconds()
        );
    }
}

/// A u32 a header field might be damaged to.
fn field_value() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(u32::MAX),
        Just(4_294_967_291),
        Just(65_535),
        Just(0x7fff_ffff),
        any::<u32>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random damage to the first 96 bytes (where every container keeps
    /// its header): byte writes, u32 fields set to extremes, and a cut.
    #[test]
    fn damaged_headers_never_panic_or_allocate_past_the_bound(
        which in 0usize..4,
        bytes in prop::collection::vec((0usize..96, any::<u8>()), 0..8),
        fields in prop::collection::vec((0usize..24, field_value()), 0..4),
        cut in prop::option::of(16usize..4096),
    ) {
        let samples = samples();
        let (name, original) = &samples[which];
        let mut file = original.clone();
        for (at, b) in bytes {
            if at < file.len() {
                file[at] = b;
            }
        }
        for (slot, v) in fields {
            let at = slot * 4;
            if at + 4 <= file.len() {
                file[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        if let Some(cut) = cut {
            file.truncate(cut.min(file.len()));
        }
        let (out, peak) = decode_measured(&file);
        prop_assert!(peak < PEAK_LIMIT, "{name}: {peak} bytes");
        if let Ok(pcm) = out {
            prop_assert!(pcm.seconds() <= MAX_SECONDS + 0.1, "{name}: {} s", pcm.seconds());
            prop_assert_eq!(pcm.sample_rate, 16_000);
        }
    }
}

/// Found by the cargo-fuzz target (`models/fuzz`) within seconds: a damaged
/// WebM on which symphonia-format-mkv 0.5.5 panics ("EBML header must be
/// read before calling this function"). The decoder turns that into an
/// error; the caller never sees a panic.
#[test]
fn a_demuxer_panic_is_an_error() {
    let file = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mkv_demuxer_panic.webm"),
    )
    .unwrap();
    let (out, peak) = decode_measured(&file);
    assert!(
        matches!(&out, Err(AudioError::Undecodable(m)) if m.contains("decoder failed")),
        "{out:?}"
    );
    assert!(peak < PEAK_LIMIT);
}
