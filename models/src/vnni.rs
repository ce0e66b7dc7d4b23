//! `C (m, n) = A (m, k) · Bᵀ` for unsigned 8-bit `A`, signed 8-bit `B`
//! `(n, k)` and 32-bit `C`, on AVX-512 VNNI (`vpdpbusd`): the integer
//! product under [`crate::int8`] on CPUs where MKL's `cblas_gemm_s8u8s32`
//! is not the one to use. MKL runs its VNNI kernels on Intel CPUs only;
//! elsewhere (AMD EPYC with AVX-512 VNNI, measured) it takes a generic path
//! through `dgemm` that made Whisper's int8 12× slower than faster-whisper.
//!
//! The sums are exact (no 16-bit intermediates, no saturation for `A` in
//! 0..=255 and `B` in -128..=127 up to `k` of 2²³), so the result equals the
//! plain triple loop and MKL's, element for element.
//!
//! `B` (the weights) is packed once, oneDNN-style: panels of 16 columns,
//! each step of 4 along `k` one 64-byte vector holding the 16 columns' 4
//! bytes. A step then broadcasts 4 bytes of each `A` row and multiplies
//! them into 16 columns at once, so no sum needs a horizontal reduction.
//! The tile is 6 rows × 2 panels (12 accumulators in registers: 2 loads,
//! 6 broadcasts, 12 `vpdpbusd` a step); tasks of 4 panels go across
//! rayon's threads, their 64 columns of `B` (128 KiB at `k` = 2048) staying
//! in L2 while every row of `A` meets them.

use rayon::prelude::*;

/// Columns of a packed panel (one 512-bit vector of 32-bit sums).
const PANEL: usize = 16;
/// Panels per task.
const PANELS_PER_TASK: usize = 4;
/// Rows of `A` per tile.
const MR: usize = 6;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU says it is an Intel one (MKL picks its fast code paths
/// by this).
#[cfg_attr(not(feature = "mkl"), allow(dead_code))]
pub(crate) fn genuine_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&id.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&id.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&id.ecx.to_le_bytes());
        &vendor == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `B` `(n, k)` packed for [`gemm_packed`].
pub(crate) struct PackedI8 {
    n: usize,
    /// `k` rounded up to a multiple of 4 (zeros after `k`): the row
    /// stride `A` must have.
    k4: usize,
    /// Panel `p`, step `g`, column `c`, byte `b` at
    /// `((p * k4 / 4 + g) * 16 + c) * 4 + b`; columns past `n` are zeros.
    data: Vec<i8>,
}

impl PackedI8 {
    /// Packs `b` `(n, k)` row-major.
    pub(crate) fn new(b: &[i8], n: usize, k: usize) -> Self {
        assert!(b.len() >= n * k);
        let k4 = k.next_multiple_of(4);
        let groups = k4 / 4;
        let mut data = vec![0i8; n.div_ceil(PANEL) * groups * PANEL * 4];
        for (j, row) in b.chunks_exact(k.max(1)).take(n).enumerate() {
            let (p, col) = (j / PANEL, j % PANEL);
            for (g, bytes) in row.chunks(4).enumerate() {
                let at = ((p * groups + g) * PANEL + col) * 4;
                data[at..at + bytes.len()].copy_from_slice(bytes);
            }
        }
        Self { n, k4, data }
    }

    /// The row stride `A` is read with: `k` rounded up to 4.
    pub(crate) fn row_stride(&self) -> usize {
        self.k4
    }
}

