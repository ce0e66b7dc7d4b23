//! A Q8_0 matrix product for a few rows at a time on x86 CPUs with AVX-512
//! VNNI: what decoding several sequences in one batch needs.
//!
//! candle's CPU Q8_0 kernel computes every (row, column) dot product on its
//! own: each extra row of a batch re-reads the weight block, takes its
//! absolute value and signs again and converts both f16 scales again, so a
//! batch of 8 costs nearly 8 single rows. Its AVX-512 VNNI repacked kernel
//! only takes inner dimensions that are multiples of 256 (SmolLM2's 576-wide
//! matrices are not). Here each weight block is loaded once per tile of up to
//! 8 rows, its scale is an f32 computed at load, and the products are
//! `vpdpbusd` on the activations shifted to unsigned (x + 128) with the
//! shift's share (128 × the weights' sums) taken off once per block.
//!
//! The numbers are candle's, bit for bit: the activations are quantized as
//! candle's `BlockQ8_0::from_float` does (f16 scale), every block's integer
//! dot product goes into the same 8 lanes (4 consecutive products each) and
//! is scaled and accumulated with the same fused multiply-add in the same
//! order, and the lanes are summed as candle's `hsum_float_8` sums them. So
//! switching kernels changes no output, and each row's result does not
//! depend on the other rows (a sequence samples the same tokens alone or in a
//! batch).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;

const QK: usize = 32;
/// Rows of activations per tile (accumulators held in registers).
const ROW_TILE: usize = 8;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A Q8_0 weight matrix `(n, k)` (`n` outputs), quants and f32 scales apart.
pub struct Q8Matrix {
    n: usize,
    k: usize,
    quants: Vec<i8>,
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// From a Q8_0 tensor on the CPU; `None` for other types or shapes.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q8_0 {
            return Ok(None);
        }
        let Ok((n, k)) = t.shape().dims2() else {
            return Ok(None);
        };
        if k % QK != 0 {
            return Ok(None);
        }
        let data = t.data()?;
        let blocks = n * k / QK;
        if data.len() != blocks * (2 + QK) {
            return Ok(None);
        }
        let mut quants = Vec::with_capacity(n * k);
        let mut scales = Vec::with_capacity(blocks);
        for b in data.chunks_exact(2 + QK) {
            scales.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            quants.extend(b[2..].iter().map(|&q| q as i8));
        }
        Ok(Some(Self {
            n,
            k,
            quants,
            scales,
        }))
    }

    /// `x` `(..., k)` f32 times the transposed matrix: `(..., n)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k {
            candle_core::bail!(
                "q8 matmul: input {:?} for a ({}, {}) matrix",
                dims,
                self.n,
                self.k
            );
        }
        let m = x.elem_count() / k;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let (xq, xd) = quantize_rows(&xs, m, k);
        let mut out = vec![0f32; m * self.n];
        self.matmul(&xq, &xd, m, &mut out);
        let mut shape = dims;
        *shape.last_mut().expect("rank >= 1") = self.n;
        Tensor::from_vec(out, shape, &Device::Cpu)
    }

    fn matmul(&self, xq: &[u8], xd: &[f32], m: usize, out: &mut [f32]) {
        let kb = self.k / QK;
        // Columns in chunks across candle's own CPU thread pool (the one its
        // matmuls run on, so the two never fight for cores); each (row,
        // column) is written by one chunk only.
        let chunk = 16;
        let out_ptr = SendPtr(out.as_mut_ptr());
        let chunks = self.n.div_ceil(chunk);
        candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
            for c in range {
                let cols = c * chunk..((c + 1) * chunk).min(self.n);
                let out_ptr = &out_ptr;
                for r0 in (0..m).step_by(ROW_TILE) {
                    let rows = ROW_TILE.min(m - r0);
                    for col in cols.clone() {
                        let w = &self.quants[col * self.k..(col + 1) * self.k];
                        let wd = &self.scales[col * kb..(col + 1) * kb];
                        let mut sums = [0f32; ROW_TILE];
                        // SAFETY: `available()` was checked when the matrix was
                        // chosen for this CPU.
                        unsafe {
                            dot_tile(
                                w,
                                wd,
                                &xq[r0 * self.k..(r0 + rows) * self.k],
                                &xd[r0 * kb..(r0 + rows) * kb],
                                rows,
                                kb,
                                &mut sums,
                            )
                        };
                        for (r, s) in sums.iter().take(rows).enumerate() {
                            // SAFETY: in bounds; this chunk alone writes column `col`.
                            unsafe { *out_ptr.0.add((r0 + r) * self.n + col) = *s };
                        }
                    }
                }
            }
        });
    }
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Activations as candle quantizes them to Q8_0 (scale `amax / 127` kept as
/// f16, values `round(x / scale)`), stored shifted to unsigned (`q + 128`)
/// with the f32 value of each block's f16 scale.
fn quantize_rows(xs: &[f32], m: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; m * k];
    let mut d = vec![0f32; m * k / QK];
    for (b, (xb, qb)) in xs.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let scale = amax / ((1 << 7) - 1) as f32;
        let inv = if scale != 0f32 { 1. / scale } else { 0. };
        d[b] = f16::from_f32(scale).to_f32();
        for (y, &x) in qb.iter_mut().zip(xb) {
            *y = ((f32::round(x * inv) as i8) as i16 + 128) as u8;
        }
    }
    (q, d)
}

