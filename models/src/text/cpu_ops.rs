//! The text model's steps between its matrix products, on plain f32
//! buffers: RMSNorm, rotary embeddings, SiLU-gated MLP activation and
//! attention against a sequence's KV buffers. The CPU forward pass runs a
//! decode step as a few hundred of these calls on vectors instead of a few
//! thousand tensor ops (each one an allocation and a dispatch), which took
//! a third of a token's time next to the weights' own reads.
//!
//! Element-wise loops are compiled for AVX-512 and AVX2 as well and picked
//! at run time (`multiversion`); sums run in 16 lanes so they vectorise.

use crate::blas::{sgemm, Mat};

const LANES: usize = 16;

/// The lanes' sum by halves (vector adds, not 16 dependent scalar ones).
#[inline(always)]
fn sum_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// The sum of `a[i] * b[i]` in 16 lanes, then the lanes by halves.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = sum_lanes(acc);
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// Each row of `x` (rows of `w.len()`) times `w` over its root mean square:
/// llama's RMSNorm, into `out`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = dot_lanes(xr, xr);
        let scale = 1. / (ss / d as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// `x += y`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(crate) fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotary embedding of one token's heads (`x`: heads of `cos.len() * 2`)
/// at the position whose table rows are `cos`/`sin`: pairs of neighbours
/// (`2i`, `2i + 1`: llama, whose GGUF q/k weights llama.cpp permutes) or
/// of halves (`i`, `i + d/2`: NEOX), as candle's `rope_i` and `rope`.
pub(crate) fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], neox: bool) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        if neox {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x0 * sin[i] + x1 * cos[i];
            }
        } else {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * cos[i] - x1 * sin[i];
                pair[1] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// `silu(gate) * up` for rows of `2 * ff` holding gate then up (the fused
/// projection's output), into `out` (rows of `ff`).
pub(crate) fn silu_gate(gate_up: &[f32], ff: usize, out: &mut [f32]) {
    for (row, o) in gate_up.chunks_exact(2 * ff).zip(out.chunks_exact_mut(ff)) {
        o.copy_from_slice(&row[..ff]);
        crate::ops::silu_in_place(o);
        mul_in_place(o, &row[ff..]);
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn mul_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a *= b;
    }
}

/// Softmax of `x` in place.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for v in x.iter_mut() {
        *v -= max;
    }
    crate::blas::exp_in_place(x);
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut sum: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    sum += sum_lanes(acc);
    let inv = 1. / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// One token's attention for query heads of one key/value head: `q`
