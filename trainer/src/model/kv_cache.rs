//! The key/value cache of incremental decoding, trimmed to the sliding window when the model has one.

use candle_core::{Result, Tensor};

/// Keys and values of one layer, `[b, kv_heads, kept, head_dim]` each (after RoPE).
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Appends new keys/values and returns the full cached keys and values to attend over.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Drops the oldest `n` cached positions.
    fn drop_front(&mut self, n: usize) -> Result<()> {
        if let Some((k, v)) = self.kv.take() {
            let len = k.dim(2)?;
            let keep = len.saturating_sub(n);
            self.kv = Some((k.narrow(2, len - keep, keep)?, v.narrow(2, len - keep, keep)?));
        }
        Ok(())
    }
}

/// The cache of all layers plus where the cached keys sit in the sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// One cache per decoder layer.
    pub layers: Vec<LayerCache>,
    seen: usize,
    start: usize,
    window: Option<usize>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers; with a sliding `window`, keys no future query can
    /// see are dropped after each step.
    pub fn new(num_layers: usize, window: Option<usize>) -> Self {
        KvCache { layers: vec![LayerCache::default(); num_layers], seen: 0, start: 0, window }
    }

    /// Tokens processed so far (the absolute index of the next token).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Absolute index of the oldest cached key.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Records that `n` more tokens went through every layer, then trims to the window.
    pub fn advance(&mut self, n: usize) -> Result<()> {
        self.seen += n;
        if let Some(w) = self.window {
            // The next query (index `seen`) sees keys with index > seen - w.
            let first_needed = (self.seen + 1).saturating_sub(w);
            if first_needed > self.start {
                let drop = first_needed - self.start;
                for layer in &mut self.layers {
                    layer.drop_front(drop)?;
                }
                self.start = first_needed;
            }
        }
        Ok(())
    }
}
