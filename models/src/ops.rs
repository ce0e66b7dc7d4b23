//! f32 CPU element-wise kernels the image, video and speech models share:
//! the exact GELU, SiLU in
//! place (MKL's vector exp where linked), nearest ×2 upsampling by row
//! copies, and the Wan VAE's RMS norm over channels (+ SiLU) in one pass.

use candle_core::{Device, Result as R, Tensor};
use rayon::prelude::*;

use crate::blas::{erf_in_place, exp_in_place, single_threaded, with_cpu_slice};

/// The exact GELU, `x * (1 + erf(x / √2)) / 2`: on the CPU in f32 with MKL's
/// vector erf (where linked) over rows split across rayon's threads
/// (candle's `gelu_erf` calls a scalar erf per value: ~5% of a Whisper
/// transcription); elsewhere candle's.
pub(crate) fn gelu_erf(x: &Tensor) -> R<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        return x.gelu_erf();
    }
    let x = x.contiguous()?;
    let mut out = vec![0f32; x.elem_count()];
    with_cpu_slice(&x, |xs| {
        out.par_chunks_mut(4096)
            .zip(xs.par_chunks(4096))
            .for_each(|(o, xs)| gelu_chunk(o, xs))
    })?;
    Tensor::from_vec(out, x.dims(), &Device::Cpu)
}

/// `o = GELU(xs)` (exact), MKL's vector erf on this thread.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(crate) fn gelu_chunk(o: &mut [f32], xs: &[f32]) {
    for (ov, &xv) in o.iter_mut().zip(xs) {
        *ov = xv * std::f32::consts::FRAC_1_SQRT_2;
    }
    single_threaded(|| erf_in_place(o));
    for (ov, &xv) in o.iter_mut().zip(xs) {
        *ov = 0.5 * xv * (1.0 + *ov);
    }
}

/// `y = y / (1 + e^-y)` in place, through a small per-thread buffer for
/// the exponentials (one vector exp per 4096 values).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(crate) fn silu_in_place(y: &mut [f32]) {
    thread_local! {
        static E: std::cell::RefCell<Vec<f32>> = std::cell::RefCell::new(vec![0f32; 4096]);
    }
    E.with(|e| {
        let mut e = e.borrow_mut();
        for chunk in y.chunks_mut(4096) {
            let e = &mut e[..chunk.len()];
            for (ev, &yv) in e.iter_mut().zip(chunk.iter()) {
                *ev = -yv;
            }
            single_threaded(|| exp_in_place(e));
            for (yv, &ev) in chunk.iter_mut().zip(e.iter()) {
                *yv /= 1.0 + ev;
            }
        }
    })
}

/// Nearest-neighbour ×2 of a `(b, c, h, w)` map. On the CPU in f32 each
/// input row is written out doubled, twice (candle's `upsample_nearest2d`
/// computes the source index of every output element: ~7× slower at the
/// VAE's sizes); elsewhere candle's.
pub(crate) fn upsample2x(x: &Tensor) -> R<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        return x.upsample_nearest2d(2 * h, 2 * w);
    }
    let x = x.contiguous()?;
    let mut out = vec![0f32; b * c * 4 * h * w];
    with_cpu_slice(&x, |src| {
        out.par_chunks_mut(4 * h * w)
            .zip(src.par_chunks(h * w))
            .for_each(|(dst, plane)| {
                for (rows, row) in dst.chunks_mut(4 * w).zip(plane.chunks(w)) {
                    let (first, second) = rows.split_at_mut(2 * w);
                    for (pair, &v) in first.chunks_exact_mut(2).zip(row) {
                        pair[0] = v;
                        pair[1] = v;
                    }
                    second.copy_from_slice(first);
                }
            })
    })?;
    Tensor::from_vec(out, (b, c, 2 * h, 2 * w), &Device::Cpu)
}

