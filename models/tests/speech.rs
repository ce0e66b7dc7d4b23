//! The real speech models: Whisper base (converted from the CTranslate2
//! wheels) and the Piper voice `en_US-joe-medium` on ONNX Runtime from the
//! onnxruntime wheel. Recordings in several formats come from ffmpeg.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use models::speech::audio::{decode, decode_to, encode, AudioFormat};
use models::speech::piper::{self, PiperVoice, SynthesisConfig, VoiceRegistry};
use models::speech::whisper::{
    resolve_whisper, TranscribeOptions, Whisper, WhisperCompute, DEFAULT_WHISPER_MODEL,
};

fn models_dir() -> PathBuf {
    models::registry::default_models_dir()
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap())
}

fn whisper() -> &'static Whisper {
    static W: OnceLock<Whisper> = OnceLock::new();
    W.get_or_init(|| {
        let dir = rt()
            .block_on(resolve_whisper(DEFAULT_WHISPER_MODEL, &models_dir()))
            .unwrap();
        Whisper::load(&dir, &Device::Cpu).unwrap()
    })
}

fn registry(lanes: usize) -> VoiceRegistry {
    let specs = HashMap::from([("joe".to_string(), piper::DEFAULT_VOICE.to_string())]);
    rt().block_on(VoiceRegistry::new(
        specs,
        "joe",
        piper::DEFAULT_ONNXRUNTIME,
        piper::DEFAULT_ESPEAK_DATA,
        &models_dir(),
        0,
        lanes,
    ))
    .unwrap()
}

/// The voice on two lanes (the worker's default).
fn voices() -> &'static VoiceRegistry {
    static V: OnceLock<VoiceRegistry> = OnceLock::new();
    V.get_or_init(|| registry(2))
}

fn voice() -> Arc<PiperVoice> {
    rt().block_on(voices().voice(Some("joe"))).unwrap()
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// A spoken recording made with the Piper voice, converted by ffmpeg.
fn recording(text: &str, ext: &str, args: &[&str]) -> Vec<u8> {
    let pcm = voice()
        .synthesize(text, &SynthesisConfig::deterministic())
        .unwrap();
    let wav_bytes = encode(&pcm, AudioFormat::Wav).unwrap();
    if ext == "wav" {
        return wav_bytes;
    }
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("speech.wav");
    std::fs::write(&wav, wav_bytes).unwrap();
    let out = dir.path().join(format!("speech.{ext}"));
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-i"])
        .arg(&wav)
        .args(args)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "ffmpeg {ext}");
    std::fs::read(out).unwrap()
}

#[test]
fn whisper_transcribes_recordings_in_every_common_format() {
    let text = "The quick brown fox jumps over the lazy dog";
    let cases: &[(&str, &[&str])] = &[
        ("wav", &[]),
        ("mp3", &["-c:a", "libmp3lame", "-b:a", "64k"]),
        ("ogg", &["-c:a", "libvorbis"]),
        ("opus", &["-c:a", "libopus", "-b:a", "32k"]),
        ("webm", &["-c:a", "libopus", "-b:a", "32k"]),
        ("m4a", &["-c:a", "aac", "-b:a", "64k"]),
        ("flac", &[]),
    ];
    for (ext, args) in cases {
        let bytes = recording(text, ext, args);
        let pcm = decode_to(&bytes, 16000, 120.0).unwrap_or_else(|e| panic!("{ext}: {e}"));
        assert!(pcm.seconds() > 1.5, "{ext}: {} s", pcm.seconds());
        let t = whisper()
            .transcribe(&pcm.samples, &TranscribeOptions::default())
            .unwrap();
        let got = words(&t.text);
        for w in ["quick", "brown", "fox", "lazy", "dog"] {
            assert!(
                got.contains(&w.to_string()),
                "{ext}: {w:?} missing from {:?}",
                t.text
            );
        }
        assert_eq!(t.language.as_deref(), Some("en"), "{ext}");
    }
}

