//! Additive attention masks: causal, sliding window (Hugging Face semantics: query i sees key j iff
//! `0 <= i - j < window`), block-diagonal per document for packed sequences, and key padding.

use candle_core::{Device, Result, Tensor};

/// What a forward pass's queries and keys are, in absolute token indices of the row.
#[derive(Debug, Clone, Copy)]
pub struct MaskSpec<'a> {
    /// Batch size.
    pub batch: usize,
    /// Number of queries (new tokens).
    pub q_len: usize,
    /// Absolute index of the first query (tokens already in the cache).
    pub q_start: usize,
    /// Number of keys (cached plus new).
    pub kv_len: usize,
    /// Absolute index of the first key (older ones were dropped by the sliding window).
    pub k_start: usize,
    /// Sliding attention window.
    pub window: Option<usize>,
    /// Per-token document ids `[b * q_len]`: tokens attend only within their document. Only
    /// without a cache (then keys are the queries).
    pub documents: Option<&'a [u32]>,
    /// Per-key validity `[b * kv_len]` (false = padding, never attended).
    pub key_valid: Option<&'a [bool]>,
}

/// The value HF adds to forbidden scores (`torch.finfo(float32).min`).
pub const MASKED: f32 = f32::MIN;

impl MaskSpec<'_> {
    /// `q_len` new tokens in each of `batch` rows after what `cache` holds (queries start at the tokens
    /// it has seen, keys at the oldest it still keeps; nothing without a cache), with no documents or
    /// padding.
    pub fn after_cache(
        batch: usize,
        q_len: usize,
        cache: Option<&super::kv_cache::KvCache>,
        window: Option<usize>,
    ) -> Self {
        let (q_start, k_start) = cache.map_or((0, 0), |c| (c.seen(), c.start()));
        MaskSpec {
            batch,
            q_len,
            q_start,
            kv_len: q_start + q_len - k_start,
            k_start,
            window,
            documents: None,
            key_valid: None,
        }
    }

    /// Whether no key is ever forbidden (a single query over a full, unwindowed, unpadded cache),
    /// in which case no mask tensor is needed.
    fn is_trivial(&self) -> bool {
        let last_q = self.q_start + self.q_len - 1;
        let causal_free = self.q_len == 1 && self.k_start + self.kv_len == last_q + 1;
        let window_free = self.window.is_none_or(|w| last_q + 1 - self.k_start <= w);
        causal_free && window_free && self.documents.is_none() && self.key_valid.is_none()
    }

    /// Builds the additive mask `[b or 1, 1, 1, q_len, kv_len]` (f32), broadcastable over
    /// `[b, kv_heads, groups, q_len, kv_len]` scores; `None` when nothing is masked.
    pub fn build(&self, device: &Device) -> Result<Option<Tensor>> {
        if self.is_trivial() {
            return Ok(None);
        }
        if let Some(docs) = self.documents {
            if self.kv_len != self.q_len || self.k_start != self.q_start || docs.len() != self.batch * self.q_len {
                candle_core::bail!("document masks need a cache-free forward with one id per token");
            }
        }
        let rows = if self.documents.is_some() || self.key_valid.is_some() { self.batch } else { 1 };
        let (t, s) = (self.q_len, self.kv_len);
        let mut mask = vec![0f32; rows * t * s];
        for r in 0..rows {
            for i in 0..t {
                let qi = self.q_start + i;
                for j in 0..s {
                    let kj = self.k_start + j;
                    let mut allowed = kj <= qi && self.window.is_none_or(|w| qi - kj < w);
                    if let Some(docs) = self.documents {
                        allowed &= docs[r * t + i] == docs[r * t + j];
                    }
                    if let Some(valid) = self.key_valid {
                        allowed &= valid[r * s + j];
                    }
                    if !allowed {
                        mask[(r * t + i) * s + j] = MASKED;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (rows, 1, 1, t, s), device).map(Some)
    }
}
