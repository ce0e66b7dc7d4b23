//! Frames → H.264 (Cisco's OpenH264, built from source by the `openh264`
//! crate) in an MP4 container (`muxide`, fast start: `moov` before `mdat`
//! so browsers play while downloading), and the poster JPEG. No ffmpeg at
//! run time. One encoder thread and no wall-clock fields, so the same
//! frames give the same bytes.

use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, QpRange,
    RateControlMode, UsageType,
};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;

use crate::image::RgbImage;
use crate::ModelError;

/// What [`encode_mp4`] wrote.
#[derive(Debug, Clone)]
pub struct Mp4 {
    pub bytes: Vec<u8>,
    pub frames: usize,
    pub fps: f64,
}

impl Mp4 {
    pub fn duration_s(&self) -> f64 {
        self.frames as f64 / self.fps
    }
}

/// Encodes `frames` (all the same size, even sides) at `fps` into an MP4.
pub fn encode_mp4(frames: &[RgbImage], fps: f64) -> Result<Mp4, ModelError> {
    let first = frames
        .first()
        .ok_or_else(|| ModelError::Invalid("no frames to encode".into()))?;
    let (w, h) = (first.width, first.height);
    if w % 2 != 0 || h % 2 != 0 || w == 0 || h == 0 {
        return Err(ModelError::Invalid(format!(
            "H.264 with 4:2:0 chroma needs even sides, not {w}x{h}"
        )));
    }
    if !(1.0..=120.0).contains(&fps) {
        return Err(ModelError::Invalid("fps must be from 1 to 120".into()));
    }
    // Quality first: high bitrate ceiling, QP kept low, a keyframe every
    // two seconds, no skipped frames.
    let pixels_per_s = (w * h) as f64 * fps;
    let config = EncoderConfig::new()
        .usage_type(UsageType::CameraVideoRealTime)
        .rate_control_mode(RateControlMode::Quality)
        .bitrate(BitRate::from_bps(
            (pixels_per_s * 2.0).clamp(1e6, 4e8) as u32
        ))
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .qp(QpRange::new(4, 18))
        .skip_frames(false)
        .intra_frame_period(IntraFramePeriod::from_num_frames((fps * 2.0).round() as u32))
        .num_threads(1);
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| ModelError::Invalid(format!("H.264 encoder: {e}")))?;
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut muxer = muxide::api::MuxerBuilder::new(&mut out)
            .video(muxide::api::VideoCodec::H264, w as u32, h as u32, fps)
            .with_fast_start(true)
            .build()
            .map_err(|e| ModelError::Invalid(format!("MP4 muxer: {e}")))?;
        for (i, f) in frames.iter().enumerate() {
            if f.width != w || f.height != h || f.pixels.len() != w * h * 3 {
                return Err(ModelError::Invalid(format!(
                    "frame {i} is {}x{}, the first {w}x{h}",
                    f.width, f.height
                )));
            }
            let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(&f.pixels, (w, h)));
            let bits = encoder
                .encode(&yuv)
                .map_err(|e| ModelError::Invalid(format!("H.264 frame {i}: {e}")))?;
            let key = matches!(bits.frame_type(), FrameType::IDR | FrameType::I);
            let data = bits.to_vec();
            muxer
                .write_video(i as f64 / fps, &data, key)
                .map_err(|e| ModelError::Invalid(format!("MP4 frame {i}: {e}")))?;
        }
        muxer
            .finish()
            .map_err(|e| ModelError::Invalid(format!("MP4 muxer: {e}")))?;
    }
    Ok(Mp4 {
        bytes: out.into_inner(),
        frames: frames.len(),
        fps,
    })
}
