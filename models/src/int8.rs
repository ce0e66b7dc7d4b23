//! int8 linear layers on Intel MKL's integer GEMM (`cblas_gemm_s8u8s32`,
//! VNNI on CPUs that have it): Whisper's `int8` compute type, the scheme
//! CTranslate2 runs faster-whisper's int8 with on CPUs. Weights are
//! quantized at load, symmetric, one scale per output row; activations per
//! input row at each call (`x ≈ sx * qx`, `qx` in -127..=127), handed to the
//! GEMM shifted to unsigned (`qx + 128`, the type its left operand takes),
//! the shift's share (`128 * Σ w`) taken off with a per-row sum kept from
//! the load. The integer product is MKL's on Intel CPUs (its VNNI kernels)
//! and [`crate::vnni`]'s elsewhere (MKL runs a generic path on other
//! vendors' CPUs, 10× slower); [`available`] says whether either runs.

use candle_core::{Device, Result, Tensor};

use crate::blas::gemm_u8s8;

/// Whether an integer product runs here without 16-bit intermediates
/// (products of full-range bytes would saturate): MKL's on an Intel CPU
/// with AVX-512 VNNI or AVX-VNNI (builds with the `mkl` feature), or
/// [`crate::vnni`]'s on any CPU with AVX-512 VNNI.
pub fn available() -> bool {
    mkl_runs_it() || crate::vnni::available()
}

/// Whether MKL's integer GEMM is the one to call: an MKL build on an
/// Intel CPU with VNNI.
fn mkl_runs_it() -> bool {
    #[cfg(all(feature = "mkl", target_arch = "x86_64"))]
    {
        // CPUID traps to the hypervisor in a VM: asked once.
        static MKL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *MKL.get_or_init(|| {
            crate::vnni::genuine_intel()
                && (std::is_x86_feature_detected!("avx512vnni")
                    || std::is_x86_feature_detected!("avxvnni"))
        })
    }
    #[cfg(not(all(feature = "mkl", target_arch = "x86_64")))]
    {
        false
    }
}

/// `y = x Wᵀ + b` with `W` `(out, in)` in int8.
pub struct Int8Linear {
    out: usize,
    inp: usize,
    /// The weights as MKL takes them (`(out, in)` row-major), or packed for
    /// [`crate::vnni`] where that kernel runs the product.
    w: Weights,
    /// Per output row: the weights' scale, and 128 × the row's sum.
    scale: Vec<f32>,
    shift: Vec<i32>,
    bias: Option<Vec<f32>>,
}

impl Int8Linear {
    /// From f32 weights `(out, in)` and an optional bias `(out)`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (out, inp) = weight.dims2()?;
        let wf = weight
            .to_device(&Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut w = vec![0i8; out * inp];
        let mut scale = vec![0f32; out];
        let mut shift = vec![0i32; out];
        for (o, (row, q)) in wf
            .chunks_exact(inp)
            .zip(w.chunks_exact_mut(inp))
            .enumerate()
        {
            let amax = row.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let s = amax / 127.;
            let inv = if s > 0. { 1. / s } else { 0. };
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(row) {
                let v = (v * inv).round().clamp(-127., 127.) as i32;
                *q = v as i8;
                sum += v;
            }
            scale[o] = s;
            shift[o] = 128 * sum;
        }
        let bias = match bias {
            Some(b) => Some(
                b.to_device(&Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?,
            ),
            None => None,
        };
        let w = if mkl_runs_it() || !crate::vnni::available() {
            Weights::Mkl(w)
        } else {
            Weights::Packed(crate::vnni::PackedI8::new(&w, out, inp))
        };
        Ok(Self {
            out,
            inp,
            w,
            scale,
            shift,
            bias,
        })
    }

    /// `x` `(..., in)` f32 on the CPU → `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims.last().unwrap_or(&0);
        if inp != self.inp {
            candle_core::bail!(
                "int8 linear: input {dims:?} for ({}, {})",
                self.out,
                self.inp
            );
        }
        let rows = x.elem_count() / inp.max(1);
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let y = self.forward_rows(&xs, rows)?;
        let mut shape = dims;
        *shape.last_mut().expect("rank >= 1") = self.out;
        Tensor::from_vec(y, shape, &Device::Cpu)
    }

