//! `C = alpha · op(A) · op(B) (+ bias) + beta · C` in f32 on AVX-512 FMA:
//! the large products under [`crate::blas::sgemm`] (Whisper's encoder,
//! the fused attention, the convolutions) on CPUs where MKL's `sgemm` is
//! not the one to use. MKL picks its AVX-512 kernels on Intel CPUs only;
//! on an AMD EPYC with AVX-512 (Zen 5, measured) it runs its AVX2 `zen`
//! kernel, and Whisper base's encoder took 0.66 s there against
//! CTranslate2's 0.22 s (oneDNN, which picks kernels by instruction set).
//!
//! `op(B)` (`k × n`) is packed into panels of 16 columns, each step along
//! `k` one 64-byte vector of the 16 columns' values: a linear layer's
//! weights once at load ([`PackedF32`], kept by [`crate::blas::Linear`]),
//! other operands per call into a reused buffer. A step broadcasts one
//! value of each `A` row and multiplies it into 16 columns at once. The
//! tile is 12 rows × 2 panels (24 accumulators in registers: 2 loads, 12
//! broadcasts, 24 FMAs a step); tasks of 4 panels go across rayon's
//! threads, their 64 columns of `B` (512 KiB at `k` = 2048) staying in L2
//! while every row of `A` meets them. The bias, `alpha` and `beta` are
//! applied as each tile is stored.

use rayon::prelude::*;

/// Columns of a packed panel (one 512-bit vector of f32).
const PANEL: usize = 16;
/// Panels per task.
const PANELS_PER_TASK: usize = 4;
/// Rows of `A` per tile.
const MR: usize = 12;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether [`crate::blas::sgemm`] hands its large products here: on
/// AVX-512 CPUs unless MKL is linked and the CPU is an Intel one (MKL's
/// own AVX-512 kernels run there). Checked once.
pub(crate) fn preferred() -> bool {
    static PREFERRED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PREFERRED
        .get_or_init(|| available() && !(cfg!(feature = "mkl") && crate::vnni::genuine_intel()))
}

/// `op(B)` `(k × n)` in panels for [`gemm`].
pub(crate) struct PackedF32 {
    n: usize,
    k: usize,
    /// Panel `p`, step `s`, column `c` at `(p * k + s) * 16 + c`; columns
    /// past `n` are zeros.
    data: Vec<f32>,
}

impl PackedF32 {
    /// Packs the weights of a linear layer: `w` `(n, k)` row-major, so
    /// that `op(B) = wᵀ`.
    pub(crate) fn of_rows(w: &[f32], n: usize, k: usize) -> Self {
        Self::new(crate::blas::Mat::t(w, k), k, n)
    }

    /// Packs `op(b)` (`k × n`).
    pub(crate) fn new(b: crate::blas::Mat, k: usize, n: usize) -> Self {
        let mut data = Vec::new();
        pack(b, k, n, &mut data);
        Self { n, k, data }
    }

    fn view(&self) -> Panels<'_> {
        Panels {
            n: self.n,
            k: self.k,
            data: &self.data,
        }
    }
}

/// Packed panels, owned or in a per-call buffer.
#[derive(Clone, Copy)]
struct Panels<'a> {
    n: usize,
    k: usize,
    data: &'a [f32],
}

/// Packs `op(B)` (`k × n`) into `out` (resized).
fn pack(b: crate::blas::Mat, k: usize, n: usize, out: &mut Vec<f32>) {
    let panels = n.div_ceil(PANEL);
    out.clear();
    out.resize(panels * k * PANEL, 0.0);
    if b.trans {
        // Row j of the stored matrix is column j of op(B).
        for j in 0..n {
            let (p, c) = (j / PANEL, j % PANEL);
            let row = &b.data[j * b.ld..j * b.ld + k];
            let panel = &mut out[p * k * PANEL..(p + 1) * k * PANEL];
            for (s, &v) in row.iter().enumerate() {
                panel[s * PANEL + c] = v;
            }
        }
    } else {
        for s in 0..k {
            let row = &b.data[s * b.ld..s * b.ld + n];
            for (p, cols) in row.chunks(PANEL).enumerate() {
                let at = (p * k + s) * PANEL;
                out[at..at + cols.len()].copy_from_slice(cols);
            }
        }
    }
}

/// Where `A` is: element `(i, p)` at `data[i * rs + p * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Strided<'a> {
    /// `op(A)` of a [`crate::blas::Mat`].
    pub(crate) fn of(a: crate::blas::Mat<'a>) -> Self {
        if a.trans {
            Self {
                data: a.data,
                rs: 1,
                cs: a.ld,
            }
        } else {
            Self {
                data: a.data,
                rs: a.ld,
                cs: 1,
            }
        }
    }
}

