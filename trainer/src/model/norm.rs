//! RMSNorm exactly as Hugging Face's Mistral computes it: normalize in f32, cast back, scale.
//! On the CPU (f32, bf16 or f16 activations) it runs fused with its own backward ([`rms_norm`]); otherwise it is built from
//! differentiable ops (candle's fused `rms_norm` has no backward).

use candle_core::{DType, Result, Tensor, D};

use crate::kernels::rms_norm;

/// Root-mean-square layer normalization with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// A norm with the given `[hidden]` scale and epsilon.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// Normalizes `x` over its last dimension; the result in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = rms_norm(x, &self.weight, self.eps)? {
            return Ok(y);
        }
        // The composed path scales by the weight in the input's dtype.
        let converted;
        let weight = if self.weight.dtype() == x.dtype() {
            &self.weight
        } else {
            converted = self.weight.to_dtype(x.dtype())?;
            &converted
        };
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let variance = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (variance + self.eps)?.sqrt()?.recip()?;
        let normed = xf.broadcast_mul(&inv)?.to_dtype(dtype)?;
        normed.broadcast_mul(weight)
    }
}
