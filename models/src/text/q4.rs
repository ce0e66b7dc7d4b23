//! A Q4_1 matrix product on x86 CPUs with AVX2 (and AVX-512 VNNI where the
//! CPU has it), run on the 4-bit weights as the GGUF stores them.
//!
//! candle's CPU kernel for Q4_1 is scalar code, so the loader used to
//! re-quantize Q4_1 tensors to Q8_0 (`CPU_REPACK`): fast dot products, but
//! 1.7 times the bytes, and decoding one sequence reads every weight once
//! per token, so it runs at the memory's speed. This kernel reads the 4-bit
//! weights themselves.
//!
//! Q4_1 holds, per block of 32 weights, a scale `d`, a minimum `m` and 32
//! unsigned 4-bit values: `w = d * q + m`. The activations are quantized per
//! block of 32 as llama.cpp's Q8_1 does (`x ≈ dx * qx`, `qx` signed 8-bit,
//! `sx = dx * Σ qx`), so a block's dot product is `d * dx * Σ q * qx + m *
//! sx`: the integer sum by `vpdpbusd` (unsigned weights times signed
//! activations, exactly what the instruction takes, no shift), or on AVX2 by
//! `vpmaddubsw` + `vpmaddwd` (a pair's sum is at most 2 × 15 × 127, no
//! saturation). Each weight block is unpacked once per tile of rows (8 with
//! AVX-512's 32 registers, 4 on AVX2; for one or two rows, 4 columns at
//! once).
//!
//! The decode step is bound by instructions per block as much as by memory,
//! so the weights are rearranged at load: two neighbouring blocks share 32
//! bytes, the first block's values in the low nibbles in order and the
//! second's in the high ones, so one 32-byte load and two masks give both
//! blocks ready for the products (the GGUF's own layout needs a load, a
//! shift, a lane insert and a mask per block). Each pair's four f16s (`d`,
//! `m` of both) convert in one instruction and multiply the row's `dx`,
//! `sx` of both blocks in one more; the `m * sx` terms add up in the same
//! vector. A row with an odd number of blocks gets a zero block.
//!
//! Every output row is computed by the same code whatever the other rows
//! are (a tile of one row runs the same per-row steps as a tile of eight),
//! so a sequence samples the same tokens alone or in a batch.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};

const QK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx512Vnni,
    Avx2,
}

fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c"))
        {
            return None;
        }
        if std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512vl")
        {
            Some(Isa::Avx512Vnni)
        } else {
            Some(Isa::Avx2)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether this CPU runs the kernel (x86-64 with AVX2, FMA and F16C).
pub fn available() -> bool {
    isa().is_some()
}

/// A Q4_1 weight matrix `(n, k)` (`n` outputs), per column in pairs of
/// blocks: 32 bytes of values (block `2p` in the low nibbles, `2p + 1` in
/// the high ones, each in order) and the pair's `d`, `m`, `d`, `m` as f16
/// bits (converted in the kernel: fewer bytes to read than f32s).
pub struct Q4Matrix {
    n: usize,
    k: usize,
    /// Pairs of blocks per column.
    pairs: usize,
    quants: Vec<u8>,
    dm: Vec<[u16; 4]>,
    isa: Isa,
}

/// Activation rows quantized as Q8_1: per block of 32, signed 8-bit values,
/// the scale `dx` and the scale times the values' sum `sx`, stored
/// `dx, sx` per block; rows padded with zeros to whole pairs of blocks.
pub struct QuantizedRows {
    rows: usize,
    k: usize,
    pairs: usize,
    q: Vec<i8>,
    ds: Vec<f32>,
}

impl QuantizedRows {
    /// `xs`, `rows` rows of `k` (a multiple of 32) values.
    pub fn new(xs: &[f32], rows: usize, k: usize) -> Self {
        assert_eq!(xs.len(), rows * k);
        assert_eq!(k % QK, 0);
        let pairs = (k / QK).div_ceil(2);
        let mut out = Self {
            rows,
            k,
            pairs,
            q: vec![0; rows * pairs * 2 * QK],
            ds: vec![0.; rows * pairs * 4],
        };
        if k > 0 {
            match isa() {
                // SAFETY: the CPU has AVX2 and FMA.
                Some(_) => unsafe { quantize_avx2(xs, &mut out) },
                None => quantize_blocks(xs, &mut out),
            }
        }
        out
    }
}

#[inline(always)]
fn quantize_blocks(xs: &[f32], out: &mut QuantizedRows) {
    let (k, padded) = (out.k, out.pairs * 2 * QK);
    for (r, row) in xs.chunks_exact(k).enumerate() {
        let q = &mut out.q[r * padded..r * padded + k];
        let ds = &mut out.ds[r * out.pairs * 4..];
        for (b, (xb, qb)) in row.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
            let amax = xb.iter().fold(0f32, |a, &x| a.max(x.abs()));
            let d = amax / 127.;
            let id = if d != 0. { 1. / d } else { 0. };
            let mut sum = 0i32;
            for (y, &x) in qb.iter_mut().zip(xb) {
                let v = (x * id).round_ties_even() as i32;
                *y = v as i8;
                sum += v;
            }
            ds[2 * b] = d;
            ds[2 * b + 1] = d * sum as f32;
        }
    }
}

