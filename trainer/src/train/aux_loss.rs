//! Mixtral's router load-balancing loss (Switch Transformer form, Hugging Face semantics).
//!
//! Over the rows `R` of all layers' router logits (padding excluded):
//! `aux = E * sum_e F_e * P_e`, with `F_e` the mean over rows of how many of a row's top-k
//! slots chose `e`, and `P_e` the mean over rows of the softmax probability of `e`. `F` is a
//! count (no gradient), so `aux = sum_l E / R * sum_{t,e} F_e * p[l,t,e]`: a sum of per-layer
//! terms, which is what lets each layer's recompute add its own share under checkpointing.

use candle_core::{DType, Result, Tensor, D};

use crate::model::moe::Routing;

/// What the top-k choices of all layers say, computed once per micro-batch from detached logits.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingStats {
    /// `F_e` over all layers and valid rows.
    pub slot_fraction: Vec<f32>,
    /// Per layer, the fraction of valid top-k slots that chose each expert (sums to 1).
    pub expert_load: Vec<Vec<f32>>,
    /// Number of valid rows over all layers (`R`).
    pub rows: usize,
    /// Number of experts.
    pub experts: usize,
}

impl RoutingStats {
    /// Counts the choices in each layer's router logits `[n, E]`, over rows where `valid` is true
    /// (all rows when `None`).
    pub fn new(router_logits: &[Tensor], k: usize, valid: Option<&[bool]>) -> Result<Self> {
        let experts = router_logits.first().map_or(Ok(0), |t| t.dim(1))?;
        let mut counts = vec![0f64; experts];
        let mut expert_load = Vec::with_capacity(router_logits.len());
        let mut rows = 0;
        for logits in router_logits {
            let probs = candle_nn::ops::softmax(&logits.detach().to_dtype(DType::F32)?, D::Minus1)?;
            let routing = Routing::top_k(&probs, k)?;
            let mut layer = vec![0f64; experts];
            let n = probs.dim(0)?;
            for row in 0..n {
                if valid.is_some_and(|v| !v[row]) {
                    continue;
                }
                rows += 1;
                for &e in &routing.experts[row * k..(row + 1) * k] {
                    layer[e as usize] += 1.0;
                }
            }
            let slots: f64 = layer.iter().sum();
            for (c, l) in counts.iter_mut().zip(&layer) {
                *c += l;
            }
            expert_load.push(layer.iter().map(|c| (c / slots.max(1.0)) as f32).collect());
        }
        let slot_fraction = counts.iter().map(|c| (c / rows.max(1) as f64) as f32).collect();
        Ok(RoutingStats { slot_fraction, expert_load, rows, experts })
    }

    /// One layer's share of the aux loss: `E / R * sum_{valid t, e} F_e * softmax(logits)[t, e]`.
    /// Differentiable with respect to `logits`.
    pub fn layer_term(&self, logits: &Tensor, valid_rows: Option<&Tensor>) -> Result<Tensor> {
        let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let probs = match valid_rows {
            Some(rows) => probs.index_select(rows, 0)?,
            None => probs,
        };
        let f = Tensor::from_vec(self.slot_fraction.clone(), (self.experts, 1), logits.device())?;
        let weight = self.experts as f64 / self.rows.max(1) as f64;
        probs.matmul(&f)?.sum_all()? * weight
    }
}

/// The indices of valid rows as a tensor for `index_select` (`None` when all rows are valid).
pub fn valid_row_index(valid: Option<&[bool]>, device: &candle_core::Device) -> Result<Option<Tensor>> {
    match valid {
        Some(v) if v.iter().any(|x| !x) => {
            let idx: Vec<u32> = v.iter().enumerate().filter(|(_, ok)| **ok).map(|(i, _)| i as u32).collect();
            let n = idx.len();
            Tensor::from_vec(idx, n, device).map(Some)
        }
        _ => Ok(None),
    }
}
