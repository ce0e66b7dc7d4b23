//! Audio in and out: any common recording decoded to mono f32 (symphonia,
//! with libopus for Opus), resampled with rubato; replies encoded as WAV, MP3
//! (LAME) or Ogg/Opus (libopus).

use std::io::Cursor;

use rubato::{FftFixedIn, Resampler};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CodecRegistry, DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// Why a recording could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AudioError {
    #[error("audio format not recognised: {0}")]
    Unrecognised(String),
    #[error("audio could not be decoded: {0}")]
    Undecodable(String),
    #[error("audio lasts more than the {max_seconds} s limit")]
    TooLong { max_seconds: f64 },
    /// A header that claims what no recording has (a sample rate of 4 GHz,
    /// 65,535 channels, a packet of gigabytes): refused before anything is
    /// sized from it.
    #[error("audio header out of bounds: {0}")]
    OutOfBounds(String),
    #[error("audio encoding failed: {0}")]
    Encode(String),
}

/// Sample rates a recording may have (telephony to studio).
pub const SAMPLE_RATES: std::ops::RangeInclusive<u32> = 4_000..=192_000;
/// Channels a recording may have (7.1 is 8).
pub const MAX_CHANNELS: usize = 8;
/// Frames one decoded packet may hold (about 5 s at 192 kHz).
pub const MAX_PACKET_FRAMES: u64 = 1 << 20;

fn check_rate(rate: u32) -> Result<(), AudioError> {
    if SAMPLE_RATES.contains(&rate) {
        Ok(())
    } else {
        Err(AudioError::OutOfBounds(format!(
            "a sample rate of {rate} Hz (accepted: {} to {} Hz)",
            SAMPLE_RATES.start(),
            SAMPLE_RATES.end()
        )))
    }
}

fn check_channels(channels: usize) -> Result<(), AudioError> {
    if channels <= MAX_CHANNELS {
        Ok(())
    } else {
        Err(AudioError::OutOfBounds(format!(
            "{channels} channels (at most {MAX_CHANNELS})"
        )))
    }
}

/// Mono samples at a sample rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Pcm {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

impl Pcm {
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate.max(1) as f64
    }
}

fn codecs() -> &'static CodecRegistry {
    static REGISTRY: std::sync::OnceLock<CodecRegistry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut registry = CodecRegistry::new();
        symphonia::default::register_enabled_codecs(&mut registry);
        registry.register_all::<symphonia_adapter_libopus::OpusDecoder>();
        registry
    })
}

/// Decodes a whole recording (wav, mp3, ogg/vorbis, ogg/opus, webm/opus,
/// m4a/aac, flac…) to mono, averaging channels. A stream that ends without a
/// clean trailer (a browser recording cut short) keeps what decoded; one that
/// yields nothing at all is an error. Decoding stops with
/// [`AudioError::TooLong`] past `max_seconds`.
pub fn decode(bytes: &[u8], max_seconds: f64) -> Result<Pcm, AudioError> {
    // Whatever a crafted file does to a demuxer, the caller gets an error,
    // never a panic.
    std::panic::catch_unwind(|| decode_checked(bytes, max_seconds)).unwrap_or_else(|_| {
        Err(AudioError::Undecodable(
            "the decoder failed on this file".into(),
        ))
    })
}

fn decode_checked(bytes: &[u8], max_seconds: f64) -> Result<Pcm, AudioError> {
    match decode_whole(bytes, max_seconds) {
        // An Ogg stream cut short (no end-of-stream page) fails symphonia's
        // probe: re-page the packets that are whole and decode those.
        Err(AudioError::Unrecognised(e)) if bytes.starts_with(b"OggS") => {
            let repaired = repage_ogg(bytes).ok_or(AudioError::Unrecognised(e))?;
            decode_whole(&repaired, max_seconds)
        }
        other => other,
    }
}