/// [`quantize_blocks`] with AVX2, value for value: the same `|x|` maximum,
/// the same `x * (1 / d)` rounded to nearest even (the default rounding of
/// `vcvtps2dq`, as `round_ties_even`), the same integer sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(xs: &[f32], out: &mut QuantizedRows) {
    use std::arch::x86_64::*;
    let (k, padded) = (out.k, out.pairs * 2 * QK);
    let sign = _mm256_set1_ps(-0.0);
    // packs_epi32 then packs_epi16 leave the 8-byte groups in the order
    // 0, 2, 4, 6, 1, 3, 5, 7 (per 128-bit lane); this puts them back.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (r, row) in xs.chunks_exact(k).enumerate() {
        let ds = &mut out.ds[r * out.pairs * 4..];
        let q = unsafe { out.q.as_mut_ptr().add(r * padded) };
        for (b, xb) in row.chunks_exact(QK).enumerate() {
            let p = xb.as_ptr();
            let v = unsafe {
                [
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ]
            };
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
            );
            let m = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_movehdup_ps(m));
            let amax = _mm_cvtss_f32(m);
            let d = amax / 127.;
            let id = _mm256_set1_ps(if d != 0. { 1. / d } else { 0. });
            let i = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, id)));
            let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let sum = _mm_add_epi32(
                _mm256_extracti128_si256(sum, 1),
                _mm256_castsi256_si128(sum),
            );
            let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 1));
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(i[0], i[1]),
                _mm256_packs_epi32(i[2], i[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            unsafe { _mm256_storeu_si256(q.add(b * QK) as *mut __m256i, bytes) };
            ds[2 * b] = d;
            ds[2 * b + 1] = d * _mm_cvtsi128_si32(sum) as f32;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_avx2(xs: &[f32], out: &mut QuantizedRows) {
    quantize_blocks(xs, out)
}

impl Q4Matrix {
    /// From a Q4_1 tensor on the CPU; `None` for other types or shapes, or
    /// on a CPU without AVX2.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let Some(isa) = isa() else { return Ok(None) };
        if t.dtype() != GgmlDType::Q4_1 {
            return Ok(None);
        }
        let Ok((n, k)) = t.shape().dims2() else {
            return Ok(None);
        };
        if k % QK != 0 || k == 0 {
            return Ok(None);
        }
        let data = t.data()?;
        let (kb, size) = (k / QK, 4 + QK / 2);
        if data.len() != n * kb * size {
            return Ok(None);
        }
        let pairs = kb.div_ceil(2);
        let mut quants = vec![0u8; n * pairs * QK];
        let mut dm = vec![[0u16; 4]; n * pairs];
        for col in 0..n {
            for b in 0..kb {
                let block = &data[(col * kb + b) * size..(col * kb + b + 1) * size];
                let (pair, second) = (col * pairs + b / 2, b % 2);
                dm[pair][2 * second] = u16::from_le_bytes([block[0], block[1]]);
                dm[pair][2 * second + 1] = u16::from_le_bytes([block[2], block[3]]);
                let dst = &mut quants[pair * QK..(pair + 1) * QK];
                for j in 0..QK {
                    // The GGUF's value j: byte j's low nibble for j < 16,
                    // byte j - 16's high nibble after.
                    let v = if j < 16 {
                        block[4 + j] & 0x0f
                    } else {
                        block[4 + j - 16] >> 4
                    };
                    dst[j] |= v << (4 * second);
                }
            }
        }
        Ok(Some(Self {
            n,
            k,
            pairs,
            quants,
            dm,
            isa,
        }))
    }

    /// The matrices' rows one after the other: one matrix for projections
    /// that read the same input. `None` when they differ in `k`.
    pub fn concat(parts: Vec<Self>) -> Option<Self> {
        let first = parts.first()?;
        let (k, pairs, isa) = (first.k, first.pairs, first.isa);
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let mut out = Self {
            n: 0,
            k,
            pairs,
            quants: Vec::new(),
            dm: Vec::new(),
            isa,
        };
        for p in parts {
            out.n += p.n;
            out.quants.extend(p.quants);
            out.dm.extend(p.dm);
        }
        Some(out)
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// `x` `(..., k)` f32 times the transposed matrix: `(..., n)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k {
            candle_core::bail!(
                "q4 matmul: input {:?} for a ({}, {}) matrix",
                dims,
                self.n,
                self.k
            );
        }
        let rows = x.elem_count() / k;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let out = self.matmul(&QuantizedRows::new(&xs, rows, k));
        let mut shape = dims;
        *shape.last_mut().expect("rank >= 1") = self.n;
        Tensor::from_vec(out, shape, &Device::Cpu)
    }

    /// `(rows, n)` for quantized activation rows.
    pub fn matmul(&self, x: &QuantizedRows) -> Vec<f32> {
        assert_eq!(x.k, self.k, "q4 matmul: inner dimensions differ");
        let mut out = vec![0f32; x.rows * self.n];
        // Columns in chunks across candle's own CPU thread pool (the one its
        // matmuls run on, so the two never fight for cores); each (row,
        // column) is written by one chunk only.
        let chunk = 16;
        let out_ptr = crate::blas::SendPtr(out.as_mut_ptr());
        let chunks = self.n.div_ceil(chunk);
        candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
            let cols = range.start * chunk..(range.end * chunk).min(self.n);
            let out_ptr = &out_ptr;
            // SAFETY: `isa` was detected on this CPU; each call writes only
            // the columns `cols` of `out`, which has `x.rows * n` values.
            unsafe {
                match self.isa {
                    Isa::Avx512Vnni => cols_vnni(self, x, cols, out_ptr.0),
                    Isa::Avx2 => cols_avx2(self, x, cols, out_ptr.0),
                }
            }
        });
        out
    }
}

