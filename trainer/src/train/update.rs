//! One optimizer step over several micro-batches: the step's labelled tokens are counted first so
//! every micro-batch's NLL is divided by the step total (not per micro-batch); gradients are
//! accumulated, checked for NaN/inf, clipped by global norm, and applied by AdamW at the
//! schedule's learning rate.

use candle_core::{Result, Tensor, Var};
use serde::Serialize;

use super::grads::{accumulate, clip_global_norm};
use super::loss::ShiftedTargets;
use super::memory::StepShape;
use super::optim::AdamW;
use super::schedule::Schedule;
use super::step::{forward_backward_keeping, LossScaling, MicroBatch};
use crate::lora::TrainableParams;
use crate::model::Model;

/// Settings of an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    /// Router load-balancing coefficient (0 = off; ignored for dense models).
    pub aux_coef: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    /// Per-layer gradient checkpointing.
    pub checkpointing: bool,
    /// With checkpointing: bytes of activations per micro-batch that may be kept instead of recomputed
    /// (the last layers that fit keep theirs, see [`StepShape::layers_within`]); `None`
    /// recomputes every layer.
    pub activation_budget: Option<u64>,
}

/// Progress within an optimizer step, passed to [`optimizer_step`]'s callback after each
/// micro-batch's forward/backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepProgress {
    /// Micro-batches of this step done so far (1 after the first).
    pub done: usize,
    /// Micro-batches in the step.
    pub of: usize,
    /// Tokens processed (valid input tokens) by the micro-batch just done.
    pub tokens: usize,
}

/// What an optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// The step's number, counted from 1: the optimizer steps done once this one is (the step
    /// that [`optimizer_step`] ran as index 0 reports 1). Metrics, checkpoints and evaluations
    /// use the same count.
    pub step: u64,
    /// The step's loss: `nll / label_tokens + aux_coef * mean aux`.
    pub loss: f64,
    /// Mean token cross-entropy of the step.
    pub ce: f64,
    /// Mean load-balancing loss over the micro-batches (MoE).
    pub aux: Option<f64>,
    /// Labelled tokens in the step.
    pub label_tokens: usize,
    /// Tokens processed (valid input tokens).
    pub tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate applied.
    pub lr: f64,
    /// Per-layer expert load averaged over the micro-batches (MoE).
    pub expert_load: Vec<Vec<f32>>,
    /// False when the loss or a gradient was NaN/inf and the update was skipped.
    pub applied: bool,
    /// Preference tuning (DPO/ORPO): the step's metrics under TRL's names, averaged over its micro-batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preference: Option<super::preference::PreferenceMetrics>,
}

fn labelled_tokens(mb: &MicroBatch, vocab: usize) -> Result<usize> {
    Ok(ShiftedTargets::new(&mb.labels, mb.batch, vocab, mb.documents.as_deref())?.len())
}

/// Runs optimizer step `step` (0-based index; it picks the learning rate) over `micro_batches`,
/// calling `progress` after each micro-batch's forward/backward (pass `&mut |_| {}` to ignore it).
/// A step whose loss or gradient is NaN/inf is not applied (`applied: false`), and the optimizer
/// state is left untouched. The report's `step` is `step + 1` (steps done).
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step(
    step: u64,
    model: &Model,
    params: &TrainableParams,
    optimizer: &mut AdamW,
    schedule: &Schedule,
    micro_batches: &[MicroBatch],
    settings: &StepSettings,
    dropout_seed: u64,
    progress: &mut dyn FnMut(StepProgress),
) -> Result<StepReport> {
    let vocab = model.config.vocab_size;
    let label_tokens: usize = micro_batches.iter().map(|mb| labelled_tokens(mb, vocab)).sum::<Result<usize>>()?;
    let aux_coef = if model.config.is_moe() { settings.aux_coef } else { 0.0 };
    let scaling = LossScaling { label_tokens, aux_coef, aux_weight: 1.0 / micro_batches.len().max(1) as f64 };
    let mut grads: Vec<Option<Tensor>> = vec![None; params.named.len()];
    let (mut nll, mut aux_sum, mut aux_seen, mut tokens) = (0.0, 0.0, false, 0usize);
    let mut expert_load: Vec<Vec<f32>> = Vec::new();
    for (i, mb) in micro_batches.iter().enumerate() {
        params.dropout.train_with_seed(dropout_seed.wrapping_add(i as u64));
        let keep = kept_layers(model, mb.input_ids.len(), settings);
        let out = forward_backward_keeping(model, params, mb, &scaling, settings.checkpointing, keep)?;
        nll += out.nll_sum;
        let mb_tokens = mb.valid.as_ref().map_or(mb.input_ids.len(), |v| v.iter().filter(|x| **x).count());
        tokens += mb_tokens;
        if let Some(a) = out.aux {
            aux_sum += a;
            aux_seen = true;
        }
        add_expert_load(&mut expert_load, &out.expert_load, micro_batches.len());
        accumulate(&mut grads, out.grads)?;
        progress(StepProgress { done: i + 1, of: micro_batches.len(), tokens: mb_tokens });
    }
    params.dropout.eval();
    let n = micro_batches.len().max(1) as f64;
    let ce = nll / label_tokens.max(1) as f64;
    let aux = aux_seen.then_some(aux_sum / n);
    let loss = ce + aux_coef * aux.unwrap_or(0.0);
    let (grad_norm, lr, applied) = apply_update(step, params, optimizer, schedule, &mut grads, loss, settings)?;
    Ok(StepReport {
        step: step + 1,
        loss,
        ce,
        aux,
        label_tokens,
        tokens,
        grad_norm,
        lr,
        expert_load,
        applied,
        preference: None,
    })
}

/// The end of every optimizer step: clips the accumulated `grads` by global norm and, when `loss` and
/// the norm are finite, applies AdamW at the schedule's learning rate for `step`. Returns the norm
/// before clipping, the learning rate, and whether the update was applied.
pub fn apply_update(
    step: u64,
    params: &TrainableParams,
    optimizer: &mut AdamW,
    schedule: &Schedule,
    grads: &mut [Option<Tensor>],
    loss: f64,
    settings: &StepSettings,
) -> Result<(f64, f64, bool)> {
    let grad_norm = clip_global_norm(grads, settings.max_grad_norm)?;
    let lr = schedule.lr(step);
    let applied = loss.is_finite() && grad_norm.is_finite();
    if applied {
        let vars: Vec<&Var> = params.named.iter().map(|(_, v)| v).collect();
        optimizer.step(&vars, grads, lr)?;
    }
    Ok((grad_norm, lr, applied))
}

/// The activation layers a micro-batch of `tokens` tokens may keep under `settings`' budget.
pub fn kept_layers(model: &Model, tokens: usize, settings: &StepSettings) -> usize {
    settings.activation_budget.map_or(0, |b| StepShape::for_model(model, tokens, 0, true).layers_within(b))
}

/// Adds one micro-batch's per-layer expert load into the step's mean over `of` micro-batches.
pub fn add_expert_load(acc: &mut Vec<Vec<f32>>, load: &[Vec<f32>], of: usize) {
    if acc.is_empty() {
        *acc = load.iter().map(|l| vec![0.0; l.len()]).collect();
    }
    for (a, layer) in acc.iter_mut().zip(load) {
        for (x, y) in a.iter_mut().zip(layer) {
            *x += y / of as f32;
        }
    }
}
