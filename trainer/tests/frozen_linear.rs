//! The frozen linear: forward values, input gradients (against candle's matmul and finite
//! differences), and the guarantee that the base weight never gets, nor costs, a gradient.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use trainer::quant::{FrozenWeight, Nf4Weight};

/// Deterministic values in about [-scale, scale) (a small LCG; not the NF4 fixtures' generator).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor(seed: u64, dims: &[usize], scale: f32) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(values(seed, n, scale), dims, &Device::Cpu).unwrap()
}

fn nf4(seed: u64, out: usize, inp: usize) -> (FrozenWeight, Tensor) {
    let w = Nf4Weight::quantize(&values(seed, out * inp, 0.05), &[out, inp], true).unwrap();
    let dense = w.to_tensor(&Device::Cpu).unwrap();
    (FrozenWeight::nf4(w).unwrap(), dense)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Reference: plain candle autograd through `x @ W^T` with W a constant.
fn reference(x: &Tensor, w: &Tensor) -> Tensor {
    let dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let y = x.reshape((x.elem_count() / k, k)).unwrap().matmul(&w.t().unwrap()).unwrap();
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0).unwrap();
    y.reshape(out).unwrap()
}

/// A loss that is not linear in y, so gradients depend on the forward values.
fn loss(y: &Tensor, c: &Tensor) -> Tensor {
    (y.sqr().unwrap() * c).unwrap().sum_all().unwrap()
}

/// NF4 forward equals `x @ dequant(W)^T` for 2-D and 3-D inputs (a 600x2000 weight and a small odd
/// shape; products over several tiles are tested in `tiled_matmul`); inference (no gradient) gives the
/// same values without attaching anything to the graph.
#[test]
fn nf4_forward_matches_dequantized_matmul() {
    for (out, inp, xdims) in
        [(600usize, 2000usize, vec![3usize, 2000]), (600, 2000, vec![2, 3, 2000]), (7, 33, vec![5, 33])]
    {
        let (fw, dense) = nf4(1, out, inp);
        let x = tensor(2, &xdims, 1.0);
        let y = fw.forward(&x).unwrap();
        assert!(!y.track_op(), "inference must not attach the bridge");
        let want = reference(&x, &dense);
        assert_eq!(y.dims(), want.dims());
        let d = max_rel_diff(&y, &want);
        assert!(d < 1e-5, "{out}x{inp} {xdims:?}: {d}");
        let xv = Var::from_tensor(&x).unwrap();
        let yv = fw.forward(xv.as_tensor()).unwrap();
        assert!(yv.track_op());
        assert_eq!(max_rel_diff(&yv, &y), 0.0);
    }
}

/// Backward gives dx = dY W for NF4 and dense weights, 2-D and 3-D inputs, matching candle's own
/// matmul gradient.
#[test]
fn input_gradient_matches_candle_matmul() {
    for xdims in [vec![4usize, 2000], vec![2, 3, 2000]] {
        let (fw, dense) = nf4(3, 600, 2000);
        for frozen in [fw, FrozenWeight::dense(&dense).unwrap()] {
            let x = Var::from_tensor(&tensor(4, &xdims, 1.0)).unwrap();
            let mut ydims = xdims.clone();
            *ydims.last_mut().unwrap() = 600;
            let c = tensor(5, &ydims, 1.0);
            let g = loss(&frozen.forward(x.as_tensor()).unwrap(), &c).backward().unwrap();
            let dx = g.get(x.as_tensor()).expect("x has a gradient");
            let x2 = Var::from_tensor(x.as_tensor()).unwrap();
            let g2 = loss(&reference(x2.as_tensor(), &dense), &c).backward().unwrap();
            let d = max_rel_diff(dx, g2.get(x2.as_tensor()).unwrap());
            assert!(d < 1e-5, "{xdims:?}: {d}");
        }
    }
}

