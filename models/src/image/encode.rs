//! Image files from decoded pixels, with the `image` crate.

use std::io::Cursor;

use image::{ExtendedColorType, ImageEncoder};

use super::RgbImage;
use crate::ModelError;

/// The file formats a job may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Webp,
    Jpeg,
}

impl ImageFormat {
    pub const NAMES: [&'static str; 3] = ["png", "webp", "jpeg"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "png" => Some(Self::Png),
            "webp" => Some(Self::Webp),
            "jpeg" | "jpg" => Some(Self::Jpeg),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Webp => "image/webp",
            Self::Jpeg => "image/jpeg",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Webp => "webp",
            Self::Jpeg => "jpg",
        }
    }
}

/// Encodes `img` (PNG and WebP lossless; JPEG at quality 90).
pub fn encode(img: &RgbImage, format: ImageFormat) -> Result<Vec<u8>, ModelError> {
    let mut out = Cursor::new(Vec::new());
    let (w, h) = (img.width as u32, img.height as u32);
    let res =
        match format {
            ImageFormat::Png => image::codecs::png::PngEncoder::new(&mut out).write_image(
                &img.pixels,
                w,
                h,
                ExtendedColorType::Rgb8,
            ),
            ImageFormat::Webp => image::codecs::webp::WebPEncoder::new_lossless(&mut out)
                .write_image(&img.pixels, w, h, ExtendedColorType::Rgb8),
            ImageFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
                .write_image(&img.pixels, w, h, ExtendedColorType::Rgb8),
        };
    res.map_err(|e| ModelError::Format(format!("encoding {format:?}: {e}")))?;
    Ok(out.into_inner())
}

/// Decodes a PNG (or any format the `image` crate reads) to RGB8.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, ModelError> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| ModelError::Format(format!("decoding an image: {e}")))?
        .to_rgb8();
    Ok(RgbImage {
        width: img.width() as usize,
        height: img.height() as usize,
        pixels: img.into_raw(),
    })
}

/// Decodes a JPEG, PNG or WebP (nothing else) of at most `max_pixels`,
/// then resizes and center-crops it to fill `width` x `height` (Lanczos3).
pub fn decode_to_fill(
    bytes: &[u8],
    width: u32,
    height: u32,
    max_pixels: u64,
) -> Result<RgbImage, String> {
    use image::ImageFormat as F;
    let reader = || -> Result<image::ImageReader<std::io::Cursor<&[u8]>>, String> {
        let mut r = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())?;
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(max_pixels.saturating_mul(4));
        r.limits(limits);
        Ok(r)
    };
    let probe = reader()?;
    match probe.format() {
        Some(F::Jpeg | F::Png | F::WebP) => {}
        other => {
            return Err(format!(
                "not a JPEG, PNG or WebP image ({})",
                other
                    .map(|f| format!("{f:?}"))
                    .unwrap_or_else(|| "unknown format".into())
            ))
        }
    }
    let (w, h) = probe.into_dimensions().map_err(|e| e.to_string())?;
    if w as u64 * h as u64 > max_pixels {
        return Err(format!("{w}x{h} is more than {max_pixels} pixels"));
    }
    let img = reader()?.decode().map_err(|e| e.to_string())?;
    let filled = img
        .resize_to_fill(width, height, image::imageops::FilterType::Lanczos3)
        .to_rgb8();
    Ok(RgbImage {
        width: width as usize,
        height: height as usize,
        pixels: filled.into_raw(),
    })
}
