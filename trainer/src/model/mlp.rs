//! The SwiGLU feed-forward network: `down(silu(gate(x)) * up(x))`, used as Mistral's MLP and as
//! each Mixtral expert (w1 = gate, w3 = up, w2 = down).

use candle_core::{Result, Tensor};

use super::linear::Linear;
use crate::kernels::swiglu;

/// A gated feed-forward network.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate projection `[intermediate, hidden]` (Mixtral's w1).
    pub gate_proj: Linear,
    /// Up projection `[intermediate, hidden]` (Mixtral's w3).
    pub up_proj: Linear,
    /// Down projection `[hidden, intermediate]` (Mixtral's w2).
    pub down_proj: Linear,
}

impl Mlp {
    /// Applies the network to `x` `[..., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&swiglu(&gate, &up)?)
    }
}