/// The whole packets of the first logical Ogg stream, written again with a
/// proper end-of-stream page.
fn repage_ogg(bytes: &[u8]) -> Option<Vec<u8>> {
    use ogg::writing::{PacketWriteEndInfo, PacketWriter};
    let mut reader = ogg::reading::PacketReader::new(Cursor::new(bytes));
    let mut packets = Vec::new();
    while let Ok(Some(p)) = reader.read_packet() {
        if packets
            .first()
            .is_some_and(|f: &ogg::Packet| f.stream_serial() != p.stream_serial())
        {
            continue;
        }
        packets.push(p);
    }
    if packets.len() < 3 {
        return None;
    }
    let mut out = Vec::new();
    let mut w = PacketWriter::new(&mut out);
    let n = packets.len();
    for (i, p) in packets.into_iter().enumerate() {
        let info = if i + 1 == n {
            PacketWriteEndInfo::EndStream
        } else if p.last_in_page() {
            PacketWriteEndInfo::EndPage
        } else {
            PacketWriteEndInfo::NormalPacket
        };
        let (serial, granule) = (p.stream_serial(), p.absgp_page());
        w.write_packet(p.data, serial, info, granule).ok()?;
    }
    drop(w);
    Some(out)
}

fn decode_whole(bytes: &[u8], max_seconds: f64) -> Result<Pcm, AudioError> {
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes.to_vec())), Default::default());
    let probed = symphonia::default::get_probe()
        .format(
            &Hint::new(),
            mss,
            &FormatOptions {
                enable_gapless: true,
                ..Default::default()
            },
            &MetadataOptions::default(),
        )
        .map_err(|e| AudioError::Unrecognised(e.to_string()))?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| AudioError::Unrecognised("no audio track".into()))?;
    let track_id = track.id;
    // What the header claims is checked before a decoder (or, later, a
    // resampler) is sized from it.
    if let Some(rate) = track.codec_params.sample_rate {
        check_rate(rate)?;
    }
    if let Some(channels) = track.codec_params.channels {
        check_channels(channels.count())?;
    }
    if let Some(frames) = track.codec_params.max_frames_per_packet {
        if frames > MAX_PACKET_FRAMES {
            return Err(AudioError::OutOfBounds(format!(
                "packets of {frames} frames (at most {MAX_PACKET_FRAMES})"
            )));
        }
    }
    let mut decoder = codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| AudioError::Unrecognised(format!("codec: {e}")))?;
    let mut sample_rate = track.codec_params.sample_rate.unwrap_or(0);
    let mut samples: Vec<f32> = Vec::new();
    let mut buf: Option<SampleBuffer<f32>> = None;
    let mut last_error = None;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            // A truncated container: keep what decoded so far.
            Err(e) => {
                last_error = Some(e.to_string());
                break;
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        match decoder.decode(&packet) {
            Ok(decoded) => {
                let spec = *decoded.spec();
                check_rate(spec.rate)?;
                sample_rate = spec.rate;
                let channels = spec.channels.count().max(1);
                check_channels(channels)?;
                let frames = decoded.frames();
                if decoded.capacity() as u64 > MAX_PACKET_FRAMES {
                    return Err(AudioError::OutOfBounds(format!(
                        "a packet of {} frames (at most {MAX_PACKET_FRAMES})",
                        decoded.capacity()
                    )));
                }
                // The limit holds before the samples are kept, not after.
                if (samples.len() + frames) as f64 / sample_rate as f64 > max_seconds {
                    return Err(AudioError::TooLong { max_seconds });
                }
                let sb = match &mut buf {
                    Some(b) if b.capacity() >= frames * channels => b,
                    _ => buf.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
                };
                sb.copy_interleaved_ref(decoded);
                let inter = sb.samples();
                samples.extend(
                    inter
                        .chunks_exact(channels)
                        .map(|frame| frame.iter().sum::<f32>() / channels as f32),
                );
                if sample_rate > 0 && samples.len() as f64 / sample_rate as f64 > max_seconds {
                    return Err(AudioError::TooLong { max_seconds });
                }
            }
            // A corrupt packet is skipped, as players do.
            Err(SymError::DecodeError(e)) => last_error = Some(e.to_string()),
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(AudioError::Undecodable(e.to_string())),
        }
    }
    if sample_rate == 0 {
        return Err(AudioError::Undecodable("no sample rate".into()));
    }
    if samples.is_empty() {
        if let Some(e) = last_error {
            return Err(AudioError::Undecodable(e));
        }
    }
    Ok(Pcm {
        samples,
        sample_rate,
    })
}

