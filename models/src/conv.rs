//! Convolution over a stack of frames on the CPU, as one matrix product per
//! band of output rows: the band's patches are laid out (im2col) with row
//! copies into one reused buffer, then `gemm` writes `weight × patches`
//! straight into the output, bias preloaded. candle's CPU conv2d builds its
//! patches element by element in small tiles and multiplies each tile on
//! its own; for the 3x3(x3) convolutions of the video and image VAEs at
//! high resolution this is several times faster. The frames axis makes it
//! a causal 3-D convolution when the kernel spans several frames (the
//! caller puts the cached or zero frames in front).
//!
//! f32 on the CPU only; [`FrameConv::forward`] falls back to candle's
//! conv2d elsewhere (CUDA, f16/bf16) with the same weights.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig};
use rayon::prelude::*;

/// Floats the patch buffer may hold (64 MB).
const BAND_FLOATS: usize = 16 << 20;

/// The weights, kept once: as plain f32 rows for the CPU path, as
/// candle's conv2d elsewhere.
enum Kernel {
    /// `(cout, kt * cin * kh * kw)` weights and `(cout)` bias.
    Cpu(Vec<f32>, Vec<f32>),
    /// `(cout, kt * cin, kh, kw)`: frame-major input channels.
    Candle(Conv2d),
}

/// A convolution with kernel `(kt, kh, kw)` over `(T, C, H, W)` frames:
/// output frame `o` reads input frames `o * stride_t .. o * stride_t + kt`;
/// spatial stride and symmetric zero padding as conv2d's.
pub struct FrameConv {
    kernel: Kernel,
    cout: usize,
    cin: usize,
    kt: usize,
    kh: usize,
    kw: usize,
    stride_t: usize,
    stride: usize,
    pad: usize,
}

