//! The f32 matrix product and exponential the CPU kernels here share
//! (FrameConv's convolutions, the fused attention): on AVX-512 CPUs other
//! than Intel's our packed kernel ([`crate::sgemm512`]), else MKL's
//! `cblas_sgemm` where the build links MKL (the `mkl` feature, the default
//! on x86-64 for the worker), else the `gemm` crate on rayon's threads; a
//! few rows on our own kernel everywhere. MKL's `vsExp` where linked, else
//! the standard library's `exp`. Also MKL's integer product under
//! [`crate::int8`] (MKL builds only).

use candle_core::{DType, Tensor};

use crate::sgemm512::Strided;

// CBLAS's enum values, for MKL's products.
#[cfg(feature = "mkl")]
const ROW_MAJOR: i32 = 101;
#[cfg(feature = "mkl")]
const NO_TRANS: i32 = 111;
#[cfg(feature = "mkl")]
const TRANS: i32 = 112;

/// A row-major operand: `data[i * ld + j]` is element (i, j) of the stored
/// matrix; `trans` uses its transpose.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub ld: usize,
    pub trans: bool,
}

impl<'a> Mat<'a> {
    /// Stored as written, rows `ld` apart.
    pub fn n(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            ld,
            trans: false,
        }
    }

    /// The transpose of the stored matrix (rows `ld` apart).
    pub fn t(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            ld,
            trans: true,
        }
    }

    /// Checks that a `rows × cols` operand fits in `data`.
    fn check(&self, rows: usize, cols: usize) {
        let (r, c) = if self.trans {
            (cols, rows)
        } else {
            (rows, cols)
        };
        assert!(self.ld >= c, "sgemm: leading dimension {} < {c}", self.ld);
        assert!(
            r == 0 || c == 0 || self.data.len() >= (r - 1) * self.ld + c,
            "sgemm: operand of {} floats for {r} x {c} (ld {})",
            self.data.len(),
            self.ld
        );
    }
}

thread_local! {
    /// Set while [`single_threaded`] runs on this thread.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's products and vector functions on this
/// thread alone: for kernels that already split their work across rayon's
/// threads, so the library's own threads do not fight them.
pub(crate) fn single_threaded<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "mkl")]
    unsafe extern "C" {
        fn MKL_Set_Num_Threads_Local(threads: i32) -> i32;
    }
    let was = SERIAL.with(|s| s.replace(true));
    // SAFETY: sets (and below restores) this thread's MKL thread count.
    #[cfg(feature = "mkl")]
    let before = unsafe { MKL_Set_Num_Threads_Local(1) };
    let out = f();
    #[cfg(feature = "mkl")]
    unsafe {
        MKL_Set_Num_Threads_Local(before);
    }
    SERIAL.with(|s| s.set(was));
    out
}