/// `c[i * n + j] = Σ_p a[i * lda + p] · B[j][p]` for `m` rows of `a`,
/// `lda` = [`PackedI8::row_stride`] (bytes past `k` in each row meet zeros).
/// Panics when [`available`] is false or a slice is too short.
pub(crate) fn gemm_packed(m: usize, a: &[u8], b: &PackedI8, c: &mut [i32]) {
    assert!(available(), "the VNNI kernel on a CPU without AVX-512 VNNI");
    let (n, lda) = (b.n, b.k4);
    assert!(a.len() >= m * lda && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let out = crate::blas::SendPtr(c.as_mut_ptr());
    let panels = n.div_ceil(PANEL);
    let task = |t: usize| {
        let ps = t * PANELS_PER_TASK..((t + 1) * PANELS_PER_TASK).min(panels);
        // SAFETY: `available()` holds (asserted); the sizes are checked
        // above; each task writes only its own panels' columns.
        unsafe { columns(m, a.as_ptr(), b, ps, out.get()) }
    };
    let tasks = panels.div_ceil(PANELS_PER_TASK);
    // A decoding step's one row is too little work to hand to the pool
    // unless the matrix is large.
    if tasks == 1 || m * n * lda < 1 << 20 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// Every row times the panels `ps`: tiles of up to 6 rows × 2 panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn columns(m: usize, a: *const u8, b: &PackedI8, ps: std::ops::Range<usize>, c: *mut i32) {
    macro_rules! tile {
        ($r:expr, $np:expr, $i:expr, $p:expr) => {
            match ($r, $np) {
                (6, 2) => tile::<6, 2>(a, b, $i, $p, c),
                (5, 2) => tile::<5, 2>(a, b, $i, $p, c),
                (4, 2) => tile::<4, 2>(a, b, $i, $p, c),
                (3, 2) => tile::<3, 2>(a, b, $i, $p, c),
                (2, 2) => tile::<2, 2>(a, b, $i, $p, c),
                (_, 2) => tile::<1, 2>(a, b, $i, $p, c),
                (6, _) => tile::<6, 1>(a, b, $i, $p, c),
                (5, _) => tile::<5, 1>(a, b, $i, $p, c),
                (4, _) => tile::<4, 1>(a, b, $i, $p, c),
                (3, _) => tile::<3, 1>(a, b, $i, $p, c),
                (2, _) => tile::<2, 1>(a, b, $i, $p, c),
                (_, _) => tile::<1, 1>(a, b, $i, $p, c),
            }
        };
    }
    let mut i = 0;
    while i < m {
        let r = (m - i).min(MR);
        let mut p = ps.start;
        while p < ps.end {
            let np = (ps.end - p).min(2);
            // SAFETY: rows i..i + r < m, panels p..p + np < the panels.
            unsafe { tile!(r, np, i, p) };
            p += np;
        }
        i += r;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn columns(_: usize, _: *const u8, _: &PackedI8, _: std::ops::Range<usize>, _: *mut i32) {
    unreachable!("the VNNI kernel is only chosen on x86_64")
}

/// Rows `i..i + R` times panels `p..p + NP` (R ≤ 6, NP ≤ 2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile<const R: usize, const NP: usize>(
    a: *const u8,
    b: &PackedI8,
    i: usize,
    p: usize,
    c: *mut i32,
) {
    use std::arch::x86_64::*;
    let (n, lda) = (b.n, b.k4);
    let groups = lda / 4;
    let mut acc = [[_mm512_setzero_si512(); NP]; R];
    // Each row's and each panel's read position, advanced step by step
    // (no index arithmetic in the loop; the rows are unrolled by hand so
    // the sums stay in registers in any build profile).
    // SAFETY (all reads): rows i..i + R of A hold lda bytes each; panels
    // p..p + NP hold `groups` steps of 64 bytes.
    let mut ap: [*const u8; R] = [a; R];
    for (r, ap) in ap.iter_mut().enumerate() {
        *ap = unsafe { a.add((i + r) * lda) };
    }
    let mut bp: [*const i8; NP] = [b.data.as_ptr(); NP];
    for (q, bp) in bp.iter_mut().enumerate() {
        *bp = unsafe { b.data.as_ptr().add((p + q) * groups * PANEL * 4) };
    }
    for _ in 0..groups {
        let b0 = unsafe { _mm512_loadu_si512(bp[0].cast()) };
        let b1 = if NP > 1 {
            unsafe { _mm512_loadu_si512(bp[NP - 1].cast()) }
        } else {
            b0
        };
        macro_rules! row {
            ($r:literal) => {
                if $r < R {
                    let av = _mm512_set1_epi32(unsafe {
                        std::ptr::read_unaligned(ap[$r].cast::<i32>())
                    });
                    acc[$r][0] = _mm512_dpbusd_epi32(acc[$r][0], av, b0);
                    if NP > 1 {
                        acc[$r][NP - 1] = _mm512_dpbusd_epi32(acc[$r][NP - 1], av, b1);
                    }
                    ap[$r] = unsafe { ap[$r].add(4) };
                }
            };
        }
        row!(0);
        row!(1);
        row!(2);
        row!(3);
        row!(4);
        row!(5);
        for bp in bp.iter_mut() {
            *bp = unsafe { bp.add(PANEL * 4) };
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (q, &v) in acc.iter().enumerate() {
            let col = (p + q) * PANEL;
            // SAFETY: row i + r < m; the store (masked for the last panel)
            // writes columns col..min(col + 16, n) only.
            unsafe {
                let dst = c.add((i + r) * n + col);
                if col + PANEL <= n {
                    _mm512_storeu_si512(dst.cast(), v);
                } else {
                    let mask: __mmask16 = (1u16 << (n - col)) - 1;
                    _mm512_mask_storeu_epi32(dst, mask, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile shape, `n` not a multiple of 16 and `k` not of 4,
    /// against the triple loop, exactly; extreme values included (255 ×
    /// -128 at every step of a row).
    #[test]
    fn equals_the_triple_loop() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: the kernel is never chosen here");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 7, 64),
            (9, 70, 201),
            (67, 131, 130),
            (13, 300, 2048),
        ] {
            let mut a: Vec<u8> = (0..m * k).map(|x| (x * 37 % 256) as u8).collect();
            let mut b: Vec<i8> = (0..n * k)
                .map(|x| ((x * 91 % 256) as i32 - 128) as i8)
                .collect();
            b[..k].fill(-128);
            a[..k].fill(255);
            let packed = PackedI8::new(&b, n, k);
            let lda = packed.row_stride();
            let mut padded = vec![7u8; m * lda];
            for (dst, src) in padded.chunks_exact_mut(lda).zip(a.chunks_exact(k)) {
                dst[..k].copy_from_slice(src);
            }
            let mut c = vec![0i32; m * n];
            gemm_packed(m, &padded, &packed, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: i32 = (0..k)
                        .map(|p| a[i * k + p] as i32 * b[j * k + p] as i32)
                        .sum();
                    assert_eq!(c[i * n + j], want, "({i}, {j}) of {m}x{n}x{k}");
                }
            }
        }
    }
}
