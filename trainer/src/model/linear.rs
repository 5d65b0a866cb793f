//! A bias-free linear layer `y = x W^T` over the last dimension.

use candle_core::{Result, Tensor};

/// A linear layer with weight `[out, in]` (the Hugging Face layout).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    /// Wraps a `[out, in]` weight (a plain tensor, or a `Var`'s tensor when it is trained).
    pub fn new(weight: Tensor) -> Self {
        Linear { weight }
    }

    /// The `[out, in]` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Applies the layer to `x` of shape `[..., in]`, giving `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_features = dims[dims.len() - 1];
        let rows = x.elem_count() / in_features;
        let y = x.reshape((rows, in_features))?.matmul(&self.weight.t()?)?;
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}