/// `C = alpha · op(A) · op(B) + beta · C` with `op(A)` `m × k`, `op(B)`
/// `k × n` and `C` `m × n` row-major, rows `ldc` apart; `beta` 0 never
/// reads C.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    a.check(m, k);
    b.check(k, n);
    assert!(ldc >= n && (m == 0 || n == 0 || c.len() >= (m - 1) * ldc + n));
    if m == 0 || n == 0 {
        return;
    }
    if m <= SKINNY_ROWS && !a.trans {
        return skinny(m, n, k, alpha, a, b, beta, c, ldc);
    }
    if crate::sgemm512::preferred() {
        let e = crate::sgemm512::Epilogue {
            alpha,
            beta,
            bias: None,
            gelu: false,
        };
        let serial = SERIAL.with(|s| s.get());
        return crate::sgemm512::gemm(m, n, k, Strided::of(a), b, e, c, ldc, serial);
    }
    #[cfg(feature = "mkl")]
    {
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
        let op = |t: bool| if t { TRANS } else { NO_TRANS };
        // SAFETY: `check` and the assert above keep every element the
        // product reads or writes inside its slice; MKL is linked
        // statically by candle's mkl feature.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                op(a.trans),
                op(b.trans),
                m as i32,
                n as i32,
                k as i32,
                alpha,
                a.data.as_ptr(),
                a.ld.max(1) as i32,
                b.data.as_ptr(),
                b.ld.max(1) as i32,
                beta,
                c.as_mut_ptr(),
                ldc as i32,
            );
        }
    }
    #[cfg(not(feature = "mkl"))]
    {
        // (row stride, column stride) of op(X).
        let strides = |x: &Mat| {
            if x.trans {
                (1, x.ld as isize)
            } else {
                (x.ld as isize, 1)
            }
        };
        let ((a_rs, a_cs), (b_rs, b_cs)) = (strides(&a), strides(&b));
        // SAFETY: as above, with the same shapes and strides. gemm's
        // `alpha` scales the destination and `beta` the product.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                ldc as isize,
                beta != 0.0,
                a.data.as_ptr(),
                a_cs,
                a_rs,
                b.data.as_ptr(),
                b_cs,
                b_rs,
                beta,
                alpha,
                false,
                false,
                false,
                if SERIAL.with(|s| s.get()) {
                    gemm::Parallelism::None
                } else {
                    gemm::Parallelism::Rayon(candle_core::utils::get_num_threads())
                },
            );
        }
    }
}

/// An output buffer shared by tasks that each write their own part of it.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: users hand it to tasks that write disjoint elements only.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole wrapper).
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// Rows of `op(A)` up to which [`sgemm`] computes `A · Bᵀ` itself.
const SKINNY_ROWS: usize = 4;

