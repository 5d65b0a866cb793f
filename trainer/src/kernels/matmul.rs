//! A differentiable 2-D f32 matrix product on the CPU through [`super::sgemm`] (any strides, so
//! transposed views cost no copy). Used for the small trainable products (LoRA, trainable weights) so
//! they run on the same threads as everything else instead of waking a second pool.

use super::sgemm::sgemm;
use super::storage::{matrix_f32, output_f32};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// `a [m, k] b [k, n] -> [m, n]`; gradients `dA = dC B^T`, `dB = A^T dC`.
#[derive(Debug, Clone, Copy)]
pub struct MatMul;

/// The product of two 2-D tensors: the fast path for f32 on the CPU, candle's matmul otherwise.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dtype() == DType::F32 && b.dtype() == DType::F32 && a.device().is_cpu() && a.rank() == 2 && b.rank() == 2 {
        a.apply_op2(b, MatMul)
    } else {
        a.matmul(b)
    }
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (matrix_f32(s1, l1, "matmul")?, matrix_f32(s2, l2, "matmul")?);
        // Overwritten by the product (accumulate = false).
        let mut out = output_f32(a.rows * b.cols);
        sgemm(a, b, &mut out, b.cols, false).map_err(candle_core::Error::Msg)?;
        Ok((CpuStorage::F32(out), Shape::from((a.rows, b.cols))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let da = grad.apply_op2_no_bwd(&b.t()?, &MatMul)?;
        let db = a.t()?.apply_op2_no_bwd(grad, &MatMul)?;
        Ok((Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn product_and_gradients_equal_candles_matmul() {
        let dev = Device::Cpu;
        let vals =
            |n: usize, s: usize| -> Vec<f32> { (0..n).map(|i| ((i * 31 + s) % 97) as f32 / 48.0 - 1.0).collect() };
        for (m, k, n) in [(3, 5, 2), (70, 40, 8), (200, 64, 33)] {
            let a = Var::from_vec(vals(m * k, 1), (m, k), &dev).unwrap();
            // b is used transposed, as LoRA does.
            let b = Var::from_vec(vals(n * k, 2), (n, k), &dev).unwrap();
            let w = Tensor::from_vec(vals(m * n, 3), (m, n), &dev).unwrap();
            let ours = matmul(a.as_tensor(), &b.as_tensor().t().unwrap()).unwrap();
            let theirs = a.as_tensor().matmul(&b.as_tensor().t().unwrap()).unwrap();
            let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let close = |x: &Tensor, y: &Tensor| {
                let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-4, "{m}x{k}x{n}: differs by {d}");
            };
            close(&ours, &theirs);
            close(g1.get(a.as_tensor()).unwrap(), g2.get(a.as_tensor()).unwrap());
            close(g1.get(b.as_tensor()).unwrap(), g2.get(b.as_tensor()).unwrap());
        }
    }
}