/// `WHISPER_COMPUTE=int8`: the same words as f32 on a sentence of the
/// Piper voice, and the same language detected.
#[test]
fn whisper_in_int8_transcribes_as_f32_does() {
    assert!(
        models::int8::available(),
        "this machine (x86-64 with AVX-512 VNNI) runs int8"
    );
    let dir = rt()
        .block_on(resolve_whisper(DEFAULT_WHISPER_MODEL, &models_dir()))
        .unwrap();
    let int8 = Whisper::load_with(&dir, &Device::Cpu, WhisperCompute::Int8).unwrap();
    let text = "I missed you today. The rain kept me inside, so I read the book you gave me.";
    let pcm = decode_to(&recording(text, "wav", &[]), 16000, 120.0).unwrap();
    let a = whisper()
        .transcribe(&pcm.samples, &TranscribeOptions::default())
        .unwrap();
    let b = int8
        .transcribe(&pcm.samples, &TranscribeOptions::default())
        .unwrap();
    assert_eq!(
        words(&a.text),
        words(&b.text),
        "f32 {:?}, int8 {:?}",
        a.text,
        b.text
    );
    assert_eq!(words(&b.text), words(text), "{:?}", b.text);
    assert_eq!(b.language.as_deref(), Some("en"));
}

#[test]
fn a_browser_recording_cut_without_its_trailer_still_transcribes() {
    let bytes = recording(
        "Good morning. I would like two coffees and a croissant please.",
        "webm",
        &[
            "-c:a",
            "libopus",
            "-b:a",
            "32k",
            "-live",
            "1",
            "-cluster_time_limit",
            "500",
        ],
    );
    let cut = &bytes[..bytes.len() * 3 / 4];
    let pcm = decode_to(cut, 16000, 120.0).unwrap();
    let t = whisper()
        .transcribe(&pcm.samples, &TranscribeOptions::default())
        .unwrap();
    assert!(
        words(&t.text).contains(&"morning".to_string()),
        "{:?}",
        t.text
    );
}

#[test]
fn silence_and_empty_audio_transcribe_to_nothing() {
    let w = whisper();
    assert_eq!(
        w.transcribe(&[], &TranscribeOptions::default())
            .unwrap()
            .text,
        ""
    );
    let quiet = vec![0.0f32; 16000 * 3];
    assert_eq!(
        w.transcribe(&quiet, &TranscribeOptions::default())
            .unwrap()
            .text,
        ""
    );
    // Low noise, no speech.
    let mut x = 1u32;
    let noise: Vec<f32> = (0..16000 * 3)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((x >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.002
        })
        .collect();
    let t = w.transcribe(&noise, &TranscribeOptions::default()).unwrap();
    assert!(t.text.len() < 12, "noise gave {:?}", t.text);
}

#[test]
fn long_audio_is_cut_into_thirty_second_windows() {
    let text = "My grandmother kept a small garden behind her house near the river. \
        Every spring she planted tomatoes, beans and bright yellow sunflowers. \
        On Sunday mornings we carried water from the well in two old buckets. \
        The neighbours often stopped by to trade seeds and tell long stories. \
        In the autumn the whole family gathered to pick apples from the orchard. \
        My uncle baked pies while the children played football in the field. \
        Years later I still remember the smell of wet soil after the rain. \
        When the snow came we sat by the fire and read old letters aloud. \
        Last week I planted my own garden, and the final word is elephant.";
    let bytes = recording(text, "wav", &[]);
    let pcm = decode_to(&bytes, 16000, 600.0).unwrap();
    assert!(pcm.seconds() > 31.0, "only {} s", pcm.seconds());
    let t = whisper()
        .transcribe(
            &pcm.samples,
            &TranscribeOptions {
                language: Some("en".into()),
            },
        )
        .unwrap();
    assert_eq!(t.windows, (pcm.seconds() / 30.0).ceil() as usize);
    let got = words(&t.text);
    for w in [
        "grandmother",
        "tomatoes",
        "neighbours",
        "apples",
        "football",
        "letters",
        "garden",
    ] {
        assert!(
            got.iter().any(|g| g.starts_with(&w[..5])),
            "{w:?} missing from {:?}",
            t.text
        );
    }
}