/// `C = alpha · A · op(B) + beta · C` for a few rows of `A`: a linear
/// layer while decoding one token (`B` stored `(n, k)`, every output one
/// contiguous dot product, the weights read once), or one query's
/// attention weights times the values (`B` `(k, n)`, its rows scaled and
/// added). MKL's
/// matrix-vector path is its generic code on CPUs not made by Intel (a
/// third of Whisper's decoding time on an AMD EPYC went there, at a
/// fraction of the memory bandwidth); this one is vectorized for AVX-512
/// and AVX2 on any x86-64. Columns are split across rayon's threads.
#[allow(clippy::too_many_arguments)]
fn skinny(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    use rayon::prelude::*;
    let out = SendPtr(c.as_mut_ptr());
    let task = |t: usize| {
        let cols = t * COLS_PER_TASK..((t + 1) * COLS_PER_TASK).min(n);
        let mut acc = [0f32; SKINNY_ROWS * COLS_PER_TASK];
        if b.trans {
            dots(a.data, a.ld, m, k, b.data, b.ld, cols.clone(), &mut acc);
        } else {
            axpys(a.data, a.ld, m, k, b.data, b.ld, cols.clone(), &mut acc);
        }
        for r in 0..m {
            for (jj, j) in cols.clone().enumerate() {
                let d = acc[r * COLS_PER_TASK + jj];
                // SAFETY: (r, j) is inside C (asserted by the caller), and
                // only the task of column j writes it.
                unsafe {
                    let o = out.get().add(r * ldc + j);
                    *o = if beta == 0.0 {
                        alpha * d
                    } else {
                        alpha * d + beta * *o
                    };
                }
            }
        }
    };
    let tasks = n.div_ceil(COLS_PER_TASK);
    if tasks == 1 || n * k < 1 << 16 || SERIAL.with(|s| s.get()) {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// Columns of C per task of [`skinny`].
const COLS_PER_TASK: usize = 64;

/// `acc[r * 64 + jj] = Σ_p a[r][p] · b[cols[jj]][p]`: column j of op(B) is
/// row j of B, one dot product each. One dispatch for the task's loops
/// (attention's dot products are 64 long: a call per product cost more
/// than the product).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn dots(
    a: &[f32],
    lda: usize,
    m: usize,
    k: usize,
    b: &[f32],
    ldb: usize,
    cols: std::ops::Range<usize>,
    acc: &mut [f32],
) {
    for (jj, j) in cols.enumerate() {
        let w = &b[j * ldb..j * ldb + k];
        for r in 0..m {
            acc[r * COLS_PER_TASK + jj] = dot(&a[r * lda..r * lda + k], w);
        }
    }
}

/// `acc[r * 64 + jj] = Σ_p a[r][p] · b[p][cols[jj]]`: B's rows scaled by
/// A's entries and added up, the task's columns at a time (one query's
/// attention weights times the values).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
fn axpys(
    a: &[f32],
    lda: usize,
    m: usize,
    k: usize,
    b: &[f32],
    ldb: usize,
    cols: std::ops::Range<usize>,
    acc: &mut [f32],
) {
    let width = cols.len();
    for r in 0..m {
        let y = &mut acc[r * COLS_PER_TASK..r * COLS_PER_TASK + width];
        for p in 0..k {
            let x = a[r * lda + p];
            let row = &b[p * ldb + cols.start..p * ldb + cols.end];
            for (y, &v) in y.iter_mut().zip(row) {
                *y += x * v;
            }
        }
    }
}

/// `Σ a[i] · b[i]`: four sums of 16 lanes in flight, added as a tree.
/// Inlined into its callers (and their target features).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut lanes = [[0f32; L]; 4];
    let (ca, cb) = (a.chunks_exact(4 * L), b.chunks_exact(4 * L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for (u, lanes) in lanes.iter_mut().enumerate() {
            for i in 0..L {
                lanes[i] += x[u * L + i] * y[u * L + i];
            }
        }
    }
    let (ra16, rb16) = (ra.chunks_exact(L), rb.chunks_exact(L));
    let tail: f32 = ra16
        .remainder()
        .iter()
        .zip(rb16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ra16.zip(rb16) {
        for i in 0..L {
            lanes[0][i] += x[i] * y[i];
        }
    }
    let mut v = [0f32; L];
    for i in 0..L {
        v[i] = (lanes[0][i] + lanes[1][i]) + (lanes[2][i] + lanes[3][i]);
    }
    let mut w = L / 2;
    while w > 0 {
        for i in 0..w {
            v[i] += v[i + w];
        }
        w /= 2;
    }
    v[0] + tail
}

/// An MKL vector math function `r[i] = f(a[i])` for `i < n`.
#[cfg(feature = "mkl")]
type VmlFn = unsafe extern "C" fn(n: i32, a: *const f32, r: *mut f32, mode: i64);

#[cfg(feature = "mkl")]
unsafe extern "C" {
    fn vmsExp(n: i32, a: *const f32, r: *mut f32, mode: i64);
    fn vmsErf(n: i32, a: *const f32, r: *mut f32, mode: i64);
}

/// Applies `f` to `x` in place in MKL's "low accuracy" mode (VML_LA:
/// under 4 ulp).
#[cfg(feature = "mkl")]
fn vml_in_place(x: &mut [f32], f: VmlFn) {
    const VML_LA: i64 = 0x1;
    for chunk in x.chunks_mut(i32::MAX as usize) {
        // SAFETY: MKL's vector functions allow a == r (in place); n is
        // the chunk's length.
        unsafe {
            f(
                chunk.len() as i32,
                chunk.as_ptr(),
                chunk.as_mut_ptr(),
                VML_LA,
            )
        };
    }
}

/// `x[i] = exp(x[i])` in place ([`crate::vmath`] where the AVX-512 kernels
/// are chosen, else MKL's vector exp where linked).
pub(crate) fn exp_in_place(x: &mut [f32]) {
    if crate::sgemm512::preferred() {
        return crate::vmath::exp_in_place(x);
    }
    #[cfg(feature = "mkl")]
    vml_in_place(x, vmsExp);
    #[cfg(not(feature = "mkl"))]
    for v in x.iter_mut() {
        *v = v.exp();
    }
}

/// `C (m, n) = A (m, k) · Bᵀ` with `B` `(n, k)`, `A` unsigned and `B` signed
/// 8-bit, `C` 32-bit.
#[cfg(all(feature = "mkl", target_arch = "x86_64"))]
pub(crate) fn gemm_u8s8(
    m: usize,
    n: usize,
    k: usize,
    a: &[u8],
    b: &[i8],
    c: &mut [i32],
) -> candle_core::Result<()> {
    const FIXED_OFFSET: i32 = 173;
    unsafe extern "C" {
        fn cblas_gemm_s8u8s32(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            offset_c: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const u8,
            lda: i32,
            oa: i8,
            b: *const i8,
            ldb: i32,
            ob: i8,
            beta: f32,
            c: *mut i32,
            ldc: i32,
            oc: *const i32,
        );
    }
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let zero = [0i32];
    // SAFETY: the sizes are checked above; MKL is linked statically (the
    // `mkl` feature) and reads A and B, writes C, within those bounds.
    unsafe {
        cblas_gemm_s8u8s32(
            ROW_MAJOR,
            NO_TRANS,
            TRANS,
            FIXED_OFFSET,
            m as i32,
            n as i32,
            k as i32,
            1.,
            a.as_ptr(),
            k as i32,
            0,
            b.as_ptr(),
            k as i32,
            0,
            0.,
            c.as_mut_ptr(),
            n as i32,
            zero.as_ptr(),
        )
    };
    Ok(())
}

#[cfg(not(all(feature = "mkl", target_arch = "x86_64")))]
pub(crate) fn gemm_u8s8(
    _: usize,
    _: usize,
    _: usize,
    _: &[u8],
    _: &[i8],
    _: &mut [i32],
) -> candle_core::Result<()> {
    candle_core::bail!("int8 linear layers need a build with the mkl feature")
}

/// `x[i] = erf(x[i])` in place (as [`exp_in_place`]).
pub(crate) fn erf_in_place(x: &mut [f32]) {
    if crate::sgemm512::preferred() {
        return crate::vmath::erf_in_place(x);
    }
    #[cfg(feature = "mkl")]
    vml_in_place(x, vmsErf);
    #[cfg(not(feature = "mkl"))]
    for v in x.iter_mut() {
        *v = candle_core::cpu::erf::erf_f32(*v);
    }
}

/// The data of a contiguous f32 CPU tensor, borrowed for `f`.
pub(crate) fn with_cpu_slice<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> T) -> candle_core::Result<T> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
            Ok(f(&cpu.as_slice::<f32>()?[start..end]))
        }
        _ => candle_core::bail!("a contiguous f32 CPU tensor"),
    }
}

