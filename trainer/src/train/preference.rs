//! Preference tuning on chosen/rejected pairs: DPO (loss types `sigmoid`, `ipo`, `robust`) and ORPO,
//! computed as TRL 1.16 computes them (`DPOTrainer._compute_loss`, `ORPOTrainer.get_batch_loss_metrics`;
//! proved by the goldens in `tests/fixtures/preference/`).
//!
//! A pair micro-batch holds `2n` right-padded rows: the `n` chosen sequences (prompt + chosen) then the `n`
//! rejected ones (prompt + rejected). A sequence's log-probability is the sum of its completion tokens'
//! log-probabilities (DPO); ORPO uses their mean, and adds the mean NLL of every token of the chosen rows
//! (prompt included, as TRL's ORPO does). DPO's reference log-probabilities come from the same model with
//! every LoRA adapter switched off (the base model: no second copy of the weights), or with the trained
//! tensors' initial values swapped in (an `init_from` adapter as reference), without dropout or gradients, per
//! micro-batch or precomputed once for every training pair ([`Reference`]).
//!
//! The loss is a function of a few per-sequence sums, so it and its derivative with respect to each
//! token's NLL are computed here in f64; the backward then back-propagates `sum_j w_j * nll_j` through
//! the shared checkpointed pass ([`super::step::forward_backward_with_head`]), which gives exactly the
//! gradient of the loss. Each micro-batch contributes its mean over pairs divided by the number of
//! micro-batches of the step (what the Hugging Face Trainer does under gradient accumulation), plus
//! `aux_coef / micro-batches` times the router load-balancing loss of its `2n` rows for MoE models
//! (once per pair micro-batch, padding excluded; TRL adds it the same way).

use candle_core::{Result, Tensor};
use serde::Serialize;

use super::grads::accumulate;
use super::loss::{labelled_nll, ShiftedTargets, IGNORE_INDEX};
use super::optim::AdamW;
use super::schedule::Schedule;
use super::step::{forward_backward_with_head, HeadLoss, MicroBatch};
use super::update::{add_expert_load, apply_update, kept_layers, StepProgress, StepReport, StepSettings};
use crate::lora::TrainableParams;
use crate::model::{Layout, Model};

pub use crate::recipe::DpoLossType;

/// Which preference objective, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PreferenceObjective {
    /// Direct Preference Optimization against a reference model ([`Reference`]: the base, or the `init_from` adapter).
    Dpo {
        /// The loss on the log-ratios.
        loss_type: DpoLossType,
        /// Robust DPO's label-flip probability (in `[0, 0.5)`; TRL's sigmoid and IPO ignore it).
        label_smoothing: f64,
    },
    /// Odds Ratio Preference Optimization: chosen NLL minus `beta * log sigmoid(log odds ratio)`, no reference.
    Orpo,
}

/// A preference objective and its `beta` (DPO's temperature, ORPO's lambda).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreferenceSettings {
    /// The objective.
    pub objective: PreferenceObjective,
    /// `beta`.
    pub beta: f64,
}

/// A micro-batch of pairs (the data pipeline's layout: rows `0..pairs` prompt + chosen, rows `pairs..2 pairs`
/// prompt + rejected, right-padded).
pub use datasets::PairBatch;

/// The micro-batch a [`PairBatch`]'s rows make for the shared forward/backward.
trait PairRows {
    /// The rows as a micro-batch whose labels are the completion tokens, and for ORPO (`chosen_nll`) also
    /// every other token of the chosen rows.
    fn micro_batch(&self, chosen_nll: bool) -> MicroBatch;
}

