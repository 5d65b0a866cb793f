//! Rotary position embeddings (the "rotate half" convention of Hugging Face Mistral), computed for
//! arbitrary per-token positions so packed documents can each restart at position 0.

use candle_core::{DType, Device, Result, Tensor, D};

/// The cos/sin tables for one forward pass, shaped `[b, 1, t, head_dim]`.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// Builds the tables for positions `[b * t]` (row-major), like HF: inverse frequencies
    /// `1 / theta^(2i/d)` in f32, angles `position * inv_freq` in f32, then cast to `dtype`.
    pub fn new(
        positions: &[u32],
        batch: usize,
        head_dim: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(positions.len() * head_dim);
        let mut sin = Vec::with_capacity(positions.len() * head_dim);
        for &p in positions {
            for _ in 0..2 {
                for &f in &inv_freq {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let t = positions.len() / batch.max(1);
        let shape = (batch, 1, t, head_dim);
        Ok(Rotary {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x` of shape `[b, heads, t, head_dim]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?
    }
}
