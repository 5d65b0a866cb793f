//! A bias-free linear layer `y = x W^T` over the last dimension, optionally with a LoRA update.

use candle_core::{Result, Tensor};

use crate::lora::LoraAdapter;

/// A linear layer with weight `[out, in]` (the Hugging Face layout).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    /// The LoRA update added to this layer's output, if any.
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Wraps a `[out, in]` weight (a plain tensor, or a `Var`'s tensor when it is trained).
    pub fn new(weight: Tensor) -> Self {
        Linear { weight, lora: None }
    }

    /// The `[out, in]` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Replaces the weight (for example by a trainable `Var`'s tensor).
    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = weight;
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// Applies the layer to `x` of shape `[..., in]`, giving `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_features = dims[dims.len() - 1];
        let rows = x.elem_count() / in_features;
        let x2 = x.reshape((rows, in_features))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(lora) = &self.lora {
            y = (y + lora.delta(&x2)?)?;
        }
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}
