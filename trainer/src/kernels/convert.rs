//! Conversions between f32 and the 16-bit float formats activations are stored in (bf16, f16), spread
//! over the CPU pool for large buffers. The kernels read 16-bit activations into f32, compute in f32
//! and store their results back in the activations' dtype, so a bf16 model keeps half the bytes of an
//! f32 one between and inside its layers.

use half::{bf16, f16};

use super::parallel::for_spans_mut;

/// Values per task of the parallel split (small buffers are converted inline).
const SPAN: usize = 1 << 16;

/// `x` rounded to the nearest bf16 (ties to even), NaN kept a NaN: the rounding of `half::bf16::from_f32`
/// and of PyTorch's `.to(torch.bfloat16)`, written without a branch so the loop vectorizes.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((b >> 16) | 0x40) as u16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }
}

/// The bf16 values of `src` as f32 (exact).
pub fn bf16_to_f32(src: &[bf16]) -> Vec<f32> {
    let mut out = super::storage::output_f32(src.len());
    // Every span is written whole.
    for_spans_mut(&mut out, SPAN, |at, o| {
        let src = &src[at..at + o.len()];
        for (o, &v) in o.iter_mut().zip(src) {
            *o = f32::from_bits((v.to_bits() as u32) << 16);
        }
    });
    out
}

/// The f16 values of `src` as f32 (exact).
pub fn f16_to_f32(src: &[f16]) -> Vec<f32> {
    let mut out = super::storage::output_f32(src.len());
    for_spans_mut(&mut out, SPAN, |at, o| {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(&src[at..at + o.len()], o)
    });
    out
}

/// `src` rounded to bf16 (nearest, ties to even).
pub fn f32_to_bf16(src: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; src.len()];
    for_spans_mut(&mut out, SPAN, |at, o| {
        let src = &src[at..at + o.len()];
        for (o, &v) in o.iter_mut().zip(src) {
            *o = bf16::from_bits(bf16_bits(v));
        }
    });
    out
}

/// `src` rounded to f16 (nearest, ties to even).
pub fn f32_to_f16(src: &[f32]) -> Vec<f16> {
    let mut out = vec![f16::ZERO; src.len()];
    for_spans_mut(&mut out, SPAN, |at, o| {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(o, &src[at..at + o.len()])
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rounding case against `half`'s reference conversion: ties both ways, subnormals, the
    /// largest finite values (rounding up to infinity), infinities and NaNs; and a buffer large enough
    /// to be split over the pool.
    #[test]
    fn rounding_equals_the_reference_conversion() {
        let mut values: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000), // a tie, rounds down to even
            f32::from_bits(0x3f81_8000), // a tie, rounds up to even
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x0000_0001), // the smallest subnormal
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001), // a signalling NaN stays a NaN
        ];
        values.extend((0..3 * SPAN as u32 + 17).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        let ours = f32_to_bf16(&values);
        for (&v, got) in values.iter().zip(&ours) {
            let want = bf16::from_f32(v);
            if v.is_nan() {
                assert!(got.is_nan(), "{v:e} ({:#x}) gave {got}", v.to_bits());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{v:e} ({:#x})", v.to_bits());
            }
        }
        let back = bf16_to_f32(&ours);
        for (got, b) in back.iter().zip(&ours) {
            assert!(got.to_bits() == b.to_f32().to_bits() || got.is_nan());
        }
        let halves = f32_to_f16(&values);
        for (&v, got) in values.iter().zip(&halves) {
            assert!(got.to_bits() == f16::from_f32(v).to_bits() || v.is_nan());
        }
        let back = f16_to_f32(&halves);
        for (got, h) in back.iter().zip(&halves) {
            assert!(got.to_bits() == h.to_f32().to_bits() || got.is_nan());
        }
    }
}
