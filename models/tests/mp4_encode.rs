//! The H.264/MP4 writer against ffmpeg (Debian's, tests only): ffprobe
//! reads our file as h264 / yuv420p with the frame count, rate and
//! duration we wrote, `moov` comes before `mdat` (fast start), the decoded
//! frames match the frames we encoded (PSNR >= 35 dB), and the same frames
//! give the same bytes.

use std::process::Command;

use models::image::RgbImage;
use models::video::mp4::encode_mp4;

/// Smooth frames with a moving square: what a video looks like to an
/// encoder (random noise would be all detail).
fn frames(n: usize, w: usize, h: usize) -> Vec<RgbImage> {
    (0..n)
        .map(|t| {
            let mut pixels = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                for x in 0..w {
                    // A soft blob drifting right over a gradient.
                    let (cx, cy) = ((w / 4 + 3 * t) as f64, (h / 2) as f64);
                    let d2 = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
                    let blob = (-d2 / 300.0).exp();
                    let bg = [
                        x as f64 * 200.0 / w as f64 + 30.0,
                        y as f64 * 180.0 / h as f64 + 40.0,
                        120.0,
                    ];
                    let fg = [230.0, 90.0, 60.0];
                    for c in 0..3 {
                        pixels.push((bg[c] * (1.0 - blob) + fg[c] * blob).round() as u8);
                    }
                }
            }
            RgbImage {
                width: w,
                height: h,
                pixels,
            }
        })
        .collect()
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
}

#[test]
fn ffmpeg_reads_our_mp4_as_we_wrote_it() {
    let (w, h, n, fps) = (160, 96, 21, 12.0);
    let input = frames(n, w, h);
    let mp4 = encode_mp4(&input, fps).unwrap();
    assert_eq!(
        mp4.bytes,
        encode_mp4(&input, fps).unwrap().bytes,
        "same frames, same bytes"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.mp4");
    std::fs::write(&path, &mp4.bytes).unwrap();

    let moov = mp4.bytes.windows(4).position(|w| w == b"moov").unwrap();
    let mdat = mp4.bytes.windows(4).position(|w| w == b"mdat").unwrap();
    assert!(moov < mdat, "fast start: moov at {moov}, mdat at {mdat}");

    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
            "stream=codec_name,pix_fmt,width,height,nb_read_frames,r_frame_rate:format=duration",
            "-of",
            "json",
        ])
        .arg(&path)
        .output()
        .expect("ffprobe (scripts/setup installs ffmpeg)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let probe: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &probe["streams"][0];
    assert_eq!(s["codec_name"], "h264");
    assert_eq!(s["pix_fmt"], "yuv420p");
    assert_eq!(
        (s["width"].as_u64(), s["height"].as_u64()),
        (Some(w as u64), Some(h as u64))
    );
    assert_eq!(s["nb_read_frames"], n.to_string());
    assert_eq!(s["r_frame_rate"], "12/1");
    let duration: f64 = probe["format"]["duration"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (duration - n as f64 / fps).abs() < 0.01,
        "duration {duration}"
    );
    assert!((mp4.duration_s() - duration).abs() < 0.01);

    // Decode every frame back to RGB and compare.
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size = w * h * 3;
    assert_eq!(out.stdout.len(), size * n);
    for (i, f) in input.iter().enumerate() {
        let p = psnr(&f.pixels, &out.stdout[i * size..(i + 1) * size]);
        assert!(p >= 35.0, "frame {i}: PSNR {p:.1} dB");
        if i == 0 {
            eprintln!(
                "first frame PSNR {p:.1} dB, {} bytes for {n} frames",
                mp4.bytes.len()
            );
        }
    }
}

#[test]
fn odd_sizes_and_bad_rates_are_refused() {
    let f = frames(1, 33, 32);
    assert!(encode_mp4(&f, 16.0)
        .unwrap_err()
        .to_string()
        .contains("even"));
    let f = frames(1, 32, 32);
    assert!(encode_mp4(&f, 0.0).unwrap_err().to_string().contains("fps"));
    assert!(encode_mp4(&[], 16.0).is_err());
}