impl PairRows for PairBatch {
    fn micro_batch(&self, chosen_nll: bool) -> MicroBatch {
        let t = self.seq_len;
        let labels = (0..self.rows() * t)
            .map(|i| {
                let chosen_row = i / t < self.pairs;
                let trained = self.valid[i] && (self.completion[i] || (chosen_nll && chosen_row));
                if trained {
                    i64::from(self.input_ids[i])
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        let padded = self.valid.iter().any(|v| !v);
        MicroBatch {
            batch: self.rows(),
            seq_len: t,
            input_ids: self.input_ids.clone(),
            labels,
            positions: None,
            documents: None,
            valid: padded.then(|| self.valid.clone()),
        }
    }
}

/// The metrics of a pair micro-batch or step, under TRL's names (see [`PreferenceMetrics::scalars`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PreferenceMetrics {
    /// The preference loss (without the aux loss).
    pub loss: f64,
    /// Mean reward of the chosen completions (DPO: `beta * (logp - ref_logp)`; ORPO: `beta * mean logp`).
    pub rewards_chosen: f64,
    /// Mean reward of the rejected completions.
    pub rewards_rejected: f64,
    /// Fraction of pairs whose chosen reward is above the rejected one.
    pub rewards_accuracies: f64,
    /// Mean of chosen minus rejected reward.
    pub rewards_margins: f64,
    /// Mean log-probability of the chosen completions (DPO: summed over tokens; ORPO: per token).
    pub logps_chosen: f64,
    /// Mean log-probability of the rejected completions.
    pub logps_rejected: f64,
    /// ORPO: the chosen rows' mean token NLL (`nll_loss`).
    pub nll_loss: Option<f64>,
    /// ORPO: mean of `log sigmoid(log odds ratio)` (`log_odds_ratio`).
    pub log_odds_ratio: Option<f64>,
    /// ORPO: mean log odds ratio of chosen over rejected (`log_odds_chosen`).
    pub log_odds_chosen: Option<f64>,
}

impl PreferenceMetrics {
    /// `(TRL name, value)` pairs: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
    /// `rewards/margins`, `logps/chosen`, `logps/rejected`, and for ORPO `nll_loss`, `log_odds_ratio`,
    /// `log_odds_chosen`. (The loss itself is reported as `loss` by the caller, with the aux loss.)
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ];
        v.extend(self.nll_loss.map(|x| ("nll_loss", x)));
        v.extend(self.log_odds_ratio.map(|x| ("log_odds_ratio", x)));
        v.extend(self.log_odds_chosen.map(|x| ("log_odds_chosen", x)));
        v
    }

    /// The mean of several micro-batches' metrics (each micro-batch weighs the same, as in TRL's logs).
    pub fn mean(all: &[PreferenceMetrics]) -> PreferenceMetrics {
        let n = all.len().max(1) as f64;
        let avg = |f: &dyn Fn(&PreferenceMetrics) -> f64| all.iter().map(f).sum::<f64>() / n;
        let avg_opt = |f: &dyn Fn(&PreferenceMetrics) -> Option<f64>| {
            all.iter().map(f).collect::<Option<Vec<f64>>>().map(|v| v.iter().sum::<f64>() / n)
        };
        PreferenceMetrics {
            loss: avg(&|m| m.loss),
            rewards_chosen: avg(&|m| m.rewards_chosen),
            rewards_rejected: avg(&|m| m.rewards_rejected),
            rewards_accuracies: avg(&|m| m.rewards_accuracies),
            rewards_margins: avg(&|m| m.rewards_margins),
            logps_chosen: avg(&|m| m.logps_chosen),
            logps_rejected: avg(&|m| m.logps_rejected),
            nll_loss: avg_opt(&|m| m.nll_loss),
            log_odds_ratio: avg_opt(&|m| m.log_odds_ratio),
            log_odds_chosen: avg_opt(&|m| m.log_odds_chosen),
        }
    }
}