    fn forward_rows(&self, xs: &[f32], rows: usize) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let (inp, out) = (self.inp, self.out);
        // Rows across rayon's threads when there are many (the encoder's
        // 1500 frames), on this thread for a decoding step's one.
        let per_task = 64;
        // Rows of the quantized input `lda` apart (the packed kernel reads
        // whole groups of 4 bytes; the padding meets zero weights).
        let lda = match &self.w {
            Weights::Mkl(_) => inp,
            Weights::Packed(p) => p.row_stride(),
        };
        let mut a = vec![0u8; rows * lda];
        let mut sx = vec![0f32; rows];
        let quantize = |(t, (a, sx)): (usize, (&mut [u8], &mut [f32]))| {
            let xs = &xs[t * per_task * inp..];
            for ((q, s), row) in a.chunks_exact_mut(lda).zip(sx).zip(xs.chunks_exact(inp)) {
                *s = quantize_row(row, &mut q[..inp]);
            }
        };
        if rows <= per_task {
            // One task: no hand-over to the pool (a decoding step).
            quantize((0, (&mut a, &mut sx)));
        } else {
            a.par_chunks_mut(per_task * lda)
                .zip(sx.par_chunks_mut(per_task))
                .enumerate()
                .for_each(quantize);
        }
        let mut c = vec![0i32; rows * out];
        match &self.w {
            Weights::Packed(p) => crate::vnni::gemm_packed(rows, &a, p, &mut c),
            Weights::Mkl(w) if mkl_runs_it() => gemm_u8s8(rows, out, inp, &a, w, &mut c)?,
            Weights::Mkl(_) => candle_core::bail!("int8 linear layers on a CPU without VNNI"),
        }
        let mut y = vec![0f32; rows * out];
        let dequantize = |((y, c), sx): ((&mut [f32], &[i32]), &[f32])| {
            for ((y, c), &s) in y.chunks_exact_mut(out).zip(c.chunks_exact(out)).zip(sx) {
                dequantize_row(c, &self.shift, &self.scale, s, self.bias.as_deref(), y);
            }
        };
        if rows <= per_task {
            dequantize(((&mut y, &c), &sx));
        } else {
            y.par_chunks_mut(per_task * out)
                .zip(c.par_chunks(per_task * out))
                .zip(sx.par_chunks(per_task))
                .for_each(dequantize);
        }
        Ok(y)
    }
}

enum Weights {
    Mkl(Vec<i8>),
    Packed(crate::vnni::PackedI8),
}

/// One row quantized to `qx + 128` (`qx = round(x / sx)`, ties to even),
/// returning `sx = max |x| / 127`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn quantize_row(row: &[f32], q: &mut [u8]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let mut amax = chunks.remainder().iter().fold(0f32, |m, v| m.max(v.abs()));
    for c in chunks {
        for i in 0..16 {
            lanes[i] = lanes[i].max(c[i].abs());
        }
    }
    amax = lanes.iter().fold(amax, |m, &v| m.max(v));
    let s = amax / 127.;
    let inv = if s > 0. { 1. / s } else { 0. };
    for (q, &v) in q.iter_mut().zip(row) {
        *q = ((v * inv).round_ties_even().clamp(-127., 127.) as i32 + 128) as u8;
    }
    s
}

/// `y[o] = (c[o] - shift[o]) * sx * scale[o] + bias[o]`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn dequantize_row(
    c: &[i32],
    shift: &[i32],
    scale: &[f32],
    sx: f32,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    for (((y, &c), &sh), &w) in y.iter_mut().zip(c).zip(shift).zip(scale) {
        *y = (c - sh) as f32 * (sx * w);
    }
    if let Some(b) = bias {
        for (y, &b) in y.iter_mut().zip(b) {
            *y += b;
        }
    }
}

#[cfg(all(test, feature = "mkl", target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Against the f32 product: within the two roundings' error, and the
    /// integer GEMM exactly as a plain loop over the same int8 values.
    #[test]
    fn matches_the_f32_product() {
        let dev = Device::Cpu;
        let (out, inp) = (70, 96);
        let w = Tensor::randn(0f32, 1., (out, inp), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., out, &dev).unwrap();
        let lin = Int8Linear::new(&w, Some(&b)).unwrap();
        // One task, and rows across rayon's threads.
        for rows in [5, 130] {
            let x = Tensor::randn(0f32, 1., (1, rows, inp), &dev).unwrap();
            let ours = lin.forward(&x).unwrap();
            assert_eq!(ours.dims(), &[1, rows, out]);
            let want = x
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let (a, e) = (
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, e) in a.iter().zip(&e) {
                assert!((a - e).abs() < 0.03 * scale, "{rows} rows: {a} vs {e}");
            }
        }
        // The GEMM itself, exactly.
        let av: Vec<u8> = (0..3 * 40usize).map(|i| (i * 37 % 256) as u8).collect();
        let bv: Vec<i8> = (0..7 * 40usize)
            .map(|i| ((i * 53 % 255) as i32 - 127) as i8)
            .collect();
        let mut c = vec![0i32; 3 * 7];
        gemm_u8s8(3, 7, 40, &av, &bv, &mut c).unwrap();
        for i in 0..3 {
            for j in 0..7 {
                let want: i32 = (0..40)
                    .map(|t| av[i * 40 + t] as i32 * bv[j * 40 + t] as i32)
                    .sum();
                assert_eq!(c[i * 7 + j], want);
            }
        }
    }
}