/// Over the channels of a `(t, c, h, w)` map: `x / max(‖x‖₂, 1e-12) ·
/// scale · gamma[c]` per pixel (diffusers' `WanRMS_norm`), then SiLU when
/// `silu`. Tasks of (frame, run of pixels): the squares summed channel
/// by channel into a row of pixels, then each channel's run scaled.
pub(crate) fn channel_rms_norm(x: &Tensor, gamma: &[f32], scale: f32, silu: bool) -> R<Tensor> {
    const RUN: usize = 2048;
    let (t, c, h, w) = x.dims4()?;
    if gamma.len() != c {
        candle_core::bail!("rms norm: {} gammas for {c} channels", gamma.len());
    }
    let hw = h * w;
    let x = x.contiguous()?;
    let mut out = vec![0f32; t * c * hw];
    // Output frames split into (channel-major) runs are not contiguous, so
    // tasks write through a raw pointer to disjoint (channel, run) slices.
    struct Ptr(*mut f32);
    unsafe impl Sync for Ptr {}
    let dst = Ptr(out.as_mut_ptr());
    let runs = hw.div_ceil(RUN);
    with_cpu_slice(&x, |src| {
        (0..t * runs).into_par_iter().for_each(|task| {
            let (f, r) = (task / runs, task % runs);
            let p0 = r * RUN;
            let n = RUN.min(hw - p0);
            let frame = &src[f * c * hw..(f + 1) * c * hw];
            let mut acc = [0f32; RUN];
            let acc = &mut acc[..n];
            for ch in 0..c {
                add_squares(acc, &frame[ch * hw + p0..ch * hw + p0 + n]);
            }
            for a in acc.iter_mut() {
                *a = scale / a.sqrt().max(1e-12);
            }
            for (ch, &g) in gamma.iter().enumerate() {
                let row = &frame[ch * hw + p0..ch * hw + p0 + n];
                // (Names the whole `Ptr`, which is Sync, so the closure
                // captures it rather than its raw-pointer field.)
                let _ = &dst;
                // SAFETY: (frame f, channel ch, pixels p0..p0+n) belongs to
                // this task alone and lies inside `out`.
                let o =
                    unsafe { std::slice::from_raw_parts_mut(dst.0.add((f * c + ch) * hw + p0), n) };
                scaled_product(o, row, acc, g);
                if silu {
                    silu_in_place(o);
                }
            }
        })
    })?;
    Tensor::from_vec(out, (t, c, h, w), &Device::Cpu)
}

/// `acc[i] += x[i]²`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_squares(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v * v;
    }
}

/// `out[i] = x[i] · a[i] · g`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn scaled_product(out: &mut [f32], x: &[f32], a: &[f32], g: f32) {
    for ((o, &v), &s) in out.iter_mut().zip(x).zip(a) {
        *o = v * s * g;
    }
}

/// `out[i] = x[i] · scale + shift`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(crate) fn affine(out: &mut [f32], x: &[f32], scale: f32, shift: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * scale + shift;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_erf_matches_candles() {
        let x = Tensor::randn(0f32, 3., (3, 5000), &Device::Cpu).unwrap();
        let a = gelu_erf(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = x
            .gelu_erf()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() <= 1e-5 * (1. + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn channel_rms_norm_matches_the_composition() {
        let dev = Device::Cpu;
        let (c, h, w) = (5, 3, 1000);
        let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev).unwrap();
        let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.25).collect();
        let g = Tensor::new(gamma.as_slice(), &dev)
            .unwrap()
            .reshape((c, 1, 1))
            .unwrap();
        let norm = x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
        let want = ((x.broadcast_div(&norm).unwrap() * 2.0).unwrap())
            .broadcast_mul(&g)
            .unwrap();
        for silu in [false, true] {
            let want = if silu {
                want.silu().unwrap()
            } else {
                want.clone()
            };
            let ours = channel_rms_norm(&x, &gamma, 2.0, silu).unwrap();
            assert!(crate::testing::max_abs_diff(&ours, &want) < 1e-5);
        }
    }
}
