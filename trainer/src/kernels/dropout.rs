//! A dropout mask held as one bit per value: a layer that keeps its activations for the backward keeps
//! the masks of its adapters too, and at one bit instead of an f32 multiplier per value they cost 1/16
//! of a bf16 activation of the same size.

use super::parallel::for_spans_mut;

/// Which of `len` values dropout keeps; a kept value is multiplied by [`DropoutMask::scale`] (`1 / keep`),
/// a dropped one by 0.
#[derive(Debug, Clone, PartialEq)]
pub struct DropoutMask {
    bits: Vec<u64>,
    len: usize,
    scale: f32,
}

impl DropoutMask {
    /// The mask over `len` values where `kept(i)` says whether value `i` is kept (called in order, once
    /// per value), kept values scaled by `scale`.
    pub fn from_fn(len: usize, scale: f32, mut kept: impl FnMut(usize) -> bool) -> Self {
        let mut bits = vec![0u64; len.div_ceil(64)];
        for i in 0..len {
            if kept(i) {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        DropoutMask { bits, len, scale }
    }

    /// Number of values the mask covers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mask covers no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The multiplier of a kept value (`1 / keep`).
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The multiplier of value `i`: [`DropoutMask::scale`] or 0.
    #[inline]
    pub fn multiplier(&self, i: usize) -> f32 {
        if self.bits[i / 64] >> (i % 64) & 1 == 1 {
            self.scale
        } else {
            0.0
        }
    }

    /// Every value's multiplier, in order.
    pub fn multipliers(&self) -> Vec<f32> {
        (0..self.len).map(|i| self.multiplier(i)).collect()
    }

    /// `out[i] += part[i] * multiplier(i)`, `out[i] = x[i] * multiplier(i)` when `accumulate` is false;
    /// spans spread over the pool.
    pub fn apply(&self, x: &[f32], out: &mut [f32], accumulate: bool) {
        // Spans are whole 64-value words so each reads its own bits.
        for_spans_mut(out, 64 * 1024, |at, o| {
            for (j, (o, &v)) in o.iter_mut().zip(&x[at..]).enumerate() {
                let m = v * self.multiplier(at + j);
                *o = if accumulate { *o + m } else { m };
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_give_back_the_pattern_they_were_built_from() {
        let keep = |i: usize| !(i * 7919).is_multiple_of(5);
        let mask = DropoutMask::from_fn(200_003, 1.25, keep);
        assert_eq!(mask.len(), 200_003);
        for i in [0, 1, 63, 64, 65, 127, 128, 200_002] {
            assert_eq!(mask.multiplier(i), if keep(i) { 1.25 } else { 0.0 }, "value {i}");
        }
        let x: Vec<f32> = (0..mask.len()).map(|i| i as f32).collect();
        let mut out = vec![0f32; x.len()];
        mask.apply(&x, &mut out, false);
        let want: Vec<f32> = x.iter().zip(mask.multipliers()).map(|(v, m)| v * m).collect();
        assert_eq!(out, want);
        mask.apply(&x, &mut out, true);
        assert_eq!(out, want.iter().map(|v| v * 2.0).collect::<Vec<_>>());
    }
}
