//! The lm_head and the cross-entropy fused, for a frozen lm_head: `nll[i] = logsumexp(h[i] W^T) -
//! (h[i] W^T)[target[i]]`, computed a block of rows at a time, with the gradient with respect to `h`
//! (`(softmax - onehot) W`) computed in the same pass and kept (it is `[n, hidden]`, small) for the
//! backward, which only scales it by each row's incoming gradient.
//!
//! The `[n, vocab]` logits never exist at once (a `[BLOCK, vocab]` block does), neither does their
//! gradient; the backward recomputes nothing. This is what bounds a training step's memory at large
//! vocabularies (32000 x 1024 tokens of f32 logits are 131 MB, and the composed path holds several such).

use super::parallel::for_rows_mut;
use super::storage::{contiguous_values, is_cpu_activation, tensor_in};
use super::vmath;
use crate::quant::FrozenWeight;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// Rows of logits computed at once.
pub const BLOCK: usize = 256;

/// The fused op over hidden states `[n, hidden]` on the CPU (f32, bf16 or f16, read as f32; the losses
/// are f32, the gradient of the hidden states in their dtype).
#[derive(Debug)]
pub struct LinearCrossEntropy {
    weight: FrozenWeight,
    targets: Arc<Vec<u32>>,
    /// `d nll[i] / d h[i]` for every row, from the forward.
    grad: Mutex<Vec<f32>>,
}

impl LinearCrossEntropy {
    /// Per-row negative log-likelihoods of `weight`'s logits of `hidden` `[n, in]` at `targets`;
    /// `None` when the fused path does not apply (hidden states not f32/bf16/f16 on the CPU, or a weight
    /// the CPU products do not take).
    pub fn nll(hidden: &Tensor, weight: &FrozenWeight, targets: &[u32]) -> candle_core::Result<Option<Tensor>> {
        if !is_cpu_activation(hidden) || hidden.rank() != 2 {
            return Ok(None);
        }
        if !weight.has_cpu_products() {
            return Ok(None);
        }
        let op = LinearCrossEntropy {
            weight: weight.clone(),
            targets: Arc::new(targets.to_vec()),
            grad: Mutex::new(Vec::new()),
        };
        hidden.contiguous()?.apply_op1_arc(Arc::new(Box::new(op))).map(Some)
    }
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = contiguous_values(storage, layout, self.name())?;
        let h = &h[..];
        let &[n, hidden] = layout.dims() else {
            bail!("linear-cross-entropy: [n, hidden] expected, found {:?}", layout.dims())
        };
        let (vocab, w_in) = self.weight.dims()?;
        if w_in != hidden || n != self.targets.len() {
            bail!(
                "linear-cross-entropy: {n} rows of {hidden} for a [{vocab}, {w_in}] weight and {} targets",
                self.targets.len()
            )
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("linear-cross-entropy: target {t} outside the vocabulary (0..{vocab})")
        }
        let msg = |e: crate::Error| candle_core::Error::Msg(e.to_string());
        let mut nll = vec![0f32; n];
        let mut grad = vec![0f32; n * hidden];
        // Each block is overwritten by its product before it is read.
        let mut logits = super::storage::output_f32(BLOCK.min(n) * vocab);
        for r0 in (0..n).step_by(BLOCK) {
            let r1 = (r0 + BLOCK).min(n);
            let block = &mut logits[..(r1 - r0) * vocab];
            self.weight.forward_f32(&h[r0 * hidden..r1 * hidden], r1 - r0, block).map_err(msg)?;
            let nll_block = &mut nll[r0..r1];
            let nll_ptr = super::parallel::SharedMut(nll_block.as_mut_ptr());
            // Each row becomes softmax - onehot in place; its loss goes to nll.
            for_rows_mut(block, vocab, |i, row| {
                let target = self.targets[r0 + i] as usize;
                let m = vmath::max(row);
                let sum = vmath::sum_exp(row, m);
                let loss = m + sum.ln() - row[target];
                vmath::scaled_exp_in_place(row, m, 1.0 / sum);
                row[target] -= 1.0;
                // SAFETY: row i of this block writes only its own loss.
                unsafe { *nll_ptr.ptr().add(i) = loss };
            });
            self.weight.input_grad_f32(block, r1 - r0, &mut grad[r0 * hidden..r1 * hidden]).map_err(msg)?;
        }
        *self.grad.lock().map_err(|_| candle_core::Error::Msg("linear-cross-entropy: poisoned lock".into()))? = grad;
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, hidden: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, h) = hidden.dims2()?;
        let scale = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let kept =
            self.grad.lock().map_err(|_| candle_core::Error::Msg("linear-cross-entropy: poisoned lock".into()))?;
        if kept.len() != n * h || scale.len() != n {
            bail!("linear-cross-entropy: backward without a matching forward")
        }
        let mut dh = vec![0f32; n * h];
        for_rows_mut(&mut dh, h, |i, row| {
            for (d, &g) in row.iter_mut().zip(&kept[i * h..(i + 1) * h]) {
                *d = scale[i] * g;
            }
        });
        tensor_in(dh, (n, h), hidden.dtype(), hidden.device()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::CrossEntropy;
    use crate::quant::{Nf4Weight, QuantizeOptions};
    use candle_core::{Device, Var};

    fn check(weight: FrozenWeight, dense: &Tensor) {
        let dev = Device::Cpu;
        let (n, hidden) = (300usize, 64usize);
        let vals: Vec<f32> = (0..n * hidden).map(|i| ((i * 7907) % 211) as f32 / 100.0 - 1.0).collect();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % dense.dim(0).unwrap() as u32).collect();
        let scale = Tensor::from_vec((0..n).map(|i| 0.5 + (i % 3) as f32).collect::<Vec<_>>(), n, &dev).unwrap();

        let h1 = Var::from_vec(vals.clone(), (n, hidden), &dev).unwrap();
        let fused = LinearCrossEntropy::nll(h1.as_tensor(), &weight, &targets).unwrap().unwrap();
        let g1 = (&fused * &scale).unwrap().sum_all().unwrap().backward().unwrap();

        let h2 = Var::from_vec(vals, (n, hidden), &dev).unwrap();
        let logits = h2.as_tensor().matmul(&dense.t().unwrap()).unwrap();
        let composed = CrossEntropy::nll(&logits, &targets).unwrap();
        let g2 = (&composed * &scale).unwrap().sum_all().unwrap().backward().unwrap();

        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&fused, &composed) < 2e-5, "nll differs by {}", diff(&fused, &composed));
        let (a, b) = (g1.get(h1.as_tensor()).unwrap(), g2.get(h2.as_tensor()).unwrap());
        assert!(diff(a, b) < 1e-5, "gradient differs by {}", diff(a, b));
    }

    #[test]
    fn equals_lm_head_then_cross_entropy_for_dense_and_nf4_weights() {
        let dev = Device::Cpu;
        let (vocab, hidden) = (1000usize, 64usize);
        let w: Vec<f32> = (0..vocab * hidden).map(|i| ((i * 104729) % 401) as f32 / 200.0 - 1.0).collect();
        let dense = Tensor::from_vec(w.clone(), (vocab, hidden), &dev).unwrap();
        check(FrozenWeight::dense(&dense).unwrap(), &dense);
        let q = Nf4Weight::quantize_with(&w, &[vocab, hidden], &QuantizeOptions::default()).unwrap();
        let dq = Tensor::from_vec(q.dequantize(), (vocab, hidden), &dev).unwrap();
        check(FrozenWeight::nf4(q).unwrap(), &dq);
    }
}