/// `(heads, d)`, the keys and values `(t, d)` (the cache's first `t`
/// positions, this token's own included), `scores` room for `t`; writes
/// `(heads, d)` into `out`. Head sizes of 64 and 128 run with the row held
/// in registers (fixed-size arrays the compiler keeps in vector registers).
pub(crate) fn attend_one(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    match d {
        64 => attend_fixed::<64>(q, k, v, scale, scores, out),
        128 => attend_fixed::<128>(q, k, v, scale, scores, out),
        _ => attend_any(q, k, v, d, scale, scores, out),
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn attend_fixed<const D: usize>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    for (qh, oh) in q.chunks_exact(D).zip(out.chunks_exact_mut(D)) {
        let qh: &[f32; D] = qh.try_into().expect("D values");
        for (s, kt) in scores.iter_mut().zip(k.chunks_exact(D)) {
            let kt: &[f32; D] = kt.try_into().expect("D values");
            let mut acc = [0f32; LANES];
            for c in 0..D / LANES {
                for i in 0..LANES {
                    acc[i] += qh[c * LANES + i] * kt[c * LANES + i];
                }
            }
            *s = sum_lanes(acc) * scale;
        }
        softmax(scores);
        let mut acc = [0f32; D];
        for (&p, vt) in scores.iter().zip(v.chunks_exact(D)) {
            let vt: &[f32; D] = vt.try_into().expect("D values");
            for i in 0..D {
                acc[i] += p * vt[i];
            }
        }
        oh.copy_from_slice(&acc);
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn attend_any(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    for (qh, oh) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        for (s, kt) in scores.iter_mut().zip(k.chunks_exact(d)) {
            *s = dot_lanes(qh, kt) * scale;
        }
        softmax(scores);
        oh.fill(0.);
        for (&p, vt) in scores.iter().zip(v.chunks_exact(d)) {
            for (o, &x) in oh.iter_mut().zip(vt) {
                *o += p * x;
            }
        }
    }
}

/// Causal attention of `seq` new tokens after `pos` cached ones, for one
/// query head: `q` rows `ldq` apart (`seq` of them, `d` wide), keys and
/// values `(pos + seq, d)`, `scores` room for `seq * (pos + seq)`; writes
/// `seq` rows `ldo` apart into `out`. Products by sgemm.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_causal(
    q: &[f32],
    ldq: usize,
    k: &[f32],
    v: &[f32],
    d: usize,
    pos: usize,
    seq: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
    ldo: usize,
) {
    let t = pos + seq;
    sgemm(
        seq,
        t,
        d,
        scale,
        Mat::n(q, ldq),
        Mat::t(k, d),
        0.,
        scores,
        t,
    );
    for (i, row) in scores.chunks_exact_mut(t).enumerate() {
        let (seen, future) = row.split_at_mut(pos + i + 1);
        softmax(seen);
        future.fill(0.);
    }
    sgemm(seq, d, t, 1., Mat::n(scores, t), Mat::n(v, d), 0., out, ldo);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], k: &[f32], v: &[f32], d: usize, upto: usize, scale: f32) -> Vec<f32> {
        let mut s: Vec<f32> = (0..upto)
            .map(|t| (0..d).map(|j| q[j] * k[t * d + j]).sum::<f32>() * scale)
            .collect();
        let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let z: f32 = s
            .iter_mut()
            .map(|x| {
                *x = (*x - m).exp();
                *x
            })
            .sum();
        (0..d)
            .map(|j| (0..upto).map(|t| s[t] / z * v[t * d + j]).sum())
            .collect()
    }

    fn rand(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 2000) as f32 / 1000. - 1.
            })
            .collect()
    }

    #[test]
    fn attention_one_token_and_causal_match_the_plain_formula() {
        let (d, n_rep, pos, seq) = (64, 3, 37, 5);
        let t = pos + seq;
        let (k, v) = (rand(t * d, 1), rand(t * d, 2));
        let q = rand(seq * n_rep * d, 3);
        let scale = 0.125;
        // Decoding: the last token, all heads of the group; head sizes with
        // their own fixed-size path and one without.
        for d in [64, 128, 40] {
            let (k, v) = (rand(t * d, 1), rand(t * d, 2));
            let last = rand(n_rep * d, 3);
            let mut scores = vec![0.; t];
            let mut out = vec![0.; n_rep * d];
            attend_one(&last, &k, &v, d, scale, &mut scores, &mut out);
            for h in 0..n_rep {
                let want = naive(&last[h * d..(h + 1) * d], &k, &v, d, t, scale);
                for (a, b) in out[h * d..(h + 1) * d].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "d {d}: {a} vs {b}");
                }
            }
        }
        // Prefill: head 1 of every new token (rows n_rep * d apart).
        let mut scores = vec![0.; seq * t];
        let mut out = vec![0.; seq * n_rep * d];
        attend_causal(
            &q[d..],
            n_rep * d,
            &k,
            &v,
            d,
            pos,
            seq,
            scale,
            &mut scores,
            &mut out[d..],
            n_rep * d,
        );
        for i in 0..seq {
            let qi = &q[i * n_rep * d + d..i * n_rep * d + 2 * d];
            let want = naive(qi, &k, &v, d, pos + i + 1, scale);
            for (a, b) in out[i * n_rep * d + d..i * n_rep * d + 2 * d]
                .iter()
                .zip(&want)
            {
                assert!((a - b).abs() < 1e-5, "token {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rms_norm_and_rope_match_the_plain_formulas() {
        let (x, w) = (rand(3 * 40, 4), rand(40, 5));
        let mut out = vec![0.; x.len()];
        rms_norm(&x, &w, 1e-5, &mut out);
        for r in 0..3 {
            let row = &x[r * 40..(r + 1) * 40];
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 40. + 1e-5).sqrt();
            for j in 0..40 {
                assert!((out[r * 40 + j] - row[j] / rms * w[j]).abs() < 1e-5);
            }
        }
        let (cos, sin) = (rand(4, 6), rand(4, 7));
        for neox in [false, true] {
            let mut h = rand(16, 8);
            let orig = h.clone();
            rope(&mut h, &cos, &sin, neox);
            for head in 0..2 {
                for i in 0..4 {
                    let (a, b) = if neox { (i, i + 4) } else { (2 * i, 2 * i + 1) };
                    let (x0, x1) = (orig[head * 8 + a], orig[head * 8 + b]);
                    assert!((h[head * 8 + a] - (x0 * cos[i] - x1 * sin[i])).abs() < 1e-6);
                    assert!((h[head * 8 + b] - (x0 * sin[i] + x1 * cos[i])).abs() < 1e-6);
                }
            }
        }
    }
}