/// Per-row sums of the labelled tokens' log-probabilities, and which row and kind each target is.
struct RowSums {
    /// Row of each target (in [`ShiftedTargets`] order).
    row_of: Vec<usize>,
    /// Whether each target is a completion token.
    is_completion: Vec<bool>,
    /// Per row: summed log-probability of the completion tokens.
    completion_logp: Vec<f64>,
    /// Per row: completion tokens.
    completion_len: Vec<usize>,
    /// Summed NLL over every target of the chosen rows, and their count (ORPO's NLL term).
    chosen_nll: (f64, usize),
}

impl RowSums {
    fn new(pb: &PairBatch, targets: &ShiftedTargets, nll: &[f32]) -> RowSums {
        let t = pb.seq_len;
        let rows = pb.rows();
        let mut s = RowSums {
            row_of: Vec::with_capacity(targets.len()),
            is_completion: Vec::with_capacity(targets.len()),
            completion_logp: vec![0.0; rows],
            completion_len: vec![0; rows],
            chosen_nll: (0.0, 0),
        };
        for (&r, &x) in targets.rows.iter().zip(nll) {
            let (row, pos) = (r as usize / t, r as usize % t);
            let completion = pb.completion[row * t + pos + 1];
            s.row_of.push(row);
            s.is_completion.push(completion);
            if completion {
                s.completion_logp[row] -= x as f64;
                s.completion_len[row] += 1;
            }
            if row < pb.pairs {
                s.chosen_nll.0 += x as f64;
                s.chosen_nll.1 += 1;
            }
        }
        s
    }
}

