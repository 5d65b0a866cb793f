//! The Mistral/Mixtral decoder: embedding, layers (attention + dense MLP or sparse MoE), final
//! norm and lm_head. The same type serves training (full-sequence logits, document masks,
//! per-layer access for checkpointing) and inference (KV cache, last-position logits).

use candle_core::{DType, Device, Result, Tensor};

use super::attention::Attention;
use super::config::ModelConfig;
use super::kv_cache::{KvCache, LayerCache};
use super::linear::Linear;
use super::mask::MaskSpec;
use super::mlp::Mlp;
use super::moe::SparseMoe;
use super::norm::RmsNorm;
use super::rope::Rotary;

/// The feed-forward half of a layer.
#[derive(Debug, Clone)]
pub enum FeedForward {
    /// Mistral's dense MLP.
    Dense(Mlp),
    /// Mixtral's sparse mixture of experts.
    Sparse(SparseMoe),
}

/// One decoder layer: pre-norm attention and pre-norm feed-forward, each with a residual.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Self-attention.
    pub self_attn: Attention,
    /// Norm before the feed-forward block.
    pub post_attention_layernorm: RmsNorm,
    /// Dense MLP or sparse MoE.
    pub feed_forward: FeedForward,
}

/// What a layer's forward produces.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// The new residual stream `[b, t, hidden]`.
    pub hidden: Tensor,
    /// Router logits `[b * t, experts]` for MoE layers.
    pub router_logits: Option<Tensor>,
}

/// Per-forward state shared by all layers: rotary tables and the attention mask.
#[derive(Debug, Clone)]
pub struct LayerContext {
    /// RoPE tables for this pass's positions.
    pub rotary: Rotary,
    /// Additive mask, or `None` when nothing is masked.
    pub mask: Option<Tensor>,
}

impl DecoderLayer {
    /// Runs the layer on `x` `[b, t, hidden]`. Activations stay in `x`'s dtype (a bf16 model keeps bf16
    /// between and inside its layers, as Hugging Face's does); on the CPU the fused kernels compute in f32
    /// and store their results in that dtype.
    pub fn forward(&self, x: &Tensor, ctx: &LayerContext, cache: Option<&mut LayerCache>) -> Result<LayerOutput> {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(x)?, &ctx.rotary, ctx.mask.as_ref(), cache)?;
        let (hidden, router_logits) = self.feed_forward_residual(&(x + attn)?)?;
        Ok(LayerOutput { hidden, router_logits })
    }

    /// The layer's second half on the residual stream `h` after attention: `h + ffn(norm(h))`, with the
    /// router logits of an MoE layer.
    pub fn feed_forward_residual(&self, h: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let normed = self.post_attention_layernorm.forward(h)?;
        let (ff, router_logits) = match &self.feed_forward {
            FeedForward::Dense(mlp) => (mlp.forward(&normed)?, None),
            FeedForward::Sparse(moe) => {
                let (y, logits) = moe.forward(&normed)?;
                (y, Some(logits))
            }
        };
        Ok(((h + ff)?, router_logits))
    }
}

/// The token layout of one forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Layout<'a> {
    /// Per-token positions `[b * t]`; default: consecutive from the cache's position.
    pub positions: Option<&'a [u32]>,
    /// Per-token document ids `[b * t]` for packed sequences (block-diagonal causal attention).
    pub documents: Option<&'a [u32]>,
    /// Per-key validity `[b * keys]` (padding is false).
    pub key_valid: Option<&'a [bool]>,
}

/// The result of running all layers.
#[derive(Debug, Clone)]
pub struct DecoderOutput {
    /// Final hidden states after the last norm, `[b, t, hidden]`.
    pub hidden: Tensor,
    /// Each MoE layer's router logits `[b * t, experts]`, in layer order (empty for dense models).
    pub router_logits: Vec<Tensor>,
}

/// A Mistral or Mixtral causal language model.
#[derive(Debug, Clone)]
pub struct Model {
    /// The validated configuration.
    pub config: ModelConfig,
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output projection `[vocab, hidden]`.
    pub lm_head: Linear,
    /// Dtype of the dense weights and of the activations (the residual stream and everything the layers
    /// keep for the backward). On the CPU the fused kernels compute in f32 whatever it is.
    pub dtype: DType,
    /// Device of the weights.
    pub device: Device,
}

impl Model {
    /// The final norm of the residual stream `h`.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        self.norm.forward(h)
    }

    /// Embeds `ids` `[b, t]` (u32) into `[b, t, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.config.hidden_size;
        self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, h))
    }

    /// Builds the rotary tables and mask of a pass over `[b, t]` tokens, given what the cache holds.
    pub fn context(&self, b: usize, t: usize, layout: Layout<'_>, cache: Option<&KvCache>) -> Result<LayerContext> {
        let q_start = cache.map_or(0, |c| c.seen());
        let default_positions: Vec<u32>;
        let positions = match layout.positions {
            Some(p) => {
                if p.len() != b * t {
                    candle_core::bail!("positions: expected {} values, got {}", b * t, p.len());
                }
                p
            }
            None => {
                default_positions = (0..b).flat_map(|_| (0..t).map(|i| (q_start + i) as u32)).collect();
                &default_positions
            }
        };
        let c = &self.config;
        let rotary = Rotary::new(positions, b, c.head_dim, c.rope_theta, &self.device)?;
        let spec = MaskSpec {
            documents: layout.documents,
            key_valid: layout.key_valid,
            ..MaskSpec::after_cache(b, t, cache, c.sliding_window)
        };
        Ok(LayerContext { rotary, mask: spec.build(&self.device)? })
    }

    /// Runs the embedding, every layer and the final norm over `ids` `[b, t]`. With a cache, the
    /// tokens continue the cached sequence and the cache is updated.
    pub fn forward(&self, ids: &Tensor, layout: Layout<'_>, mut cache: Option<&mut KvCache>) -> Result<DecoderOutput> {
        let (b, t) = ids.dims2()?;
        let ctx = self.context(b, t, layout, cache.as_deref())?;
        let mut h = self.embed(ids)?;
        let mut router_logits = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let out = layer.forward(&h, &ctx, layer_cache)?;
            h = out.hidden;
            router_logits.extend(out.router_logits);
        }
        if let Some(cache) = cache {
            cache.advance(t)?;
        }
        Ok(DecoderOutput { hidden: self.final_norm(&h)?, router_logits })
    }

    /// Logits `[..., vocab]` of final hidden states `[..., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Logits of the last position of each row, `[b, vocab]`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let t = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }
}
