//! Gradient accumulation over micro-batches and global-norm clipping (as
//! `torch.nn.utils.clip_grad_norm_`: scale by `max_norm / (norm + 1e-6)` when that is below 1).

use candle_core::{DType, Result, Tensor};

/// Adds `more` into `acc`, tensor by tensor.
pub fn accumulate(acc: &mut [Option<Tensor>], more: Vec<Option<Tensor>>) -> Result<()> {
    for (slot, g) in acc.iter_mut().zip(more) {
        if let Some(g) = g {
            *slot = Some(match slot.take() {
                Some(prev) => (prev + g)?,
                None => g,
            });
        }
    }
    Ok(())
}

/// The global L2 norm of all gradients (f64 accumulation).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads.iter().flatten() {
        let v: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        sum += v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>();
    }
    Ok(sum.sqrt())
}

/// Clips to `max_norm` (no-op when `max_norm <= 0`); returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}