fn log_sigmoid(x: f64) -> f64 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `log(1 - exp(x))` for `x < 0`, branching at `-ln 2` as TRL's `log1mexp`.
fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// The loss and metrics of one pair micro-batch, and `d loss / d nll_j` for every target `j`.
/// `reference` holds the reference model's per-row completion log-probabilities (DPO).
fn loss_and_weights(
    settings: &PreferenceSettings,
    pairs: usize,
    sums: &RowSums,
    reference: Option<&[f64]>,
) -> (PreferenceMetrics, Vec<f64>) {
    let n = pairs as f64;
    let beta = settings.beta;
    // d loss / d (per-row completion log-probability sum), and for ORPO d loss / d (chosen-row NLL sum).
    let mut d_row = vec![0.0; 2 * pairs];
    let mut d_chosen_nll = 0.0;
    let mean = |v: &mut dyn Iterator<Item = f64>| v.sum::<f64>() / n;
    let mut m = PreferenceMetrics::default();
    match settings.objective {
        PreferenceObjective::Dpo { loss_type, label_smoothing: eps } => {
            let zeros = vec![0.0; 2 * pairs];
            let reference = reference.unwrap_or(&zeros);
            let mut loss = 0.0;
            let (mut acc, mut rc, mut rr) = (0.0, 0.0, 0.0);
            for i in 0..pairs {
                let (c, r) = (sums.completion_logp[i], sums.completion_logp[pairs + i]);
                let chosen_ratio = c - reference[i];
                let rejected_ratio = r - reference[pairs + i];
                let delta = chosen_ratio - rejected_ratio;
                let (l, d_chosen, d_rejected) = match loss_type {
                    DpoLossType::Sigmoid => {
                        let d = -beta * sigmoid(-beta * delta);
                        (-log_sigmoid(beta * delta), d, -d)
                    }
                    DpoLossType::Robust => {
                        let k = 1.0 - 2.0 * eps;
                        let l = (-(1.0 - eps) * log_sigmoid(beta * delta) + eps * log_sigmoid(-beta * delta)) / k;
                        let d = -beta * ((1.0 - eps) * sigmoid(-beta * delta) + eps * sigmoid(beta * delta)) / k;
                        (l, d, -d)
                    }
                    DpoLossType::Ipo => {
                        let len_c = sums.completion_len[i].max(1) as f64;
                        let len_r = sums.completion_len[pairs + i].max(1) as f64;
                        let e = chosen_ratio / len_c - rejected_ratio / len_r - 1.0 / (2.0 * beta);
                        (e * e, 2.0 * e / len_c, -2.0 * e / len_r)
                    }
                };
                loss += l / n;
                d_row[i] = d_chosen / n;
                d_row[pairs + i] = d_rejected / n;
                let (reward_c, reward_r) = (beta * chosen_ratio, beta * rejected_ratio);
                acc += f64::from(u8::from(reward_c > reward_r));
                rc += reward_c;
                rr += reward_r;
            }
            m.loss = loss;
            m.rewards_chosen = rc / n;
            m.rewards_rejected = rr / n;
            m.rewards_accuracies = acc / n;
            m.rewards_margins = (rc - rr) / n;
            m.logps_chosen = mean(&mut (0..pairs).map(|i| sums.completion_logp[i]));
            m.logps_rejected = mean(&mut (pairs..2 * pairs).map(|i| sums.completion_logp[i]));
        }
        PreferenceObjective::Orpo => {
            let avg = |row: usize| sums.completion_logp[row] / sums.completion_len[row].max(1) as f64;
            let (nll_sum, nll_count) = sums.chosen_nll;
            let nll = nll_sum / nll_count.max(1) as f64;
            d_chosen_nll = 1.0 / nll_count.max(1) as f64;
            let (mut ratio_sum, mut odds_sum, mut acc) = (0.0, 0.0, 0.0);
            for i in 0..pairs {
                let (c, r) = (avg(i), avg(pairs + i));
                let log_odds = (c - r) - (log1mexp(c) - log1mexp(r));
                ratio_sum += log_sigmoid(log_odds);
                odds_sum += log_odds;
                acc += f64::from(u8::from(beta * c > beta * r));
                // loss = nll - beta * mean(log sigmoid(log_odds)); d log_odds / dc = 1 / (1 - e^c).
                let d_odds = -beta / n * sigmoid(-log_odds);
                let d_c = -d_odds / c.exp_m1();
                let d_r = d_odds / r.exp_m1();
                d_row[i] = d_c / sums.completion_len[i].max(1) as f64;
                d_row[pairs + i] = d_r / sums.completion_len[pairs + i].max(1) as f64;
            }
            let logps_c = mean(&mut (0..pairs).map(avg));
            let logps_r = mean(&mut (pairs..2 * pairs).map(avg));
            m.loss = nll - beta * ratio_sum / n;
            m.rewards_chosen = beta * logps_c;
            m.rewards_rejected = beta * logps_r;
            m.rewards_accuracies = acc / n;
            m.rewards_margins = beta * (logps_c - logps_r);
            m.logps_chosen = logps_c;
            m.logps_rejected = logps_r;
            m.nll_loss = Some(nll);
            m.log_odds_ratio = Some(ratio_sum / n);
            m.log_odds_chosen = Some(odds_sum / n);
        }
    }
    // Each target's NLL enters its row's log-probability with sign -1, and the chosen NLL term with +1.
    let weights = sums
        .row_of
        .iter()
        .zip(&sums.is_completion)
        .map(|(&row, &completion)| {
            let mut w = if completion { -d_row[row] } else { 0.0 };
            if row < pairs {
                w += d_chosen_nll;
            }
            w
        })
        .collect();
    (m, weights)
}

fn layout(mb: &MicroBatch) -> Layout<'_> {
    Layout { positions: None, documents: None, key_valid: mb.valid.as_deref() }
}

fn chosen_nll(settings: &PreferenceSettings) -> bool {
    settings.objective == PreferenceObjective::Orpo
}

