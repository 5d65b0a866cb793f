//! Preference pairs (`data.format = "preference"`, for DPO and ORPO): reading, encoding, truncation and
//! batching.
//!
//! A row holds a `prompt` (a string, taken as one user message, or a list of messages, optionally after a
//! `system` column) and a `chosen` and a `rejected` completion (a string, taken as one assistant message; an
//! assistant message struct; or a list of messages). Column names come from `data.columns.{prompt, chosen,
//! rejected, system}`.
//!
//! **Encoding** is the model's Mistral prompt format, as TRL does it with a chat template: the prompt is
//! encoded as a prompt to be continued ([`Encoder::encode_prompt`]), prompt + chosen and prompt + rejected as
//! training conversations; the pair's prompt is the longest common prefix of the three (in every Mistral format
//! that is the whole prompt), and each completion is the rest of its conversation, closing `</s>` included.
//! Every completion token is trained; prompt tokens never are (ORPO's NLL term adds the chosen row's prompt, as
//! TRL does; see the trainer).
//!
//! **Bad rows** follow `data.on_invalid` (an error naming the file, the row and the column, or a counted skip):
//! a null or missing chosen/rejected value, an empty completion, chosen and rejected encoding to the same tokens,
//! and a prompt that leaves no room for a completion within `data.max_seq_len` (unless `truncation = "truncate"`).
//!
//! **Length**: a pair is too long when its prompt plus its longer completion exceeds `max_seq_len`.
//! `truncation = "drop"` skips it (counted), `"error"` stops, `"truncate"` cuts the prompt first (keeping `<s>`
//! and its last tokens, down to `max_seq_len` minus the longer completion but never below half of
//! `max_seq_len`), then the completions to what is left (their ends go); both cuts are counted.
//!
//! **Batches** are never packed: a micro-batch of `n` pairs is `2n` right-padded rows, the chosen rows first
//! ([`PairBatch`]), shuffled per epoch from the seed and resumable from a [`DataPosition`].

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::batch::DataPosition;
use crate::config::{DataConfig, OnInvalid, Truncation};
use crate::encode::Encoder;
use crate::error::{Error, Origin, Problem, ProblemKind, RecordError, Result};
use crate::json::Json;
use crate::record::{optional_text, parse_message, parse_messages, Conversation, Layout, Message, Role};
use crate::rng;
use crate::source::{expand_files, for_each_row};

/// How many skip reasons are kept in [`PairStats::skip_examples`].
const SKIP_EXAMPLES: usize = 5;

/// One encoded preference pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    /// The shared prompt's token ids (starting with `<s>`).
    pub prompt: Vec<u32>,
    /// The chosen completion's ids (through its `</s>` unless truncated).
    pub chosen: Vec<u32>,
    /// The rejected completion's ids.
    pub rejected: Vec<u32>,
    /// Where the row came from.
    pub origin: Origin,
}

/// What loading pairs saw and did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PairStats {
    /// The files read.
    pub files: Vec<PathBuf>,
    /// Rows read.
    pub rows: u64,
    /// Pairs kept.
    pub pairs: usize,
    /// Prompt tokens of the kept pairs.
    pub prompt_tokens: u64,
    /// Chosen-completion tokens of the kept pairs.
    pub chosen_tokens: u64,
    /// Rejected-completion tokens of the kept pairs.
    pub rejected_tokens: u64,
    /// Invalid rows skipped (`data.on_invalid = "skip"`).
    pub skipped_invalid: u64,
    /// Rows skipped because a required value was null (`data.on_invalid = "skip"`).
    pub skipped_null: u64,
    /// Pairs longer than `max_seq_len` dropped (`data.truncation = "drop"`).
    pub dropped_too_long: u64,
    /// Pairs whose prompt was cut (`data.truncation = "truncate"`).
    pub truncated_prompts: u64,
    /// Pairs whose completions were cut after the prompt (`data.truncation = "truncate"`).
    pub truncated_completions: u64,
    /// Pairs moved to the eval split (`data.eval_fraction`), counted on the train side.
    pub held_out: u64,
    /// The first few skip reasons, "FILE row N: ...".
    pub skip_examples: Vec<String>,
}

/// Encoded pairs in memory, with statistics.
#[derive(Debug, Clone, Default)]
pub struct PairDataset {
    /// The pairs, in file order.
    pub pairs: Vec<EncodedPair>,
    /// What loading saw and did.
    pub stats: PairStats,
}

