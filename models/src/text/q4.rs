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
//! AVX-512's 32 registers, 4 on AVX2), its `d` and `m` kept as f32 from the
//! load.
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

/// A Q4_1 weight matrix `(n, k)` (`n` outputs): per block of 32, 16 bytes
/// of 4-bit values as the GGUF packs them (byte `j`: value `j` in the low
/// nibble, value `j + 16` in the high one), and its scale and minimum.
pub struct Q4Matrix {
    n: usize,
    k: usize,
    quants: Vec<u8>,
    /// Per block, the f16 bits of `d` (low half) and `m` (high half), as
    /// the GGUF stores them: converting in the kernel costs less than
    /// reading f32s (decoding runs at the memory's speed).
    dm: Vec<u32>,
    isa: Isa,
}

/// Activation rows quantized as Q8_1: per block of 32, signed 8-bit values,
/// the scale and the scale times the values' sum.
pub struct QuantizedRows {
    rows: usize,
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl QuantizedRows {
    /// `xs`, `rows` rows of `k` (a multiple of 32) values.
    pub fn new(xs: &[f32], rows: usize, k: usize) -> Self {
        assert_eq!(xs.len(), rows * k);
        assert_eq!(k % QK, 0);
        let blocks = rows * k / QK;
        let mut out = Self {
            rows,
            k,
            q: vec![0; rows * k],
            d: vec![0.; blocks],
            s: vec![0.; blocks],
        };
        match isa() {
            // SAFETY: the CPU has AVX2 and FMA.
            Some(_) => unsafe { quantize_avx2(xs, &mut out) },
            None => quantize_plain(xs, &mut out),
        }
        out
    }
}

#[inline(always)]
fn quantize_blocks(xs: &[f32], out: &mut QuantizedRows) {
    for (b, (xb, qb)) in xs
        .chunks_exact(QK)
        .zip(out.q.chunks_exact_mut(QK))
        .enumerate()
    {
        let amax = xb.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let d = amax / 127.;
        let id = if d != 0. { 1. / d } else { 0. };
        let mut sum = 0i32;
        for (y, &x) in qb.iter_mut().zip(xb) {
            let v = (x * id).round_ties_even() as i32;
            *y = v as i8;
            sum += v;
        }
        out.d[b] = d;
        out.s[b] = d * sum as f32;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(xs: &[f32], out: &mut QuantizedRows) {
    quantize_blocks(xs, out)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_avx2(xs: &[f32], out: &mut QuantizedRows) {
    quantize_blocks(xs, out)
}

fn quantize_plain(xs: &[f32], out: &mut QuantizedRows) {
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
        if k % QK != 0 {
            return Ok(None);
        }
        let data = t.data()?;
        let blocks = n * k / QK;
        if data.len() != blocks * (4 + QK / 2) {
            return Ok(None);
        }
        let mut quants = Vec::with_capacity(n * k / 2);
        let mut dm = Vec::with_capacity(blocks);
        for b in data.chunks_exact(4 + QK / 2) {
            dm.push(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            quants.extend_from_slice(&b[4..]);
        }
        Ok(Some(Self {
            n,
            k,
            quants,
            dm,
            isa,
        }))
    }

    /// The matrices' rows one after the other: one matrix for projections
    /// that read the same input. `None` when they differ in `k`.
    pub fn concat(parts: Vec<Self>) -> Option<Self> {
        let first = parts.first()?;
        let (k, isa) = (first.k, first.isa);
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let mut out = Self {
            n: 0,
            k,
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
        let out_ptr = super::q8::SendPtr(out.as_mut_ptr());
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
            // Columns per tile: 4 for one or two rows, 2 for three or four.
            let wide = if x.rows <= 2 {
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
            let (k, kb) = (w.k, w.k / QK);
            let wq = unsafe { w.quants.as_ptr().add(col * k / 2) };
            let wdm = &w.dm[col * kb..(col + C) * kb];
            let xq = unsafe { x.q.as_ptr().add(r0 * k) };
            let xd = &x.d[r0 * kb..(r0 + R) * kb];
            let xs = &x.s[r0 * kb..(r0 + R) * kb];
            let low = _mm256_set1_epi8(0x0f);
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut mins = [[0f32; C]; R];
            for b in 0..kb {
                for c in 0..C {
                    let raw = unsafe {
                        _mm_loadu_si128(wq.add(c * k / 2 + b * QK / 2) as *const __m128i)
                    };
                    // Values 0..16 from the low nibbles, 16..32 from the high.
                    let wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
                    let bits = wdm[c * kb + b];
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
                    let (dw, mw) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
                    for r in 0..R {
                        let xv =
                            unsafe { _mm256_loadu_si256(xq.add(r * k + b * QK) as *const __m256i) };
                        let ($w, $x) = (wv, xv);
                        let lanes: __m256i = $dot;
                        let scale = _mm256_set1_ps(dw * xd[r * kb + b]);
                        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, acc[r][c]);
                        mins[r][c] = mw.mul_add(xs[r * kb + b], mins[r][c]);
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    let v = acc[r][c];
                    let h = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
                    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
                    // SAFETY: row `r0 + r` < rows, column `col + c` < n.
                    unsafe { *out.add((r0 + r) * w.n + col + c) = _mm_cvtss_f32(h) + mins[r][c] };
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
        for isa in isas() {
            let (n, k) = (200, 576);
            let (qt, ours) = matrix(n, k, isa);
            let deq = qt.dequantize(&Device::Cpu).unwrap();
            let theirs = QMatMul::from_qtensor(qt).unwrap();
            for m in [1, 3, 8, 11] {
                let x = Tensor::randn(0f32, 1., (1, m, k), &Device::Cpu).unwrap();
                let a = vec(&ours.forward(&x).unwrap());
                let exact = vec(&x.broadcast_matmul(&deq.t().unwrap()).unwrap());
                let candle = vec(&theirs.forward(&x).unwrap());
                assert_eq!(a.len(), m * n);
                let scale = exact.iter().fold(0f32, |s, v| s.max(v.abs()));
                for ((a, e), c) in a.iter().zip(&exact).zip(&candle) {
                    assert!(
                        (a - e).abs() < 0.02 * scale,
                        "{isa:?} {m} rows: {a} vs f32 {e}"
                    );
                    assert!(
                        (a - c).abs() < 0.01 * scale,
                        "{isa:?} {m} rows: {a} vs candle {c}"
                    );
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
