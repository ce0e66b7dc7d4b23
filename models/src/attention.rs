//! Scaled dot-product attention, `softmax(q kᵀ · scale) v`, without a
//! mask. On the CPU in f32 it never holds the whole score matrix: per
//! head, a band of query rows at a time (a few MB, kept between calls)
//! gets its scores from one matrix product, its softmax in place (MKL's
//! vector exp where linked), and its output from a second product, the
//! normalisation applied to the small output rows. The plain composition
//! (candle's matmul, softmax, matmul) allocates `heads · Lq · Lk` floats
//! twice per call — 335 MB at SD's 64x64 latent level — and pays the page
//! faults for them each time. Elsewhere (CUDA, f16/bf16) it is that
//! composition.

use candle_core::{DType, Device, Result as R, Tensor};
use rayon::prelude::*;

use crate::blas::{exp_in_place, sgemm, Mat};

/// Floats of one band of scores (4 MB).
const BAND_FLOATS: usize = 1 << 20;

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
        if lk == 0 {
            return out;
        }
        let rows_per_band = (BAND_FLOATS / lk).clamp(1, lq.max(1));
        thread_local! {
            static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let mut s = SCORES.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if s.len() < rows_per_band * lk {
            s.resize(rows_per_band * lk, 0.0);
        }
        let mut sums = vec![0f32; rows_per_band];
        for h in 0..heads {
            let (qh, kh) = (&q[h * lq * d..(h + 1) * lq * d], &k[h * lk * d..(h + 1) * lk * d]);
            let vh = &v[h * lk * dv..(h + 1) * lk * dv];
            let oh = &mut out[h * lq * dv..(h + 1) * lq * dv];
            let mut r0 = 0;
            while r0 < lq {
                let rows = rows_per_band.min(lq - r0);
                let band = &mut s[..rows * lk];
                sgemm(
                    rows,
                    lk,
                    d,
                    scale as f32,
                    Mat::n(&qh[r0 * d..], d),
                    Mat::t(kh, d),
                    0.0,
                    band,
                    lk,
                );
                band.par_chunks_mut(lk).for_each(|row| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    row.iter_mut().for_each(|x| *x -= max);
                });
                exp_in_place(band);
                band.par_chunks(lk)
                    .zip(sums[..rows].par_iter_mut())
                    .for_each(|(row, sum)| *sum = row.iter().sum());
                let ob = &mut oh[r0 * dv..(r0 + rows) * dv];
                sgemm(rows, dv, lk, 1.0, Mat::n(band, lk), Mat::n(vh, dv), 0.0, ob, dv);
                for (orow, sum) in ob.chunks_mut(dv).zip(&sums) {
                    let inv = 1.0 / sum;
                    orow.iter_mut().for_each(|x| *x *= inv);
                }
                r0 += rows;
            }
        }
        SCORES.with(|c| *c.borrow_mut() = s);
        out
    })?;
    let mut shape = lead.to_vec();
    shape.extend([lq, dv]);
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// Runs `f` on the f32 data of three contiguous CPU tensors, in place.
fn with_slices<T>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> T,
) -> R<T> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (sc, lc) = c.storage_and_layout();
    fn slice<'a>(
        s: &'a candle_core::Storage,
        l: &candle_core::Layout,
    ) -> R<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
                Ok(&cpu.as_slice::<f32>()?[start..end])
            }
            _ => candle_core::bail!("sdpa: a contiguous CPU tensor"),
        }
    }
    Ok(f(slice(&sa, la)?, slice(&sb, lb)?, slice(&sc, lc)?))
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
            let k = k.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
            let scale = 1.0 / (d as f64).sqrt() * 3.0;
            let ours = sdpa(&q, &k, &v, scale).unwrap();
            let want = reference(&q, &k.contiguous().unwrap(), &v, scale);
            assert_eq!(ours.dims(), want.dims());
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
