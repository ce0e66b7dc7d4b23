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
