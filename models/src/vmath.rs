//! `exp` and `erf` over f32 slices on AVX-512, for the CPUs whose large
//! products run on [`crate::sgemm512`] (AVX-512, not Intel with MKL): MKL's
//! vector math runs a generic path there (`…_EXHAynn`, ~1 ns a value on an
//! AMD EPYC, measured), 10× what 16 lanes at a time take.
//!
//! `exp`: Cephes' `expf` — `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, a degree-6
//! polynomial for `eʳ`, scaled by `2ⁿ` with `vscalefps` (so underflow to
//! zero and overflow to infinity come out right); within 2 ulp.
//! `erf`, odd: below 0.84375 fdlibm's `x + x·R(x²)` (a rational fit),
//! above Abramowitz and Stegun 7.1.26, `1 − t·P(t)·e^{−x²}` with
//! `t = 1 / (1 + p|x|)` (within 1.5e-7 of the true value there, where it
//! is at least 0.77: the formula of PyTorch's vectorised CPU `erf` and of
//! oneDNN's exact GELU); within 4 ulp, as MKL's low-accuracy mode.

/// `x[i] = e^x[i]`. Panics on a CPU without AVX-512 (callers check
/// [`crate::sgemm512::preferred`]).
pub(crate) fn exp_in_place(x: &mut [f32]) {
    assert!(crate::sgemm512::available());
    // SAFETY: AVX-512F is present (asserted).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        exp_slice(x)
    }
}

/// `x[i] = erf(x[i])`, as [`exp_in_place`].
pub(crate) fn erf_in_place(x: &mut [f32]) {
    assert!(crate::sgemm512::available());
    // SAFETY: as above.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        erf_slice(x)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_slice(x: &mut [f32]) {
    // SAFETY: this function's own features.
    unsafe { map16(x, |v| exp16(v)) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn erf_slice(x: &mut [f32]) {
    // SAFETY: this function's own features.
    unsafe { map16(x, |v| erf16(v)) }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Applies `f` to 16 values at a time, the tail through a mask.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn map16(x: &mut [f32], f: impl Fn(__m512) -> __m512) {
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: 16 floats in `c`.
        unsafe { _mm512_storeu_ps(c.as_mut_ptr(), f(_mm512_loadu_ps(c.as_ptr()))) };
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mask: __mmask16 = (1u16 << rest.len()) - 1;
        // SAFETY: the mask covers `rest.len()` floats.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
            _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, f(v));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn exp16(x: __m512) -> __m512 {
    // Past these e^x is 0 (after scaling) or +inf; NaN stays NaN.
    let x = _mm512_min_ps(
        _mm512_set1_ps(89.0),
        _mm512_max_ps(_mm512_set1_ps(-104.0), x),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // r = x - n ln 2, ln 2 in two parts (Cephes' C1, C2).
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_2e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5e-1,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    _mm512_scalef_ps(y, n)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn erf16(x: __m512) -> __m512 {
    let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
    let a = _mm512_abs_ps(x);
    // |x| < 0.84375: x + x·R(x²), fdlibm's rational fit (1 ulp).
    let z = _mm512_mul_ps(a, a);
    let horner = |cs: &[f32]| {
        let mut p = _mm512_set1_ps(cs[0]);
        for &c in &cs[1..] {
            p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(c));
        }
        p
    };
    let r = horner(&[
        -2.376_301_7e-5,
        -5.770_270_3e-3,
        -2.848_175e-2,
        -3.250_421e-1,
        1.283_791_7e-1,
    ]);
    let s = horner(&[
        -3.960_228_2e-6,
        1.324_947_4e-4,
        5.081_306e-3,
        6.502_225e-2,
        3.979_172e-1,
        1.0,
    ]);
    let small = _mm512_fmadd_ps(a, _mm512_div_ps(r, s), a);
    // Elsewhere 1 - t·P(t)·e^(-x²), t = 1 / (1 + p|x|).
    let t = _mm512_div_ps(
        _mm512_set1_ps(1.0),
        _mm512_fmadd_ps(a, _mm512_set1_ps(0.327_591_1), _mm512_set1_ps(1.0)),
    );
    let mut p = _mm512_set1_ps(1.061_405_4);
    for c in [-1.453_152_1, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
    }
    let p = _mm512_mul_ps(p, t);
    let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), z));
    let large = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.0));
    let is_small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_set1_ps(0.843_75));
    let y = _mm512_mask_blend_ps(is_small, large, small);
    _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(lo: f32, hi: f32) -> Vec<f32> {
        // 100,003 values: not a multiple of 16, so the tail runs too.
        (0..100_003)
            .map(|i| lo + (hi - lo) * i as f32 / 100_002.0)
            .collect()
    }

    #[test]
    fn exp_is_within_two_ulp() {
        if !crate::sgemm512::available() {
            eprintln!("no AVX-512 on this CPU: never chosen here");
            return;
        }
        let xs = inputs(-87.0, 88.0);
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp();
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                ((y as f64) - want).abs() <= 2.0 * ulp as f64,
                "exp({x}) = {y}, want {want}"
            );
        }
        let mut edge = [
            f32::NEG_INFINITY,
            -200.0,
            0.0,
            100.0,
            f32::INFINITY,
            f32::NAN,
        ];
        exp_in_place(&mut edge);
        assert_eq!(edge[..5], [0.0, 0.0, 1.0, f32::INFINITY, f32::INFINITY]);
        assert!(edge[5].is_nan());
    }

    #[test]
    fn erf_is_within_4_ulp() {
        if !crate::sgemm512::available() {
            eprintln!("no AVX-512 on this CPU: never chosen here");
            return;
        }
        let xs = inputs(-6.0, 6.0);
        let mut ys = xs.clone();
        erf_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            let ulp = (want.abs() as f32 * f32::EPSILON) as f64;
            assert!(
                ((y as f64) - want).abs() <= 4.0 * ulp,
                "erf({x}) = {y}, want {want}"
            );
        }
    }
}