/// Per-row completion log-probabilities (summed over each row's completion tokens) of `model` as it is,
/// without gradients: rows `0..pairs` the chosen completions, `pairs..2 pairs` the rejected ones.
pub fn sequence_logps(model: &Model, pb: &PairBatch) -> Result<Vec<f64>> {
    let mb = pb.micro_batch(false);
    let targets = ShiftedTargets::new(&mb.labels, mb.batch, model.config.vocab_size, None)?;
    let ids = Tensor::from_vec(mb.input_ids.clone(), (mb.batch, mb.seq_len), &model.device)?;
    let out = model.forward(&ids, layout(&mb), None)?;
    let nll = match labelled_nll(model, &out.hidden.detach(), &targets)? {
        Some(nll) => nll.to_vec1::<f32>()?,
        None => Vec::new(),
    };
    Ok(RowSums::new(pb, &targets, &nll).completion_logp)
}

pub use crate::recipe::ReferenceKind;

/// DPO's reference model without a second copy of the base: the same model with the adapters switched off, or
/// with the trainable tensors' initial values swapped in for the pass (a copy of the small trained tensors
/// only), always without dropout and gradients. Optionally holds every training pair's reference
/// log-probabilities, computed once before training ([`Reference::precompute`], TRL's
/// `precompute_ref_log_probs`).
#[derive(Debug, Clone)]
pub struct Reference {
    /// Whether the LoRA adapters apply during the reference pass.
    adapters: bool,
    /// Trainable tensors (index in `params.named`) and the values they take during the reference pass.
    swap: Vec<(usize, Tensor)>,
    /// Per training pair (by its index in the pair dataset): reference log-probabilities of chosen and rejected.
    precomputed: Option<Vec<[f64; 2]>>,
}

/// Whether a trainable tensor is a fully trained router's weight (`lora.router = "full"`), which switching the
/// adapters off does not undo.
fn is_full_router(name: &str) -> bool {
    name.ends_with(".block_sparse_moe.gate.weight")
}

