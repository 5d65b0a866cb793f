//! A bias-free linear layer `y = x W^T` over the last dimension, optionally with a LoRA update.
//!
//! The base weight is either frozen — dense or NF4, through [`FrozenWeight`], which never computes
//! or stores a gradient for it — or trainable (a `Var`'s tensor, plain matmul).

use candle_core::{Result, Tensor};

use crate::kernels::matmul;
use crate::lora::LoraAdapter;
use crate::quant::FrozenWeight;

/// The base weight of a linear layer.
#[derive(Debug, Clone)]
enum LinearBase {
    /// A frozen weight: gradients reach the input only.
    Frozen(FrozenWeight),
    /// A trainable `[out, in]` weight (a `Var`'s tensor).
    Trainable(Tensor),
}

/// A linear layer with weight `[out, in]` (the Hugging Face layout).
#[derive(Debug, Clone)]
pub struct Linear {
    base: LinearBase,
    /// The LoRA update added to this layer's output, if any.
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Wraps a dense `[out, in]` weight: trainable when it is a `Var`'s tensor, frozen otherwise.
    pub fn new(weight: Tensor) -> Self {
        let base = if weight.is_variable() {
            LinearBase::Trainable(weight)
        } else {
            match FrozenWeight::dense(&weight) {
                Ok(frozen) => LinearBase::Frozen(frozen),
                Err(_) => LinearBase::Trainable(weight),
            }
        };
        Linear { base, lora: None }
    }

    /// A layer over a frozen weight (dense or NF4).
    pub fn frozen(weight: FrozenWeight) -> Self {
        Linear { base: LinearBase::Frozen(weight), lora: None }
    }

    /// The base weight as a dense tensor on its own device (NF4 dequantized to f32, on the host, where NF4 codes
    /// live).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.base {
            LinearBase::Frozen(FrozenWeight::Dense(w)) => Ok(w.detach()),
            // NF4 codes are host bytes (`Nf4Weight`): they dequantize where they are.
            LinearBase::Frozen(w) => w.to_dense(&candle_core::Device::Cpu),
            LinearBase::Trainable(w) => Ok(w.clone()),
        }
    }

    /// The frozen base weight when the layer is exactly that (frozen and without LoRA).
    pub fn frozen_only(&self) -> Option<&FrozenWeight> {
        match (&self.base, &self.lora) {
            (LinearBase::Frozen(w), None) => Some(w),
            _ => None,
        }
    }

    /// Replaces the base weight by a dense tensor (a `Var`'s tensor makes it trainable).
    pub fn set_weight(&mut self, weight: Tensor) {
        self.base = Linear::new(weight).base;
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        match &self.base {
            LinearBase::Frozen(w) => (w.out_features(), w.in_features()),
            LinearBase::Trainable(w) => {
                let d = w.dims();
                (d[0], d[1])
            }
        }
    }

    /// Bytes held by the base weight.
    pub fn memory_bytes(&self) -> usize {
        match &self.base {
            LinearBase::Frozen(w) => w.memory_bytes(),
            LinearBase::Trainable(w) => w.elem_count() * w.dtype().size_in_bytes(),
        }
    }

    /// Applies the layer to `x` of shape `[..., in]`, giving `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The fused ops take `[..., in]` as it is: no reshape nodes (each would cost the backward a
        // gradient copy of the activation).
        // A switched-off adapter (the reference pass of preference tuning) leaves the base layer alone.
        let lora = self.lora.as_ref().filter(|l| l.enabled());
        let fused = match (&self.base, lora) {
            (LinearBase::Frozen(w), Some(lora)) => lora.forward_with_base(w, x)?,
            (LinearBase::Frozen(w), None) => Some(w.forward(x)?),
            _ => None,
        };
        if let Some(y) = fused {
            return Ok(y);
        }
        let dims = x.dims();
        let in_features = dims[dims.len() - 1];
        let rows = x.elem_count() / in_features;
        let x2 = x.reshape((rows, in_features))?;
        let y = match &self.base {
            LinearBase::Frozen(w) => w.forward(&x2)?,
            // A trainable weight keeps its own dtype (f32 master weights); the conversion to the
            // input's is differentiable.
            LinearBase::Trainable(w) => matmul(&x2, &w.to_dtype(x2.dtype())?.t()?)?,
        };
        let y = match lora {
            Some(lora) => (y + lora.delta(&x2)?)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = y.dim(1)?;
        y.reshape(out_dims)
    }
}
