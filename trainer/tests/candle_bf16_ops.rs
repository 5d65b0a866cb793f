//! The patched candle-core's bf16 element-wise kernels (vendor/candle-core/TRAMONTANE-PATCH.md) against the
//! reference rounding: every bf16 add and multiply equals `half::bf16::from_f32` of the exact f32 result of the
//! two bf16 operands, bit for bit (NaN stays NaN), over random bit patterns (all exponents, ties, subnormals,
//! infinities, NaNs) long enough to take the vectorized and the parallel paths.

use candle_core::{Device, Tensor};
use half::bf16;

fn patterns(n: usize, seed: u32) -> Vec<bf16> {
    let mut state = seed;
    (0..n)
        .map(|i| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            // Every 7th value near 1.0 so sums of similar magnitudes round often (ties included).
            if i % 7 == 0 {
                bf16::from_bits(0x3f80 | (state >> 16) as u16 & 0x7f)
            } else {
                bf16::from_bits((state >> 16) as u16)
            }
        })
        .collect()
}

fn check(op: &str, got: &Tensor, a: &[bf16], b: &[bf16], f: impl Fn(f32, f32) -> f32) {
    let got: Vec<bf16> = got.to_vec1().unwrap();
    for (i, ((&x, &y), &g)) in a.iter().zip(b).zip(&got).enumerate() {
        let want = bf16::from_f32(f(x.to_f32(), y.to_f32()));
        if want.is_nan() {
            assert!(g.is_nan(), "{op} #{i}: {x} and {y} gave {g}, want NaN");
        } else {
            assert_eq!(
                g.to_bits(),
                want.to_bits(),
                "{op} #{i}: {x} ({:#06x}) and {y} ({:#06x})",
                x.to_bits(),
                y.to_bits()
            );
        }
    }
}

#[test]
fn bf16_add_and_mul_round_exactly_like_half() {
    let dev = Device::Cpu;
    for n in [37usize, 4096 * 64 + 29] {
        let (a, b) = (patterns(n, 1), patterns(n, 2));
        let (ta, tb) = (Tensor::from_vec(a.clone(), n, &dev).unwrap(), Tensor::from_vec(b.clone(), n, &dev).unwrap());
        check("add", &(&ta + &tb).unwrap(), &a, &b, |x, y| x + y);
        check("mul", &(&ta * &tb).unwrap(), &a, &b, |x, y| x * y);
    }
}