/// `nn.Linear`: on the CPU in f32 one product written over the bias
/// (candle's adds the bias in a second pass over a second fresh output);
/// elsewhere candle's `Linear`.
pub struct Linear {
    inner: LinearKind,
}

enum LinearKind {
    /// candle's layer, run on [`sgemm`] for CPU f32 inputs.
    Plain(candle_nn::Linear),
    /// The weights only as packed for [`crate::sgemm512`], where that is
    /// the kernel of choice (f32 CPU weights on AVX-512 CPUs but Intel ones
    /// with MKL), with the bias as floats: products of any number of rows
    /// run on them, so the weights are held once.
    Packed {
        weights: crate::sgemm512::PackedF32,
        bias: Option<Vec<f32>>,
    },
}

impl Linear {
    /// `weight` `(out, in)`, `bias` `(out)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let packed =
            (crate::sgemm512::preferred() && cpu_f32(&weight) && bias.as_ref().is_none_or(cpu_f32))
                .then(|| -> candle_core::Result<_> {
                    let (dout, din) = weight.dims2()?;
                    let weights = with_cpu_slice(&weight.contiguous()?, |w| {
                        crate::sgemm512::PackedF32::of_rows(w, dout, din)
                    })?;
                    let bias = match &bias {
                        Some(b) => Some(b.flatten_all()?.to_vec1::<f32>()?),
                        None => None,
                    };
                    Ok(LinearKind::Packed { weights, bias })
                })
                .and_then(Result::ok);
        Self {
            inner: packed
                .unwrap_or_else(|| LinearKind::Plain(candle_nn::Linear::new(weight, bias))),
        }
    }

    /// The exact GELU of [`Module::forward`]'s result, applied as the
    /// AVX-512 kernel stores it where that runs the product.
    pub fn forward_gelu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, gelu: bool) -> candle_core::Result<Tensor> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let finish = |y: Tensor| {
            if gelu {
                crate::ops::gelu_erf(&y)
            } else {
                Ok(y)
            }
        };
        let (dout, din) = match &self.inner {
            LinearKind::Plain(l) => l.weight().dims2()?,
            LinearKind::Packed { weights, .. } => (weights.n(), weights.k()),
        };
        let mut shape = x.dims().to_vec();
        match shape.last_mut() {
            Some(last) if *last == din => *last = dout,
            _ => candle_core::bail!("linear: input {:?} for a {din} -> {dout} weight", x.dims()),
        }
        let rows = x.elem_count() / din.max(1);
        match &self.inner {
            LinearKind::Packed { weights, bias } => {
                if !cpu_f32(x) {
                    candle_core::bail!(
                        "linear: weights packed for the CPU in f32, input {:?} on {:?}",
                        x.dtype(),
                        x.device()
                    );
                }
                let x = x.contiguous()?;
                let mut out = vec![0f32; rows * dout];
                let e = crate::sgemm512::Epilogue {
                    alpha: 1.0,
                    beta: 0.0,
                    bias: bias.as_deref(),
                    gelu,
                };
                let serial = SERIAL.with(|s| s.get());
                with_cpu_slice(&x, |xs| {
                    if rows == 0 {
                    } else if rows <= SKINNY_ROWS {
                        // A decoding step's few rows stream the panels once.
                        crate::sgemm512::gemm_few_rows(rows, xs, weights, e, &mut out, dout, serial)
                    } else {
                        let a = Strided::of(Mat::n(xs, din));
                        crate::sgemm512::gemm_packed(rows, a, weights, e, &mut out, dout, serial)
                    }
                })?;
                Tensor::from_vec(out, shape, &candle_core::Device::Cpu)
            }
            LinearKind::Plain(l) => {
                let w = l.weight();
                if !(cpu_f32(x) && cpu_f32(w) && w.is_contiguous()) {
                    return finish(candle_core::Module::forward(l, x)?);
                }
                let x = x.contiguous()?;
                // The product accumulates onto the bias, read in place.
                let mut out = match l.bias() {
                    Some(b) => with_cpu_slice(&b.contiguous()?, |b| b.repeat(rows))?,
                    None => vec![0f32; rows * dout],
                };
                let beta = if l.bias().is_some() { 1.0 } else { 0.0 };
                with_cpu_slice(&x, |xs| {
                    with_cpu_slice(w, |ws| {
                        sgemm(
                            rows,
                            dout,
                            din,
                            1.0,
                            Mat::n(xs, din),
                            Mat::t(ws, din),
                            beta,
                            &mut out,
                            dout,
                        )
                    })
                })??;
                finish(Tensor::from_vec(out, shape, &candle_core::Device::Cpu)?)
            }
        }
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    #[test]
    fn linear_matches_candle() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (19, 7), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 19, &dev).unwrap();
        // Ten rows (the packed AVX-512 kernel where it is chosen, else
        // sgemm) and three (the few-row kernel).
        for rows in [(2, 5), (1, 3)] {
            let x = Tensor::randn(0f32, 1.0, (rows.0, rows.1, 7), &dev).unwrap();
            for bias in [Some(b.clone()), None] {
                let ours = Linear::new(w.clone(), bias.clone());
                let want = candle_nn::Linear::new(w.clone(), bias).forward(&x).unwrap();
                let got = ours.forward(&x).unwrap();
                assert_eq!(got.dims(), &[rows.0, rows.1, 19]);
                assert!(crate::testing::max_abs_diff(&got, &want) < 1e-5);
                let got = ours.forward_gelu(&x).unwrap();
                let want = want.gelu_erf().unwrap();
                assert!(crate::testing::max_abs_diff(&got, &want) < 1e-5);
            }
        }
    }

    /// A few rows (computed by `skinny`) times a transposed matrix (a
    /// decoding step's linear layer) and an untransposed one (one query's
    /// attention weights times the values): against the triple loop, row
    /// strides wider than the rows, a length that leaves a tail, one task
    /// and many, with and without beta.
    #[test]
    fn few_rows_match_the_definition() {
        for &(n, k) in &[(7, 3), (200, 150), (1100, 100), (64, 1500)] {
            for trans in [true, false] {
                let ldb = if trans { k + 1 } else { n + 5 };
                let b: Vec<f32> = (0..n.max(k) * ldb)
                    .map(|i| (i as f32 * 0.11).cos())
                    .collect();
                let op_b = |p: usize, j: usize| {
                    if trans {
                        b[j * ldb + p]
                    } else {
                        b[p * ldb + j]
                    }
                };
                let mat_b = if trans {
                    Mat::t(&b, ldb)
                } else {
                    Mat::n(&b, ldb)
                };
                for m in 1..=SKINNY_ROWS {
                    let lda = k + 3;
                    let a: Vec<f32> = (0..m * lda).map(|i| (i as f32 * 0.37).sin()).collect();
                    for beta in [0.0, 0.5] {
                        let mut c = vec![if beta == 0.0 { f32::NAN } else { 2.0 }; m * n];
                        sgemm(m, n, k, 1.5, Mat::n(&a, lda), mat_b, beta, &mut c, n);
                        for i in 0..m {
                            for j in 0..n {
                                let d: f32 = (0..k).map(|p| a[i * lda + p] * op_b(p, j)).sum();
                                let want = 1.5 * d + if beta != 0.0 { beta * 2.0 } else { 0.0 };
                                let got = c[i * n + j];
                                assert!(
                                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "trans {trans}, ({i}, {j}) of {m}x{n}x{k}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Every transpose combination against the plain triple loop.
    #[test]
    fn sgemm_matches_the_definition() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] =
                    0.5 + 2.0 * (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
            }
        }
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if ta { Mat::t(&at, m) } else { Mat::n(&a, k) };
            let b = if tb { Mat::t(&bt, k) } else { Mat::n(&b, n) };
            let mut c = vec![0.25f32; m * n];
            sgemm(m, n, k, 2.0, a, b, 2.0, &mut c, n);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "{ta} {tb}: {x} vs {y}");
            }
        }
        let mut e = vec![0.0f32, 0.3, -1.7, 4.0];
        let want: Vec<f32> = e
            .iter()
            .map(|&v| candle_core::cpu::erf::erf_f32(v))
            .collect();
        erf_in_place(&mut e);
        for (v, w) in e.iter().zip(&want) {
            assert!((v - w).abs() < 1e-6, "erf {v} vs {w}");
        }
        let mut x = vec![0.0f32, 1.0, -2.5, 10.0];
        exp_in_place(&mut x);
        for (v, want) in x
            .iter()
            .zip([1.0f32, 1.0f32.exp(), (-2.5f32).exp(), 10f32.exp()])
        {
            assert!((v - want).abs() <= want * 1e-6, "{v} vs {want}");
        }
    }
}
