//! Convolution over a stack of frames on the CPU. A 3x3 kernel with
//! stride 1 and padding 1 (nearly every convolution of the image and video
//! VAEs and UNets) runs as Winograd's F(2x2, 3x3): per band of output rows
//! the input tiles are transformed, multiplied by the transformed weights
//! in 16 matrix products, and transformed back, 2.25 times fewer
//! multiplications than the direct product (1.4–1.7× the im2col path's
//! speed at the VAE's and UNet's shapes, `benches/benches/conv.rs`). Any
//! other kernel is one matrix product per band of output rows: the band's
//! patches are laid out (im2col) with row copies into one reused buffer,
//! then the product writes `weight × patches` straight into the output,
//! bias preloaded. candle's CPU conv2d builds its patches element by
//! element in small tiles and multiplies each tile on its own; at these
//! shapes both paths are several times faster. The frames axis makes it a
//! causal 3-D convolution when the kernel spans several frames (the caller
//! puts the cached or zero frames in front).
//!
//! f32 on the CPU only; [`FrameConv::forward`] falls back to candle's
//! conv2d elsewhere (CUDA, f16/bf16) with the same weights.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig};
use rayon::prelude::*;

use crate::blas::{sgemm, Mat};

/// Floats the patch buffer may hold (64 MB).
const BAND_FLOATS: usize = 16 << 20;

/// Floats of Winograd's transformed input and products per band (64 MB:
/// smaller bands, down to the caches' size, measured slower: the
/// products' efficiency falls faster than the transforms' gains).
const WINOGRAD_BAND_FLOATS: usize = 16 << 20;

/// The weights, kept once: as plain f32 rows for the CPU path, as
/// candle's conv2d elsewhere.
enum Kernel {
    /// `(cout, kt * cin * kh * kw)` weights and `(cout)` bias.
    Cpu(Vec<f32>, Vec<f32>),
    /// A 3x3 convolution (stride 1, padding 1) as Winograd's F(2x2, 3x3):
    /// `(cout, 16, kt * cin)` transformed weights and `(cout)` bias.
    Winograd(Vec<f32>, Vec<f32>),
    /// `(cout, kt * cin, kh, kw)`: frame-major input channels.
    Candle(Conv2d),
}

/// A convolution with kernel `(kt, kh, kw)` over `(T, C, H, W)` frames:
/// output frame `o` reads input frames `o * stride_t .. o * stride_t + kt`;
/// spatial stride and symmetric zero padding as conv2d's.
pub struct FrameConv {
    kernel: Kernel,
    cout: usize,
    cin: usize,
    kt: usize,
    kh: usize,
    kw: usize,
    stride_t: usize,
    stride: usize,
    pad: usize,
}

