//! What a training step holds at its peak, part by part, and the activation budget that fits in what is
//! really free once the model is loaded.
//!
//! The parts: the loaded model (measured: the process's resident memory after loading), the trainable state
//! (LoRA weights, the step's accumulated gradients, one micro-batch's gradients, AdamW's two moments: all
//! f32), the checkpointed layer inputs (one `[tokens, hidden]` per layer), the activations of the layers
//! that keep theirs (both in the model's activation dtype: a bf16 model keeps half the bytes of an f32
//! one), and the working set of the layer being recomputed and back-propagated plus the loss's logits
//! block and the products' scratch tiles.

use candle_core::DType;

use crate::model::{Model, ModelConfig};

/// Rows of logits the fused lm_head + cross-entropy computes at once.
const LOSS_BLOCK_ROWS: u64 = crate::kernels::linear_cross_entropy::BLOCK as u64;

/// Bytes of the f32 scratch tile a compact weight is expanded into (see [`crate::quant::tiled_matmul`]).
const TILE_BYTES: u64 = (crate::quant::tiled_matmul::TILE_FLOATS * 4) as u64;

/// A step's memory at its peak, by part (bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepMemory {
    /// The process after loading: model weights, tokenizer, data, code.
    pub loaded: u64,
    /// LoRA weights, accumulated and per-micro-batch gradients, AdamW moments (f32).
    pub trainable: u64,
    /// The checkpointed layer inputs (all layers), in the activation dtype.
    pub layer_inputs: u64,
    /// Activations of the layers that keep theirs (with checkpointing: the last `kept_layers`).
    pub kept_activations: u64,
    /// One layer's recompute and backward, the kernels' f32 copies of 16-bit activations, the loss's
    /// logits block, scratch tiles.
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

/// Estimated bytes of the activations one decoder layer keeps for its backward, for `tokens` tokens of
/// activations stored in `dtype` (the kernels compute in f32 but keep their inputs and results in the
/// activations' dtype): the attention's normed input, queries, keys and values after RoPE and its output;
/// the residual after attention and the feed-forward's normed input; the gate, up and gated product (per
/// visited expert with MoE, with the expert's gathered input, plus the router logits). A 20% margin covers
/// per-row statistics (f32), LoRA dropout bitmasks (one bit per adapted input value), masks and allocator
/// rounding (measured against peak RSS by `cargo bench --bench real_shapes`).
pub fn layer_activation_bytes(config: &ModelConfig, tokens: usize, dtype: DType) -> u64 {
    let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
    let q = (config.num_heads * config.head_dim) as u64;
    let kv = (config.num_kv_heads * config.head_dim) as u64;
    let attention = 3 * h + 2 * q + 2 * kv;
    let feed_forward = match &config.moe {
        Some(moe) => moe.experts_per_token as u64 * (h + 3 * i) + moe.num_experts as u64,
        None => 3 * i,
    };
    (attention + feed_forward) * dtype.size_in_bytes() as u64 * tokens as u64 * 6 / 5
}

/// What a training configuration needs.
#[derive(Debug, Clone, Copy)]
pub struct StepShape<'a> {
    /// The model's configuration.
    pub config: &'a ModelConfig,
    /// Tokens per micro-batch.
    pub tokens: usize,
    /// The activations' (and the stored dense weights') dtype.
    pub dtype: DType,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Per-layer gradient checkpointing.
    pub checkpointing: bool,
}

impl<'a> StepShape<'a> {
    /// The shape of a step of `tokens` tokens per micro-batch on `model`.
    pub fn for_model(model: &'a Model, tokens: usize, trainable_parameters: usize, checkpointing: bool) -> Self {
        StepShape { config: &model.config, tokens, dtype: model.dtype, trainable_parameters, checkpointing }
    }

    /// Estimated activations one layer keeps (see [`layer_activation_bytes`]).
    pub fn per_layer(&self) -> u64 {
        layer_activation_bytes(self.config, self.tokens, self.dtype)
    }