impl PairDataset {
    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// `true` when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// FNV-1a over every pair's ids: equal datasets have equal fingerprints.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        eat(self.pairs.len() as u64);
        for p in &self.pairs {
            for part in [&p.prompt, &p.chosen, &p.rejected] {
                eat(part.len() as u64);
                part.iter().for_each(|&id| eat(u64::from(id)));
            }
        }
        h
    }

    fn push(&mut self, pair: EncodedPair) {
        self.stats.pairs += 1;
        self.stats.prompt_tokens += pair.prompt.len() as u64;
        self.stats.chosen_tokens += pair.chosen.len() as u64;
        self.stats.rejected_tokens += pair.rejected.len() as u64;
        self.pairs.push(pair);
    }
}

/// The training pairs and, when configured, the evaluation pairs.
#[derive(Debug, Clone)]
pub struct LoadedPairs {
    /// Training pairs.
    pub train: Arc<PairDataset>,
    /// Evaluation pairs (`data.eval_fraction` or `data.eval_files`).
    pub eval: Option<Arc<PairDataset>>,
}

/// Loads a `preference` dataset: reads, encodes and checks every row, holds out the eval split (from `seed`).
pub fn load_pairs(config: &DataConfig, encoder: &Encoder, seed: u64) -> Result<LoadedPairs> {
    config.validate()?;
    let files = expand_files(&config.train_entries())?;
    let mut train = load_pair_files(&files, config, encoder, config.limit)?;
    if train.is_empty() {
        return Err(empty_error(&train.stats));
    }
    let eval = if !config.eval_files.is_empty() {
        let eval = load_pair_files(&expand_files(&config.eval_files)?, config, encoder, None)?;
        if eval.is_empty() {
            return Err(empty_error(&eval.stats));
        }
        Some(eval)
    } else if config.eval_fraction > 0.0 {
        let n = train.len();
        let n_eval = ((n as f64) * config.eval_fraction).round().max(1.0) as usize;
        if n_eval >= n {
            return Err(Error::Config(format!(
                "data.eval_fraction = {} leaves no training pairs out of {n}",
                config.eval_fraction
            )));
        }
        let perm = rng::permutation(n, rng::mix(&[seed, 0xE7A1]));
        let mut is_eval = vec![false; n];
        perm[..n_eval].iter().for_each(|&i| is_eval[i as usize] = true);
        let base = PairStats { skip_examples: Vec::new(), ..train.stats.clone() };
        let mut kept = PairDataset { stats: zeroed(&base), ..Default::default() };
        let mut held = PairDataset {
            stats: zeroed(&PairStats { files: base.files.clone(), ..Default::default() }),
            ..Default::default()
        };
        for (pair, ev) in std::mem::take(&mut train.pairs).into_iter().zip(is_eval) {
            if ev {
                held.push(pair);
            } else {
                kept.push(pair);
            }
        }
        kept.stats.held_out = held.len() as u64;
        kept.stats.skip_examples = train.stats.skip_examples.clone();
        held.stats.rows = held.len() as u64;
        train = kept;
        Some(held)
    } else {
        None
    };
    Ok(LoadedPairs { train: Arc::new(train), eval: eval.map(Arc::new) })
}

fn zeroed(s: &PairStats) -> PairStats {
    PairStats { pairs: 0, prompt_tokens: 0, chosen_tokens: 0, rejected_tokens: 0, ..s.clone() }
}

fn empty_error(s: &PairStats) -> Error {
    let files: Vec<String> = s.files.iter().map(|f| f.display().to_string()).collect();
    let mut msg = format!(
        "no usable preference pairs in {} ({} rows read; {} invalid, {} null, {} too long)",
        files.join(", "),
        s.rows,
        s.skipped_invalid,
        s.skipped_null,
        s.dropped_too_long
    );
    if let Some(first) = s.skip_examples.first() {
        msg.push_str(&format!("; first skip: {first}"));
    }
    Error::Empty(msg)
}

/// What became of one row.
enum Outcome {
    Keep(EncodedPair, bool, bool),
    TooLong,
    Bad(Problem),
}