/// Central finite differences of the loss agree with the backward (small shapes, f64 accumulation of
/// the loss through f32 ops: the loss is quadratic in x, so central differences are exact up to
/// rounding).
#[test]
fn input_gradient_matches_finite_differences() {
    let (fw, dense) = nf4(6, 9, 70);
    for frozen in [fw, FrozenWeight::dense(&dense).unwrap()] {
        let x0 = values(7, 3 * 70, 1.0);
        let c = tensor(8, &[3, 9], 1.0);
        let xv = Var::from_tensor(&Tensor::from_vec(x0.clone(), (3, 70), &Device::Cpu).unwrap()).unwrap();
        let g = loss(&frozen.forward(xv.as_tensor()).unwrap(), &c).backward().unwrap();
        let dx = g.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eval = |x: &[f32]| -> f64 {
            let x = Tensor::from_vec(x.to_vec(), (3, 70), &Device::Cpu).unwrap();
            loss(&frozen.forward(&x).unwrap(), &c).to_scalar::<f32>().unwrap() as f64
        };
        let eps = 1e-2f32;
        for i in [0usize, 5, 69, 70, 123, 209] {
            let (mut plus, mut minus) = (x0.clone(), x0.clone());
            plus[i] += eps;
            minus[i] -= eps;
            let fd = (eval(&plus) - eval(&minus)) / (2.0 * eps as f64);
            assert!((fd - dx[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()), "coordinate {i}: fd {fd} vs {}", dx[i]);
        }
    }
}

/// The dense weight never gets a gradient, even when it is a `Var` handed over as is: the control
/// (plain candle matmul) does produce one, so this test would fail if the op computed it. No tensor of
/// the weight's shape appears in the GradStore at all.
#[test]
fn frozen_weight_gets_no_gradient_even_as_a_var() {
    let (out, inp) = (48, 80);
    let w = Var::from_tensor(&tensor(9, &[out, inp], 0.1)).unwrap();
    let x = Var::from_tensor(&tensor(10, &[2, 5, inp], 1.0)).unwrap();
    let c = tensor(11, &[2, 5, out], 1.0);

    let control = loss(&reference(x.as_tensor(), w.as_tensor()), &c).backward().unwrap();
    assert!(control.get(w.as_tensor()).is_some(), "candle's matmul computes the frozen weight's gradient");

    let (nf4_w, _) = nf4(12, out, inp);
    for frozen in [FrozenWeight::Dense(w.as_tensor().clone()), nf4_w] {
        let grads = loss(&frozen.forward(x.as_tensor()).unwrap(), &c).backward().unwrap();
        assert!(grads.get(w.as_tensor()).is_none(), "the frozen weight got a gradient");
        assert!(grads.get(x.as_tensor()).is_some());
        for id in grads.get_ids() {
            let g = grads.get_id(*id).unwrap();
            assert_ne!(g.dims(), &[out, inp], "a weight-sized gradient was computed");
        }
        assert_eq!(frozen.dims().unwrap(), (out, inp));
    }
}

/// bf16 activations: converted to f32 for the NF4 product and back; the gradient comes back in bf16.
#[test]
fn bf16_activations() {
    let (fw, dense) = nf4(13, 32, 64);
    let x32 = tensor(14, &[4, 64], 1.0);
    let x = Var::from_tensor(&x32.to_dtype(DType::BF16).unwrap()).unwrap();
    let y = fw.forward(x.as_tensor()).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let want = reference(&x.as_tensor().to_dtype(DType::F32).unwrap(), &dense);
    assert!(max_rel_diff(&y.to_dtype(DType::F32).unwrap(), &want) < 1e-2);
    let grads = y.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(x.as_tensor()).unwrap();
    assert_eq!(dx.dtype(), DType::BF16);
    let want_dx = dense.sum_keepdim(0).unwrap().broadcast_as((4, 64)).unwrap();
    assert!(max_rel_diff(&dx.to_dtype(DType::F32).unwrap(), &want_dx) < 1e-2);
}

/// Shape errors are reported, not panics.
#[test]
fn mismatched_input_is_an_error() {
    let (fw, _) = nf4(15, 8, 64);
    assert!(fw.forward(&tensor(16, &[3, 65], 1.0)).is_err());
    assert!(FrozenWeight::dense(&tensor(17, &[2, 3, 4], 1.0)).is_err());
    let w3 = Nf4Weight::quantize(&values(18, 128, 1.0), &[2, 1, 64], true).unwrap();
    assert!(FrozenWeight::nf4(w3).is_err());
    assert_eq!(fw.in_features(), 64);
    assert_eq!(fw.out_features(), 8);
    let FrozenWeight::Nf4(w) = &fw else { unreachable!() };
    assert!(fw.memory_bytes() == w.memory_bytes() && Arc::strong_count(w) >= 1);
}