    /// The step's memory when the last `kept_layers` layers keep their activations (all of them without
    /// checkpointing), on top of `loaded` bytes already resident.
    pub fn memory(&self, loaded: u64, kept_layers: usize) -> StepMemory {
        let c = self.config;
        let tokens = self.tokens as u64;
        let layers = c.num_layers;
        let per_layer = self.per_layer();
        let kept_layers = if self.checkpointing { kept_layers.min(layers) } else { layers };
        let hidden = c.hidden_size as u64;
        let layer_inputs =
            if self.checkpointing { layers as u64 * tokens * hidden * self.dtype.size_in_bytes() as u64 } else { 0 };
        // Weights, the step's accumulated gradients, one micro-batch's gradients, two AdamW moments.
        let trainable = 5 * 4 * self.trainable_parameters as u64;
        // The loss: one block of logits (f32), the labelled rows' hidden states and their gradient.
        let loss = LOSS_BLOCK_ROWS.min(tokens) * c.vocab_size as u64 * 4 + 2 * tokens * hidden * 4;
        // A recomputed layer's activations and one and a half times as much for its backward's gradients and
        // temporaries; when nothing is recomputed, the backward's gradients of one layer (fitted to the peaks
        // `cargo bench --bench real_shapes` measures: Mistral-7B full depth at 512 and 2048 tokens, Mixtral and
        // Nemo cuts, f32 and bf16, all within 15%).
        let recompute = if self.checkpointing && kept_layers < layers { per_layer * 5 / 2 } else { per_layer };
        // 16-bit activations: the kernel running at the peak holds f32 copies of its operands and results
        // (input, output and their gradients) next to the 16-bit tensors, the largest `[tokens, intermediate]`.
        let widest = c.hidden_size.max(c.intermediate_size).max(c.num_heads * c.head_dim) as u64;
        let conversions = if self.dtype == DType::F32 { 0 } else { 4 * tokens * widest * 4 };
        StepMemory {
            loaded,
            trainable,
            layer_inputs,
            kept_activations: kept_layers as u64 * per_layer,
            working: recompute + conversions + loss + TILE_BYTES,
            kept_layers,
            layers,
            per_layer,
        }
    }

    /// How many of the last layers keep their activations within `budget` bytes.
    pub fn layers_within(&self, budget: u64) -> usize {
        let per_layer = self.per_layer().max(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mistral_7b() -> ModelConfig {
        let j = serde_json::json!({
            "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        });
        ModelConfig::from_json_str(&j.to_string()).unwrap()
    }

    fn shape(c: &ModelConfig, tokens: usize, dtype: DType) -> StepShape<'_> {
        StepShape { config: c, tokens, dtype, trainable_parameters: 41_943_040, checkpointing: true }
    }

    #[test]
    fn a_layer_keeps_what_its_backward_reads() {
        let c = mistral_7b();
        // Per token: normed input, q, k, v, attention output, residual, normed input again, gate, up, product:
        // 3 x 4096 (hidden) + 2 x 4096 (q, output) + 2 x 1024 (k, v) + 3 x 14336 (intermediate) = 65536 f32.
        let per_token = 65536u64 * 4;
        assert_eq!(layer_activation_bytes(&c, 512, DType::F32), per_token * 512 * 6 / 5);
        // bf16 activations keep half the bytes.
        assert_eq!(layer_activation_bytes(&c, 512, DType::BF16), per_token / 2 * 512 * 6 / 5);
        assert_eq!(layer_activation_bytes(&c, 1024, DType::F32), 2 * per_token * 512 * 6 / 5);
    }

    #[test]
    fn the_peak_is_the_sum_of_its_parts() {
        let c = mistral_7b();
        let s = shape(&c, 2048, DType::BF16);
        let m = s.memory(4 << 30, 0);
        assert_eq!(m.total(), m.loaded + m.trainable + m.layer_inputs + m.kept_activations + m.working);
        assert_eq!(m.kept_activations, 0);
        // LoRA weights, accumulated and per-micro-batch gradients and two AdamW moments, f32.
        assert_eq!(m.trainable, 41_943_040 * 4 * 5);
        // One bf16 [2048, 4096] input per layer.
        assert_eq!(m.layer_inputs, 32 * 2048 * 4096 * 2);
        assert_eq!(shape(&c, 2048, DType::F32).memory(0, 0).layer_inputs, 2 * m.layer_inputs);
        let kept = s.memory(4 << 30, 5);
        assert_eq!(kept.kept_activations, 5 * s.per_layer());
        // Keeping every layer recomputes none: one layer's backward instead of a recompute.
        assert!(s.memory(0, 32).working < m.working);
    }

    #[test]
    fn the_default_budget_keeps_a_margin_and_never_goes_negative() {
        let c = mistral_7b();
        let s = shape(&c, 2048, DType::BF16);
        let fixed = s.memory(0, 0).fixed();
        let available = 20u64 << 30;
        assert_eq!(s.default_budget(available), (available - fixed - available / 10) / 2);
        // Below 10 GiB available the margin is at least 1 GiB.
        let small = fixed + (3 << 30);
        assert_eq!(s.default_budget(small), (small - fixed - (1 << 30)) / 2);
        assert_eq!(s.default_budget(fixed / 2), 0);
        assert_eq!(s.layers_within(s.per_layer() * 3 + 1), 3);
        assert_eq!(s.layers_within(u64::MAX), 32);
    }
}
