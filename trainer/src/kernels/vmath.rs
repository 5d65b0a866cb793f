//! Vectorized exponentials over rows of f32 (softmax and cross-entropy): AVX-512 when the CPU has it,
//! scalar `f32::exp` otherwise.
//!
//! The vector `exp` is Cephes' `expf` (range reduction by `ln 2` in two parts, a degree-6 polynomial,
//! exact scaling by `2^n` with `vscalefps`): at most ~2 ulp from the correctly rounded value, and it
//! underflows to 0 for very negative inputs (e.g. the `f32::MIN` of masked attention scores).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether the AVX-512 paths run on this CPU.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The largest value of `xs` (`-inf` when empty).
pub fn max(xs: &[f32]) -> f32 {
    xs.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `sum_j exp(xs[j] - shift)`, accumulated in f32 lanes.
pub fn sum_exp(xs: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F (checked above).
        return unsafe { exp_avx512(xs, shift, 1.0, None) };
    }
    xs.iter().map(|&v| (v - shift).exp()).sum()
}

/// `out[j] = scale * exp(xs[j] - shift)`; returns `sum_j exp(xs[j] - shift)`. `out` may be the
/// same length as `xs` only.
pub fn scaled_exp(xs: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f32 {
    assert_eq!(xs.len(), out.len(), "scaled_exp: input and output lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F and `out` has the length of `xs`.
        return unsafe { exp_avx512(xs, shift, scale, Some(out)) };
    }
    let mut sum = 0f32;
    for (o, &v) in out.iter_mut().zip(xs) {
        let e = (v - shift).exp();
        sum += e;
        *o = scale * e;
    }
    sum
}

/// In place: `xs[j] = scale * exp(xs[j] - shift)`; returns the sum of the unscaled exponentials.
pub fn scaled_exp_in_place(xs: &mut [f32], shift: f32, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F; input and output are the same slice, read before written
        // one vector at a time.
        return unsafe {
            let p = xs.as_mut_ptr();
            exp_avx512(
                std::slice::from_raw_parts(p, xs.len()),
                shift,
                scale,
                Some(std::slice::from_raw_parts_mut(p, xs.len())),
            )
        };
    }
    let mut sum = 0f32;
    for v in xs.iter_mut() {
        let e = (*v - shift).exp();
        sum += e;
        *v = scale * e;
    }
    sum
}

/// `out[j] = 1 / (1 + exp(-xs[j]))`.
pub fn sigmoid(xs: &[f32], out: &mut [f32]) {
    assert_eq!(xs.len(), out.len(), "sigmoid: input and output lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports AVX-512F and the lengths match.
        unsafe { sigmoid_avx512(xs, out) };
        return;
    }
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = 1.0 / (1.0 + (-x).exp());
    }
}

/// [`sigmoid`] on 16 lanes at a time.
///
/// # Safety
/// The CPU must support AVX-512F; `out` has the length of `xs`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sigmoid_avx512(xs: &[f32], out: &mut [f32]) {
    let one = _mm512_set1_ps(1.0);
    let mut j = 0;
    while j < xs.len() {
        let left = xs.len() - j;
        let mask: __mmask16 = if left >= 16 { 0xffff } else { ((1u32 << left) - 1) as __mmask16 };
        let x = _mm512_maskz_loadu_ps(mask, xs.as_ptr().add(j));
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(j), mask, _mm512_div_ps(one, _mm512_add_ps(one, e)));
        j += 16;
    }
}

/// Cephes `expf` on 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp16(x: __m512) -> __m512 {
    // Below -103.97 the result rounds to 0 in f32.
    let alive = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-103.972_08));
    let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.72283)), _mm512_set1_ps(-103.972_08));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5e-1));
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    _mm512_maskz_mov_ps(alive, _mm512_scalef_ps(y, n))
}

/// Sum of `exp(x - shift)` over `xs`, optionally writing `scale * exp(x - shift)` to `out`.
///
/// # Safety
/// The CPU must support AVX-512F; `out`, when given, has the length of `xs` (it may alias `xs`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(xs: &[f32], shift: f32, scale: f32, out: Option<&mut [f32]>) -> f32 {
    let n = xs.len();
    let (shift_v, scale_v) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
    let mut acc = _mm512_setzero_ps();
    let out_ptr = out.map(|o| o.as_mut_ptr());
    let mut j = 0;
    while j < n {
        let left = n - j;
        let mask: __mmask16 = if left >= 16 { 0xffff } else { ((1u32 << left) - 1) as __mmask16 };
        let x = _mm512_maskz_loadu_ps(mask, xs.as_ptr().add(j));
        let e = exp16(_mm512_sub_ps(x, shift_v));
        acc = _mm512_mask_add_ps(acc, mask, acc, e);
        if let Some(o) = out_ptr {
            _mm512_mask_storeu_ps(o.add(j), mask, _mm512_mul_ps(e, scale_v));
        }
        j += 16;
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_exp_is_within_a_few_ulp_of_the_libm_one() {
        let xs: Vec<f32> = (0..20000).map(|i| -100.0 + i as f32 * 0.0055).collect();
        let mut out = vec![0f32; xs.len()];
        let sum = scaled_exp(&xs, 0.5, 2.0, &mut out);
        let mut want_sum = 0f64;
        for (&x, &o) in xs.iter().zip(&out) {
            let want = ((x - 0.5) as f64).exp();
            want_sum += want;
            let got = o as f64 / 2.0;
            assert!((got - want).abs() <= 4e-7 * want + 1e-38, "exp({}) = {got}, want {want}", x - 0.5);
        }
        // An f32 sum of 20000 terms spanning 50 orders of magnitude: f32 accumulation error, not exp's.
        assert!((sum as f64 - want_sum).abs() <= 1e-4 * want_sum, "{sum} vs {want_sum}");
        assert!((sum_exp(&xs, 0.5) - sum).abs() <= 1e-6 * sum);
        // Masked scores underflow to exactly 0.
        assert_eq!(sum_exp(&[f32::MIN, f32::MIN], 0.0), 0.0);
        let mut row = vec![1.0f32, f32::MIN, 0.0];
        let s = scaled_exp_in_place(&mut row, 1.0, 1.0);
        assert_eq!(row[1], 0.0);
        assert!((s - (1.0 + (-1.0f32).exp())).abs() < 1e-6);
        assert_eq!(max(&[1.0, 3.0, -2.0]), 3.0);
        let mut sig = vec![0f32; xs.len()];
        sigmoid(&xs, &mut sig);
        for (&x, &s) in xs.iter().zip(&sig) {
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((s as f64 - want).abs() <= 2e-7 * want + 1e-37, "sigmoid({x}) = {s}, want {want}");
        }
    }
}
