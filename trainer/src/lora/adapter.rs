//! One LoRA adapter: `delta(x) = scale * B (A dropout(x))`, A `[r, in]`, B `[out, r]` (PEFT's).
//!
//! Dropout masks are drawn from a counter-based seed (the run's per-micro-batch seed mixed with
//! the adapter's id), so the recompute of a checkpointed layer sees the same mask as its forward
//! and a resumed run draws the same masks as an uninterrupted one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

use crate::infer::Rng;
use crate::kernels::lora_linear::LoraLinear;
use crate::kernels::{matmul, DropoutMask};
use crate::quant::FrozenWeight;

/// Shared switches of every adapter of a model: dropout (on/off and its seed) and whether the adapters
/// apply at all (off = the base model, which preference tuning uses as its reference model).
#[derive(Debug, Default)]
pub struct DropoutControl {
    training: AtomicBool,
    seed: AtomicU64,
    bypassed: AtomicBool,
}

impl DropoutControl {
    /// Turns dropout on with masks derived from `seed` (call once per micro-batch).
    pub fn train_with_seed(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
        self.training.store(true, Ordering::Relaxed);
    }

    /// Turns dropout off (evaluation, generation).
    pub fn eval(&self) {
        self.training.store(false, Ordering::Relaxed);
    }

    /// Switches every adapter off (`false`: layers compute with their base weights only) or back on.
    pub fn set_adapters_enabled(&self, enabled: bool) {
        self.bypassed.store(!enabled, Ordering::Relaxed);
    }

    /// Whether the adapters apply (the default).
    pub fn adapters_enabled(&self) -> bool {
        !self.bypassed.load(Ordering::Relaxed)
    }

    /// The dropout seed while training with dropout masks (`None` after [`DropoutControl::eval`]): what a pass
    /// that must run without dropout saves before calling `eval` and restores with `train_with_seed`.
    pub fn training_seed(&self) -> Option<u64> {
        self.seed_if_training()
    }

    fn seed_if_training(&self) -> Option<u64> {
        self.training.load(Ordering::Relaxed).then(|| self.seed.load(Ordering::Relaxed))
    }
}

/// A trainable low-rank update of a frozen linear layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Down projection `[r, in]`.
    pub a: Var,
    /// Up projection `[out, r]`.
    pub b: Var,
    /// Multiplier of `B A x`.
    pub scale: f64,
    dropout: f64,
    id: u64,
    control: Arc<DropoutControl>,
}

impl LoraAdapter {
    /// Whether this adapter applies now (see [`DropoutControl::set_adapters_enabled`]).
    pub fn enabled(&self) -> bool {
        self.control.adapters_enabled()
    }

    /// An adapter from existing A and B.
    pub fn new(a: Var, b: Var, scale: f64, dropout: f64, id: u64, control: Arc<DropoutControl>) -> Self {
        LoraAdapter { a, b, scale, dropout, id, control }
    }

    /// PEFT's default init from `rng`: A kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in),
    /// 1/sqrt(in)); B zero; both f32 on `device` (the model's).
    pub fn init_tensors(
        r: usize,
        in_features: usize,
        out_features: usize,
        rng: &mut Rng,
        device: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a: Vec<f32> = (0..r * in_features).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
        Ok((
            Tensor::from_vec(a, (r, in_features), device)?,
            Tensor::zeros((out_features, r), candle_core::DType::F32, device)?,
        ))
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// The update for `x` `[n, in]`, giving `[n, out]`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = match self.dropout_mask(x.elem_count()) {
            Some(mask) => (x * Tensor::from_vec(mask.multipliers(), x.shape(), x.device())?.to_dtype(x.dtype())?)?,
            None => x.clone(),
        };
        let h = matmul(&x.to_dtype(self.a.dtype())?, &self.a.as_tensor().t()?)?;
        (matmul(&h, &self.b.as_tensor().t()?)? * self.scale)?.to_dtype(dtype)
    }

    /// `base(x) + delta(x)` for a frozen base weight as one fused op (see
    /// [`crate::kernels::lora_linear`]); `None` where it does not apply (see [`LoraLinear::applies`]).
    pub fn forward_with_base(&self, base: &FrozenWeight, x: &Tensor) -> Result<Option<Tensor>> {
        // Checked before drawing the mask, which the composed path would otherwise draw a second time.
        if !LoraLinear::applies(x, base, self.a.as_tensor(), self.b.as_tensor()) {
            return Ok(None);
        }
        let mask = self.dropout_mask(x.elem_count());
        LoraLinear::forward(x, base, self.a.as_tensor(), self.b.as_tensor(), self.scale, mask)
    }

    /// The dropout mask (kept values scaled by 1/keep) for an input of `len` values, while training with
    /// dropout.
    fn dropout_mask(&self, len: usize) -> Option<DropoutMask> {
        let seed = self.control.seed_if_training().filter(|_| self.dropout > 0.0)?;
        let mut rng = Rng::new(seed ^ self.id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let keep = 1.0 - self.dropout;
        Some(DropoutMask::from_fn(len, (1.0 / keep) as f32, |_| rng.next_f64() < keep))
    }
}