#[test]
fn unknown_language_is_a_clear_error() {
    let e = whisper()
        .transcribe(
            &[0.1; 1600],
            &TranscribeOptions {
                language: Some("klingon".into()),
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("klingon"), "{e}");
}

/// piper-tts's phoneme ids for the same sentences, computed by the reference
/// implementation (tests/piper_ids.py) when a venv with piper-tts exists.
fn reference_ids(sentences: &[&str]) -> Vec<Vec<Vec<i64>>> {
    let python = std::env::var("PIPER_PEER_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/companion-worker/peer-venv/bin/python",
            std::env::var("HOME").unwrap()
        )
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/piper_ids.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(sentences)
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (scripts/setup installs piper-tts)"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn phoneme_ids_equal_the_reference_piper() {
    let sentences = [
        "Hello there! How are you today?",
        "Dr. Smith paid $3.50 for 2 apples, didn't he?",
        "I live at 221B Baker St. in London; it's 10:30 a.m. now.",
        "Wait... what?! No way: e.g. this, etc.",
        "The U.S.A. has 50 states, and 1,234,567 people moved in 2024.",
        "\"Quoted\" text (with parens) - and dashes — here.",
        "Mr. and Mrs. Jones arrived at 5 p.m. It was 72°F outside!",
        "I'm feeling 100% better; thanks for asking. See you at 7:45?",
        "Café naïve résumé",
        "",
    ];
    let reference = reference_ids(&sentences);
    let v = voice();
    let palatal = v.config.phoneme_id_map["ʲ"][0];
    let pad = v.config.phoneme_id_map["_"][0];
    let mut liaisons = Vec::new();
    for (s, want) in sentences.iter().zip(reference) {
        let got = v.phoneme_ids(s).unwrap();
        if got == want {
            continue;
        }
        // The one known difference: piper-tts's espeak-ng (a later commit of
        // 1.52.0.1) writes a palatal glide ʲ between /i/ and a following
        // vowel ("thirty a.m."); ours does not. Anything else fails.
        let without: Vec<Vec<i64>> = want
            .iter()
            .map(|ids| {
                let mut out = Vec::new();
                let mut i = 0;
                while i < ids.len() {
                    if ids[i] == palatal && ids.get(i + 1) == Some(&pad) {
                        i += 2;
                    } else {
                        out.push(ids[i]);
                        i += 1;
                    }
                }
                out
            })
            .collect();
        assert_eq!(got, without, "{s:?}");
        liaisons.push(*s);
    }
    assert!(liaisons.len() <= 2, "{liaisons:?}");
}

#[test]
fn piper_speech_is_deterministic_plausible_and_transcribes_back() {
    let v = voice();
    let text = "I missed you today. Shall we watch a movie tonight?";
    let cfg = SynthesisConfig::deterministic();
    let a = v.synthesize(text, &cfg).unwrap();
    let b = v.synthesize(text, &cfg).unwrap();
    assert_eq!(a, b, "noise scales 0 must give identical audio");
    assert_eq!(a.sample_rate, 22050);
    let secs = a.seconds();
    assert!(
        (1.5..6.0).contains(&secs),
        "{secs} s for {} words",
        words(text).len()
    );
    for format in [AudioFormat::Wav, AudioFormat::Mp3, AudioFormat::OggOpus] {
        let bytes = encode(&a, format).unwrap();
        let back = decode(&bytes, 60.0).unwrap();
        assert!((back.seconds() - secs).abs() < 0.1, "{format:?}");
        let pcm = models::speech::audio::resample(&back, 16000).unwrap();
        let t = whisper()
            .transcribe(&pcm.samples, &TranscribeOptions::default())
            .unwrap();
        let got = words(&t.text);
        for w in ["missed", "today", "movie", "tonight"] {
            assert!(
                got.contains(&w.to_string()),
                "{format:?}: {w:?} missing from {:?}",
                t.text
            );
        }
    }
}

/// Sentences synthesized on two lanes at once come out as one lane's,
/// in order.
#[test]
fn two_lanes_speak_as_one() {
    let text = "First sentence here. A second, longer sentence follows it. Third! And a fourth one, to queue.";
    let cfg = SynthesisConfig::deterministic();
    let one = rt().block_on(registry(1).voice(None)).unwrap();
    let mut want = Vec::new();
    one.synthesize_each(text, &cfg, |pcm| {
        want.push(pcm.samples);
        Ok(())
    })
    .unwrap();
    let mut got = Vec::new();
    voice()
        .synthesize_each(text, &cfg, |pcm| {
            got.push(pcm.samples);
            Ok(())
        })
        .unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), w.len(), "sentence {i}");
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "sentence {i}: max |diff| {worst}");
    }
    // A failing callback stops the lanes and comes back as the error.
    let mut calls = 0;
    let err = voice().synthesize_each(text, &cfg, |_| {
        calls += 1;
        Err(models::ModelError::Cancelled)
    });
    assert!(matches!(err, Err(models::ModelError::Cancelled)), "{err:?}");
    assert_eq!(calls, 1);
}

#[test]
fn sentences_are_synthesized_one_at_a_time() {
    let v = voice();
    let mut lens = Vec::new();
    v.synthesize_each(
        "First sentence here. A second, longer sentence follows it. Third!",
        &SynthesisConfig::deterministic(),
        |pcm| {
            lens.push(pcm.samples.len());
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(lens.len(), 3);
    assert!(lens[1] > lens[2], "{lens:?}");
}