impl FrameConv {
    /// `weight` `(cout, cin, kt, kh, kw)` (a torch Conv3d's; a Conv2d's with
    /// kt = 1 reshaped), `bias` `(cout)`.
    pub fn new(
        weight: &Tensor,
        bias: Option<Tensor>,
        stride_t: usize,
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Self> {
        crate::device::cpu_math_init();
        let (cout, cin, kt, kh, kw) = weight.dims5()?;
        let w = weight
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((cout, kt * cin, kh, kw))?;
        let kernel = if w.device().is_cpu() && w.dtype() == DType::F32 {
            let b = match &bias {
                Some(b) => b.to_vec1::<f32>()?,
                None => vec![0.0; cout],
            };
            Kernel::Cpu(w.flatten_all()?.to_vec1::<f32>()?, b)
        } else {
            let cfg = Conv2dConfig {
                padding: pad,
                stride,
                ..Default::default()
            };
            Kernel::Candle(Conv2d::new(w, bias, cfg))
        };
        Ok(Self {
            kernel,
            cout,
            cin,
            kt,
            kh,
            kw,
            stride_t,
            stride,
            pad,
        })
    }

    /// `x` `(T, cin, H, W)` → `(T_out, cout, H_out, W_out)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (t, c, h, w) = x.dims4()?;
        if c != self.cin {
            candle_core::bail!("conv: {c} input channels, the kernel takes {}", self.cin);
        }
        if t < self.kt {
            candle_core::bail!("conv: {t} frames for a kernel of {}", self.kt);
        }
        let t_out = (t - self.kt) / self.stride_t + 1;
        match (&self.kernel, x.device(), x.dtype()) {
            (Kernel::Cpu(weight, bias), Device::Cpu, DType::F32) => {
                let x = x.contiguous()?;
                // The input is read in place (no copy of it).
                let (storage, layout) = x.storage_and_layout();
                let data = match (&*storage, layout.contiguous_offsets()) {
                    (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
                        &cpu.as_slice::<f32>()?[start..end]
                    }
                    _ => candle_core::bail!("conv: a contiguous CPU input"),
                };
                let (h_out, w_out) = (
                    (h + 2 * self.pad - self.kh) / self.stride + 1,
                    (w + 2 * self.pad - self.kw) / self.stride + 1,
                );
                let out = self.run_cpu(data, (t, h, w), (t_out, h_out, w_out), weight, bias);
                drop(storage);
                Tensor::from_vec(out, (t_out, self.cout, h_out, w_out), &Device::Cpu)
            }
            (Kernel::Cpu(..), ..) => candle_core::bail!(
                "conv: f32 CPU weights, a {:?} {:?} input",
                x.dtype(),
                x.device()
            ),
            (Kernel::Candle(conv), ..) => {
                if self.kt == 1 && self.stride_t == 1 {
                    return conv.forward(x);
                }
                let parts = (0..self.kt)
                    .map(|i| {
                        let idx: Vec<u32> =
                            (0..t_out).map(|o| (o * self.stride_t + i) as u32).collect();
                        x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                conv.forward(&Tensor::cat(&parts, 1)?)
            }
        }
    }

    fn run_cpu(
        &self,
        x: &[f32],
        (_t, h, w): (usize, usize, usize),
        (t_out, h_out, w_out): (usize, usize, usize),
        weight: &[f32],
        bias: &[f32],
    ) -> Vec<f32> {
        let (c, kt, kh, kw) = (self.cin, self.kt, self.kh, self.kw);
        let (stride, pad) = (self.stride, self.pad);
        let k = kt * c * kh * kw;
        let hw_out = h_out * w_out;
        let threads = candle_core::utils::get_num_threads();
        // The products accumulate onto the bias.
        let mut out = vec![0f32; t_out * self.cout * hw_out];
        for (i, plane) in out.chunks_mut(hw_out).enumerate() {
            plane.fill(bias[i % self.cout]);
        }
        if kt == 1 && kh == 1 && kw == 1 && stride == 1 && pad == 0 {
            // A pointwise convolution is the matrix product itself: the
            // input frame is already `(cin, h·w)`.
            for (to, frame_out) in out.chunks_mut(self.cout * hw_out).enumerate() {
                let frame = to * self.stride_t;
                let input = &x[frame * c * hw_out..(frame + 1) * c * hw_out];
                sgemm_acc(
                    self.cout, hw_out, c, weight, input, frame_out, hw_out, threads,
                );
            }
            return out;
        }
        let rows_per_band = (BAND_FLOATS / (k * w_out).max(1)).clamp(1, h_out);
        // The patch buffer is kept per thread between calls: a fresh 64 MB
        // allocation per convolution costs page faults, not just time.
        thread_local! {
            static COL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let mut col = COL.with(|c| std::mem::take(&mut *c.borrow_mut()));
        if col.len() < k * rows_per_band * w_out {
            col.resize(k * rows_per_band * w_out, 0.0);
        }
        for to in 0..t_out {
            let frame_out = &mut out[to * self.cout * hw_out..(to + 1) * self.cout * hw_out];
            let mut oy0 = 0;
            while oy0 < h_out {
                let rows = rows_per_band.min(h_out - oy0);
                let n = rows * w_out;
                // Patches: row `kr` of the buffer is input channel
                // (it, ci) shifted by (ih, iw), over the band's pixels.
                col[..k * n]
                    .par_chunks_mut(n)
                    .enumerate()
                    .for_each(|(kr, dst)| {
                        let iw = kr % kw;
                        let ih = (kr / kw) % kh;
                        let ci = (kr / (kw * kh)) % c;
                        let it = kr / (kw * kh * c);
                        let frame = to * self.stride_t + it;
                        let plane = &x[(frame * c + ci) * h * w..(frame * c + ci + 1) * h * w];
                        for r in 0..rows {
                            let drow = &mut dst[r * w_out..(r + 1) * w_out];
                            let iy = ((oy0 + r) * stride + ih) as isize - pad as isize;
                            if iy < 0 || iy >= h as isize {
                                drow.fill(0.0);
                                continue;
                            }
                            let srow = &plane[iy as usize * w..(iy as usize + 1) * w];
                            if stride == 1 {
                                // ix = ox + iw - pad
                                let shift = iw as isize - pad as isize;
                                let lo = (-shift).clamp(0, w_out as isize) as usize;
                                let hi = ((w as isize - shift).clamp(0, w_out as isize)) as usize;
                                drow[..lo].fill(0.0);
                                if hi > lo {
                                    let s0 = (lo as isize + shift) as usize;
                                    drow[lo..hi].copy_from_slice(&srow[s0..s0 + (hi - lo)]);
                                }
                                drow[hi.max(lo)..].fill(0.0);
                            } else {
                                for (ox, d) in drow.iter_mut().enumerate() {
                                    let ix = (ox * stride + iw) as isize - pad as isize;
                                    *d = if ix >= 0 && ix < w as isize {
                                        srow[ix as usize]
                                    } else {
                                        0.0
                                    };
                                }
                            }
                        }
                    });
                // out[:, band] += weight (cout x k) · col (k x n)
                sgemm_acc(
                    self.cout,
                    n,
                    k,
                    weight,
                    col.as_slice(),
                    &mut frame_out[oy0 * w_out..],
                    hw_out,
                    threads,
                );
                oy0 += rows;
            }
        }
        COL.with(|c| *c.borrow_mut() = col);
        out
    }
}

/// `c[i * ldc + j] += Σ_p a[i * k + p] · b[p * n + j]` for `i < m`, `j < n`:
/// MKL's sgemm where the build links it (the default on x86-64), else the
/// `gemm` crate on `threads` rayon threads.
#[allow(clippy::too_many_arguments)]
fn sgemm_acc(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    threads: usize,
) {
    assert!(a.len() >= m * k && b.len() >= k * n);
    assert!(m == 0 || c.len() >= (m - 1) * ldc + n);
    #[cfg(feature = "mkl")]
    {
        let _ = threads;
        const ROW_MAJOR: i32 = 101;
        const NO_TRANS: i32 = 111;
        unsafe extern "C" {
            fn cblas_sgemm(
                layout: i32,
                trans_a: i32,
                trans_b: i32,
                m: i32,
                n: i32,
                k: i32,
                alpha: f32,
                a: *const f32,
                lda: i32,
                b: *const f32,
                ldb: i32,
                beta: f32,
                c: *mut f32,
                ldc: i32,
            );
        }
        // SAFETY: the asserts above keep every row of a, b and c inside
        // its slice; MKL is linked statically by candle's mkl feature.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                NO_TRANS,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a.as_ptr(),
                k.max(1) as i32,
                b.as_ptr(),
                n.max(1) as i32,
                1.0,
                c.as_mut_ptr(),
                ldc.max(1) as i32,
            );
        }
    }
    #[cfg(not(feature = "mkl"))]
    // SAFETY: as above, with the same shapes and strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            true,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(threads),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::Distribution;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| rand_distr::StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The reference: candle's conv2d per kernel frame, summed.
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stride_t: usize,
        stride: usize,
        pad: usize,
    ) -> Tensor {
        let (t, ..) = x.dims4().unwrap();
        let kt = w.dim(2).unwrap();
        let t_out = (t - kt) / stride_t + 1;
        let mut frames = Vec::new();
        for o in 0..t_out {
            let mut acc: Option<Tensor> = None;
            for i in 0..kt {
                let xi = x.narrow(0, o * stride_t + i, 1).unwrap();
                let wi = w
                    .narrow(2, i, 1)
                    .unwrap()
                    .squeeze(2)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let y = xi.conv2d(&wi, pad, stride, 1, 1).unwrap();
                acc = Some(match acc {
                    Some(a) => (a + y).unwrap(),
                    None => y,
                });
            }
            let y = acc
                .unwrap()
                .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
                .unwrap();
            frames.push(y);
        }
        Tensor::cat(&frames, 0).unwrap()
    }

