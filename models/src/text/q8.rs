//! A Q8_0 matrix product for a few rows at a time on x86 CPUs with AVX-512
//! VNNI: what decoding several sequences in one batch needs.
//!
//! candle's CPU Q8_0 kernel computes every (row, column) dot product on its
//! own: each extra row of a batch re-reads the weight block, takes its
//! absolute value and signs again and converts both f16 scales again, so a
//! batch of 8 costs nearly 8 single rows. Its AVX-512 VNNI repacked kernel
//! only takes inner dimensions that are multiples of 256 (SmolLM2's 576-wide
//! matrices are not). Here each weight block is loaded once per tile of up to
//! 8 rows (or 4 columns at once for one or two rows), its f16 scale
//! converted by F16C, and the products are `vpdpbusd` on the activations shifted to unsigned (x + 128) with the
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
            && std::is_x86_feature_detected!("f16c")
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
    /// The f16 bits of each block's scale (converted in the kernel: fewer
    /// bytes to read than f32s).
    scales: Vec<u16>,
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
            scales.push(u16::from_le_bytes([b[0], b[1]]));
            quants.extend(b[2..].iter().map(|&q| q as i8));
        }
        Ok(Some(Self {
            n,
            k,
            quants,
            scales,
        }))
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// The matrices' rows one after the other: one matrix for projections
    /// that read the same input. `None` when they differ in `k`.
    pub fn concat(parts: Vec<Self>) -> Option<Self> {
        let k = parts.first()?.k;
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let mut out = Self {
            n: 0,
            k,
            quants: Vec::new(),
            scales: Vec::new(),
        };
        for p in parts {
            out.n += p.n;
            out.quants.extend(p.quants);
            out.scales.extend(p.scales);
        }
        Some(out)
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
        let out = self.matmul_f32(&x.flatten_all()?.to_vec1::<f32>()?, m);
        let mut shape = dims;
        *shape.last_mut().expect("rank >= 1") = self.n;
        Tensor::from_vec(out, shape, &Device::Cpu)
    }

    /// `m` rows of `k` f32 times the transposed matrix: `(m, n)`.
    pub fn matmul_f32(&self, xs: &[f32], m: usize) -> Vec<f32> {
        let (xq, xd) = quantize_rows(xs, m, self.k);
        let mut out = vec![0f32; m * self.n];
        self.matmul(&xq, &xd, m, &mut out);
        out
    }

    fn matmul(&self, xq: &[u8], xd: &[f32], m: usize, out: &mut [f32]) {
        // Columns in chunks across candle's own CPU thread pool (the one its
        // matmuls run on, so the two never fight for cores); each (row,
        // column) is written by one chunk only.
        let chunk = 16;
        let out_ptr = crate::blas::SendPtr(out.as_mut_ptr());
        let chunks = self.n.div_ceil(chunk);
        candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
            let cols = range.start * chunk..(range.end * chunk).min(self.n);
            let out_ptr = &out_ptr;
            // SAFETY: `available()` was checked when the matrix was chosen
            // for this CPU; this call writes only the columns `cols`.
            unsafe { self.columns(xq, xd, m, cols, out_ptr.0) }
        });
    }

    /// Every row's dot products with the columns `cols`, in tiles of up to
    /// 8 rows by 1 column, or for one or two rows (decoding) 4 columns at
    /// once: independent sums, so the adds do not wait on each other and
    /// more weight blocks are in flight from memory. Each (row, column) is
    /// computed by the same steps in any tile.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512vl,avx512vnni")]
    unsafe fn columns(
        &self,
        xq: &[u8],
        xd: &[f32],
        m: usize,
        cols: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        let wide = if m <= 2 {
            4
        } else if m <= 4 {
            2
        } else {
            1
        };
        let mut col = cols.start;
        while col < cols.end {
            let c = if cols.end - col >= wide { wide } else { 1 };
            let mut r0 = 0;
            while r0 < m {
                let r = (m - r0).min(ROW_TILE);
                unsafe {
                    match (r, c) {
                        (1, 4) => self.tile::<1, 4>(xq, xd, col, r0, out),
                        (2, 4) => self.tile::<2, 4>(xq, xd, col, r0, out),
                        (3, 2) => self.tile::<3, 2>(xq, xd, col, r0, out),
                        (4, 2) => self.tile::<4, 2>(xq, xd, col, r0, out),
                        (1, _) => self.tile::<1, 1>(xq, xd, col, r0, out),
                        (2, _) => self.tile::<2, 1>(xq, xd, col, r0, out),
                        (3, _) => self.tile::<3, 1>(xq, xd, col, r0, out),
                        (4, _) => self.tile::<4, 1>(xq, xd, col, r0, out),
                        (5, _) => self.tile::<5, 1>(xq, xd, col, r0, out),
                        (6, _) => self.tile::<6, 1>(xq, xd, col, r0, out),
                        (7, _) => self.tile::<7, 1>(xq, xd, col, r0, out),
                        _ => self.tile::<ROW_TILE, 1>(xq, xd, col, r0, out),
                    }
                }
                r0 += r;
            }
            col += c;
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn columns(
        &self,
        _: &[u8],
        _: &[f32],
        _: usize,
        _: std::ops::Range<usize>,
        _: *mut f32,
    ) {
        unreachable!("the q8 kernel is only chosen on x86_64")
    }

    /// Rows `r0..r0 + R` times columns `col..col + C`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile<const R: usize, const C: usize>(
        &self,
        xq: &[u8],
        xd: &[f32],
        col: usize,
        r0: usize,
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let (k, kb) = (self.k, self.k / QK);
        let w = unsafe { self.quants.as_ptr().add(col * k) };
        let wd = &self.scales[col * kb..(col + C) * kb];
        let xq = unsafe { xq.as_ptr().add(r0 * k) };
        let xd = &xd[r0 * kb..(r0 + R) * kb];
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let shift = _mm256_set1_epi8(-128i8);
        for b in 0..kb {
            for c in 0..C {
                let wb = unsafe { _mm256_loadu_si256(w.add(c * k + b * QK) as *const __m256i) };
                // 128 × the sum of each lane's 4 weights: what the shift added.
                let corr = _mm256_dpbusd_epi32(_mm256_setzero_si256(), shift, wb);
                let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(wd[c * kb + b] as i32)));
                for r in 0..R {
                    let xb =
                        unsafe { _mm256_loadu_si256(xq.add(r * k + b * QK) as *const __m256i) };
                    let lanes =
                        _mm256_sub_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), xb, wb), corr);
                    let d = _mm256_set1_ps(dw * xd[r * kb + b]);
                    acc[r][c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r][c]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, &x) in row.iter().enumerate() {
                // candle's hsum_float_8, step for step.
                let res = _mm256_extractf128_ps(x, 1);
                let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
                let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
                let res = _mm_add_ss(res, _mm_movehdup_ps(res));
                // SAFETY: row `r0 + r` < rows, column `col + c` < n.
                unsafe { *out.add((r0 + r) * self.n + col + c) = _mm_cvtss_f32(res) };
            }
        }
    }
}

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
