//! One micro-batch's forward and backward, with or without per-layer gradient checkpointing.
//!
//! Checkpointing keeps only each layer's input; after the loss, layers are recomputed in reverse
//! and back-propagated one at a time (`notes/candle.md`'s recipe). Each layer's share of the
//! router load-balancing loss is added to its recompute (see [`super::aux_loss`]), so the two
//! modes compute the same gradients.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

use super::aux_loss::{valid_row_index, RoutingStats};
use super::loss::{labelled_nll_sum, ShiftedTargets};
use crate::lora::TrainableParams;
use crate::model::{Layout, Model};

/// A micro-batch of `batch` rows of `seq_len` tokens, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    /// Rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Token ids `[batch * seq_len]`.
    pub input_ids: Vec<u32>,
    /// Labels `[batch * seq_len]` (`-100` = not trained); position p predicts `labels[p + 1]`
    /// when both are in the same document.
    pub labels: Vec<i64>,
    /// Per-token positions (packed documents restart at 0); consecutive when `None`.
    pub positions: Option<Vec<u32>>,
    /// Per-token document ids (block-diagonal attention) for packed rows.
    pub documents: Option<Vec<u32>>,
    /// Per-token validity (false = padding: never attended, excluded from the aux loss).
    pub valid: Option<Vec<bool>>,
}

/// How a micro-batch's terms enter the step's loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaling {
    /// The step's total number of labelled tokens over all its micro-batches: the summed token
    /// NLL is divided by it.
    pub label_tokens: usize,
    /// Coefficient of the router load-balancing loss (0 disables it).
    pub aux_coef: f64,
    /// Weight of this micro-batch's aux loss in the step (1 / micro-batches per step).
    pub aux_weight: f64,
}

/// What one micro-batch's forward/backward produced.
#[derive(Debug, Clone)]
pub struct MicroBatchOutput {
    /// Summed NLL of its labelled tokens.
    pub nll_sum: f64,
    /// Its labelled tokens.
    pub label_tokens: usize,
    /// Its load-balancing loss (MoE only).
    pub aux: Option<f64>,
    /// Per-layer expert load (MoE only).
    pub expert_load: Vec<Vec<f32>>,
    /// Gradient of the step loss's share for each trainable tensor, in `params.named` order.
    pub grads: Vec<Option<Tensor>>,
}