/// Reads and encodes the pairs of `files` (at most `limit` rows).
pub fn load_pair_files(
    files: &[PathBuf],
    config: &DataConfig,
    encoder: &Encoder,
    limit: Option<usize>,
) -> Result<PairDataset> {
    let mut d = PairDataset::default();
    d.stats.files = files.to_vec();
    let format = crate::config::Format::Preference;
    let mut failure: Option<Error> = None;
    for_each_row(files, format, &config.columns, |row| {
        if limit.is_some_and(|l| d.stats.rows >= l as u64) {
            return Ok(false);
        }
        d.stats.rows += 1;
        let outcome = match row.values {
            Ok(mut values) => encode_row(&row.layout, &mut values, config, encoder, row.origin.clone()),
            Err(p) => Outcome::Bad(p),
        };
        match outcome {
            Outcome::Keep(pair, cut_prompt, cut_completion) => {
                d.stats.truncated_prompts += u64::from(cut_prompt);
                d.stats.truncated_completions += u64::from(cut_completion);
                d.push(pair);
            }
            Outcome::TooLong => d.stats.dropped_too_long += 1,
            Outcome::Bad(problem) => {
                if config.on_invalid == OnInvalid::Error || problem.kind == ProblemKind::TooLong {
                    failure = Some(Error::Record(RecordError { origin: row.origin, problem }));
                    return Ok(false);
                }
                match problem.kind {
                    ProblemKind::Null => d.stats.skipped_null += 1,
                    _ => d.stats.skipped_invalid += 1,
                }
                if d.stats.skip_examples.len() < SKIP_EXAMPLES {
                    d.stats.skip_examples.push(format!("{}: {problem}", row.origin));
                }
            }
        }
        Ok(true)
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(d),
    }
}

/// The messages of a prompt value: a string is one user message.
fn prompt_messages(v: Json, column: &str, config: &DataConfig) -> std::result::Result<Vec<Message>, Problem> {
    match v {
        Json::Str(s) => Ok(vec![Message::new(Role::User, s)]),
        Json::Null => Err(Problem::null(format!("column `{column}` is null"))),
        v => parse_messages(v, column, config),
    }
}

/// The messages of a completion value: a string is one assistant message, an object one message.
fn completion_messages(v: Json, column: &str, config: &DataConfig) -> std::result::Result<Vec<Message>, Problem> {
    let messages = match v {
        Json::Str(s) => vec![Message::new(Role::Assistant, s)],
        Json::Null => return Err(Problem::null(format!("column `{column}` is null (a pair needs both completions)"))),
        Json::Object(_) => vec![parse_message(v, config).map_err(|p| p.within(format!("column `{column}`")))?],
        v => parse_messages(v, column, config)?,
    };
    let Some(last) = messages.last() else {
        return Err(Problem::invalid(format!("column `{column}`: the completion has no message")));
    };
    if last.role != Role::Assistant {
        return Err(Problem::invalid(format!(
            "column `{column}`: the completion must end with an assistant message, not {}",
            last.role.with_article()
        )));
    }
    if messages.iter().all(|m| m.role != Role::Assistant || (m.content.trim().is_empty() && m.tool_calls.is_empty())) {
        return Err(Problem::invalid(format!("column `{column}`: the completion is empty")));
    }
    Ok(messages)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn encode_row(layout: &Layout, values: &mut [Json], config: &DataConfig, encoder: &Encoder, origin: Origin) -> Outcome {
    let Layout::Preference { prompt, chosen, rejected, system } = layout else {
        return Outcome::Bad(Problem::invalid("not a preference layout"));
    };
    let mut take = |i: usize| std::mem::replace(&mut values[i], Json::Null);
    let parsed = (|| {
        let mut p = prompt_messages(take(0), prompt, config)?;
        let c = completion_messages(take(1), chosen, config)?;
        let r = completion_messages(take(2), rejected, config)?;
        if let Some(col) = system {
            if let Some(s) = optional_text(take(3), col)?.filter(|s| !s.is_empty()) {
                p.insert(0, Message::new(Role::System, s));
            }
        }
        Ok::<_, Problem>((p, c, r))
    })();
    let (p, c, r) = match parsed {
        Ok(x) => x,
        Err(problem) => return Outcome::Bad(problem),
    };
    let conv = |messages: Vec<Message>| Conversation { messages, tools: Vec::new() };
    let encoded = (|| {
        let prompt_ids = encoder.encode_prompt(&conv(p.clone())).map_err(|e| e.within(format!("column `{prompt}`")))?;
        let full = |more: Vec<Message>, col: &str| {
            let mut all = p.clone();
            all.extend(more);
            encoder
                .encode_conversation(&conv(all))
                .map(|e| e.input_ids)
                .map_err(|e| e.within(format!("column `{col}`")))
        };
        Ok::<_, Problem>((prompt_ids, full(c, chosen)?, full(r, rejected)?))
    })();
    let (prompt_ids, with_c, with_r) = match encoded {
        Ok(x) => x,
        Err(problem) => return Outcome::Bad(problem),
    };
    let cut = common_prefix(&prompt_ids, &with_c).min(common_prefix(&prompt_ids, &with_r));
    let mut pair = EncodedPair {
        prompt: prompt_ids[..cut].to_vec(),
        chosen: with_c[cut..].to_vec(),
        rejected: with_r[cut..].to_vec(),
        origin,
    };
    if pair.chosen.is_empty() || pair.rejected.is_empty() {
        let col = if pair.chosen.is_empty() { chosen } else { rejected };
        return Outcome::Bad(Problem::invalid(format!("column `{col}`: the completion encodes to no token")));
    }
    if pair.chosen == pair.rejected {
        return Outcome::Bad(Problem::invalid(format!(
            "columns `{chosen}` and `{rejected}` are identical: a pair must prefer one completion over another"
        )));
    }
    let max = config.max_seq_len;
    let longest = pair.chosen.len().max(pair.rejected.len());
    if pair.prompt.len() + longest <= max {
        return Outcome::Keep(pair, false, false);
    }
    match config.truncation {
        Truncation::Truncate => {
            let keep = max.saturating_sub(longest).max(max / 2).max(1).min(pair.prompt.len());
            let cut_prompt = keep < pair.prompt.len();
            if cut_prompt {
                let tail = pair.prompt.len() - (keep - 1);
                let mut p = vec![pair.prompt[0]];
                p.extend_from_slice(&pair.prompt[tail..]);
                pair.prompt = p;
            }
            let room = max - pair.prompt.len();
            let cut_completion = longest > room;
            pair.chosen.truncate(room);
            pair.rejected.truncate(room);
            if pair.chosen == pair.rejected {
                return Outcome::Bad(Problem::invalid(format!(
                    "columns `{chosen}` and `{rejected}` are identical once truncated to data.max_seq_len = {max}"
                )));
            }
            Outcome::Keep(pair, cut_prompt, cut_completion)
        }
        _ if pair.prompt.len() >= max => Outcome::Bad(Problem::invalid(format!(
            "column `{prompt}`: the prompt has {} tokens and leaves no room for a completion within \
             data.max_seq_len = {max} (raise it, or set data.truncation = \"truncate\")",
            pair.prompt.len()
        ))),
        Truncation::Drop => Outcome::TooLong,
        Truncation::Error => Outcome::Bad(Problem {
            kind: ProblemKind::TooLong,
            message: format!(
                "the pair has {} prompt + {longest} completion tokens, more than data.max_seq_len = {max} (set \
                 data.truncation = \"drop\" or \"truncate\", or raise max_seq_len)",
                pair.prompt.len()
            ),
        }),
    }
}

/// A micro-batch of `pairs` pairs as `2 * pairs` right-padded rows: rows `0..pairs` are prompt + chosen,
/// the next `pairs` prompt + rejected (TRL's `DataCollatorForPreference` layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairBatch {
    /// Pairs.
    pub pairs: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Token ids `[2 pairs * seq_len]` (padding: the pad id).
    pub input_ids: Vec<u32>,
    /// `true` on completion tokens.
    pub completion: Vec<bool>,
    /// `false` on padding.
    pub valid: Vec<bool>,
    /// Each pair's index in its [`PairDataset`] (empty when the batch was laid out from loose pairs): what
    /// precomputed per-pair values (DPO's reference log-probabilities) are looked up by.
    pub indices: Vec<u32>,
}

impl PairBatch {
    /// Rows (twice the pairs).
    pub fn rows(&self) -> usize {
        2 * self.pairs
    }

    /// Non-padding tokens.
    pub fn tokens(&self) -> usize {
        self.valid.iter().filter(|v| **v).count()
    }

    /// Lays out `pairs`, padding every row with `pad_id` to the longest rounded up to `multiple`.
    pub fn new(pairs: &[&EncodedPair], pad_id: u32, multiple: usize) -> PairBatch {
        let longest = pairs.iter().map(|p| p.prompt.len() + p.chosen.len().max(p.rejected.len())).max().unwrap_or(0);
        let seq_len = longest.div_ceil(multiple.max(1)) * multiple.max(1);
        let rows = 2 * pairs.len();
        let mut b = PairBatch {
            pairs: pairs.len(),
            seq_len,
            input_ids: vec![pad_id; rows * seq_len],
            completion: vec![false; rows * seq_len],
            valid: vec![false; rows * seq_len],
            indices: Vec::new(),
        };
        let sides = pairs.iter().map(|p| (&p.prompt, &p.chosen)).chain(pairs.iter().map(|p| (&p.prompt, &p.rejected)));
        for (row, (prompt, completion)) in sides.enumerate() {
            let start = row * seq_len;
            for (j, &id) in prompt.iter().chain(completion.iter()).enumerate() {
                b.input_ids[start + j] = id;
                b.valid[start + j] = true;
                b.completion[start + j] = j >= prompt.len();
            }
        }
        b
    }
}

/// The endless, shuffled, resumable stream of pair micro-batches.
#[derive(Debug, Clone)]
pub struct PairBatches {
    data: Arc<PairDataset>,
    micro_batch_size: usize,
    shuffle: bool,
    seed: u64,
    pad_id: u32,
    multiple: usize,
    fingerprint: u64,
    epoch: u64,
    order: Vec<u32>,
    next: usize,
}

impl PairBatches {
    /// Starts at epoch 0, batch 0. `multiple`: round each batch's length up to it (`data.pad_to_multiple_of`).
    pub fn new(
        data: Arc<PairDataset>,
        micro_batch_size: usize,
        shuffle: bool,
        seed: u64,
        pad_id: u32,
        multiple: usize,
    ) -> Result<PairBatches> {
        if data.is_empty() {
            return Err(Error::Empty("no preference pairs to batch".into()));
        }
        if micro_batch_size == 0 {
            return Err(Error::Config("train.micro_batch_size: must be at least 1".into()));
        }
        let fingerprint = rng::mix(&[data.fingerprint(), micro_batch_size as u64, u64::from(shuffle), seed]);
        let mut b = PairBatches {
            data,
            micro_batch_size,
            shuffle,
            seed,
            pad_id,
            multiple,
            fingerprint,
            epoch: 0,
            order: Vec::new(),
            next: 0,
        };
        b.order = b.epoch_order(0);
        Ok(b)
    }

    /// Continues from a saved position; refuses one from other data or settings.
    pub fn resume(mut self, pos: DataPosition) -> Result<PairBatches> {
        if pos.fingerprint != self.fingerprint {
            return Err(Error::Position(format!(
                "the pairs or the batch settings (micro_batch_size, shuffle, seed) changed since the checkpoint \
                 (fingerprint {:016x}, now {:016x})",
                pos.fingerprint, self.fingerprint
            )));
        }
        if pos.batch as usize > self.batches_per_epoch() {
            return Err(Error::Position(format!("batch {} of epoch {} does not exist", pos.batch, pos.epoch)));
        }
        self.epoch = pos.epoch;
        self.order = self.epoch_order(pos.epoch);
        self.next = pos.batch as usize;
        Ok(self)
    }

    fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        if self.shuffle {
            rng::permutation(self.data.len(), rng::mix(&[self.seed, epoch, 0x9A1F]))
        } else {
            (0..self.data.len() as u32).collect()
        }
    }

    /// Micro-batches per epoch (the last may hold fewer pairs).
    pub fn batches_per_epoch(&self) -> usize {
        self.data.len().div_ceil(self.micro_batch_size)
    }

    /// The position of the next batch.
    pub fn position(&self) -> DataPosition {
        if self.next >= self.batches_per_epoch() {
            DataPosition { epoch: self.epoch + 1, batch: 0, fingerprint: self.fingerprint }
        } else {
            DataPosition { epoch: self.epoch, batch: self.next as u64, fingerprint: self.fingerprint }
        }
    }

    /// The pairs.
    pub fn data(&self) -> &Arc<PairDataset> {
        &self.data
    }

    fn build(&self, index: usize) -> PairBatch {
        let lo = index * self.micro_batch_size;
        let hi = (lo + self.micro_batch_size).min(self.data.len());
        let pairs: Vec<&EncodedPair> = self.order[lo..hi].iter().map(|&i| &self.data.pairs[i as usize]).collect();
        let mut b = PairBatch::new(&pairs, self.pad_id, self.multiple);
        b.indices = self.order[lo..hi].to_vec();
        b
    }

    /// The next micro-batch, moving to the next (reshuffled) epoch when one ends. Never ends.
    pub fn next_batch(&mut self) -> PairBatch {
        if self.next >= self.batches_per_epoch() {
            self.epoch += 1;
            self.order = self.epoch_order(self.epoch);
            self.next = 0;
        }
        let b = self.build(self.next);
        self.next += 1;
        b
    }

    /// The batches from the current position to the end of the epoch (evaluation passes).
    pub fn rest_of_epoch(&mut self) -> Vec<PairBatch> {
        let mut out = Vec::new();
        while self.next < self.batches_per_epoch() {
            out.push(self.build(self.next));
            self.next += 1;
        }
        out
    }
}