/// Resamples with rubato's FFT resampler (band-limited, not linear
/// interpolation); the output is delay-compensated and exactly
/// `len * to / from` samples long.
pub fn resample(pcm: &Pcm, to: u32) -> Result<Pcm, AudioError> {
    if pcm.sample_rate == to || pcm.samples.is_empty() {
        return Ok(Pcm {
            samples: pcm.samples.clone(),
            sample_rate: to,
        });
    }
    // The FFT sizes follow the rates: never size one from an unchecked rate.
    check_rate(pcm.sample_rate)?;
    check_rate(to)?;
    let err = |e: &dyn std::fmt::Display| AudioError::Undecodable(format!("resampling: {e}"));
    let chunk = 1024;
    let mut rs = FftFixedIn::<f32>::new(pcm.sample_rate as usize, to as usize, chunk, 2, 1)
        .map_err(|e| err(&e))?;
    let delay = rs.output_delay();
    let expected = (pcm.samples.len() as u64 * to as u64 / pcm.sample_rate as u64) as usize;
    let mut out: Vec<f32> = Vec::with_capacity(expected + delay + chunk);
    let mut rest = &pcm.samples[..];
    while rest.len() >= rs.input_frames_next() {
        let n = rs.input_frames_next();
        let produced = rs.process(&[&rest[..n]], None).map_err(|e| err(&e))?;
        out.extend_from_slice(&produced[0]);
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        let produced = rs
            .process_partial(Some(&[rest]), None)
            .map_err(|e| err(&e))?;
        out.extend_from_slice(&produced[0]);
    }
    while out.len() < expected + delay {
        let produced = rs
            .process_partial::<&[f32]>(None, None)
            .map_err(|e| err(&e))?;
        if produced[0].is_empty() {
            break;
        }
        out.extend_from_slice(&produced[0]);
    }
    let end = (delay + expected).min(out.len());
    Ok(Pcm {
        samples: out[delay.min(end)..end].to_vec(),
        sample_rate: to,
    })
}

/// Decode then resample to `rate` (16 kHz for Whisper).
pub fn decode_to(bytes: &[u8], rate: u32, max_seconds: f64) -> Result<Pcm, AudioError> {
    resample(&decode(bytes, max_seconds)?, rate)
}

/// Output formats for spoken replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AudioFormat {
    #[default]
    Wav,
    Mp3,
    OggOpus,
}

impl AudioFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "wav" => Some(Self::Wav),
            "mp3" => Some(Self::Mp3),
            "ogg" | "opus" | "ogg/opus" | "ogg_opus" => Some(Self::OggOpus),
            _ => None,
        }
    }
    pub fn extension(self) -> &'static str {
        match self {
            Self::Wav => "wav",
            Self::Mp3 => "mp3",
            Self::OggOpus => "ogg",
        }
    }
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Wav => "audio/wav",
            Self::Mp3 => "audio/mpeg",
            Self::OggOpus => "audio/ogg",
        }
    }
}

fn to_i16(samples: &[f32]) -> Vec<i16> {
    samples
        .iter()
        .map(|s| (s.clamp(-1.0, 1.0) * 32767.0).round() as i16)
        .collect()
}

/// Encodes mono samples.
pub fn encode(pcm: &Pcm, format: AudioFormat) -> Result<Vec<u8>, AudioError> {
    match format {
        AudioFormat::Wav => encode_wav(pcm),
        AudioFormat::Mp3 => encode_mp3(pcm),
        AudioFormat::OggOpus => encode_ogg_opus(pcm),
    }
}

