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

/// Layer normalisation over the last dimension (with a bias), as
/// candle's `LayerNorm`: on the CPU in f32 one pass per row for the mean
/// and variance and one for the output, rows split across rayon's threads
/// in blocks of 64 (a decoding step's one row on the calling thread);
/// elsewhere candle's. candle's fused CPU op makes a task of every row:
/// 1.3 ms for Whisper's 1500 × 512, against 0.2 here.
pub(crate) struct LayerNorm {
    inner: candle_nn::LayerNorm,
    /// Weight and bias as floats, for the CPU kernel.
    cpu: Option<(Vec<f32>, Vec<f32>)>,
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn load(d: usize, eps: f64, vb: candle_nn::VarBuilder) -> R<Self> {
        let inner = candle_nn::layer_norm(d, eps, vb)?;
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
        let cpu = match inner.bias() {
            Some(b) if cpu_f32(inner.weight()) && cpu_f32(b) => {
                Some((inner.weight().to_vec1::<f32>()?, b.to_vec1::<f32>()?))
            }
            _ => None,
        };
        Ok(Self {
            inner,
            cpu,
            eps: eps as f32,
        })
    }
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> R<Tensor> {
        let Some((w, b)) = self
            .cpu
            .as_ref()
            .filter(|_| x.device().is_cpu() && x.dtype() == candle_core::DType::F32)
        else {
            return self.inner.forward(x);
        };
        let d = w.len();
        if x.dims().last() != Some(&d) {
            candle_core::bail!("layer norm of {d} over {:?}", x.dims());
        }
        let x = x.contiguous()?;
        let mut out = vec![0f32; x.elem_count()];
        with_cpu_slice(&x, |xs| {
            let rows = |(o, xs): (&mut [f32], &[f32])| {
                for (o, x) in o.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                    layer_norm_row(o, x, w, b, self.eps);
                }
            };
            const BLOCK: usize = 64;
            if out.len() >= 2 * BLOCK * d {
                out.par_chunks_mut(BLOCK * d)
                    .zip(xs.par_chunks(BLOCK * d))
                    .for_each(rows);
            } else {
                rows((&mut out, xs));
            }
        })?;
        Tensor::from_vec(out, x.dims(), &Device::Cpu)
    }
}

/// One row: `o = (x - mean) / √(var + eps) · w + b`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn layer_norm_row(o: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    const LANES: usize = 16;
    let d = x.len() as f32;
    let mut s = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (si, &ci) in s.iter_mut().zip(c) {
            *si += ci;
        }
    }
    let mean = (s.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()) / d;
    let mut v = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (vi, &ci) in v.iter_mut().zip(c) {
            *vi += (ci - mean) * (ci - mean);
        }
    }
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|&c| (c - mean) * (c - mean))
        .sum();
    let inv = 1.0 / ((v.iter().sum::<f32>() + rest) / d + eps).sqrt();
    for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
        *o = (x - mean) * inv * w + b;
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
    #[test]
    fn layer_norm_matches_candles() {
        use candle_core::Module;
        let dev = candle_core::Device::Cpu;
        for rows in [1, 3, 200] {
            let d = 37;
            let w = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
            let vb = candle_nn::VarBuilder::from_tensors(
                [
                    ("weight".to_string(), w.clone()),
                    ("bias".to_string(), b.clone()),
                ]
                .into(),
                candle_core::DType::F32,
                &dev,
            );
            let ours = LayerNorm::load(d, 1e-5, vb).unwrap();
            assert!(ours.cpu.is_some());
            let x = (Tensor::randn(0f32, 3.0, (1, rows, d), &dev).unwrap() + 5.0).unwrap();
            let want = candle_nn::LayerNorm::new(w, b, 1e-5).forward(&x).unwrap();
            let got = ours.forward(&x).unwrap();
            assert!(crate::testing::max_abs_diff(&got, &want) < 1e-4);
        }
    }

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
