//! What a training step holds at its peak, part by part, and the activation budget that fits in what is
//! really free once the model is loaded.
//!
//! The parts: the loaded model (measured: the process's resident memory after loading), the trainable state
//! (LoRA weights, the step's accumulated gradients, one micro-batch's gradients, AdamW's two moments: all
//! f32), the checkpointed layer inputs (one `[tokens, hidden]` per layer in the residual stream's dtype),
//! the activations of the layers that keep theirs (in the compute dtype), and the working set of the layer
//! being recomputed and back-propagated plus the loss's logits block and the products' scratch tiles.

use candle_core::DType;

use crate::model::ModelConfig;

/// Rows of logits the fused lm_head + cross-entropy computes at once (see
/// [`crate::kernels::LinearCrossEntropy`]).
const LOSS_BLOCK_ROWS: u64 = 256;

/// Bytes of the f32 scratch tile a compact weight is expanded into (see [`crate::quant::tiled_matmul`]).
const TILE_BYTES: u64 = (crate::quant::tiled_matmul::TILE_FLOATS * 4) as u64;

/// A step's memory at its peak, by part (bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepMemory {
    /// The process after loading: model weights, tokenizer, data, code.
    pub loaded: u64,
    /// LoRA weights, accumulated and per-micro-batch gradients, AdamW moments (f32).
    pub trainable: u64,
    /// The checkpointed layer inputs (all layers), in the residual stream's dtype.
    pub layer_inputs: u64,
    /// Activations of the layers that keep theirs (with checkpointing: the last `kept_layers`).
    pub kept_activations: u64,
    /// One layer's recompute and backward, the loss's logits block, scratch tiles.
    pub working: u64,
    /// Layers whose activations are kept.
    pub kept_layers: usize,
    /// Layers of the model.
    pub layers: usize,
    /// Estimated activations one layer keeps for its backward.
    pub per_layer: u64,
}

impl StepMemory {
    /// The predicted peak resident memory of a training step.
    pub fn total(&self) -> u64 {
        self.loaded + self.trainable + self.layer_inputs + self.kept_activations + self.working
    }

    /// Everything but the kept activations: what a step needs even when every layer is recomputed.
    pub fn fixed(&self) -> u64 {
        self.total() - self.kept_activations
    }
}

/// Estimated bytes of the activations one decoder layer keeps for its backward, for `tokens` tokens,
/// computed in `compute` (attention inputs, projections, rotated q/k, outputs and residuals; the
/// feed-forward's inputs, gate, up and product; per visited expert with MoE), with a 25% margin.
pub fn layer_activation_bytes(config: &ModelConfig, tokens: usize, compute: DType) -> u64 {
    let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
    let kv = (config.num_kv_heads * config.head_dim) as u64;
    let attention = 8 * h + 3 * kv;
    let feed_forward = match &config.moe {
        Some(moe) => moe.experts_per_token as u64 * (3 * h + 3 * i) + 2 * h,
        None => 3 * h + 3 * i,
    };
    (attention + feed_forward) * compute.size_in_bytes() as u64 * tokens as u64 * 5 / 4
}

/// What a training configuration needs.
#[derive(Debug, Clone, Copy)]
pub struct StepShape<'a> {
    /// The model's configuration.
    pub config: &'a ModelConfig,
    /// Tokens per micro-batch.
    pub tokens: usize,
    /// The residual stream's (and the stored weights') dtype.
    pub storage: DType,
    /// The dtype layers compute in.
    pub compute: DType,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Per-layer gradient checkpointing.
    pub checkpointing: bool,
}

impl StepShape<'_> {
    /// The step's memory when the last `kept_layers` layers keep their activations (all of them without
    /// checkpointing), on top of `loaded` bytes already resident.
    pub fn memory(&self, loaded: u64, kept_layers: usize) -> StepMemory {
        let c = self.config;
        let tokens = self.tokens as u64;
        let layers = c.num_layers;
        let per_layer = layer_activation_bytes(c, self.tokens, self.compute);
        let kept_layers = if self.checkpointing { kept_layers.min(layers) } else { layers };
        let hidden = c.hidden_size as u64;
        let layer_inputs =
            if self.checkpointing { layers as u64 * tokens * hidden * self.storage.size_in_bytes() as u64 } else { 0 };
        // Weights, the step's accumulated gradients, one micro-batch's gradients, two AdamW moments.
        let trainable = 5 * 4 * self.trainable_parameters as u64;
        // The loss: one block of logits (f32), the labelled rows' hidden states and their gradient.
        let loss = LOSS_BLOCK_ROWS.min(tokens) * c.vocab_size as u64 * 4 + 2 * tokens * hidden * 4;
        // A recomputed layer's activations and as much again for its backward's gradients; without
        // checkpointing the backward's gradients of the last layer.
        let recompute = if self.checkpointing && kept_layers < layers { 2 * per_layer } else { per_layer };
        StepMemory {
            loaded,
            trainable,
            layer_inputs,
            kept_activations: kept_layers as u64 * per_layer,
            working: recompute + loss + TILE_BYTES,
            kept_layers,
            layers,
            per_layer,
        }
    }

    /// How many of the last layers keep their activations within `budget` bytes.
    pub fn layers_within(&self, budget: u64) -> usize {
        let per_layer = layer_activation_bytes(self.config, self.tokens, self.compute).max(1);
        ((budget / per_layer) as usize).min(self.config.num_layers)
    }

    /// The activation budget when the recipe sets none: half of what stays available once the model is
    /// loaded and the step's fixed needs (trainable state, layer inputs, one layer's recompute, the loss)
    /// are set aside, keeping a margin of 10% of `available` (at least 1 GiB) for everything else; 0
    /// (recompute every layer) when nothing is left.
    pub fn default_budget(&self, available: u64) -> u64 {
        let fixed = self.memory(0, 0).fixed();
        let margin = (available / 10).max(1 << 30);
        available.saturating_sub(fixed).saturating_sub(margin) / 2
    }
}