    #[test]
    fn matches_candle_conv_for_every_shape_the_vaes_use() {
        // (t, cin, cout, (kt, kh, kw), stride_t, stride, pad, h, w)
        let cases = [
            (3, 5, 7, (3, 3, 3), 1, 1, 1, 9, 11),
            (4, 4, 6, (3, 1, 1), 1, 1, 0, 8, 8),
            (5, 3, 3, (3, 1, 1), 2, 1, 0, 6, 7),
            (2, 6, 4, (1, 3, 3), 1, 2, 0, 9, 9),
            (1, 8, 8, (1, 1, 1), 1, 1, 0, 5, 4),
            (3, 6, 5, (1, 1, 1), 1, 1, 0, 7, 9),
            (2, 3, 5, (1, 3, 3), 1, 1, 1, 16, 3),
        ];
        for (i, (t, cin, cout, (kt, kh, kw), st, s, p, h, w)) in cases.into_iter().enumerate() {
            let x = randn(&[t, cin, h, w], i as u64);
            let wt = randn(&[cout, cin, kt, kh, kw], 100 + i as u64);
            let b = randn(&[cout], 200 + i as u64);
            let conv = FrameConv::new(&wt, Some(b.clone()), st, s, p).unwrap();
            let ours = conv.forward(&x).unwrap();
            let want = reference(&x, &wt, &b, st, s, p);
            assert_eq!(ours.dims(), want.dims(), "case {i}");
            let diff = (ours - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "case {i}: max |diff| {diff}");
        }
    }
}
