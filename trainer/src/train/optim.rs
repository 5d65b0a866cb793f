//! AdamW with decoupled weight decay, following `torch.optim.AdamW`'s update order exactly, with
//! state that can be saved and restored (exact resume).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// AdamW over a fixed list of tensors.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    exp_avg: Vec<Vec<f32>>,
    exp_avg_sq: Vec<Vec<f32>>,
}

impl AdamW {
    /// Fresh state for tensors with these element counts.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Self {
        AdamW {
            config,
            step: 0,
            exp_avg: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            exp_avg_sq: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The moments of tensor `i` (`exp_avg`, `exp_avg_sq`).
    pub fn moments(&self, i: usize) -> (&[f32], &[f32]) {
        (&self.exp_avg[i], &self.exp_avg_sq[i])
    }

    /// Applies one update with learning rate `lr`; tensors without a gradient are left alone
    /// (their moments too, as PyTorch does).
    pub fn step(&mut self, params: &[&Var], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if params.len() != self.exp_avg.len() || grads.len() != params.len() {
            candle_core::bail!("AdamW: state for {} tensors, got {} params", self.exp_avg.len(), params.len());
        }
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let step_size = (lr / bias1) as f32;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let bias2_sqrt = bias2_sqrt as f32;
        for (i, (var, grad)) in params.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            let g: Vec<f32> = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut p: Vec<f32> = var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let (m, v) = (&mut self.exp_avg[i], &mut self.exp_avg_sq[i]);
            for j in 0..p.len() {
                p[j] *= decay;
                m[j] += (g[j] - m[j]) * (1.0 - b1);
                v[j] = v[j] * b2 + g[j] * g[j] * (1.0 - b2);
                let denom = v[j].sqrt() / bias2_sqrt + eps;
                p[j] -= step_size * m[j] / denom;
            }
            let t = Tensor::from_vec(p, var.shape(), var.device())?.to_dtype(var.dtype())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The state as named tensors (`exp_avg.i`, `exp_avg_sq.i`, `step`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (m, v)) in self.exp_avg.iter().zip(&self.exp_avg_sq).enumerate() {
            out.insert(format!("exp_avg.{i}"), Tensor::from_slice(m, m.len(), &Device::Cpu)?);
            out.insert(format!("exp_avg_sq.{i}"), Tensor::from_slice(v, v.len(), &Device::Cpu)?);
        }
        out.insert("step".into(), Tensor::from_slice(&[self.step as i64], 1, &Device::Cpu)?);
        Ok(out)
    }

    /// Restores state saved by [`AdamW::state_tensors`]; the sizes must match.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| state.get(k).ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks `{k}`")));
        for i in 0..self.exp_avg.len() {
            let m: Vec<f32> = get(&format!("exp_avg.{i}"))?.to_vec1()?;
            let v: Vec<f32> = get(&format!("exp_avg_sq.{i}"))?.to_vec1()?;
            if m.len() != self.exp_avg[i].len() || v.len() != m.len() {
                candle_core::bail!(
                    "optimizer state tensor {i} has {} values, expected {}",
                    m.len(),
                    self.exp_avg[i].len()
                );
            }
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        self.step = get("step")?.to_vec1::<i64>()?.first().copied().unwrap_or(0) as u64;
        Ok(())
    }
}