impl FrameConv {
    /// `weight` `(cout, cin, kt, kh, kw)` (a torch Conv3d's; a Conv2d's with
    /// kt = 1 reshaped), `bias` `(cout)`.
    pub fn new(
        weight: &Tensor,
        bias: Option<Tensor>,
        stride_t: usize,
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Self> {
        Self::build(weight, bias, stride_t, stride, pad, true)
    }

    /// As [`FrameConv::new`] but never Winograd's transform on the CPU:
    /// the plain im2col product (for the benches and tests that compare
    /// the two).
    #[doc(hidden)]
    pub fn new_im2col(
        weight: &Tensor,
        bias: Option<Tensor>,
        stride_t: usize,
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Self> {
        Self::build(weight, bias, stride_t, stride, pad, false)
    }

    fn build(
        weight: &Tensor,
        bias: Option<Tensor>,
        stride_t: usize,
        stride: usize,
        pad: usize,
        winograd: bool,
    ) -> candle_core::Result<Self> {
        crate::device::cpu_math_init();
        let (cout, cin, kt, kh, kw) = weight.dims5()?;
        let w = weight
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((cout, kt * cin, kh, kw))?;
        let kernel = if w.device().is_cpu() && w.dtype() == DType::F32 {
            let b = match &bias {
                Some(b) => b.to_vec1::<f32>()?,
                None => vec![0.0; cout],
            };
            let w = w.flatten_all()?.to_vec1::<f32>()?;
            if winograd && kh == 3 && kw == 3 && stride == 1 && pad == 1 {
                Kernel::Winograd(winograd_weights(&w, cout, kt * cin), b)
            } else {
                Kernel::Cpu(w, b)
            }
        } else {
            let cfg = Conv2dConfig {
                padding: pad,
                stride,
                ..Default::default()
            };
            Kernel::Candle(Conv2d::new(w, bias, cfg))
        };
        Ok(Self {
            kernel,
            cout,
            cin,
            kt,
            kh,
            kw,
            stride_t,
            stride,
            pad,
        })
    }

    /// `x` `(T, cin, H, W)` → `(T_out, cout, H_out, W_out)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (t, c, h, w) = x.dims4()?;
        if c != self.cin {
            candle_core::bail!("conv: {c} input channels, the kernel takes {}", self.cin);
        }
        if t < self.kt {
            candle_core::bail!("conv: {t} frames for a kernel of {}", self.kt);
        }
        let t_out = (t - self.kt) / self.stride_t + 1;
        match (&self.kernel, x.device(), x.dtype()) {
            (
                Kernel::Cpu(weight, bias) | Kernel::Winograd(weight, bias),
                Device::Cpu,
                DType::F32,
            ) => {
                let x = x.contiguous()?;
                // The input is read in place (no copy of it).
                let (storage, layout) = x.storage_and_layout();
                let data = match (&*storage, layout.contiguous_offsets()) {
                    (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
                        &cpu.as_slice::<f32>()?[start..end]
                    }
                    _ => candle_core::bail!("conv: a contiguous CPU input"),
                };
                let (h_out, w_out) = (
                    (h + 2 * self.pad - self.kh) / self.stride + 1,
                    (w + 2 * self.pad - self.kw) / self.stride + 1,
                );
                let out = if matches!(self.kernel, Kernel::Winograd(..)) {
                    self.run_winograd(data, (h, w), t_out, weight, bias)
                } else {
                    self.run_cpu(data, (t, h, w), (t_out, h_out, w_out), weight, bias)
                };
                drop(storage);
                Tensor::from_vec(out, (t_out, self.cout, h_out, w_out), &Device::Cpu)
            }
            (Kernel::Cpu(..) | Kernel::Winograd(..), ..) => candle_core::bail!(
                "conv: f32 CPU weights, a {:?} {:?} input",
                x.dtype(),
                x.device()
            ),
            (Kernel::Candle(conv), ..) => {
                if self.kt == 1 && self.stride_t == 1 {
                    return conv.forward(x);
                }
                let parts = (0..self.kt)
                    .map(|i| {
                        let idx: Vec<u32> =
                            (0..t_out).map(|o| (o * self.stride_t + i) as u32).collect();
                        x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                conv.forward(&Tensor::cat(&parts, 1)?)
            }
        }
    }

    fn run_cpu(
        &self,
        x: &[f32],
        (_t, h, w): (usize, usize, usize),
        (t_out, h_out, w_out): (usize, usize, usize),
        weight: &[f32],
        bias: &[f32],
    ) -> Vec<f32> {
        let (c, kt, kh, kw) = (self.cin, self.kt, self.kh, self.kw);
        let (stride, pad) = (self.stride, self.pad);
        let k = kt * c * kh * kw;
        let hw_out = h_out * w_out;
        // The products accumulate onto the bias.
        let mut out = vec![0f32; t_out * self.cout * hw_out];
        for (i, plane) in out.chunks_mut(hw_out).enumerate() {
            plane.fill(bias[i % self.cout]);
        }
        if kt == 1 && kh == 1 && kw == 1 && stride == 1 && pad == 0 {
            // A pointwise convolution is the matrix product itself: the
            // input frame is already `(cin, h·w)`.
            for (to, frame_out) in out.chunks_mut(self.cout * hw_out).enumerate() {
                let frame = to * self.stride_t;
                let input = &x[frame * c * hw_out..(frame + 1) * c * hw_out];
                sgemm(
                    self.cout,
                    hw_out,
                    c,
                    1.0,
                    Mat::n(weight, c),
                    Mat::n(input, hw_out),
                    1.0,
                    frame_out,
                    hw_out,
                );
            }
            return out;
        }
        let rows_per_band = (BAND_FLOATS / (k * w_out).max(1)).clamp(1, h_out);
        // The patch buffer is kept per thread between calls: a fresh 64 MB
        // allocation per convolution costs page faults, not just time.
        thread_local! {
            static COL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let mut col = COL.with(|c| std::mem::take(&mut *c.borrow_mut()));
        if col.len() < k * rows_per_band * w_out {
            col.resize(k * rows_per_band * w_out, 0.0);
        }
        for to in 0..t_out {
            let frame_out = &mut out[to * self.cout * hw_out..(to + 1) * self.cout * hw_out];
            let mut oy0 = 0;
            while oy0 < h_out {
                let rows = rows_per_band.min(h_out - oy0);
                let n = rows * w_out;
                // Patches: row `kr` of the buffer is input channel
                // (it, ci) shifted by (ih, iw), over the band's pixels.
                col[..k * n]
                    .par_chunks_mut(n)
                    .enumerate()
                    .for_each(|(kr, dst)| {
                        let iw = kr % kw;
                        let ih = (kr / kw) % kh;
                        let ci = (kr / (kw * kh)) % c;
                        let it = kr / (kw * kh * c);
                        let frame = to * self.stride_t + it;
                        let plane = &x[(frame * c + ci) * h * w..(frame * c + ci + 1) * h * w];
                        for r in 0..rows {
                            let drow = &mut dst[r * w_out..(r + 1) * w_out];
                            let iy = ((oy0 + r) * stride + ih) as isize - pad as isize;
                            if iy < 0 || iy >= h as isize {
                                drow.fill(0.0);
                                continue;
                            }
                            let srow = &plane[iy as usize * w..(iy as usize + 1) * w];
                            if stride == 1 {
                                // ix = ox + iw - pad
                                let shift = iw as isize - pad as isize;
                                let lo = (-shift).clamp(0, w_out as isize) as usize;
                                let hi = ((w as isize - shift).clamp(0, w_out as isize)) as usize;
                                drow[..lo].fill(0.0);
                                if hi > lo {
                                    let s0 = (lo as isize + shift) as usize;
                                    drow[lo..hi].copy_from_slice(&srow[s0..s0 + (hi - lo)]);
                                }
                                drow[hi.max(lo)..].fill(0.0);
                            } else {
                                for (ox, d) in drow.iter_mut().enumerate() {
                                    let ix = (ox * stride + iw) as isize - pad as isize;
                                    *d = if ix >= 0 && ix < w as isize {
                                        srow[ix as usize]
                                    } else {
                                        0.0
                                    };
                                }
                            }
                        }
                    });
                // out[:, band] += weight (cout x k) · col (k x n)
                sgemm(
                    self.cout,
                    n,
                    k,
                    1.0,
                    Mat::n(weight, k),
                    Mat::n(&col, n),
                    1.0,
                    &mut frame_out[oy0 * w_out..],
                    hw_out,
                );
                oy0 += rows;
            }
        }
        COL.with(|c| *c.borrow_mut() = col);
        out
    }

    /// A 3x3 convolution (stride 1, padding 1) by Winograd's F(2x2, 3x3)
    /// (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks"):
    /// each 2x2 output tile is `Aᵀ [U ⊙ V] A` with `V = Bᵀ d B` the 4x4
    /// input tile transformed, so the products are 16 matrix products
    /// `M[ξ] = U[ξ] (cout × cin') · V[ξ] (cin' × tiles)`: 2.25 times fewer
    /// multiplications than the im2col product, and no 9-fold patch copy.
    fn run_winograd(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        t_out: usize,
        u: &[f32],
        bias: &[f32],
    ) -> Vec<f32> {
        let (c, cout) = (self.cin, self.cout);
        let kk = self.kt * c;
        // The input frames the outputs read, each transformed once per
        // band: output frame `to`'s (tap, channel) rows are the `kk`
        // consecutive rows from frame `to · stride_t` on.
        let t_in = (t_out - 1) * self.stride_t + self.kt;
        let hw = h * w;
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let rows_per_band =
            (WINOGRAD_BAND_FLOATS / (16 * (t_in * c + cout) * tw).max(1)).clamp(1, th);
        let cap = rows_per_band * tw;
        // `v` is `(t_in · cin, 16, tiles)` and `m` `(cout, 16, tiles)`:
        // one channel's 16 transformed planes lie together, so the
        // transforms run a channel per task; the products read them with a
        // stride.
        thread_local! {
            static BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        let (mut v, mut m) = BUFS.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if v.len() < 16 * t_in * c * cap {
            v.resize(16 * t_in * c * cap, 0.0);
        }
        if m.len() < 16 * cout * cap {
            m.resize(16 * cout * cap, 0.0);
        }
        let mut out = vec![0f32; t_out * cout * hw];
        let mut ty0 = 0;
        while ty0 < th {
            let rows = rows_per_band.min(th - ty0);
            let n = rows * tw;
            v[..16 * t_in * c * n]
                .par_chunks_mut(16 * n)
                .enumerate()
                .for_each_init(
                    || vec![0f32; 16 * (tw + 1)],
                    |scratch, (ch, dst)| {
                        let plane = &x[ch * hw..(ch + 1) * hw];
                        winograd_input(plane, (h, w), ty0..ty0 + rows, dst, scratch);
                    },
                );
            for to in 0..t_out {
                let v0 = to * self.stride_t * c * 16 * n;
                for xi in 0..16 {
                    sgemm(
                        cout,
                        n,
                        kk,
                        1.0,
                        Mat::n(&u[xi * kk..], 16 * kk),
                        Mat::n(&v[v0 + xi * n..], 16 * n),
                        0.0,
                        &mut m[xi * n..],
                        16 * n,
                    );
                }
                let m = &m;
                out[to * cout * hw..(to + 1) * cout * hw]
                    .par_chunks_mut(hw)
                    .enumerate()
                    .for_each_init(
                        || vec![0f32; 10 * tw],
                        |scratch, (co, plane)| {
                            let mb = &m[co * 16 * n..(co + 1) * 16 * n];
                            winograd_output(mb, bias[co], (h, w), ty0..ty0 + rows, plane, scratch);
                        },
                    );
            }
            ty0 += rows;
        }
        BUFS.with(|b| *b.borrow_mut() = (v, m));
        out
    }
}

/// Winograd's input transform of one channel `plane` `(h, w)` for the
/// tile rows `tiles`: `dst` gets the 16 planes `V[ξ]` of `n = rows · tw`
/// tiles, `n` apart; `scratch` holds `16 · (tw + 1)` floats.
///
/// V = Bᵀ d B, Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]: the 4 input
/// rows of a tile row split into even and odd columns (of the padded row:
/// column -1 is even index 0), transformed down the rows, then across
/// each tile's columns, every step a contiguous vector operation.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn winograd_input(
    plane: &[f32],
    (h, w): (usize, usize),
    tiles: std::ops::Range<usize>,
    dst: &mut [f32],
    scratch: &mut [f32],
) {
    let tw = w.div_ceil(2);
    let n = tiles.len() * tw;
    let (even, odd) = scratch.split_at_mut(8 * (tw + 1));
    for (r, ty) in tiles.enumerate() {
        // even[i] = padded row i at columns 2x - 1, odd[i] at 2x, x in 0..=tw.
        for i in 0..4 {
            let e = &mut even[i * (tw + 1)..(i + 1) * (tw + 1)];
            let o = &mut odd[i * (tw + 1)..(i + 1) * (tw + 1)];
            let y = (2 * ty + i) as isize - 1;
            e.fill(0.0);
            o.fill(0.0);
            if y < 0 || y as usize >= h {
                continue;
            }
            let row = &plane[y as usize * w..(y as usize + 1) * w];
            let pairs = row.chunks_exact(2);
            if let [last] = pairs.remainder() {
                o[w / 2] = *last;
            }
            for ((pair, ov), ev) in pairs.zip(o.iter_mut()).zip(e[1..].iter_mut()) {
                *ov = pair[0];
                *ev = pair[1];
            }
        }
        // Down the rows, into rows 4..8: t0 = p0 - p2, t1 = p1 + p2,
        // t2 = p2 - p1, t3 = p1 - p3.
        for half in [&mut *even, &mut *odd] {
            let (p, t) = half.split_at_mut(4 * (tw + 1));
            let (p0, rest) = p.split_at(tw + 1);
            let (p1, rest) = rest.split_at(tw + 1);
            let (p2, p3) = rest.split_at(tw + 1);
            let (t0, rest) = t.split_at_mut(tw + 1);
            let (t1, rest) = rest.split_at_mut(tw + 1);
            let (t2, t3) = rest.split_at_mut(tw + 1);
            for q in 0..=tw {
                t0[q] = p0[q] - p2[q];
                t1[q] = p1[q] + p2[q];
                t2[q] = p2[q] - p1[q];
                t3[q] = p1[q] - p3[q];
            }
        }
        // Across: d0 = E[x] - E[x+1], d1 = O[x] + E[x+1], d2 = E[x+1] - O[x],
        // d3 = O[x] - O[x+1].
        let o = r * tw;
        for i in 0..4 {
            let e = &even[(4 + i) * (tw + 1)..(5 + i) * (tw + 1)];
            let od = &odd[(4 + i) * (tw + 1)..(5 + i) * (tw + 1)];
            let (d0, rest) = dst[4 * i * n..].split_at_mut(n);
            let (d1, rest) = rest.split_at_mut(n);
            let (d2, rest) = rest.split_at_mut(n);
            let (d0, d1, d2, d3) = (
                &mut d0[o..o + tw],
                &mut d1[o..o + tw],
                &mut d2[o..o + tw],
                &mut rest[o..o + tw],
            );
            let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &od[..tw], &od[1..]);
            for q in 0..tw {
                d0[q] = e0[q] - e1[q];
                d1[q] = o0[q] + e1[q];
                d2[q] = e1[q] - o0[q];
                d3[q] = o0[q] - o1[q];
            }
        }
    }
}

/// Winograd's output transform of one output channel: `mb` its 16 product
/// planes (`n = rows · tw` tiles apart) for the tile rows `tiles`, written
/// with `bias` into `plane` `(h, w)`; `scratch` holds `10 · tw` floats.
///
/// Y = Aᵀ M A + bias, Aᵀ = [1 1 1 0; 0 1 -1 -1]: down the rows into r0,
/// r1 (per tile column j), then across.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn winograd_output(
    mb: &[f32],
    bias: f32,
    (h, w): (usize, usize),
    tiles: std::ops::Range<usize>,
    plane: &mut [f32],
    scratch: &mut [f32],
) {
    let tw = w.div_ceil(2);
    let n = tiles.len() * tw;
    for (r, ty) in tiles.enumerate() {
        let oy = 2 * ty;
        let o = r * tw;
        let s = |xi: usize| &mb[xi * n + o..xi * n + o + tw];
        let (r0, rest) = scratch.split_at_mut(4 * tw);
        let (r1, y) = rest.split_at_mut(4 * tw);
        for j in 0..4 {
            let (a0, a1, a2, a3) = (s(j), s(4 + j), s(8 + j), s(12 + j));
            let (r0j, r1j) = (&mut r0[j * tw..(j + 1) * tw], &mut r1[j * tw..(j + 1) * tw]);
            for q in 0..tw {
                r0j[q] = a0[q] + a1[q] + a2[q];
                r1j[q] = a1[q] - a2[q] - a3[q];
            }
        }
        for (k, rr) in [&*r0, &*r1].into_iter().enumerate() {
            let oy = oy + k;
            if oy >= h {
                break;
            }
            let (c0, c1, c2, c3) = (
                &rr[..tw],
                &rr[tw..2 * tw],
                &rr[2 * tw..3 * tw],
                &rr[3 * tw..],
            );
            // Interleaved: (left, right) pairs.
            let y0 = &mut y[..2 * tw];
            for (q, pair) in y0.chunks_exact_mut(2).enumerate() {
                pair[0] = bias + c0[q] + c1[q] + c2[q];
                pair[1] = bias + c1[q] - c2[q] - c3[q];
            }
            plane[oy * w..(oy + 1) * w].copy_from_slice(&y0[..w]);
        }
    }
}

/// Winograd F(2x2, 3x3) weights: `U = G g Gᵀ` per (output, input)
/// channel pair, `G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]`, laid out
/// `(cout, 16, cin)` from `(cout, cin, 3, 3)` (so `U[ξ]` is the matrix at
/// offset `ξ·cin` with rows `16·cin` apart).
fn winograd_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    const G: [[f32; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let mut u = vec![0f32; 16 * cout * cin];
    u.par_chunks_mut(16 * cin).enumerate().for_each(|(co, uc)| {
        for ci in 0..cin {
            let g = &w[(co * cin + ci) * 9..(co * cin + ci + 1) * 9];
            // G g: 4 x 3
            let mut gg = [[0f32; 3]; 4];
            for (i, row) in gg.iter_mut().enumerate() {
                for (b, v) in row.iter_mut().enumerate() {
                    *v = (0..3).map(|a| G[i][a] * g[a * 3 + b]).sum();
                }
            }
            for i in 0..4 {
                for j in 0..4 {
                    uc[(i * 4 + j) * cin + ci] = (0..3).map(|b| gg[i][b] * G[j][b]).sum();
                }
            }
        }
    });
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::Distribution;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| rand_distr::StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The reference: candle's conv2d per kernel frame, summed.
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stride_t: usize,
        stride: usize,
        pad: usize,
    ) -> Tensor {
        let (t, ..) = x.dims4().unwrap();
        let kt = w.dim(2).unwrap();
        let t_out = (t - kt) / stride_t + 1;
        let mut frames = Vec::new();
        for o in 0..t_out {
            let mut acc: Option<Tensor> = None;
            for i in 0..kt {
                let xi = x.narrow(0, o * stride_t + i, 1).unwrap();
                let wi = w
                    .narrow(2, i, 1)
                    .unwrap()
                    .squeeze(2)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let y = xi.conv2d(&wi, pad, stride, 1, 1).unwrap();
                acc = Some(match acc {
                    Some(a) => (a + y).unwrap(),
                    None => y,
                });
            }
            let y = acc
                .unwrap()
                .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
                .unwrap();
            frames.push(y);
        }
        Tensor::cat(&frames, 0).unwrap()
    }

    #[test]
    fn matches_candle_conv_for_every_shape_the_vaes_use() {
        // (t, cin, cout, (kt, kh, kw), stride_t, stride, pad, h, w)
        let cases = [
            (3, 5, 7, (3, 3, 3), 1, 1, 1, 9, 11),
            (4, 4, 6, (3, 1, 1), 1, 1, 0, 8, 8),
            (5, 3, 3, (3, 1, 1), 2, 1, 0, 6, 7),
            (2, 6, 4, (1, 3, 3), 1, 2, 0, 9, 9),
            (1, 8, 8, (1, 1, 1), 1, 1, 0, 5, 4),
            (3, 6, 5, (1, 1, 1), 1, 1, 0, 7, 9),
            (2, 3, 5, (1, 3, 3), 1, 1, 1, 16, 3),
            (1, 2, 3, (1, 3, 3), 1, 1, 1, 1, 1),
            (2, 4, 3, (2, 3, 3), 1, 1, 1, 5, 2),
            // Winograd over several output frames (each input frame
            // transformed once), with a temporal stride too.
            (5, 4, 3, (3, 3, 3), 1, 1, 1, 6, 7),
            (6, 3, 4, (3, 3, 3), 2, 1, 1, 5, 5),
            // Winograd in two bands of tile rows, odd width.
            (1, 64, 64, (1, 3, 3), 1, 1, 1, 300, 127),
        ];
        for (i, (t, cin, cout, (kt, kh, kw), st, s, p, h, w)) in cases.into_iter().enumerate() {
            let x = randn(&[t, cin, h, w], i as u64);
            let wt = randn(&[cout, cin, kt, kh, kw], 100 + i as u64);
            let b = randn(&[cout], 200 + i as u64);
            let want = reference(&x, &wt, &b, st, s, p);
            let scale = want
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1.0);
            // Winograd's path where the shape allows it, and im2col's.
            for conv in [
                FrameConv::new(&wt, Some(b.clone()), st, s, p).unwrap(),
                FrameConv::new_im2col(&wt, Some(b.clone()), st, s, p).unwrap(),
            ] {
                let ours = conv.forward(&x).unwrap();
                assert_eq!(ours.dims(), want.dims(), "case {i}");
                let diff = crate::testing::max_abs_diff(&ours, &want);
                assert!(
                    diff < 1e-5 * scale,
                    "case {i}: max |diff| {diff} of max |y| {scale}"
                );
            }
        }
    }
}