/// The column loop and a tile of `R` rows by `C` columns, for one
/// instruction set: `$dot` is the integer dot product of 32 unsigned 4-bit
/// weights with 32 signed 8-bit activations, as 8 lanes of i32. A tile's
/// `R * C` sums are independent chains: one row (decoding) runs 4 columns
/// at once so the adds do not wait on each other, and more weight blocks
/// are in flight from memory.
macro_rules! kernel {
    ($cols:ident, $tile:ident, $features:literal, $rows:literal, |$w:ident, $x:ident| $dot:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $cols(
            w: &Q4Matrix,
            x: &QuantizedRows,
            cols: std::ops::Range<usize>,
            out: *mut f32,
        ) {
            // Columns per tile: 8 for one row, 4 for two, 2 for three or four.
            let wide = if x.rows == 1 {
                8
            } else if x.rows <= 2 {
                4
            } else if x.rows <= 4 {
                2
            } else {
                1
            };
            let mut col = cols.start;
            while col < cols.end {
                let c = if cols.end - col >= wide { wide } else { 1 };
                let mut r0 = 0;
                while r0 < x.rows {
                    let r = (x.rows - r0).min($rows);
                    unsafe {
                        match (r, c) {
                            (1, 8) => $tile::<1, 8>(w, x, col, r0, out),
                            (1, 4) => $tile::<1, 4>(w, x, col, r0, out),
                            (2, 4) => $tile::<2, 4>(w, x, col, r0, out),
                            (3, 2) => $tile::<3, 2>(w, x, col, r0, out),
                            (4, 2) => $tile::<4, 2>(w, x, col, r0, out),
                            (1, _) => $tile::<1, 1>(w, x, col, r0, out),
                            (2, _) => $tile::<2, 1>(w, x, col, r0, out),
                            (3, _) => $tile::<3, 1>(w, x, col, r0, out),
                            (4, _) => $tile::<4, 1>(w, x, col, r0, out),
                            (5, _) => $tile::<5, 1>(w, x, col, r0, out),
                            (6, _) => $tile::<6, 1>(w, x, col, r0, out),
                            (7, _) => $tile::<7, 1>(w, x, col, r0, out),
                            _ => $tile::<$rows, 1>(w, x, col, r0, out),
                        }
                    }
                    r0 += r;
                }
                col += c;
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $tile<const R: usize, const C: usize>(
            w: &Q4Matrix,
            x: &QuantizedRows,
            col: usize,
            r0: usize,
            out: *mut f32,
        ) {
            use std::arch::x86_64::*;
            let pairs = w.pairs;
            let padded = pairs * 2 * QK;
            let wq = unsafe { w.quants.as_ptr().add(col * pairs * QK) };
            let wdm = unsafe { w.dm.as_ptr().add(col * pairs) };
            let xq = unsafe { x.q.as_ptr().add(r0 * padded) };
            let xds = unsafe { x.ds.as_ptr().add(r0 * pairs * 4) };
            let low = _mm256_set1_epi8(0x0f);
            let third = _mm256_set1_epi32(2);
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            // Lanes 1 and 3: the pairs' m * sx; lanes 0 and 2 unused.
            let mut mins = [[_mm_setzero_ps(); C]; R];
            for p in 0..pairs {
                for c in 0..C {
                    let v = unsafe {
                        _mm256_loadu_si256(wq.add((c * pairs + p) * QK) as *const __m256i)
                    };
                    let w0 = _mm256_and_si256(v, low);
                    let w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    // d0, m0, d1, m1.
                    let dm = _mm_cvtph_ps(unsafe {
                        _mm_loadl_epi64(wdm.add(c * pairs + p) as *const __m128i)
                    });
                    for r in 0..R {
                        let at = unsafe { xq.add(r * padded + p * 2 * QK) };
                        let x0 = unsafe { _mm256_loadu_si256(at as *const __m256i) };
                        let x1 = unsafe { _mm256_loadu_si256(at.add(QK) as *const __m256i) };
                        let ($w, $x) = (w0, x0);
                        let i0: __m256i = $dot;
                        let ($w, $x) = (w1, x1);
                        let i1: __m256i = $dot;
                        // d0 dx0, m0 sx0, d1 dx1, m1 sx1.
                        let prod =
                            _mm_mul_ps(dm, unsafe { _mm_loadu_ps(xds.add((r * pairs + p) * 4)) });
                        mins[r][c] = _mm_add_ps(mins[r][c], prod);
                        let s0 = _mm256_broadcastss_ps(prod);
                        let s1 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(prod), third);
                        let both = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(i0),
                            s0,
                            _mm256_mul_ps(_mm256_cvtepi32_ps(i1), s1),
                        );
                        acc[r][c] = _mm256_add_ps(acc[r][c], both);
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    let v = acc[r][c];
                    let h = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
                    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
                    let m = mins[r][c];
                    let m = _mm_add_ss(_mm_movehdup_ps(m), _mm_movehl_ps(m, _mm_movehdup_ps(m)));
                    // SAFETY: row `r0 + r` < rows, column `col + c` < n.
                    unsafe {
                        *out.add((r0 + r) * w.n + col + c) = _mm_cvtss_f32(h) + _mm_cvtss_f32(m)
                    };
                }
            }
        }
    };
}

kernel!(
    cols_vnni,
    tile_vnni,
    "avx2,fma,f16c,avx512vl,avx512vnni",
    8,
    |wv, xv| _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, xv)
);
kernel!(cols_avx2, tile_avx2, "avx2,fma,f16c", 4, |wv, xv| {
    _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), _mm256_set1_epi16(1))
});

