//! Grouped-query self-attention with RoPE, an additive mask and an optional KV cache.
//! Scores are computed per key/value group (no repeated K/V tensors are materialized) and the
//! softmax runs in f32 like HF's eager attention. On the CPU the scores, softmax and weighted
//! sum run fused ([`FusedAttention`]: no score tensor is kept for the backward).

use candle_core::{DType, Result, Tensor, D};

use super::kv_cache::LayerCache;
use super::linear::Linear;
use super::rope::Rotary;
use crate::kernels::{is_cpu_activation, FusedAttention};

/// The attention block of a decoder layer.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection `[heads * head_dim, hidden]`.
    pub q_proj: Linear,
    /// Key projection `[kv_heads * head_dim, hidden]`.
    pub k_proj: Linear,
    /// Value projection `[kv_heads * head_dim, hidden]`.
    pub v_proj: Linear,
    /// Output projection `[hidden, heads * head_dim]`.
    pub o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Assembles the block from its projections.
    pub fn new(projections: [Linear; 4], num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        let [q_proj, k_proj, v_proj, o_proj] = projections;
        Attention { q_proj, k_proj, v_proj, o_proj, num_heads, num_kv_heads, head_dim }
    }

    /// The heads of `x` `[b, t, hidden]`: queries and keys rotated, `[b, heads, t, head_dim]` and
    /// `[b, kv_heads, t, head_dim]`, values `[b, kv_heads, t, head_dim]` (keys and values contiguous, as a
    /// cache stores them).
    pub fn project(&self, x: &Tensor, rotary: &Rotary) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = rotary.apply_to_heads(&self.q_proj.forward(x)?.reshape((b, t, nh, hd))?)?;
        let k = rotary.apply_to_heads(&self.k_proj.forward(x)?.reshape((b, t, nkv, hd))?)?.contiguous()?;
        let v = self.v_proj.forward(x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        Ok((q, k, v))
    }

    /// Attends `x` `[b, t, hidden]`; `mask` is `[b|1, 1, 1, t, keys]` or `None` (nothing masked).
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, rotary)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v)?,
            None => (k, v),
        };
        let out = attend(&q, &k, &v, mask)?;
        self.o_proj.forward(&out)
    }
}

/// Scaled dot-product attention of `q` `[b, heads, t, head_dim]` (after RoPE) over keys and values
/// `[b, kv_heads, keys, head_dim]` with an additive `mask` `[b|1, 1, 1, t, keys]`, giving
/// `[b, t, heads * head_dim]` for `o_proj`. Heads `g*groups..(g+1)*groups` share key/value head `g`, as in
/// HF's `repeat_kv`; the softmax runs in f32. Fused on the CPU (f32, bf16 or f16 activations).
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let out = if is_cpu_activation(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        FusedAttention::apply(q, k, v, mask)?
    } else {
        let groups = nh / nkv;
        let q = q.contiguous()?.reshape((b, nkv, groups * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?.reshape((b, nkv, groups, t, s))?;
        let scores = scores.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(q.dtype())?;
        probs.reshape((b, nkv, groups * t, s))?.matmul(v)?.reshape((b, nh, t, hd))?
    };
    out.transpose(1, 2)?.reshape((b, t, nh * hd))
}
