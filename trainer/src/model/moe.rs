//! Mixtral's sparse mixture of experts with differentiable top-k routing (HF semantics):
//! router softmax in f32, top-k of the probabilities, the kept k renormalized to sum to one,
//! tokens dispatched to experts with `index_select` and gathered back with `index_add`.
//! Gradients reach the router and the hidden state through the kept probabilities; the chosen
//! indices carry none.

use candle_core::{DType, Result, Tensor, D};

use super::linear::Linear;
use super::mlp::Mlp;

/// The sparse MoE block of a Mixtral layer.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    /// Router `[experts, hidden]`.
    pub router: Linear,
    /// The experts' feed-forward networks.
    pub experts: Vec<Mlp>,
    top_k: usize,
}

/// The chosen experts of every token.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `[tokens * k]` expert index of each slot, row-major.
    pub experts: Vec<u32>,
    /// Slots per token.
    pub k: usize,
}

impl Routing {
    /// Top-k (descending probability, lower index first on ties) of each row of `probs` `[n, e]`.
    pub fn top_k(probs: &Tensor, k: usize) -> Result<Self> {
        let rows: Vec<Vec<f32>> = probs.to_vec2()?;
        let mut experts = Vec::with_capacity(rows.len() * k);
        let mut order: Vec<u32> = Vec::new();
        for row in &rows {
            order.clear();
            order.extend(0..row.len() as u32);
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            experts.extend_from_slice(&order[..k]);
        }
        Ok(Routing { experts, k })
    }

    /// For expert `e`: the tokens routed to it and the flat slot index (`token * k + slot`) of each.
    pub fn assignments(&self, e: u32) -> (Vec<u32>, Vec<u32>) {
        let mut tokens = Vec::new();
        let mut slots = Vec::new();
        for (i, &chosen) in self.experts.iter().enumerate() {
            if chosen == e {
                tokens.push((i / self.k) as u32);
                slots.push(i as u32);
            }
        }
        (tokens, slots)
    }
}

impl SparseMoe {
    /// Assembles the block.
    pub fn new(router: Linear, experts: Vec<Mlp>, top_k: usize) -> Self {
        SparseMoe { router, experts, top_k }
    }

    /// Applies the block to `x` `[b, t, hidden]`; returns the output and the router logits
    /// `[b * t, experts]` (needed for the load-balancing loss).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, h) = x.dims3()?;
        let xf = x.reshape((b * t, h))?;
        let logits = self.router.forward(&xf)?;
        let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let routing = Routing::top_k(&probs, self.top_k)?;
        let chosen = Tensor::from_vec(routing.experts.clone(), (b * t, self.top_k), x.device())?;
        let kept = probs.gather(&chosen, 1)?;
        let weights = kept.broadcast_div(&kept.sum_keepdim(1)?)?.to_dtype(x.dtype())?.flatten_all()?;
        let mut out = xf.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            let (tokens, slots) = routing.assignments(e as u32);
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let tokens = Tensor::from_vec(tokens, n, x.device())?;
            let slots = Tensor::from_vec(slots, n, x.device())?;
            let y = expert.forward(&xf.index_select(&tokens, 0)?)?;
            let w = weights.index_select(&slots, 0)?.unsqueeze(1)?;
            out = out.index_add(&tokens, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok((out.reshape((b, t, h))?, logits))
    }
}