impl Reference {
    /// The base model as reference: adapters off, and a fully trained router (`lora.router = "full"`) at its
    /// present value, which must be the base's (call before training).
    pub fn base(params: &TrainableParams) -> Result<Reference> {
        let swap = params
            .named
            .iter()
            .enumerate()
            .filter(|(_, (name, _))| is_full_router(name))
            .map(|(i, (_, var))| Ok((i, var.as_tensor().copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Reference { adapters: false, swap, precomputed: None })
    }

    /// The model as it is now, frozen (call before training: the `init_from` adapter on the base): a copy of
    /// every trainable tensor is kept and swapped in for each reference pass.
    pub fn initial(params: &TrainableParams) -> Result<Reference> {
        let swap = params
            .named
            .iter()
            .enumerate()
            .map(|(i, (_, var))| Ok((i, var.as_tensor().copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Reference { adapters: true, swap, precomputed: None })
    }

    /// Runs `f` on the reference model: the swapped tensors set to their reference values, the adapters on or
    /// off, dropout off; everything is put back afterwards, also when `f` fails.
    fn run<T>(&self, params: &TrainableParams, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut saved: Vec<(usize, Tensor)> = Vec::with_capacity(self.swap.len());
        let seed = params.dropout.training_seed();
        let swapped = (|| {
            for (i, value) in &self.swap {
                let var = &params.named[*i].1;
                saved.push((*i, var.as_tensor().copy()?));
                var.set(value)?;
            }
            Ok(())
        })();
        params.dropout.eval();
        params.dropout.set_adapters_enabled(self.adapters);
        let out = swapped.and_then(|()| f());
        params.dropout.set_adapters_enabled(true);
        if let Some(seed) = seed {
            params.dropout.train_with_seed(seed);
        }
        let mut restored = Ok(());
        for (i, value) in &saved {
            if let Err(e) = params.named[*i].1.set(value) {
                restored = Err(e);
            }
        }
        let out = out?;
        restored?;
        Ok(out)
    }

    /// The reference model's per-row completion log-probabilities of `pb`, computed now.
    pub fn compute(&self, model: &Model, params: &TrainableParams, pb: &PairBatch) -> Result<Vec<f64>> {
        self.run(params, || sequence_logps(model, pb))
    }

    /// The reference log-probabilities of a training micro-batch: the precomputed ones when there are (looked up
    /// by the batch's pair indices), else [`Reference::compute`].
    pub fn logps(&self, model: &Model, params: &TrainableParams, pb: &PairBatch) -> Result<Vec<f64>> {
        let Some(pre) = self.precomputed.as_ref().filter(|_| !pb.indices.is_empty()) else {
            return self.compute(model, params, pb);
        };
        if pb.indices.len() != pb.pairs {
            candle_core::bail!("pair batch: {} pair indices for {} pairs", pb.indices.len(), pb.pairs);
        }
        let mut out = vec![0.0; pb.rows()];
        for (k, &i) in pb.indices.iter().enumerate() {
            let [chosen, rejected] = *pre.get(i as usize).ok_or_else(|| {
                candle_core::Error::Msg(format!("pair {i} has no precomputed reference log-probabilities"))
            })?;
            out[k] = chosen;
            out[pb.pairs + k] = rejected;
        }
        Ok(out)
    }

    /// Computes every pair's reference log-probabilities in one pass over `data` (in file order, `micro_batch_size`
    /// pairs at a time, padded as training pads), kept for [`Reference::logps`]. Returns the pairs computed.
    pub fn precompute(
        &mut self,
        model: &Model,
        params: &TrainableParams,
        data: &std::sync::Arc<datasets::PairDataset>,
        micro_batch_size: usize,
        pad_id: u32,
        multiple: usize,
    ) -> Result<usize> {
        let mut batches = datasets::PairBatches::new(data.clone(), micro_batch_size, false, 0, pad_id, multiple)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut pre = vec![[f64::NAN; 2]; data.len()];
        for _ in 0..batches.batches_per_epoch() {
            let pb = batches.next_batch();
            let logps = self.compute(model, params, &pb)?;
            for (k, &i) in pb.indices.iter().enumerate() {
                pre[i as usize] = [logps[k], logps[pb.pairs + k]];
            }
        }
        self.precomputed = Some(pre);
        Ok(data.len())
    }

    /// Whether every training pair's reference log-probabilities are precomputed.
    pub fn is_precomputed(&self) -> bool {
        self.precomputed.is_some()
    }
}

/// DPO's reference log-probabilities for `pb`: from `reference`, or without one from the base (adapters off),
/// which a fully trained router would not be.
fn reference_for(
    model: &Model,
    params: &TrainableParams,
    pb: &PairBatch,
    reference: Option<&Reference>,
    precomputed: bool,
) -> Result<Vec<f64>> {
    match reference {
        Some(r) if precomputed => r.logps(model, params, pb),
        Some(r) => r.compute(model, params, pb),
        None => {
            if params.named.iter().any(|(n, _)| is_full_router(n)) {
                candle_core::bail!(
                    "DPO with a fully trained router needs a Reference (Reference::base taken before training)"
                );
            }
            Reference { adapters: false, swap: Vec::new(), precomputed: None }.compute(model, params, pb)
        }
    }
}

/// What one pair micro-batch's forward/backward produced.
#[derive(Debug, Clone)]
pub struct PairOutput {
    /// Its preference metrics (loss without aux).
    pub metrics: PreferenceMetrics,
    /// Its load-balancing loss (MoE only).
    pub aux: Option<f64>,
    /// Per-layer expert load (MoE only).
    pub expert_load: Vec<Vec<f32>>,
    /// Gradient of `weight * (loss + aux_coef * aux)` for each trainable tensor, in `params.named` order.
    pub grads: Vec<Option<Tensor>>,
}

/// Forward and backward of one pair micro-batch: the reference pass (DPO: `reference`'s log-probabilities,
/// precomputed ones included; `None`: the base with the adapters off), then the policy pass through the shared
/// checkpointed step, back-propagating `weight * (preference loss + aux_coef * aux)`.
#[allow(clippy::too_many_arguments)]
pub fn pair_forward_backward(
    model: &Model,
    params: &TrainableParams,
    pb: &PairBatch,
    settings: &PreferenceSettings,
    reference: Option<&Reference>,
    aux_coef: f64,
    weight: f64,
    checkpointing: bool,
    keep_last: usize,
) -> Result<PairOutput> {
    if pb.input_ids.len() != pb.rows() * pb.seq_len
        || pb.completion.len() != pb.input_ids.len()
        || pb.valid.len() != pb.input_ids.len()
    {
        candle_core::bail!("pair batch: {} ids for {} rows x {}", pb.input_ids.len(), pb.rows(), pb.seq_len);
    }
    let reference = match settings.objective {
        PreferenceObjective::Dpo { .. } => Some(reference_for(model, params, pb, reference, true)?),
        PreferenceObjective::Orpo => None,
    };
    let mb = pb.micro_batch(chosen_nll(settings));
    let targets = ShiftedTargets::new(&mb.labels, mb.batch, model.config.vocab_size, None)?;
    let mut metrics = None;
    let mut head = |hidden: &Tensor| -> Result<Option<HeadLoss>> {
        let Some(nll) = labelled_nll(model, hidden, &targets)? else { return Ok(None) };
        let values = nll.to_vec1::<f32>()?;
        let sums = RowSums::new(pb, &targets, &values);
        let (m, w) = loss_and_weights(settings, pb.pairs, &sums, reference.as_deref());
        let w: Vec<f32> = w.iter().map(|x| (x * weight) as f32).collect();
        let w = Tensor::from_vec(w, values.len(), hidden.device())?;
        let objective = (nll * w)?.sum_all()?;
        let value = m.loss;
        metrics = Some(m);
        Ok(Some(HeadLoss { objective, value }))
    };
    let pass = forward_backward_with_head(model, params, &mb, &mut head, aux_coef * weight, checkpointing, keep_last)?;
    let metrics = metrics.ok_or_else(|| candle_core::Error::Msg("pair batch without completion tokens".into()))?;
    Ok(PairOutput { metrics, aux: pass.aux, expert_load: pass.expert_load, grads: pass.grads })
}

/// The preference metrics of `pb` without gradients (evaluation): DPO's reference log-probabilities are
/// computed now from `reference` (never precomputed ones: `pb` is not from the training pairs; `None`: the base
/// with the adapters off).
pub fn pair_metrics(
    model: &Model,
    params: &TrainableParams,
    pb: &PairBatch,
    settings: &PreferenceSettings,
    reference: Option<&Reference>,
) -> Result<PreferenceMetrics> {
    let reference = match settings.objective {
        PreferenceObjective::Dpo { .. } => Some(reference_for(model, params, pb, reference, false)?),
        PreferenceObjective::Orpo => None,
    };
    policy_metrics(model, pb, settings, reference.as_deref())
}

/// The preference metrics of `pb` under `model` as it is (the policy), without gradients, given DPO's
/// per-row reference log-probabilities (`None` for ORPO; for DPO, `None` means a reference equal to zero).
/// Evaluation of adapters applied for inference (`tramontane eval`) uses it with the reference model's
/// [`sequence_logps`].
pub fn policy_metrics(
    model: &Model,
    pb: &PairBatch,
    settings: &PreferenceSettings,
    reference: Option<&[f64]>,
) -> Result<PreferenceMetrics> {
    if reference.is_some_and(|r| r.len() != pb.rows()) {
        candle_core::bail!("{} reference log-probabilities for {} rows", reference.map_or(0, <[f64]>::len), pb.rows());
    }
    let mb = pb.micro_batch(chosen_nll(settings));
    let targets = ShiftedTargets::new(&mb.labels, mb.batch, model.config.vocab_size, None)?;
    let ids = Tensor::from_vec(mb.input_ids.clone(), (mb.batch, mb.seq_len), &model.device)?;
    let out = model.forward(&ids, layout(&mb), None)?;
    let nll = match labelled_nll(model, &out.hidden.detach(), &targets)? {
        Some(nll) => nll.to_vec1::<f32>()?,
        None => candle_core::bail!("pair batch without completion tokens"),
    };
    let sums = RowSums::new(pb, &targets, &nll);
    Ok(loss_and_weights(settings, pb.pairs, &sums, reference).0)
}

/// One optimizer step over pair micro-batches (DPO's reference: see [`pair_forward_backward`]): each contributes `1 / micro_batches.len()` of its mean
/// loss over pairs (and of its aux loss), gradients are accumulated, clipped and applied as for SFT
/// ([`apply_update`]). The report's `loss` is the mean preference loss plus `aux_coef` times the mean
/// aux loss; `ce` is ORPO's NLL term (0 for DPO); `preference` holds the mean metrics.
#[allow(clippy::too_many_arguments)]
pub fn preference_step(
    step: u64,
    model: &Model,
    params: &TrainableParams,
    optimizer: &mut AdamW,
    schedule: &Schedule,
    micro_batches: &[PairBatch],
    preference: &PreferenceSettings,
    reference: Option<&Reference>,
    settings: &StepSettings,
    dropout_seed: u64,
    progress: &mut dyn FnMut(StepProgress),
) -> Result<StepReport> {
    let aux_coef = if model.config.is_moe() { settings.aux_coef } else { 0.0 };
    let of = micro_batches.len().max(1);
    let weight = 1.0 / of as f64;
    let mut grads: Vec<Option<Tensor>> = vec![None; params.named.len()];
    let (mut aux_sum, mut aux_seen, mut tokens, mut label_tokens) = (0.0, false, 0usize, 0usize);
    let mut expert_load: Vec<Vec<f32>> = Vec::new();
    let mut metrics = Vec::with_capacity(of);
    for (i, pb) in micro_batches.iter().enumerate() {
        params.dropout.train_with_seed(dropout_seed.wrapping_add(i as u64));
        let keep = kept_layers(model, pb.input_ids.len(), settings);
        let out = pair_forward_backward(
            model,
            params,
            pb,
            preference,
            reference,
            aux_coef,
            weight,
            settings.checkpointing,
            keep,
        );
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                params.dropout.eval();
                return Err(e);
            }
        };
        let mb_tokens = pb.tokens();
        tokens += mb_tokens;
        label_tokens += pb.completion.iter().filter(|c| **c).count();
        if let Some(a) = out.aux {
            aux_sum += a;
            aux_seen = true;
        }
        add_expert_load(&mut expert_load, &out.expert_load, of);
        accumulate(&mut grads, out.grads)?;
        metrics.push(out.metrics);
        progress(StepProgress { done: i + 1, of, tokens: mb_tokens });
    }
    params.dropout.eval();
    let m = PreferenceMetrics::mean(&metrics);
    let aux = aux_seen.then_some(aux_sum / of as f64);
    let loss = m.loss + aux_coef * aux.unwrap_or(0.0);
    let (grad_norm, lr, applied) = apply_update(step, params, optimizer, schedule, &mut grads, loss, settings)?;
    Ok(StepReport {
        step: step + 1,
        loss,
        ce: m.nll_loss.unwrap_or(0.0),
        aux,
        label_tokens,
        tokens,
        grad_norm,
        lr,
        expert_load,
        applied,
        preference: Some(m),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log1mexp_matches_the_direct_formula_on_both_branches() {
        for x in [-5.0, -1.0, -0.7, -0.5, -0.01] {
            let direct = (1.0 - f64::exp(x)).ln();
            assert!((log1mexp(x) - direct).abs() < 1e-12, "{x}");
        }
    }

    #[test]
    fn log_sigmoid_is_stable() {
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-15);
        assert!(log_sigmoid(-800.0).is_finite() && log_sigmoid(800.0) == 0.0);
    }
}