/// What the store adds to `alpha · A · B`.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub alpha: f32,
    /// Scales what `C` held (0: never read).
    pub beta: f32,
    /// Added to every row (`n` values).
    pub bias: Option<&'a [f32]>,
}

/// `C (m × n, rows ldc apart) = alpha · op(A) · W + bias + beta · C` with
/// `W` packed once.
pub(crate) fn gemm_packed(
    m: usize,
    a: Strided,
    b: &PackedF32,
    e: Epilogue,
    c: &mut [f32],
    ldc: usize,
    serial: bool,
) {
    run(m, a, b.view(), e, c, ldc, serial)
}

/// `C = alpha · op(A) · op(B) + beta · C`, packing `op(B)` into this
/// thread's buffer first.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: crate::blas::Mat,
    e: Epilogue,
    c: &mut [f32],
    ldc: usize,
    serial: bool,
) {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|cell| {
        // A product inside a task of a product on this thread (never
        // today) gets a buffer of its own rather than a borrow panic.
        let mut own = Vec::new();
        let mut guard = cell.try_borrow_mut().ok();
        let buf = match guard.as_deref_mut() {
            Some(b) => b,
            None => &mut own,
        };
        pack(b, k, n, buf);
        run(m, a, Panels { n, k, data: buf }, e, c, ldc, serial);
    })
}