#[cfg(not(target_arch = "x86_64"))]
unsafe fn cols_vnni(_: &Q4Matrix, _: &QuantizedRows, _: std::ops::Range<usize>, _: *mut f32) {
    unreachable!("the q4 kernel is only chosen on x86_64")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn cols_avx2(_: &Q4Matrix, _: &QuantizedRows, _: std::ops::Range<usize>, _: *mut f32) {
    unreachable!("the q4 kernel is only chosen on x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    fn vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn matrix(n: usize, k: usize, isa: Isa) -> (QTensor, Q4Matrix) {
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let mut ours = Q4Matrix::from_qtensor(&qt).unwrap().unwrap();
        ours.isa = isa;
        (qt, ours)
    }

    fn isas() -> Vec<Isa> {
        match isa() {
            Some(Isa::Avx512Vnni) => vec![Isa::Avx512Vnni, Isa::Avx2],
            Some(Isa::Avx2) => vec![Isa::Avx2],
            None => vec![],
        }
    }

    /// Against the dequantized weights in f32 (the activations' 8-bit
    /// rounding is the only difference) and against candle's own Q4_1 ×
    /// Q8_1 product.
    #[test]
    fn matches_the_dequantized_product_and_candles_kernel() {
        // 18 blocks a row, and 3 (an odd count: a zero block pads the pair).
        for (isa, k) in isas().into_iter().flat_map(|i| [(i, 576), (i, 96)]) {
            let n = 200;
            let (qt, ours) = matrix(n, k, isa);
            let deq = qt.dequantize(&Device::Cpu).unwrap();
            let theirs = QMatMul::from_qtensor(qt).unwrap();
            for m in [1, 3, 8, 11] {
                let x = Tensor::randn(0f32, 1., (1, m, k), &Device::Cpu).unwrap();
                let a = vec(&ours.forward(&x).unwrap());
                let exact = vec(&x.broadcast_matmul(&deq.t().unwrap()).unwrap());
                assert_eq!(a.len(), m * n);
                let scale = exact.iter().fold(0f32, |s, v| s.max(v.abs()));
                for (a, e) in a.iter().zip(&exact) {
                    assert!(
                        (a - e).abs() < 0.02 * scale,
                        "{isa:?} k {k}, {m} rows: {a} vs f32 {e}"
                    );
                }
                // candle's kernel takes even block counts only.
                if (k / QK).is_multiple_of(2) {
                    let candle = vec(&theirs.forward(&x).unwrap());
                    for (a, c) in a.iter().zip(&candle) {
                        assert!(
                            (a - c).abs() < 0.01 * scale,
                            "{isa:?} k {k}, {m} rows: {a} vs candle {c}"
                        );
                    }
                }
            }
        }
    }

    /// A row's result does not depend on the rows beside it, and the two
    /// instruction sets give the same numbers (integer sums, then the same
    /// float steps in the same order).
    #[test]
    fn each_row_is_the_same_alone_or_in_a_batch() {
        let isas = isas();
        let Some(&first) = isas.first() else { return };
        let (n, k) = (70, 320);
        let (_, mut ours) = matrix(n, k, first);
        let x = Tensor::randn(0f32, 1., (13, k), &Device::Cpu).unwrap();
        let batch = vec(&ours.forward(&x).unwrap());
        for isa in isas {
            ours.isa = isa;
            for r in 0..13 {
                let alone = vec(&ours.forward(&x.narrow(0, r, 1).unwrap()).unwrap());
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&alone),
                    bits(&batch[r * n..(r + 1) * n]),
                    "{isa:?} row {r}"
                );
            }
        }
    }

    /// The AVX2 quantization gives the plain loop's values exactly.
    #[test]
    fn vector_quantization_equals_the_plain_one() {
        if isa().is_none() {
            return;
        }
        let (rows, k) = (3, 160);
        let mut xs = vec(&Tensor::randn(0f32, 1., (rows, k), &Device::Cpu).unwrap());
        // Ties to even, a zero block, a block's maximum at each end.
        xs[..QK].fill(0.);
        xs[QK] = 127.;
        xs[QK + 1] = 0.5;
        xs[QK + 2] = 1.5;
        xs[QK + 3] = -2.5;
        xs[2 * QK + 31] = -9.;
        let (mut plain, mut simd) = (
            QuantizedRows::new(&xs, rows, k),
            QuantizedRows::new(&xs, rows, k),
        );
        quantize_blocks(&xs, &mut plain);
        // SAFETY: checked above.
        unsafe { quantize_avx2(&xs, &mut simd) };
        assert_eq!(plain.q, simd.q);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&plain.ds), bits(&simd.ds));
    }

    #[test]
    fn concatenated_matrices_give_each_part_s_columns() {
        let Some(&isa) = isas().first() else { return };
        let (_, a) = matrix(40, 64, isa);
        let (_, b) = matrix(24, 64, isa);
        let x = Tensor::randn(0f32, 1., (3, 64), &Device::Cpu).unwrap();
        let (ya, yb) = (vec(&a.forward(&x).unwrap()), vec(&b.forward(&x).unwrap()));
        let both = Q4Matrix::concat(vec![a, b]).unwrap();
        assert_eq!(both.n(), 64);
        let y = vec(&both.forward(&x).unwrap());
        for r in 0..3 {
            assert_eq!(&y[r * 64..r * 64 + 40], &ya[r * 40..(r + 1) * 40]);
            assert_eq!(&y[r * 64 + 40..(r + 1) * 64], &yb[r * 24..(r + 1) * 24]);
        }
    }
}
