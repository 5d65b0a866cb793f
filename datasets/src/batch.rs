//! Sequence assembly: shuffling, packing, padding, micro-batches, and a resumable position.
//!
//! Every epoch has a *plan*: the examples in a deterministic order (a permutation from the seed and the epoch
//! number, or file order without shuffling), grouped into rows of at most `max_seq_len` tokens (first-fit over a
//! few open rows when packing; one example per row otherwise), then cut into micro-batches. The plan is a pure
//! function of (dataset, settings, epoch), so a [`DataPosition`] — epoch and batch index — is all a checkpoint needs
//! to restart exactly where it stopped.
//!
//! Within a packed row every token carries its document id and its position inside its document: the engine
//! builds a block-diagonal causal mask from the ids and restarts rotary positions per document, so no example
//! attends to another and each sees the same positions as when alone.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::DataConfig;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::rng;
use crate::IGNORE_INDEX;

/// How many rows stay open for first-fit packing (more rows: fuller rows, less order preserved).
const OPEN_ROWS: usize = 16;

/// Settings of batch assembly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchConfig {
    /// Rows per micro-batch (> 0).
    pub micro_batch_size: usize,
    /// Longest row in tokens (> 0); every example must fit (the loader drops or truncates longer ones).
    pub max_seq_len: usize,
    /// Pack several examples per row.
    pub packing: bool,
    /// Shuffle every epoch.
    pub shuffle: bool,
    /// Seed of the shuffles.
    pub seed: u64,
    /// Token id written in padding slots (never trained; any id works).
    pub pad_id: u32,
    /// Round each batch's length up to a multiple of this (capped at `max_seq_len`).
    pub pad_to_multiple_of: usize,
}

impl BatchConfig {
    /// Settings from the `[data]` section, the micro-batch size, the seed and the padding id.
    pub fn new(data: &DataConfig, micro_batch_size: usize, seed: u64, pad_id: u32) -> BatchConfig {
        BatchConfig {
            micro_batch_size,
            max_seq_len: data.max_seq_len,
            packing: data.packing,
            shuffle: data.shuffle,
            seed,
            pad_id,
            pad_to_multiple_of: data.pad_to_multiple_of.max(1),
        }
    }

    /// The same settings without shuffling (for evaluation).
    pub fn unshuffled(&self) -> BatchConfig {
        BatchConfig { shuffle: false, ..self.clone() }
    }

    fn check(&self) -> Result<()> {
        if self.micro_batch_size == 0 {
            return Err(Error::Config("train.micro_batch_size: must be at least 1 (got 0)".into()));
        }
        if self.max_seq_len == 0 {
            return Err(Error::Config("data.max_seq_len: must be at least 1 (got 0)".into()));
        }
        Ok(())
    }

    fn fingerprint(&self, data: &Dataset) -> u64 {
        rng::mix(&[
            data.fingerprint(),
            self.micro_batch_size as u64,
            self.max_seq_len as u64,
            u64::from(self.packing),
            u64::from(self.shuffle),
            self.seed,
        ])
    }
}

/// Where the data stream stands: the next batch to produce. Small and serializable, for checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DataPosition {
    /// Epoch of the next batch (0-based).
    pub epoch: u64,
    /// Index of the next batch within its epoch (0-based).
    pub batch: u64,
    /// Identifies the dataset and batch settings; resuming with different data or settings is refused.
    pub fingerprint: u64,
}

/// One document inside a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSpan {
    /// First token of the document in the row.
    pub start: usize,
    /// Number of tokens.
    pub len: usize,
    /// Index of the example in its [`Dataset`].
    pub example: usize,
}

/// A micro-batch: `batch_size` rows of `seq_len` tokens, row-major.
///
/// Padding slots hold `pad_id`, label `-100`, position counting from 0 at the padding start, and their own
/// document id (one past the row's last document), so a block-diagonal causal mask never leaves a query without
/// keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Batch {
    /// Rows.
    pub batch_size: usize,
    /// Tokens per row (the longest row, rounded up to `pad_to_multiple_of`, at most `max_seq_len`).
    pub seq_len: usize,
    /// `[batch_size * seq_len]` token ids.
    pub input_ids: Vec<u32>,
    /// `[batch_size * seq_len]` labels, Hugging Face convention: the input id where trained, -100 elsewhere; NOT
    /// shifted (position `t` is predicted from positions `< t` of the same document). See [`Batch::targets`].
    pub labels: Vec<i64>,
    /// `[batch_size * seq_len]` position of each token inside its document (restarts at 0 per document).
    pub positions: Vec<u32>,
    /// `[batch_size * seq_len]` document index of each token inside its row (0, 0, .., 1, 1, ..; padding has its
    /// own index). Token `q` may attend token `k` iff `k <= q` and both have the same document id.
    pub doc_ids: Vec<u32>,
    /// Real (non-padding) tokens per row.
    pub row_lengths: Vec<usize>,
    /// The documents of each row.
    pub docs: Vec<Vec<DocSpan>>,
    /// Position of this batch in the stream (epoch and index within the epoch).
    pub epoch: u64,
    /// Index of this batch within its epoch.
    pub index: u64,
}

