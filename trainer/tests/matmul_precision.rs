//! `matmul_precision = "medium"` reaches the frozen base's products: dense and NF4 forwards and input
//! gradients then equal the f32 product of bf16-rounded operands (on CPUs with AVX-512 BF16; elsewhere they
//! stay f32), and "highest" is the plain f32 product. Its own test binary: the precision is process-wide.

use candle_core::{Device, Tensor};
use trainer::kernels::{set_matmul_precision, MatmulPrecision};
use trainer::quant::{FrozenWeight, Nf4Weight, QuantizeOptions};

fn bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// `x [m, k] W^T` (forward) or `x [m, n] W` (input gradient) in f64 for a row-major `w [n, k]`.
fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, transposed: bool) -> Vec<f64> {
    let (inner, outer) = if transposed { (n, k) } else { (k, n) };
    let mut out = vec![0f64; m * outer];
    for i in 0..m {
        for j in 0..outer {
            out[i * outer + j] = (0..inner)
                .map(|p| {
                    let wv = if transposed { w[p * k + j] } else { w[j * k + p] };
                    x[i * inner + p] as f64 * wv as f64
                })
                .sum();
        }
    }
    out
}

#[test]
fn medium_precision_rounds_the_frozen_products_operands_to_bf16() {
    let (m, n, k) = (64usize, 96usize, 128usize);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0).collect();
    let g: Vec<f32> = (0..m * n).map(|i| ((i * 104729) % 1999) as f32 / 999.0 - 1.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 3571) % 2011) as f32 / 1005.0 - 1.0).collect();
    let dev = Device::Cpu;
    let nf4 = Nf4Weight::quantize_with(&w, &[n, k], &QuantizeOptions::default()).unwrap();
    let nf4_dense = nf4.dequantize();
    let weights = [
        (FrozenWeight::dense(&Tensor::from_vec(w.clone(), (n, k), &dev).unwrap()).unwrap(), w.clone()),
        (FrozenWeight::nf4(nf4).unwrap(), nf4_dense),
    ];
    let rounded = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16");
    for precision in [MatmulPrecision::Highest, MatmulPrecision::Medium] {
        set_matmul_precision(precision);
        let round = rounded && precision == MatmulPrecision::Medium;
        for (weight, values) in &weights {
            let wv = if round { bf16(values) } else { values.clone() };
            for transposed in [false, true] {
                let input = if transposed { &g } else { &x };
                let iv = if round { bf16(input) } else { input.clone() };
                let mut out = vec![0f32; m * if transposed { k } else { n }];
                if transposed {
                    weight.input_grad_f32(input, m, &mut out).unwrap();
                } else {
                    weight.forward_f32(input, m, &mut out).unwrap();
                }
                let want = reference(&iv, &wv, m, n, k, transposed);
                for (idx, (&got, &w)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{precision:?} transposed={transposed} at {idx}: {got} vs {w}"
                    );
                }
            }
        }
    }
    set_matmul_precision(MatmulPrecision::Highest);
}
