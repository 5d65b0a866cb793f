//! Fused softmax cross-entropy over rows of logits: `nll[i] = logsumexp(x[i]) - x[i, target[i]]`, and
//! its gradient `g[i] * (softmax(x[i]) - onehot(target[i]))` in one pass per row.
//!
//! The composed version (log-softmax, gather, sum) walks the `[n, vocab]` logits about eight times
//! forward and backward and allocates as many temporaries of that size; this reads them twice forward
//! and twice backward, writing only the gradient. The backward recovers `logsumexp` from the forward's
//! result (`nll + x[target]`), so nothing is kept between the passes.

use super::parallel::for_rows_mut;
use super::vmath;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use std::sync::Arc;

/// `logits [n, vocab] (f32, CPU) -> nll [n]` with the given targets (one per row, each `< vocab`).
#[derive(Debug, Clone)]
pub struct CrossEntropy {
    /// The target class of each row.
    pub targets: Arc<Vec<u32>>,
}

impl CrossEntropy {
    /// The per-row negative log-likelihoods of `logits` `[n, vocab]` (f32 on the CPU) at `targets`.
    pub fn nll(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
        let op = CrossEntropy { targets: Arc::new(targets.to_vec()) };
        logits.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))
    }

    /// Checks the logits' storage and shape; returns `(values, vocab)`.
    fn rows<'a>(&self, storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
        let CpuStorage::F32(data) = storage else {
            bail!("cross-entropy: f32 logits expected, found {:?}", storage.dtype())
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("cross-entropy: contiguous logits expected")
        };
        let &[n, vocab] = layout.dims() else {
            bail!("cross-entropy: logits must be [n, vocab], found {:?}", layout.dims())
        };
        if n != self.targets.len() {
            bail!("cross-entropy: {n} rows of logits for {} targets", self.targets.len())
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("cross-entropy: target {t} outside the vocabulary (0..{vocab})")
        }
        Ok((&data[start..end], vocab))
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, vocab) = self.rows(storage, layout)?;
        let n = self.targets.len();
        let mut nll = vec![0f32; n];
        for_rows_mut(&mut nll, 1, |i, out| {
            let row = &x[i * vocab..(i + 1) * vocab];
            let m = vmath::max(row);
            let lse = m + vmath::sum_exp(row, m).ln();
            out[0] = lse - row[self.targets[i] as usize];
        });
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, nll: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let logits = logits.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else { bail!("cross-entropy: CPU logits expected") };
        let (x, vocab) = self.rows(storage, layout)?;
        let nll = nll.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let grad = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; x.len()];
        for_rows_mut(&mut dx, vocab, |i, out| {
            let row = &x[i * vocab..(i + 1) * vocab];
            let target = self.targets[i] as usize;
            let lse = nll[i] + row[target];
            vmath::scaled_exp(row, lse, grad[i], out);
            out[target] -= grad[i];
        });
        Tensor::from_vec(dx, layout.dims(), logits.device()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn loss_and_gradient_equal_the_composed_log_softmax() {
        let (n, vocab) = (5usize, 1000usize);
        let values: Vec<f32> = (0..n * vocab).map(|i| ((i * 7919) % 1013) as f32 / 50.0 - 10.0).collect();
        let targets: Vec<u32> = vec![0, 999, 17, 500, 3];
        let dev = Device::Cpu;
        let weights = Tensor::new(&[1.0f32, 0.5, 2.0, -1.0, 0.0], &dev).unwrap();

        let x = Var::from_tensor(&Tensor::from_vec(values.clone(), (n, vocab), &dev).unwrap()).unwrap();
        let fused = CrossEntropy::nll(x.as_tensor(), &targets).unwrap();
        let grads = (&fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let fused_grad = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();

        let y = Var::from_tensor(&Tensor::from_vec(values, (n, vocab), &dev).unwrap()).unwrap();
        let idx = Tensor::new(targets.as_slice(), &dev).unwrap().unsqueeze(1).unwrap();
        let composed = candle_nn::ops::log_softmax(y.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&idx, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let grads = (&composed * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let composed_grad = grads.get(y.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();

        for (a, b) in fused.to_vec1::<f32>().unwrap().iter().zip(composed.to_vec1::<f32>().unwrap()) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "nll {a} vs {b}");
        }
        for (i, (a, b)) in fused_grad.iter().zip(&composed_grad).enumerate() {
            assert!((a - b).abs() <= 1e-6, "gradient {i}: {a} vs {b}");
        }
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let x = Tensor::zeros((2, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(CrossEntropy::nll(&x, &[0, 4]).is_err());
        assert!(CrossEntropy::nll(&x, &[0]).is_err());
    }
}