impl Batch {
    /// Next-token targets, aligned with the logits: `targets[t] = labels[t + 1]` when `t + 1` is in the same
    /// document, else -100. The loss is the mean of cross-entropy over the non-(-100) targets.
    pub fn targets(&self) -> Vec<i64> {
        let t = self.seq_len;
        let mut out = vec![IGNORE_INDEX; self.labels.len()];
        for r in 0..self.batch_size {
            let base = r * t;
            for i in 0..t.saturating_sub(1) {
                if i + 1 < self.row_lengths[r] && self.doc_ids[base + i] == self.doc_ids[base + i + 1] {
                    out[base + i] = self.labels[base + i + 1];
                }
            }
        }
        out
    }

    /// Number of trained target tokens (what the loss is averaged over; sum it over the micro-batches of an
    /// optimizer step to normalize gradient accumulation by tokens, not by micro-batch).
    pub fn num_targets(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Real (non-padding) tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.row_lengths.iter().sum()
    }

    /// Whether query token `q` may attend key token `k` in row `row` (causal, same document).
    pub fn attends(&self, row: usize, q: usize, k: usize) -> bool {
        let base = row * self.seq_len;
        k <= q && self.doc_ids[base + q] == self.doc_ids[base + k]
    }
}

/// The rows of one epoch: each row is a list of example indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    /// Example indices of each row, in order.
    pub rows: Vec<Vec<u32>>,
    /// Micro-batch size, to cut rows into batches.
    pub micro_batch_size: usize,
}

impl EpochPlan {
    /// Plans epoch `epoch` of `data`.
    pub fn new(data: &Dataset, cfg: &BatchConfig, epoch: u64) -> EpochPlan {
        let n = data.len();
        let order: Vec<u32> =
            if cfg.shuffle { rng::permutation(n, rng::mix(&[cfg.seed, epoch])) } else { (0..n as u32).collect() };
        let rows =
            if cfg.packing { pack(data, &order, cfg.max_seq_len) } else { order.iter().map(|&i| vec![i]).collect() };
        EpochPlan { rows, micro_batch_size: cfg.micro_batch_size.max(1) }
    }

    /// Number of micro-batches.
    pub fn num_batches(&self) -> usize {
        self.rows.len().div_ceil(self.micro_batch_size)
    }

    /// The rows of batch `b`.
    pub fn batch_rows(&self, b: usize) -> &[Vec<u32>] {
        let start = (b * self.micro_batch_size).min(self.rows.len());
        let end = (start + self.micro_batch_size).min(self.rows.len());
        &self.rows[start..end]
    }
}

/// First-fit packing over a window of open rows, in the given order. Deterministic.
fn pack(data: &Dataset, order: &[u32], max_len: usize) -> Vec<Vec<u32>> {
    // (creation index, used tokens, examples)
    let mut open: Vec<(usize, usize, Vec<u32>)> = Vec::with_capacity(OPEN_ROWS + 1);
    let mut done: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut created = 0usize;
    for &i in order {
        let len = data.example_len(i as usize).min(max_len);
        if let Some(slot) = open.iter().position(|(_, used, _)| used + len <= max_len) {
            let row = &mut open[slot];
            row.1 += len;
            row.2.push(i);
            if row.1 == max_len {
                let (c, _, ex) = open.remove(slot);
                done.push((c, ex));
            }
        } else {
            open.push((created, len, vec![i]));
            created += 1;
            if open.len() > OPEN_ROWS {
                let (c, _, ex) = open.remove(0);
                done.push((c, ex));
            }
        }
    }
    done.extend(open.into_iter().map(|(c, _, ex)| (c, ex)));
    done.sort_by_key(|(c, _)| *c);
    done.into_iter().map(|(_, ex)| ex).collect()
}

