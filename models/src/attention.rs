//! Scaled dot-product attention, `softmax(q kᵀ · scale) v`, without a
//! mask. On the CPU in f32 it never holds the whole score matrix: each
//! (head, band of query rows) is one task on one core, whose band of
//! scores (at most 1 MB, in that core's cache) comes from one matrix
//! product, gets its softmax in place (MKL's vector exp where linked), and
//! gives the output rows through a second product, the normalisation
//! applied to the small output rows. The plain composition
//! (candle's matmul, softmax, matmul) allocates `heads · Lq · Lk` floats
//! twice per call — 335 MB at SD's 64x64 latent level — and pays the page
//! faults for them each time. Elsewhere (CUDA, f16/bf16) it is that
//! composition.

use candle_core::{DType, Device, Result as R, Tensor};
use rayon::prelude::*;

use crate::blas::{exp_in_place, sgemm, with_cpu_slice, Mat};
use crate::sgemm512::{gemm_packed, gemm_rows_packed, Epilogue, PackedF32, PackedRows, Strided};

/// Floats of one band of scores (1 MB: in a core's L2 cache).
const BAND_FLOATS: usize = 1 << 18;
/// Query rows of one band at most.
const MAX_BAND_ROWS: usize = 128;

/// `q` `(…, Lq, D)`, `k` `(…, Lk, D)`, `v` `(…, Lk, Dv)` with the same
/// leading dimensions → `(…, Lq, Dv)`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> R<Tensor> {
    let rank = q.rank();
    if rank < 2 || k.rank() != rank || v.rank() != rank {
        candle_core::bail!("sdpa: q, k and v of one rank (at least 2)");
    }
    let dims = q.dims();
    let (lq, d) = (dims[rank - 2], dims[rank - 1]);
    let (lk, dk) = (k.dims()[rank - 2], k.dims()[rank - 1]);
    let (lv, dv) = (v.dims()[rank - 2], v.dims()[rank - 1]);
    let lead = &dims[..rank - 2];
    if dk != d || lv != lk || k.dims()[..rank - 2] != *lead || v.dims()[..rank - 2] != *lead {
        candle_core::bail!(
            "sdpa: q {:?}, k {:?}, v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v)) {
        let scores = (q.matmul(&k.t()?)? * scale)?;
        return candle_nn::ops::softmax_last_dim(&scores)?.matmul(v);
    }
    let heads: usize = lead.iter().product();
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let out = with_slices(&q, &k, &v, |q, k, v| {
        let mut out = vec![0f32; heads * lq * dv];
        if lk == 0 || lq == 0 {
            return out;
        }
        let rows = (BAND_FLOATS / lk).clamp(1, MAX_BAND_ROWS.min(lq));
        // Where the AVX-512 kernel runs the products, each head's keys and
        // values are packed for it once, not once per band, and a band's
        // scores are computed transposed (below).
        let packed: Vec<(PackedRows, PackedF32)> = if crate::sgemm512::preferred() && lq > rows {
            (0..heads)
                .into_par_iter()
                .map(|h| {
                    let kh = &k[h * lk * d..(h + 1) * lk * d];
                    let vh = &v[h * lk * dv..(h + 1) * lk * dv];
                    (
                        PackedRows::new(Strided::of(Mat::n(kh, d)), lk, d),
                        PackedF32::new(Mat::n(vh, dv), lk, dv),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        // Tasks of (head, band of query rows), each on one thread with
        // its own scores buffer: independent work for every core and no
        // fork/join inside the products.
        out.par_chunks_mut(lq * dv)
            .enumerate()
            .flat_map(|(h, oh)| {
                oh.par_chunks_mut(rows * dv)
                    .enumerate()
                    .map(move |(b, ob)| (h, b * rows, ob))
            })
            .for_each(|(h, r0, ob)| {
                thread_local! {
                    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                let n = ob.len() / dv;
                let qh = &q[(h * lq + r0) * d..(h * lq + r0 + n) * d];
                let kh = &k[h * lk * d..(h + 1) * lk * d];
                let vh = &v[h * lk * dv..(h + 1) * lk * dv];
                SCORES.with(|cell| {
                    let mut s = cell.borrow_mut();
                    if s.len() < n * lk {
                        s.resize(n * lk, 0.0);
                    }
                    let band = &mut s[..n * lk];
                    let mut sums = [0f32; MAX_BAND_ROWS];
                    super::blas::single_threaded(|| match packed.get(h) {
                        Some((pk, pv)) => {
                            // Scores transposed, (keys, queries): the keys
                            // are the packed rows, the band's queries the
                            // small operand packed per call, and the
                            // weights times the values read the scores'
                            // columns as contiguous rows, no repacking.
                            let e = |alpha| Epilogue {
                                alpha,
                                beta: 0.0,
                                bias: None,
                                gelu: false,
                            };
                            gemm_rows_packed(pk, n, Mat::t(qh, d), e(scale as f32), band, n, true);
                            softmax_columns(band, n, &mut sums[..n]);
                            let p = Strided {
                                data: band,
                                rs: 1,
                                cs: n,
                            };
                            gemm_packed(n, p, pv, e(1.0), ob, dv, true);
                        }
                        None => {
                            sgemm(n, lk, d, scale as f32, Mat::n(qh, d), Mat::t(kh, d), 0.0, band, lk);
                            for (row, sum) in band.chunks_mut(lk).zip(sums.iter_mut()) {
                                let max = max_of(row);
                                subtract(row, max);
                                exp_in_place(row);
                                *sum = sum_of(row);
                            }
                            sgemm(n, dv, lk, 1.0, Mat::n(band, lk), Mat::n(vh, dv), 0.0, ob, dv);
                        }
                    });
                    for (orow, sum) in ob.chunks_mut(dv).zip(sums.iter()) {
                        let inv = 1.0 / sum;
                        orow.iter_mut().for_each(|x| *x *= inv);
                    }
                });
            });
        out
    })?;
    let mut shape = lead.to_vec();
    shape.extend([lq, dv]);
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// Lanes of the vectorised reductions below.
const LANES: usize = 16;

/// The largest element (16 running maxima, so the loop vectorises).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn max_of(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (mi, &ci) in m.iter_mut().zip(c) {
            if ci > *mi {
                *mi = ci;
            }
        }
    }
    let rest = chunks.remainder().iter().copied();
    m.into_iter().chain(rest).fold(f32::NEG_INFINITY, f32::max)
}

/// The sum (16 running sums, so the loop vectorises).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn sum_of(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (ai, &ci) in acc.iter_mut().zip(c) {
            *ai += ci;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Softmax down the columns of `s` (`rows × n`, row-major) in place,
/// leaving out the division: each column's values become `e^(x - max)`
/// and `sums[j]` their sum.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn softmax_columns(s: &mut [f32], n: usize, sums: &mut [f32]) {
    let mut max = [f32::NEG_INFINITY; MAX_BAND_ROWS];
    let max = &mut max[..n];
    for row in s.chunks_exact(n) {
        for (m, &x) in max.iter_mut().zip(row) {
            *m = m.max(x);
        }
    }
    for row in s.chunks_exact_mut(n) {
        for (x, &m) in row.iter_mut().zip(max.iter()) {
            *x -= m;
        }
    }
    exp_in_place(s);
    sums.fill(0.0);
    for row in s.chunks_exact(n) {
        for (sum, &x) in sums.iter_mut().zip(row) {
            *sum += x;
        }
    }
}

/// `x[i] -= v`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn subtract(x: &mut [f32], v: f32) {
    x.iter_mut().for_each(|e| *e -= v);
}

/// Runs `f` on the f32 data of three contiguous CPU tensors, in place.
fn with_slices<T>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> T,
) -> R<T> {
    with_cpu_slice(a, |a| {
        with_cpu_slice(b, |b| with_cpu_slice(c, |c| f(a, b, c)))
    })??
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    #[test]
    fn matches_matmul_softmax_matmul() {
        let dev = Device::Cpu;
        // (heads, lq, lk, d, dv): one band, several bands, tiny.
        for (i, (h, lq, lk, d, dv)) in [(3, 40, 77, 16, 16), (2, 300, 5000, 8, 12), (1, 1, 1, 4, 3)]
            .into_iter()
            .enumerate()
        {
            let q = Tensor::randn(0f32, 1.0, (1, h, lq, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (1, h, lk, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, h, lk, dv), &dev).unwrap();
            // A transposed (strided) key, as the callers' reshapes give.
            let k = k
                .transpose(2, 3)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(2, 3)
                .unwrap();
            let scale = 1.0 / (d as f64).sqrt() * 3.0;
            let ours = sdpa(&q, &k, &v, scale).unwrap();
            let want = reference(&q, &k.contiguous().unwrap(), &v, scale);
            assert_eq!(ours.dims(), want.dims());
            let diff = crate::testing::max_abs_diff(&ours, &want);
            assert!(diff < 1e-4, "case {i}: max |diff| {diff}");
        }
    }
}