fn encode_wav(pcm: &Pcm) -> Result<Vec<u8>, AudioError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: pcm.sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = Cursor::new(Vec::new());
    let e = |e: hound::Error| AudioError::Encode(format!("wav: {e}"));
    let mut w = hound::WavWriter::new(&mut out, spec).map_err(e)?;
    for s in to_i16(&pcm.samples) {
        w.write_sample(s).map_err(e)?;
    }
    w.finalize().map_err(e)?;
    Ok(out.into_inner())
}

fn encode_mp3(pcm: &Pcm) -> Result<Vec<u8>, AudioError> {
    use mp3lame_encoder::{Bitrate, Builder, FlushNoGap, MonoPcm, Quality};
    let e =
        |what: &str, err: &dyn std::fmt::Display| AudioError::Encode(format!("mp3 {what}: {err}"));
    let mut b =
        Builder::new().ok_or_else(|| AudioError::Encode("mp3: LAME did not start".into()))?;
    b.set_num_channels(1).map_err(|x| e("channels", &x))?;
    b.set_sample_rate(pcm.sample_rate)
        .map_err(|x| e("sample rate", &x))?;
    b.set_brate(Bitrate::Kbps64).map_err(|x| e("bitrate", &x))?;
    b.set_quality(Quality::Good).map_err(|x| e("quality", &x))?;
    let mut enc = b.build().map_err(|x| e("build", &x))?;
    let input = to_i16(&pcm.samples);
    let mut out = Vec::new();
    for chunk in input.chunks(8192) {
        out.reserve(mp3lame_encoder::max_required_buffer_size(chunk.len()));
        enc.encode_to_vec(MonoPcm(chunk), &mut out)
            .map_err(|x| e("encode", &x))?;
    }
    out.reserve(7200);
    enc.flush_to_vec::<FlushNoGap>(&mut out)
        .map_err(|x| e("flush", &x))?;
    Ok(out)
}

