//! `C = alpha · op(A) · op(B) (+ bias) + beta · C` in f32 on AVX-512 FMA:
//! the large products under [`crate::blas::sgemm`] (Whisper's encoder,
//! the fused attention, the convolutions) on CPUs where MKL's `sgemm` is
//! not the one to use. MKL picks its AVX-512 kernels on Intel CPUs only;
//! on an AMD EPYC with AVX-512 (Zen 5, measured) it runs its AVX2 `zen`
//! kernel, and Whisper base's encoder took 0.66 s there against
//! CTranslate2's 0.22 s.
//!
//! `op(B)` (`k × n`) is packed into panels of 16 columns, each step along
//! `k` one 64-byte vector of the 16 columns' values: a linear layer's
//! weights once at load ([`PackedF32`], kept by [`crate::blas::Linear`]),
//! other operands per call into a reused buffer. `op(A)` is packed per
//! call into tiles of 12 rows, each step the 12 rows' values side by side.
//! A step broadcasts one value of each row and multiplies it into 16
//! columns at once: the tile is 12 rows × 2 panels, 24 accumulators in
//! zmm8–zmm31 of an assembly loop (2 loads, 12 broadcasts, 24 FMAs a
//! step). Tasks of 8 row tiles × 8 panels go across rayon's threads; in a
//! task each pair of panels (256 KiB of `B` at `k` = 2048) stays in L2
//! while the task's row tiles meet it. The bias, `alpha` and `beta` are
//! applied as each tile is stored, and GELU where asked. One to four rows
//! (a decoding step's) read the packed panels directly
//! ([`gemm_few_rows`]), so a linear layer holds its weights once, packed.

use rayon::prelude::*;