/// Builds batch `index` of `plan`.
pub fn build_batch(data: &Dataset, cfg: &BatchConfig, plan: &EpochPlan, epoch: u64, index: usize) -> Batch {
    let rows = plan.batch_rows(index);
    let lens: Vec<usize> = rows
        .iter()
        .map(|r| r.iter().map(|&i| data.example_len(i as usize)).sum::<usize>().min(cfg.max_seq_len))
        .collect();
    let longest = lens.iter().copied().max().unwrap_or(0).max(1);
    let m = cfg.pad_to_multiple_of.max(1);
    let seq_len = longest.div_ceil(m).saturating_mul(m).min(cfg.max_seq_len).max(longest);
    let b = rows.len();
    let mut batch = Batch {
        batch_size: b,
        seq_len,
        input_ids: vec![cfg.pad_id; b * seq_len],
        labels: vec![IGNORE_INDEX; b * seq_len],
        positions: vec![0; b * seq_len],
        doc_ids: vec![0; b * seq_len],
        row_lengths: lens.clone(),
        docs: Vec::with_capacity(b),
        epoch,
        index: index as u64,
    };
    for (r, row) in rows.iter().enumerate() {
        let base = r * seq_len;
        let mut at = 0usize;
        let mut spans = Vec::with_capacity(row.len());
        for (d, &ex) in row.iter().enumerate() {
            let e = data.example(ex as usize);
            let n = e.input_ids.len().min(seq_len - at);
            for k in 0..n {
                let t = base + at + k;
                batch.input_ids[t] = e.input_ids[k];
                batch.labels[t] = if e.loss_mask[k] { i64::from(e.input_ids[k]) } else { IGNORE_INDEX };
                batch.positions[t] = k as u32;
                batch.doc_ids[t] = d as u32;
            }
            spans.push(DocSpan { start: at, len: n, example: ex as usize });
            at += n;
        }
        let pad_doc = row.len() as u32;
        for (k, t) in (base + at..base + seq_len).enumerate() {
            batch.positions[t] = k as u32;
            batch.doc_ids[t] = pad_doc;
        }
        batch.docs.push(spans);
    }
    batch
}

/// Packing statistics of one epoch plan.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PackingStats {
    /// Rows (sequences).
    pub rows: usize,
    /// Micro-batches.
    pub batches: usize,
    /// Real tokens.
    pub tokens: u64,
    /// Token slots computed on (sum of batch_size * seq_len over the batches).
    pub slots: u64,
    /// tokens / slots: the share of computation spent on real tokens.
    pub efficiency: f64,
    /// Mean examples per row.
    pub examples_per_row: f64,
}

impl PackingStats {
    /// Statistics of `plan` (batches are sized as [`build_batch`] sizes them).
    pub fn of(data: &Dataset, cfg: &BatchConfig, plan: &EpochPlan) -> PackingStats {
        let m = cfg.pad_to_multiple_of.max(1);
        let mut tokens = 0u64;
        let mut slots = 0u64;
        for b in 0..plan.num_batches() {
            let rows = plan.batch_rows(b);
            let lens: Vec<usize> = rows
                .iter()
                .map(|r| r.iter().map(|&i| data.example_len(i as usize)).sum::<usize>().min(cfg.max_seq_len))
                .collect();
            let longest = lens.iter().copied().max().unwrap_or(0).max(1);
            let seq_len = longest.div_ceil(m).saturating_mul(m).min(cfg.max_seq_len).max(longest);
            tokens += lens.iter().sum::<usize>() as u64;
            slots += (rows.len() * seq_len) as u64;
        }
        let examples: usize = plan.rows.iter().map(|r| r.len()).sum();
        PackingStats {
            rows: plan.rows.len(),
            batches: plan.num_batches(),
            tokens,
            slots,
            efficiency: if slots == 0 { 0.0 } else { tokens as f64 / slots as f64 },
            examples_per_row: if plan.rows.is_empty() { 0.0 } else { examples as f64 / plan.rows.len() as f64 },
        }
    }
}

/// An endless stream of micro-batches over epochs, resumable from a [`DataPosition`].
///
/// ```text
/// let mut batches = Batches::new(data.train.clone(), cfg)?;
/// for step in 0..max_steps {
///     for _ in 0..grad_accum { let b = batches.next_batch(); /* forward/backward */ }
///     checkpoint.data_position = batches.position();
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Batches {
    data: Arc<Dataset>,
    cfg: BatchConfig,
    fingerprint: u64,
    epoch: u64,
    plan: EpochPlan,
    next: usize,
}