/// Ogg/Opus per RFC 7845: OpusHead and OpusTags pages, then 20 ms packets at
/// 48 kHz with granule positions counting the encoder's pre-skip.
fn encode_ogg_opus(pcm: &Pcm) -> Result<Vec<u8>, AudioError> {
    use ogg::writing::{PacketWriteEndInfo, PacketWriter};
    const RATE: u32 = 48_000;
    const FRAME: usize = 960;
    let e = |what: &str, err: &dyn std::fmt::Display| {
        AudioError::Encode(format!("ogg/opus {what}: {err}"))
    };
    let pcm48 = resample(pcm, RATE)?;
    let mut enc = opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Voip)
        .map_err(|x| e("encoder", &x))?;
    enc.set_bitrate(opus::Bitrate::Bits(32_000))
        .map_err(|x| e("bitrate", &x))?;
    let pre_skip = enc.get_lookahead().map_err(|x| e("lookahead", &x))? as u16;
    let serial = 0x636f_6d70; // "comp"
    let mut out = Vec::new();
    {
        let mut w = PacketWriter::new(&mut out);
        let mut head = b"OpusHead".to_vec();
        head.push(1); // version
        head.push(1); // channels
        head.extend_from_slice(&pre_skip.to_le_bytes());
        head.extend_from_slice(&pcm.sample_rate.to_le_bytes()); // original rate
        head.extend_from_slice(&0i16.to_le_bytes()); // gain
        head.push(0); // mapping family
        w.write_packet(head, serial, PacketWriteEndInfo::EndPage, 0)
            .map_err(|x| e("write", &x))?;
        let vendor = b"companion-worker";
        let mut tags = b"OpusTags".to_vec();
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&0u32.to_le_bytes());
        w.write_packet(tags, serial, PacketWriteEndInfo::EndPage, 0)
            .map_err(|x| e("write", &x))?;
        let mut samples = pcm48.samples;
        // Pad so the last frame is whole and the pre-skip is flushed out.
        let total = samples.len();
        let padded = (total + pre_skip as usize).div_ceil(FRAME) * FRAME;
        samples.resize(padded.max(FRAME), 0.0);
        let frames: Vec<&[f32]> = samples.chunks(FRAME).collect();
        let mut packet = vec![0u8; 4000];
        for (i, frame) in frames.iter().enumerate() {
            let n = enc
                .encode_float(frame, &mut packet)
                .map_err(|x| e("encode", &x))?;
            let last = i + 1 == frames.len();
            let granule = if last {
                (total + pre_skip as usize) as u64
            } else {
                ((i + 1) * FRAME) as u64
            };
            let info = if last {
                PacketWriteEndInfo::EndStream
            } else if (i + 1) % 25 == 0 {
                // A page every half second, as opusenc does: a player (or
                // a cut download) loses at most that much.
                PacketWriteEndInfo::EndPage
            } else {
                PacketWriteEndInfo::NormalPacket
            };
            w.write_packet(packet[..n].to_vec(), serial, info, granule)
                .map_err(|x| e("write", &x))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, seconds: f64, hz: f64) -> Pcm {
        let n = (rate as f64 * seconds) as usize;
        Pcm {
            samples: (0..n)
                .map(|i| {
                    (0.5 * (2.0 * std::f64::consts::PI * hz * i as f64 / rate as f64).sin()) as f32
                })
                .collect(),
            sample_rate: rate,
        }
    }

    /// Strength of a frequency in a signal (one DFT bin).
    fn power_at(pcm: &Pcm, hz: f64) -> f64 {
        let (mut re, mut im) = (0.0, 0.0);
        for (i, &s) in pcm.samples.iter().enumerate() {
            let ph = 2.0 * std::f64::consts::PI * hz * i as f64 / pcm.sample_rate as f64;
            re += s as f64 * ph.cos();
            im += s as f64 * ph.sin();
        }
        (re * re + im * im).sqrt() / pcm.samples.len() as f64
    }

    #[test]
    fn every_output_format_decodes_back_to_the_same_tone() {
        let pcm = tone(22050, 1.0, 440.0);
        for format in [AudioFormat::Wav, AudioFormat::Mp3, AudioFormat::OggOpus] {
            let bytes = encode(&pcm, format).unwrap();
            let back = decode(&bytes, 60.0).unwrap();
            let secs = back.seconds();
            assert!((secs - 1.0).abs() < 0.08, "{format:?}: {secs} s");
            let back = resample(&back, 16000).unwrap();
            assert!(power_at(&back, 440.0) > 0.15, "{format:?} lost the tone");
            assert!(power_at(&back, 1000.0) < 0.02, "{format:?} added a tone");
        }
    }

    #[test]
    fn resampling_keeps_length_and_frequency() {
        let pcm = tone(44100, 0.5, 1000.0);
        let out = resample(&pcm, 16000).unwrap();
        assert_eq!(out.samples.len(), 8000);
        assert!(power_at(&out, 1000.0) > 0.2);
        // The first samples are the signal, not the resampler's delay.
        assert!(out.samples[..40].iter().any(|s| s.abs() > 0.1));
    }

    #[test]
    fn garbage_and_overlong_audio_are_errors() {
        assert!(matches!(
            decode(b"not audio at all", 60.0),
            Err(AudioError::Unrecognised(_))
        ));
        let long = encode(&tone(8000, 3.0, 300.0), AudioFormat::Wav).unwrap();
        assert_eq!(
            decode(&long, 2.0),
            Err(AudioError::TooLong { max_seconds: 2.0 })
        );
    }

    #[test]
    fn a_truncated_recording_keeps_what_decoded() {
        let bytes = encode(&tone(22050, 2.0, 440.0), AudioFormat::OggOpus).unwrap();
        let cut = &bytes[..bytes.len() * 2 / 3];
        let back = decode(cut, 60.0).unwrap();
        assert!(
            back.seconds() > 0.8 && back.seconds() < 1.9,
            "{}",
            back.seconds()
        );
    }
}
