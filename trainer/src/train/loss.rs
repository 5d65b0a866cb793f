//! Causal language-modelling cross-entropy over labelled positions only.
//!
//! Like Hugging Face, position `p` predicts `labels[p + 1]`; labels of `-100` are ignored. The
//! logits are computed only for the positions that carry a label, which skips lm_head work (and
//! its backward) for masked prompt tokens.

use candle_core::{DType, Result, Tensor, D};

use crate::kernels::{CrossEntropy, LinearCrossEntropy};
use crate::model::Model;

/// The label value that marks a position as not trained.
pub const IGNORE_INDEX: i64 = -100;

/// Which hidden rows predict which token, after the causal shift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShiftedTargets {
    /// Flat row indices `b * t + p` of the predicting positions.
    pub rows: Vec<u32>,
    /// The token each of those rows must predict.
    pub targets: Vec<u32>,
}

impl ShiftedTargets {
    /// Pairs each position `p < t - 1` of each row with `labels[p + 1]` unless it is ignored or,
    /// in a packed row (`documents` given, `[b * t]`), `p + 1` starts another document.
    /// `labels` is `[b * t]` row-major. Fails on a label outside `0..vocab` that is not `-100`.
    pub fn new(labels: &[i64], batch: usize, vocab: usize, documents: Option<&[u32]>) -> Result<Self> {
        let t = labels.len() / batch.max(1);
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for b in 0..batch {
            for p in 0..t.saturating_sub(1) {
                let label = labels[b * t + p + 1];
                let crosses = documents.is_some_and(|d| d[b * t + p] != d[b * t + p + 1]);
                if label == IGNORE_INDEX || crosses {
                    continue;
                }
                if label < 0 || label as usize >= vocab {
                    candle_core::bail!(
                        "label {label} at row {b} position {} is outside the vocabulary (0..{vocab})",
                        p + 1
                    );
                }
                rows.push((b * t + p) as u32);
                targets.push(label as u32);
            }
        }
        Ok(ShiftedTargets { rows, targets })
    }

    /// Number of labelled tokens.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether no token carries a label.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Per row `-log softmax(logits)[target]`, computed in f32. `logits` is `[n, vocab]`; the result is `[n]`.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    if logits.device().is_cpu() && logits.rank() == 2 {
        let ids = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        return CrossEntropy::nll(&logits, &ids);
    }
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// Sum over rows of `-log softmax(logits)[target]`, computed in f32. `logits` is `[n, vocab]`.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_rows(logits, targets)?.sum_all()
}

/// The negative log-likelihood of each labelled token `[targets.len()]` (in `targets` order), from
/// final hidden states `[b, t, hidden]`; only labelled rows go through lm_head. `None` when nothing is
/// labelled.
pub fn labelled_nll(model: &Model, hidden: &Tensor, targets: &ShiftedTargets) -> Result<Option<Tensor>> {
    if targets.is_empty() {
        return Ok(None);
    }
    let (b, t, h) = hidden.dims3()?;
    let device = hidden.device();
    let rows = Tensor::from_vec(targets.rows.clone(), targets.len(), device)?;
    let picked = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
    if let Some(weight) = model.lm_head.frozen_only() {
        if let Some(nll) = LinearCrossEntropy::nll(&picked, weight, &targets.targets)? {
            return Ok(Some(nll));
        }
    }
    let logits = model.logits(&picked)?;
    let goal = Tensor::from_vec(targets.targets.clone(), targets.len(), device)?;
    cross_entropy_rows(&logits, &goal).map(Some)
}

/// The summed negative log-likelihood of the labelled tokens, from final hidden states
/// `[b, t, hidden]`; only labelled rows go through lm_head. Returns `None` when nothing is labelled.
pub fn labelled_nll_sum(model: &Model, hidden: &Tensor, targets: &ShiftedTargets) -> Result<Option<Tensor>> {
    labelled_nll(model, hidden, targets)?.map(|nll| nll.sum_all()).transpose()
}
