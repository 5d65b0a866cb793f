//! Rotary position embeddings (the "rotate half" convention of Hugging Face Mistral), computed for
//! arbitrary per-token positions so packed documents can each restart at position 0.

use candle_core::{Device, Result, Tensor, D};

use crate::kernels::{is_cpu_activation, RopeTranspose};

/// The cos/sin tables for one forward pass, shaped `[b, 1, t, head_dim]`, in f32 (cast to the
/// activations' dtype where they are used, as Hugging Face does).
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// Builds the tables for positions `[b * t]` (row-major), like HF: inverse frequencies
    /// `1 / theta^(2i/d)` in f32, angles `position * inv_freq` in f32.
    pub fn new(positions: &[u32], batch: usize, head_dim: usize, theta: f64, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        // Angles of each distinct position once (rows repeat positions: every batch row starts at 0).
        let angles = |p: u32, cos: &mut Vec<f32>, sin: &mut Vec<f32>| {
            let start = cos.len();
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
            // The second half repeats the first ("rotate half").
            cos.extend_from_within(start..start + half);
            sin.extend_from_within(start..start + half);
        };
        let mut cos = Vec::with_capacity(positions.len() * head_dim);
        let mut sin = Vec::with_capacity(positions.len() * head_dim);
        let highest = positions.iter().copied().max().unwrap_or(0) as usize;
        if highest < positions.len() {
            let (mut table_cos, mut table_sin) = (Vec::new(), Vec::new());
            for p in 0..=highest as u32 {
                angles(p, &mut table_cos, &mut table_sin);
            }
            for &p in positions {
                let at = p as usize * head_dim;
                cos.extend_from_slice(&table_cos[at..at + head_dim]);
                sin.extend_from_slice(&table_sin[at..at + head_dim]);
            }
        } else {
            for &p in positions {
                angles(p, &mut cos, &mut sin);
            }
        }
        let t = positions.len() / batch.max(1);
        let shape = (batch, 1, t, head_dim);
        Ok(Rotary { cos: Tensor::from_vec(cos, shape, device)?, sin: Tensor::from_vec(sin, shape, device)? })
    }

    /// Rotates `x` of shape `[b, t, heads, head_dim]` (a projection's output, split into heads) and
    /// returns it as `[b, heads, t, head_dim]`, in `x`'s dtype: fused for f32/bf16/f16 on the CPU
    /// (computed in f32), transpose then [`Rotary::apply`] otherwise.
    pub fn apply_to_heads(&self, x: &Tensor) -> Result<Tensor> {
        if is_cpu_activation(x) {
            let op = RopeTranspose { cos: self.cos.clone(), sin: self.sin.clone(), backward: false };
            return x.contiguous()?.apply_op1(op);
        }
        self.apply(&x.transpose(1, 2)?)
    }

    /// Rotates `x` of shape `[b, heads, t, head_dim]` (the tables cast to `x`'s dtype, as HF casts them).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let (cos, sin) = (self.cos.to_dtype(x.dtype())?, self.sin.to_dtype(x.dtype())?);
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}