fn run(m: usize, a: Strided, b: Panels, e: Epilogue, c: &mut [f32], ldc: usize, serial: bool) {
    assert!(available(), "the AVX-512 kernel on a CPU without AVX-512");
    let (n, k) = (b.n, b.k);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n);
    assert!(k == 0 || a.data.len() > (m - 1) * a.rs + (k - 1) * a.cs);
    assert!(b.data.len() >= n.div_ceil(PANEL) * k * PANEL);
    assert!(e.bias.is_none_or(|bias| bias.len() >= n));
    let out = crate::blas::SendPtr(c.as_mut_ptr());
    let panels = n.div_ceil(PANEL);
    let task = |t: usize| {
        let ps = t * PANELS_PER_TASK..((t + 1) * PANELS_PER_TASK).min(panels);
        // SAFETY: `available()` holds (asserted); the sizes are checked
        // above; each task writes only its own panels' columns.
        unsafe { columns(m, a, b, e, ps, out.get(), ldc) }
    };
    let tasks = panels.div_ceil(PANELS_PER_TASK);
    if serial || tasks == 1 || m * n * k < 1 << 18 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// Every row times the panels `ps`: tiles of up to 12 rows × 2 panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn columns(
    m: usize,
    a: Strided,
    b: Panels,
    e: Epilogue,
    ps: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
) {
    macro_rules! tiles {
        ($r:expr, $np:expr, $i:expr, $p:expr, $($rr:literal)*) => {
            match ($r, $np) {
                $( ($rr, 2) => tile::<$rr, 2>(a, b, e, $i, $p, c, ldc), )*
                $( ($rr, _) => tile::<$rr, 1>(a, b, e, $i, $p, c, ldc), )*
                _ => unreachable!(),
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
            unsafe { tiles!(r, np, i, p, 1 2 3 4 5 6 7 8 9 10 11 12) };
            p += np;
        }
        i += r;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn columns(
    _: usize,
    _: Strided,
    _: Panels,
    _: Epilogue,
    _: std::ops::Range<usize>,
    _: *mut f32,
    _: usize,
) {
    unreachable!("the AVX-512 kernel is only chosen on x86_64")
}

/// Rows `i..i + R` times panels `p..p + NP` (R ≤ 12, NP ≤ 2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize, const NP: usize>(
    a: Strided,
    b: Panels,
    e: Epilogue,
    i: usize,
    p: usize,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    let (n, k) = (b.n, b.k);
    let mut acc = [[_mm512_setzero_ps(); NP]; R];
    // Each row's and each panel's read position, advanced step by step
    // (no index arithmetic in the loop; the rows are unrolled by hand so
    // the sums stay in registers in any build profile).
    // SAFETY (all reads): rows i..i + R of A reach k steps of `cs`;
    // panels p..p + NP hold k steps of 16 floats.
    let base = a.data.as_ptr();
    let mut ap: [*const f32; R] = [base; R];
    for (r, ap) in ap.iter_mut().enumerate() {
        *ap = unsafe { base.add((i + r) * a.rs) };
    }
    let cs = a.cs;
    let mut bp: [*const f32; NP] = [b.data.as_ptr(); NP];
    for (q, bp) in bp.iter_mut().enumerate() {
        *bp = unsafe { b.data.as_ptr().add((p + q) * k * PANEL) };
    }
    for _ in 0..k {
        let b0 = unsafe { _mm512_loadu_ps(bp[0]) };
        let b1 = if NP > 1 {
            unsafe { _mm512_loadu_ps(bp[NP - 1]) }
        } else {
            b0
        };
        macro_rules! row {
            ($($r:literal)*) => {$(
                if $r < R {
                    let av = _mm512_set1_ps(unsafe { ap[$r].read_unaligned() });
                    acc[$r][0] = _mm512_fmadd_ps(av, b0, acc[$r][0]);
                    if NP > 1 {
                        acc[$r][NP - 1] = _mm512_fmadd_ps(av, b1, acc[$r][NP - 1]);
                    }
                    ap[$r] = ap[$r].wrapping_add(cs);
                }
            )*};
        }
        row!(0 1 2 3 4 5 6 7 8 9 10 11);
        for bp in bp.iter_mut() {
            *bp = bp.wrapping_add(PANEL);
        }
    }
    let alpha = _mm512_set1_ps(e.alpha);
    let beta = _mm512_set1_ps(e.beta);
    for (r, acc) in acc.iter().enumerate() {
        for (q, &v) in acc.iter().enumerate() {
            let col = (p + q) * PANEL;
            let mask: __mmask16 = if col + PANEL <= n {
                !0
            } else {
                (1u16 << (n - col)) - 1
            };
            // SAFETY: row i + r < m; the masked loads and store touch
            // columns col..min(col + 16, n) only.
            unsafe {
                let dst = c.add((i + r) * ldc + col);
                let mut v = if e.alpha == 1.0 {
                    v
                } else {
                    _mm512_mul_ps(v, alpha)
                };
                if let Some(bias) = e.bias {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(col)));
                }
                if e.beta != 0.0 {
                    v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, dst), beta, v);
                }
                _mm512_mask_storeu_ps(dst, mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blas::Mat;

    /// Every tile shape, `n` not a multiple of 16, both layouts of each
    /// operand, alpha, beta and a bias, against the triple loop in f64.
    #[test]
    fn matches_the_definition() {
        if !available() {
            eprintln!("no AVX-512 on this CPU: the kernel is never chosen here");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 7, 64),
            (13, 70, 201),
            (67, 131, 130),
            (25, 300, 2048),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|x| ((x * 37 % 101) as f32 - 50.) / 50.)
                .collect();
            let b: Vec<f32> = (0..n * k)
                .map(|x| ((x * 91 % 103) as f32 - 51.) / 51.)
                .collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.).collect();
            // A (m × k) stored as is and as its transpose (k × m); B (k × n)
            // stored as its transpose (n × k, a linear layer's weights) and
            // as is.
            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
            let bn: Vec<f32> = (0..k * n).map(|x| b[(x % n) * k + x / n]).collect();
            let want = |i: usize, j: usize| -> f64 {
                (0..k)
                    .map(|p| a[i * k + p] as f64 * b[j * k + p] as f64)
                    .sum()
            };
            let close = |got: f32, want: f64, what: &str| {
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * (1. + want.abs()),
                    "{what}: {got} vs {want} in {m}x{n}x{k}"
                );
            };
            for (name, sa) in [
                ("A", Strided::of(Mat::n(&a, k))),
                ("Aᵀ", Strided::of(Mat::t(&at, m))),
            ] {
                for (bname, mb) in [("Bᵀ", Mat::t(&b, k)), ("B", Mat::n(&bn, n))] {
                    let ldc = n + 3;
                    let mut c = vec![2f32; m * ldc];
                    let e = Epilogue {
                        alpha: 0.5,
                        beta: -1.5,
                        bias: Some(&bias),
                    };
                    gemm(m, n, k, sa, mb, e, &mut c, ldc, false);
                    for i in 0..m {
                        for j in 0..n {
                            let w = 0.5 * want(i, j) + bias[j] as f64 - 3.0;
                            close(c[i * ldc + j], w, &format!("{name}·{bname} ({i}, {j})"));
                        }
                        // Past n, C is untouched.
                        assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&x| x == 2.0));
                    }
                }
                let packed = PackedF32::of_rows(&b, n, k);
                let mut c = vec![f32::NAN; m * n];
                let e = Epilogue {
                    alpha: 1.0,
                    beta: 0.0,
                    bias: None,
                };
                gemm_packed(m, sa, &packed, e, &mut c, n, true);
                for i in 0..m {
                    for j in 0..n {
                        close(
                            c[i * n + j],
                            want(i, j),
                            &format!("{name}·packed ({i}, {j})"),
                        );
                    }
                }
            }
        }
    }
}