fn add_grads(store: &GradStore, params: &TrainableParams, acc: &mut [Option<Tensor>]) -> Result<()> {
    for ((_, var), slot) in params.named.iter().zip(acc.iter_mut()) {
        if let Some(g) = store.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}

/// Runs forward and backward on `mb`, returning the gradients of
/// `nll_sum / scaling.label_tokens + aux_coef * aux_weight * aux` for every trainable tensor.
pub fn forward_backward(
    model: &Model,
    params: &TrainableParams,
    mb: &MicroBatch,
    scaling: &LossScaling,
    checkpointing: bool,
) -> Result<MicroBatchOutput> {
    forward_backward_keeping(model, params, mb, scaling, checkpointing, 0)
}

/// [`forward_backward`] with checkpointing where the last `keep_last` layers keep their activations
/// from the forward instead of being recomputed (more memory, less work); without checkpointing every
/// layer keeps them anyway.
pub fn forward_backward_keeping(
    model: &Model,
    params: &TrainableParams,
    mb: &MicroBatch,
    scaling: &LossScaling,
    checkpointing: bool,
    keep_last: usize,
) -> Result<MicroBatchOutput> {
    let targets = ShiftedTargets::new(&mb.labels, mb.batch, model.config.vocab_size, mb.documents.as_deref())?;
    let normalizer = scaling.label_tokens.max(1) as f64;
    let mut head = |hidden: &Tensor| -> Result<Option<HeadLoss>> {
        Ok(match labelled_nll_sum(model, hidden, &targets)? {
            Some(nll) => {
                let value = nll.to_scalar::<f32>()? as f64;
                Some(HeadLoss { objective: (nll / normalizer)?, value })
            }
            None => None,
        })
    };
    let aux_scale = scaling.aux_coef * scaling.aux_weight;
    let pass = forward_backward_with_head(model, params, mb, &mut head, aux_scale, checkpointing, keep_last)?;
    Ok(MicroBatchOutput {
        nll_sum: pass.head_value,
        label_tokens: targets.len(),
        aux: pass.aux,
        expert_load: pass.expert_load,
        grads: pass.grads,
    })
}

/// What a loss head makes of the final hidden states (after the final norm).
#[derive(Debug, Clone)]
pub struct HeadLoss {
    /// The scalar to back-propagate: this micro-batch's share of the step's loss.
    pub objective: Tensor,
    /// A number to hand back to the caller (the summed NLL for SFT).
    pub value: f64,
}

/// What [`forward_backward_with_head`] produced.
#[derive(Debug, Clone)]
pub struct HeadPass {
    /// The head's [`HeadLoss::value`] (0 when it returned nothing).
    pub head_value: f64,
    /// The load-balancing loss (MoE only).
    pub aux: Option<f64>,
    /// Per-layer expert load (MoE only).
    pub expert_load: Vec<Vec<f32>>,
    /// Gradient of `head objective + aux_scale * aux` for each trainable tensor, in `params.named` order.
    pub grads: Vec<Option<Tensor>>,
}

/// The forward and backward of one micro-batch for any loss computed from the final hidden states:
/// `head` turns them (`[b, t, hidden]`, differentiable) into the objective (or `None`: nothing to
/// train), and `aux_scale * aux` is added for MoE models. With `checkpointing`, layers are recomputed
/// one at a time in the backward (the last `keep_last` keep their activations). SFT's
/// [`forward_backward_keeping`] and preference tuning ([`super::preference`]) are both this pass.
pub fn forward_backward_with_head(
    model: &Model,
    params: &TrainableParams,
    mb: &MicroBatch,
    head: &mut dyn FnMut(&Tensor) -> Result<Option<HeadLoss>>,
    aux_scale: f64,
    checkpointing: bool,
    keep_last: usize,
) -> Result<HeadPass> {
    let (b, t) = (mb.batch, mb.seq_len);
    if mb.input_ids.len() != b * t || mb.labels.len() != b * t {
        candle_core::bail!("micro-batch: {} ids and {} labels for {b} x {t}", mb.input_ids.len(), mb.labels.len());
    }
    let device = &model.device;
    let ids = Tensor::from_vec(mb.input_ids.clone(), (b, t), device)?;
    let layout = Layout {
        positions: mb.positions.as_deref(),
        documents: mb.documents.as_deref(),
        key_valid: mb.valid.as_deref(),
    };
    let valid_rows = valid_row_index(mb.valid.as_deref(), device)?;
    let k = model.config.moe.as_ref().map_or(0, |m| m.experts_per_token);
    let mut grads: Vec<Option<Tensor>> = vec![None; params.named.len()];
    let stats_of = |logits: &[Tensor]| -> Result<Option<RoutingStats>> {
        if logits.is_empty() {
            return Ok(None);
        }
        RoutingStats::new(logits, k, mb.valid.as_deref()).map(Some)
    };
    let (nll_sum, aux, stats) = if checkpointing {
        let ctx = model.context(b, t, layout, None)?;
        let mut h = model.embed(&ids)?.detach();
        let mut inputs = Vec::with_capacity(model.layers.len());
        let mut router_logits = Vec::new();
        // The last `keep_last` layers run with their graph attached to their input, kept for the backward.
        let first_kept = model.layers.len().saturating_sub(keep_last);
        let mut kept = Vec::with_capacity(model.layers.len());
        for (l, layer) in model.layers.iter().enumerate() {
            inputs.push(h.clone());
            if l >= first_kept {
                let xin = Var::from_tensor(&h)?;
                let out = layer.forward(xin.as_tensor(), &ctx, None)?;
                h = out.hidden.detach();
                router_logits.extend(out.router_logits.as_ref().map(|l| l.detach()));
                kept.push(Some((xin, out)));
            } else {
                let out = layer.forward(&h, &ctx, None)?;
                h = out.hidden.detach();
                router_logits.extend(out.router_logits.map(|l| l.detach()));
                kept.push(None);
            }
        }
        let stats = stats_of(&router_logits)?;
        let hv = Var::from_tensor(&h)?;
        let hidden = model.final_norm(hv.as_tensor())?;
        let mut nll_sum = 0.0;
        // The gradient flowing into the current layer's output; `None` while it is zero.
        let mut g = match head(&hidden)? {
            Some(loss) => {
                nll_sum = loss.value;
                let store = loss.objective.backward()?;
                add_grads(&store, params, &mut grads)?;
                store.get(hv.as_tensor()).cloned()
            }
            None => None,
        };
        let mut aux = 0.0;
        for (l, (layer, input)) in model.layers.iter().zip(&inputs).enumerate().rev() {
            let with_aux = stats.is_some() && aux_scale != 0.0;
            if g.is_none() && !with_aux {
                // Nothing to back-propagate: report the aux share from the logits the forward kept.
                if let (Some(stats), Some(logits)) = (&stats, router_logits.get(l)) {
                    aux += stats.layer_term(logits, valid_rows.as_ref())?.to_scalar::<f32>()? as f64;
                }
                continue;
            }
            let (xin, out) = match kept[l].take() {
                Some(pair) => pair,
                None => {
                    let xin = Var::from_tensor(input)?;
                    let out = layer.forward(xin.as_tensor(), &ctx, None)?;
                    (xin, out)
                }
            };
            // In f32 whatever the residual stream's dtype, so the aux term (f32) can be added to it.
            let mut objective = match &g {
                Some(g) => Some((out.hidden.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?.sum_all()?),
                None => None,
            };
            if let (Some(stats), Some(logits)) = (&stats, &out.router_logits) {
                let term = stats.layer_term(logits, valid_rows.as_ref())?;
                aux += term.to_scalar::<f32>()? as f64;
                if aux_scale != 0.0 {
                    let scaled = (term * aux_scale)?;
                    objective = Some(match objective {
                        Some(o) => (o + scaled)?,
                        None => scaled,
                    });
                }
            }
            let Some(objective) = objective else { continue };
            let store = objective.backward()?;
            add_grads(&store, params, &mut grads)?;
            g = store.get(xin.as_tensor()).cloned();
        }
        (nll_sum, stats.as_ref().map(|_| aux), stats)
    } else {
        let out = model.forward(&ids, layout, None)?;
        let stats = stats_of(&out.router_logits)?;
        let mut loss: Option<Tensor> = None;
        let mut nll_sum = 0.0;
        if let Some(head_loss) = head(&out.hidden)? {
            nll_sum = head_loss.value;
            loss = Some(head_loss.objective);
        }
        let mut aux = 0.0;
        if let Some(stats) = &stats {
            for logits in &out.router_logits {
                let term = stats.layer_term(logits, valid_rows.as_ref())?;
                aux += term.to_scalar::<f32>()? as f64;
                if aux_scale != 0.0 {
                    let scaled = (term * aux_scale)?;
                    loss = Some(match loss {
                        Some(l) => (l + scaled)?,
                        None => scaled,
                    });
                }
            }
        }
        if let Some(loss) = loss {
            add_grads(&loss.backward()?, params, &mut grads)?;
        }
        (nll_sum, stats.as_ref().map(|_| aux), stats)
    };
    Ok(HeadPass { head_value: nll_sum, aux, expert_load: stats.map(|s| s.expert_load).unwrap_or_default(), grads })
}