/// Columns of a packed panel (one 512-bit vector of f32).
const PANEL: usize = 16;
/// Panels per task (128 columns: 1 MiB of `B` at `k` = 2048, in L2).
const PANELS_PER_TASK: usize = 8;
/// Tiles of rows per task.
const TILES_PER_TASK: usize = 8;
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

    /// Columns of `op(B)` (a linear layer's outputs).
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Rows of `op(B)` (a linear layer's inputs).
    pub(crate) fn k(&self) -> usize {
        self.k
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
    /// The exact GELU of the result (after the bias and `beta · C`).
    pub gelu: bool,
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

/// Floats of `op(B)` packed per call at most (8 MiB): a wider `B` (a
/// pointwise convolution's whole image) goes in column blocks.
const PACKED_B_FLOATS: usize = 1 << 21;

/// `C = alpha · op(A) · op(B) + beta · C`, packing `op(B)` into this
/// thread's buffer first, a block of columns at a time.
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
    let block = PANEL * PANELS_PER_TASK;
    let cols = (PACKED_B_FLOATS / k.max(1) / block * block).max(block);
    with_buffer(&B_BUF, |buf| {
        for j0 in (0..n).step_by(cols) {
            let nj = cols.min(n - j0);
            // op(B)'s columns j0.. start at row j0 of a transposed store,
            // at column j0 of a plain one.
            let at = if b.trans { j0 * b.ld } else { j0 };
            let bj = crate::blas::Mat {
                data: &b.data[at..],
                ..b
            };
            pack(bj, k, nj, buf);
            let ej = Epilogue {
                bias: e.bias.map(|bias| &bias[j0..]),
                ..e
            };
            let panels = Panels {
                n: nj,
                k,
                data: buf,
            };
            run(m, a, panels, ej, &mut c[j0..], ldc, serial);
        }
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
    let parallel = !serial && m * n * k >= 1 << 18;
    with_buffer(&A_BUF, |buf| {
        let tiles = m.div_ceil(MR);
        // Every element is written by `pack_a` (padding rows too).
        buf.resize(tiles * k * MR, 0.0);
        let pack_tile =
            |(t, dst): (usize, &mut [f32])| pack_a(a, t * MR, (m - t * MR).min(MR), k, dst);
        if parallel {
            buf.par_chunks_mut((k * MR).max(1))
                .enumerate()
                .for_each(pack_tile);
        } else {
            buf.chunks_mut((k * MR).max(1))
                .enumerate()
                .for_each(pack_tile);
        }
        run_packed(m, buf, b, e, c, ldc, parallel)
    })
}

thread_local! {
    /// This thread's buffers for packing `A` and `B` per call.
    static A_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static B_BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's `buffer`, or on a new one where it is in use
/// (a product started by a task that this thread runs while it waits in
/// another product).
fn with_buffer<T>(
    buffer: &'static std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>,
    f: impl FnOnce(&mut Vec<f32>) -> T,
) -> T {
    buffer.with(|cell| match cell.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut Vec::new()),
    })
}

/// [`run`] on `A` already packed in 12-row tiles.
fn run_packed(
    m: usize,
    packed_a: &[f32],
    b: Panels,
    e: Epilogue,
    c: &mut [f32],
    ldc: usize,
    parallel: bool,
) {
    let (n, k) = (b.n, b.k);
    let tiles = m.div_ceil(MR);
    assert!(packed_a.len() >= tiles * k * MR);
    let out = crate::blas::SendPtr(c.as_mut_ptr());
    let panels = n.div_ceil(PANEL);
    let (row_blocks, groups) = (
        tiles.div_ceil(TILES_PER_TASK),
        panels.div_ceil(PANELS_PER_TASK),
    );
    let task = |t: usize| {
        let (rb, g) = (t / groups, t % groups);
        let ts = rb * TILES_PER_TASK..((rb + 1) * TILES_PER_TASK).min(tiles);
        let ps = g * PANELS_PER_TASK..((g + 1) * PANELS_PER_TASK).min(panels);
        // SAFETY: `available()` holds (asserted by every caller); the
        // sizes are checked by them and above; each task writes only its
        // own rows' and panels' part.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            block(m, packed_a, b, e, ts, ps, out.get(), ldc)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{:?}", (ts, ps, out.get(), ldc))
    };
    let tasks = row_blocks * groups;
    if !parallel || tasks == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// `op(A)` (`m × k`) packed once in 12-row tiles, for products with
/// different `B`s ([`gemm_rows_packed`]).
pub(crate) struct PackedRows {
    m: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedRows {
    pub(crate) fn new(a: Strided, m: usize, k: usize) -> Self {
        let tiles = m.div_ceil(MR);
        let mut data = vec![0f32; tiles * k * MR];
        for (t, dst) in data.chunks_mut((k * MR).max(1)).enumerate().take(tiles) {
            pack_a(a, t * MR, (m - t * MR).min(MR), k, dst);
        }
        Self { m, k, data }
    }
}

/// `C = alpha · A · op(B) + beta · C` with `A` packed once and `op(B)`
/// (`k × n`) packed here.
pub(crate) fn gemm_rows_packed(
    a: &PackedRows,
    n: usize,
    b: crate::blas::Mat,
    e: Epilogue,
    c: &mut [f32],
    ldc: usize,
    serial: bool,
) {
    assert!(available(), "the AVX-512 kernel on a CPU without AVX-512");
    let (m, k) = (a.m, a.k);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n);
    assert!(e.bias.is_none_or(|bias| bias.len() >= n));
    with_buffer(&B_BUF, |buf| {
        pack(b, k, n, buf);
        let parallel = !serial && m * n * k >= 1 << 18;
        run_packed(m, &a.data, Panels { n, k, data: buf }, e, c, ldc, parallel)
    })
}

/// Rows `i..i + rows` of `op(A)` into `dst` (`k` steps of 12 values, rows
/// past `rows` zero).
fn pack_a(a: Strided, i: usize, rows: usize, k: usize, dst: &mut [f32]) {
    if rows < MR {
        for d in dst.chunks_exact_mut(MR).take(k) {
            d[rows..].fill(0.0);
        }
    }
    if a.rs == 1 {
        // Each step's rows are contiguous.
        for (s, d) in dst.chunks_exact_mut(MR).enumerate().take(k) {
            let at = s * a.cs + i;
            d[..rows].copy_from_slice(&a.data[at..at + rows]);
        }
    } else {
        for r in 0..rows {
            let row = (i + r) * a.rs;
            for s in 0..k {
                dst[s * MR + r] = a.data[row + s * a.cs];
            }
        }
    }
}

/// Tiles `ts` (of 12 rows) times panels `ps`, panel pair by panel pair,
/// every tile meeting a pair while it is in L2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    m: usize,
    packed_a: &[f32],
    b: Panels,
    e: Epilogue,
    ts: std::ops::Range<usize>,
    ps: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    #[repr(align(64))]
    struct Tile([f32; MR * 2 * PANEL]);
    let mut tile = Tile([0.0; MR * 2 * PANEL]);
    let (n, k) = (b.n, b.k);
    let mut p = ps.start;
    while p < ps.end {
        let np = (ps.end - p).min(2);
        // SAFETY: panels p..p + np hold k steps of 16 floats each (a lone
        // panel is read twice, its second copy never stored).
        let b0 = unsafe { b.data.as_ptr().add(p * k * PANEL) };
        let b1 = if np == 2 {
            unsafe { b0.add(k * PANEL) }
        } else {
            b0
        };
        for t in ts.clone() {
            let i = t * MR;
            // SAFETY: tile t of the packed A holds k steps of 12 floats;
            // `tile` holds 24 vectors.
            unsafe {
                kernel(
                    k,
                    packed_a.as_ptr().add(t * k * MR),
                    b0,
                    b1,
                    tile.0.as_mut_ptr(),
                )
            };
            for r in 0..(m - i).min(MR) {
                for q in 0..np {
                    // SAFETY: row i + r < m; `tile` holds the 24 vectors.
                    unsafe {
                        let v = _mm512_load_ps(tile.0.as_ptr().add((r * 2 + q) * PANEL));
                        store(v, e, p + q, n, c.add((i + r) * ldc));
                    }
                }
            }
        }
        p += np;
    }
}

/// The 12 × 32 tile over `k` steps: `out[(r * 2 + q) * 16 + j]` =
/// `Σ_s a[s * 12 + r] · b_q[s * 16 + j]`. In assembly so that the 24 sums
/// stay in zmm8–zmm31 with six registers for the broadcasts (the compiler
/// hoisted all twelve broadcasts and spilled sums to the stack).
///
/// # Safety
/// AVX-512F; `a` holds `k · 12` floats, `b0` and `b1` `k · 16` each, `out`
/// 384.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel(k: usize, a: *const f32, b0: *const f32, b1: *const f32, out: *mut f32) {
    // SAFETY: the reads and writes stay within the bounds above.
    unsafe {
        std::arch::asm!(
            "vxorps zmm8, zmm8, zmm8",
            "vxorps zmm9, zmm9, zmm9",
            "vxorps zmm10, zmm10, zmm10",
            "vxorps zmm11, zmm11, zmm11",
            "vxorps zmm12, zmm12, zmm12",
            "vxorps zmm13, zmm13, zmm13",
            "vxorps zmm14, zmm14, zmm14",
            "vxorps zmm15, zmm15, zmm15",
            "vxorps zmm16, zmm16, zmm16",
            "vxorps zmm17, zmm17, zmm17",
            "vxorps zmm18, zmm18, zmm18",
            "vxorps zmm19, zmm19, zmm19",
            "vxorps zmm20, zmm20, zmm20",
            "vxorps zmm21, zmm21, zmm21",
            "vxorps zmm22, zmm22, zmm22",
            "vxorps zmm23, zmm23, zmm23",
            "vxorps zmm24, zmm24, zmm24",
            "vxorps zmm25, zmm25, zmm25",
            "vxorps zmm26, zmm26, zmm26",
            "vxorps zmm27, zmm27, zmm27",
            "vxorps zmm28, zmm28, zmm28",
            "vxorps zmm29, zmm29, zmm29",
            "vxorps zmm30, zmm30, zmm30",
            "vxorps zmm31, zmm31, zmm31",
            "test {k}, {k}",
            "jz 3f",
            "2:",
            "vmovups zmm0, [{b0}]",
            "vmovups zmm1, [{b1}]",
            "vbroadcastss zmm2, dword ptr [{a} + 0]",
            "vfmadd231ps zmm8, zmm0, zmm2",
            "vfmadd231ps zmm9, zmm1, zmm2",
            "vbroadcastss zmm3, dword ptr [{a} + 4]",
            "vfmadd231ps zmm10, zmm0, zmm3",
            "vfmadd231ps zmm11, zmm1, zmm3",
            "vbroadcastss zmm4, dword ptr [{a} + 8]",
            "vfmadd231ps zmm12, zmm0, zmm4",
            "vfmadd231ps zmm13, zmm1, zmm4",
            "vbroadcastss zmm5, dword ptr [{a} + 12]",
            "vfmadd231ps zmm14, zmm0, zmm5",
            "vfmadd231ps zmm15, zmm1, zmm5",
            "vbroadcastss zmm6, dword ptr [{a} + 16]",
            "vfmadd231ps zmm16, zmm0, zmm6",
            "vfmadd231ps zmm17, zmm1, zmm6",
            "vbroadcastss zmm7, dword ptr [{a} + 20]",
            "vfmadd231ps zmm18, zmm0, zmm7",
            "vfmadd231ps zmm19, zmm1, zmm7",
            "vbroadcastss zmm2, dword ptr [{a} + 24]",
            "vfmadd231ps zmm20, zmm0, zmm2",
            "vfmadd231ps zmm21, zmm1, zmm2",
            "vbroadcastss zmm3, dword ptr [{a} + 28]",
            "vfmadd231ps zmm22, zmm0, zmm3",
            "vfmadd231ps zmm23, zmm1, zmm3",
            "vbroadcastss zmm4, dword ptr [{a} + 32]",
            "vfmadd231ps zmm24, zmm0, zmm4",
            "vfmadd231ps zmm25, zmm1, zmm4",
            "vbroadcastss zmm5, dword ptr [{a} + 36]",
            "vfmadd231ps zmm26, zmm0, zmm5",
            "vfmadd231ps zmm27, zmm1, zmm5",
            "vbroadcastss zmm6, dword ptr [{a} + 40]",
            "vfmadd231ps zmm28, zmm0, zmm6",
            "vfmadd231ps zmm29, zmm1, zmm6",
            "vbroadcastss zmm7, dword ptr [{a} + 44]",
            "vfmadd231ps zmm30, zmm0, zmm7",
            "vfmadd231ps zmm31, zmm1, zmm7",
            "add {a}, 48",
            "add {b0}, 64",
            "add {b1}, 64",
            "dec {k}",
            "jnz 2b",
            "3:",
            "vmovups [{out} + 0], zmm8",
            "vmovups [{out} + 64], zmm9",
            "vmovups [{out} + 128], zmm10",
            "vmovups [{out} + 192], zmm11",
            "vmovups [{out} + 256], zmm12",
            "vmovups [{out} + 320], zmm13",
            "vmovups [{out} + 384], zmm14",
            "vmovups [{out} + 448], zmm15",
            "vmovups [{out} + 512], zmm16",
            "vmovups [{out} + 576], zmm17",
            "vmovups [{out} + 640], zmm18",
            "vmovups [{out} + 704], zmm19",
            "vmovups [{out} + 768], zmm20",
            "vmovups [{out} + 832], zmm21",
            "vmovups [{out} + 896], zmm22",
            "vmovups [{out} + 960], zmm23",
            "vmovups [{out} + 1024], zmm24",
            "vmovups [{out} + 1088], zmm25",
            "vmovups [{out} + 1152], zmm26",
            "vmovups [{out} + 1216], zmm27",
            "vmovups [{out} + 1280], zmm28",
            "vmovups [{out} + 1344], zmm29",
            "vmovups [{out} + 1408], zmm30",
            "vmovups [{out} + 1472], zmm31",
            k = inout(reg) k => _,
            a = inout(reg) a => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            out = in(reg) out,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _, out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _, out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _, out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            options(nostack),
        );
    }
}

/// Panels a few-row task streams.
const FEW_PANELS_PER_TASK: usize = 8;

/// `C = A · W` (+ the epilogue) for at most 4 rows of `A` (`m × k`, rows
/// `k` apart) straight from the packed panels: a decoding step's rows,
/// bound by reading `W` once. Tasks of 8 panels go across rayon's threads
/// (unless `serial`); each streams 4 panels at a time.
pub(crate) fn gemm_few_rows(
    m: usize,
    a: &[f32],
    w: &PackedF32,
    e: Epilogue,
    c: &mut [f32],
    ldc: usize,
    serial: bool,
) {
    assert!(available(), "the AVX-512 kernel on a CPU without AVX-512");
    assert!((1..=4).contains(&m), "gemm_few_rows: {m} rows");
    let (n, k) = (w.n, w.k);
    assert!(a.len() >= m * k && ldc >= n && c.len() >= (m - 1) * ldc + n);
    assert!(e.bias.is_none_or(|bias| bias.len() >= n));
    let b = w.view();
    let out = crate::blas::SendPtr(c.as_mut_ptr());
    let panels = n.div_ceil(PANEL);
    let task = |t: usize| {
        let ps = t * FEW_PANELS_PER_TASK..((t + 1) * FEW_PANELS_PER_TASK).min(panels);
        // SAFETY: `available()` holds (asserted); sizes checked above;
        // each task writes only its own panels' columns.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            few_rows(m, a, b, e, ps, out.get(), ldc)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{:?}", (ps, out.get(), ldc))
    };
    let tasks = panels.div_ceil(FEW_PANELS_PER_TASK);
    if serial || tasks == 1 || n * k < 1 << 16 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn few_rows(
    m: usize,
    a: &[f32],
    b: Panels,
    e: Epilogue,
    ps: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
) {
    macro_rules! go {
        ($m:literal) => {{
            let mut p = ps.start;
            while p < ps.end {
                let np = (ps.end - p).min(4);
                // SAFETY: rows < m, panels p..p + np < the panels.
                unsafe {
                    match np {
                        4 => few::<$m, 4>(a, b, e, p, c, ldc),
                        3 => few::<$m, 3>(a, b, e, p, c, ldc),
                        2 => few::<$m, 2>(a, b, e, p, c, ldc),
                        _ => few::<$m, 1>(a, b, e, p, c, ldc),
                    }
                }
                p += np;
            }
        }};
    }
    match m {
        1 => go!(1),
        2 => go!(2),
        3 => go!(3),
        _ => go!(4),
    }
}

/// Rows `0..M` times panels `p..p + NP`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn few<const M: usize, const NP: usize>(
    a: &[f32],
    b: Panels,
    e: Epilogue,
    p: usize,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    let (n, k) = (b.n, b.k);
    let mut acc = [[_mm512_setzero_ps(); NP]; M];
    // SAFETY (all reads): panels p..p + NP hold k steps of 16 floats;
    // rows 0..M of `a` hold k floats.
    let bp = unsafe { b.data.as_ptr().add(p * k * PANEL) };
    let ap = a.as_ptr();
    for s in 0..k {
        let mut bv = [_mm512_setzero_ps(); NP];
        for (q, v) in bv.iter_mut().enumerate() {
            *v = unsafe { _mm512_loadu_ps(bp.add((q * k + s) * PANEL)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(unsafe { *ap.add(r * k + s) });
            for (acc, &v) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_fmadd_ps(x, v, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (q, &v) in acc.iter().enumerate() {
            // SAFETY: row r < m; columns col..min(col + 16, n).
            unsafe { store(v, e, p + q, n, c.add(r * ldc)) };
        }
    }
}

/// Stores 16 sums of panel `p` into the row at `row` with the epilogue
/// (masked past `n`).
///
/// # Safety
/// AVX-512F; `row` holds `n` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store(v: std::arch::x86_64::__m512, e: Epilogue, p: usize, n: usize, row: *mut f32) {
    use std::arch::x86_64::*;
    let col = p * PANEL;
    let mask: __mmask16 = if col + PANEL <= n {
        !0
    } else {
        (1u16 << (n - col)) - 1
    };
    // SAFETY: the masked loads and store touch columns col..min(col + 16,
    // n) of the row and of the bias only.
    unsafe {
        let dst = row.add(col);
        let mut v = if e.alpha == 1.0 {
            v
        } else {
            _mm512_mul_ps(v, _mm512_set1_ps(e.alpha))
        };
        if let Some(bias) = e.bias {
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(col)));
        }
        if e.beta != 0.0 {
            v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, dst), _mm512_set1_ps(e.beta), v);
        }
        if e.gelu {
            let erf = crate::vmath::erf16(_mm512_mul_ps(
                v,
                _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
            ));
            let half = _mm512_mul_ps(v, _mm512_set1_ps(0.5));
            v = _mm512_fmadd_ps(half, erf, half);
        }
        _mm512_mask_storeu_ps(dst, mask, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blas::Mat;

    /// One to four rows straight from the panels, every panel count and a
    /// ragged last panel, with the bias and GELU, against the definition.
    #[test]
    fn few_rows_match_the_definition() {
        if !available() {
            eprintln!("no AVX-512 on this CPU: the kernel is never chosen here");
            return;
        }
        for &(n, k) in &[(1, 1), (7, 33), (70, 64), (131, 130), (300, 512)] {
            let w: Vec<f32> = (0..n * k)
                .map(|x| ((x * 91 % 103) as f32 - 51.) / 51.)
                .collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 0.5).collect();
            let packed = PackedF32::of_rows(&w, n, k);
            for m in 1..=4 {
                let a: Vec<f32> = (0..m * k)
                    .map(|x| ((x * 37 % 101) as f32 - 50.) / 50.)
                    .collect();
                for gelu in [false, true] {
                    let e = Epilogue {
                        alpha: 1.0,
                        beta: 0.0,
                        bias: Some(&bias),
                        gelu,
                    };
                    let ldc = n + 1;
                    let mut c = vec![9f32; m * ldc];
                    gemm_few_rows(m, &a, &packed, e, &mut c, ldc, false);
                    for i in 0..m {
                        for j in 0..n {
                            let y: f64 = (0..k)
                                .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                                .sum::<f64>()
                                + bias[j] as f64;
                            let want = if gelu {
                                0.5 * y * (1.0 + candle_core::cpu::erf::erf_f64(y / 2f64.sqrt()))
                            } else {
                                y
                            };
                            let got = c[i * ldc + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1. + want.abs()),
                                "{m}x{n}x{k} ({i}, {j}): {got} vs {want}"
                            );
                        }
                        assert_eq!(c[i * ldc + n], 9.0, "past n");
                    }
                }
            }
        }
    }

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
            // Two column blocks of packed B (1024 + 176 columns).
            (7, 1200, 2048),
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
                        gelu: false,
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
                    gelu: false,
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
