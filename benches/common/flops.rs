//! The FLOP count both benchmarks report GFLOP/s with.

use trainer::model::ModelConfig;

/// FLOPs per token of one LoRA training step (forward, backward, optimizer) on a frozen base, counted so
/// that GFLOP/s = tokens/s x this / 1e9 is the useful work done:
/// - frozen decoder matmuls, N = attention projections + the experts a token visits (top-k of E; the router
///   too, it is a matmul): forward 2N, input gradient 2N (no weight gradient: the base is frozen), and with
///   checkpointing the per-layer recompute 2N: 4N without, 6N with (counted only for the layers recomputed:
///   a checkpointed step keeps the activations of the last layers its activation budget allows);
/// - lm_head (vocab x hidden): forward + input gradient, 4 x vocab x hidden; outside the checkpointed layers,
///   so never recomputed. Counted for every token, although the last position of a sequence carries no label
///   (we skip its logits): 1/seq_len too generous;
/// - attention (QK^T and the weighted sum of V, causal, so a token sees seq_len/2 keys on average):
///   forward 4 x layers x (heads x head_dim) x seq_len/2; the backward needs gradients for both operands of
///   both products (all activations, nothing frozen), 2x the forward; recompute 1x: 3x forward without
///   checkpointing, 4x with;
/// - LoRA, P = r x (in + out) per adapted linear a token passes (all seven projections; visited experts
///   only): forward 2P, backward 4P (input and weight gradients), recompute 2P: 6P without, 8P with.
///
/// Not counted (no matmuls, or negligible): the embedding gather, norms, RoPE, activations, softmax and loss,
/// gradient clipping and AdamW. The bench's tokens are the batch's input tokens (batch x seq_len).
pub fn lora_step_flops_per_token(config: &ModelConfig, seq_len: usize, rank: usize, recomputed_layers: usize) -> f64 {
    let (h, i) = (config.hidden_size as f64, config.intermediate_size as f64);
    let q = (config.num_heads * config.head_dim) as f64;
    let kv = (config.num_kv_heads * config.head_dim) as f64;
    let (experts_visited, router) = match &config.moe {
        Some(m) => (m.experts_per_token as f64, (m.num_experts as f64) * h),
        None => (1.0, 0.0),
    };
    let layers = config.num_layers as f64;
    let attention_params = 2.0 * h * q + 2.0 * h * kv;
    let n = layers * (attention_params + experts_visited * 3.0 * h * i + router);
    let lm_head = config.vocab_size as f64 * h;
    let attention_fwd = 4.0 * layers * q * seq_len as f64 / 2.0;
    let r = rank as f64;
    let lora = layers * r * ((h + q) * 2.0 + (h + kv) * 2.0 + experts_visited * 3.0 * (h + i));
    // The share of the layers a checkpointed step recomputes (kept layers are not).
    let recomputed = recomputed_layers.min(config.num_layers) as f64 / layers.max(1.0);
    let (frozen, attn, lora_x) = (4.0 + 2.0 * recomputed, 3.0 + recomputed, 6.0 + 2.0 * recomputed);
    frozen * n + 4.0 * lm_head + attn * attention_fwd + lora_x * lora
}