/// The dot products of one weight column with `rows` activation rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512vl,avx512vnni")]
unsafe fn dot_tile(
    w: &[i8],
    wd: &[f32],
    xq: &[u8],
    xd: &[f32],
    rows: usize,
    kb: usize,
    sums: &mut [f32; ROW_TILE],
) {
    use std::arch::x86_64::*;
    let k = kb * QK;
    let mut acc = [_mm256_setzero_ps(); ROW_TILE];
    let shift = _mm256_set1_epi8(-128i8);
    for b in 0..kb {
        let wb = unsafe { _mm256_loadu_si256(w.as_ptr().add(b * QK) as *const __m256i) };
        // 128 × the sum of each lane's 4 weights: what the shift added.
        let corr = _mm256_dpbusd_epi32(_mm256_setzero_si256(), shift, wb);
        let dw = wd[b];
        for r in 0..rows {
            let xb =
                unsafe { _mm256_loadu_si256(xq.as_ptr().add(r * k + b * QK) as *const __m256i) };
            let lanes = _mm256_sub_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), xb, wb), corr);
            let d = _mm256_set1_ps(dw * xd[r * kb + b]);
            acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r]);
        }
    }
    for r in 0..rows {
        // candle's hsum_float_8, step for step.
        let x = acc[r];
        let res = _mm256_extractf128_ps(x, 1);
        let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        sums[r] = _mm_cvtss_f32(res);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_tile(
    _w: &[i8],
    _wd: &[f32],
    _xq: &[u8],
    _xd: &[f32],
    _rows: usize,
    _kb: usize,
    _sums: &mut [f32; ROW_TILE],
) {
    unreachable!("the q8 kernel is only chosen on x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    /// Bit for bit what candle's QMatMul gives, for 1 to 11 rows.
    #[test]
    fn matches_candles_q8_0_matmul_exactly() {
        if !available() {
            eprintln!("no AVX-512 VNNI: the kernel is not used on this CPU");
            return;
        }
        let dev = Device::Cpu;
        let (n, k) = (200, 576);
        let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let ours = Q8Matrix::from_qtensor(&qt).unwrap().unwrap();
        let theirs = QMatMul::from_qtensor(qt).unwrap();
        for m in [1, 2, 3, 8, 11] {
            let x = Tensor::randn(0f32, 1., (1, m, k), &dev).unwrap();
            let a = ours.forward(&x).unwrap();
            let b = theirs.forward(&x).unwrap();
            assert_eq!(a.dims(), b.dims());
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let same = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| x.to_bits() == y.to_bits())
                .count();
            assert_eq!(same, a.len(), "{m} rows: {same} of {} equal", a.len());
        }
    }
}