impl Batches {
    /// Starts at epoch 0, batch 0.
    pub fn new(data: Arc<Dataset>, cfg: BatchConfig) -> Result<Batches> {
        cfg.check()?;
        if data.is_empty() {
            return Err(Error::Empty("no examples to batch".into()));
        }
        let plan = EpochPlan::new(&data, &cfg, 0);
        let fingerprint = cfg.fingerprint(&data);
        Ok(Batches { data, cfg, fingerprint, epoch: 0, plan, next: 0 })
    }

    /// Continues from a saved position. Refuses a position from other data or other batch settings.
    pub fn resume(data: Arc<Dataset>, cfg: BatchConfig, pos: DataPosition) -> Result<Batches> {
        let mut b = Batches::new(data, cfg)?;
        if pos.fingerprint != b.fingerprint {
            return Err(Error::Position(format!(
                "the data or the batch settings (micro_batch_size, max_seq_len, packing, shuffle, seed) changed \
                 since the checkpoint (fingerprint {:016x}, now {:016x})",
                pos.fingerprint, b.fingerprint
            )));
        }
        b.epoch = pos.epoch;
        b.plan = EpochPlan::new(&b.data, &b.cfg, pos.epoch);
        if pos.batch as usize > b.plan.num_batches() {
            return Err(Error::Position(format!(
                "batch {} of epoch {} does not exist (the epoch has {})",
                pos.batch,
                pos.epoch,
                b.plan.num_batches()
            )));
        }
        b.next = pos.batch as usize;
        Ok(b)
    }

    /// The position of the next batch (save it in checkpoints).
    pub fn position(&self) -> DataPosition {
        if self.next >= self.plan.num_batches() {
            DataPosition { epoch: self.epoch + 1, batch: 0, fingerprint: self.fingerprint }
        } else {
            DataPosition { epoch: self.epoch, batch: self.next as u64, fingerprint: self.fingerprint }
        }
    }

    /// The epoch of the next batch.
    pub fn epoch(&self) -> u64 {
        self.position().epoch
    }

    /// Micro-batches in the current epoch.
    pub fn batches_in_epoch(&self) -> usize {
        self.plan.num_batches()
    }

    /// Micro-batches in epoch `epoch` (packing makes it vary slightly between epochs).
    pub fn batches_in(&self, epoch: u64) -> usize {
        if epoch == self.epoch {
            self.plan.num_batches()
        } else {
            EpochPlan::new(&self.data, &self.cfg, epoch).num_batches()
        }
    }

    /// Micro-batches in the first `epochs` epochs (for schedules given in epochs).
    pub fn total_batches(&self, epochs: u64) -> u64 {
        (0..epochs).map(|e| self.batches_in(e) as u64).sum()
    }

    /// The plan of the current epoch.
    pub fn plan(&self) -> &EpochPlan {
        &self.plan
    }

    /// The settings.
    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }

    /// The dataset.
    pub fn data(&self) -> &Arc<Dataset> {
        &self.data
    }

    /// Packing statistics of the current epoch.
    pub fn packing_stats(&self) -> PackingStats {
        PackingStats::of(&self.data, &self.cfg, &self.plan)
    }

    /// Produces the next micro-batch, moving to the next epoch (reshuffled) when one ends. Never ends.
    pub fn next_batch(&mut self) -> Batch {
        if self.next >= self.plan.num_batches() {
            self.epoch += 1;
            self.plan = EpochPlan::new(&self.data, &self.cfg, self.epoch);
            self.next = 0;
        }
        let b = build_batch(&self.data, &self.cfg, &self.plan, self.epoch, self.next);
        self.next += 1;
        b
    }

    /// The batches of the current epoch from the current position to its end (for evaluation passes).
    pub fn rest_of_epoch(&mut self) -> Vec<Batch> {
        let mut out = Vec::new();
        while self.next < self.plan.num_batches() {
            out.push(build_batch(&self.data, &self.cfg, &self.plan, self.epoch, self.next));
            self.next += 1;
        }
        out
    }
}

impl Iterator for Batches {
    type Item = Batch;

    /// Always `Some`: the stream cycles through epochs.
    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}
