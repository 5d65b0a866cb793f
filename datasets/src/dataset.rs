//! Loading: files -> records -> encoded examples held in memory, with statistics and the eval split.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::config::{DataConfig, OnInvalid, Truncation};
use crate::encode::{Encoded, Encoder};
use crate::error::{Error, Origin, Problem, ProblemKind, RecordError, Result};
use rayon::prelude::*;

use crate::json::Json;
use crate::record::{parse_record, Layout};
use crate::rng;
use crate::source::{expand_files, for_each_row, RawRow};

/// How many skip reasons are kept as examples in [`DatasetStats::skip_examples`].
const SKIP_EXAMPLES: usize = 5;

/// Encoded examples, stored flat (one id vector, one mask vector, offsets), with where each came from.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    ids: Vec<u32>,
    mask: Vec<bool>,
    offsets: Vec<usize>,
    origins: Vec<Origin>,
    fingerprint: u64,
    /// What loading saw and did.
    pub stats: DatasetStats,
}

/// One encoded example of a [`Dataset`].
#[derive(Debug, Clone, Copy)]
pub struct Example<'a> {
    /// Token ids.
    pub input_ids: &'a [u32],
    /// `true` where the token is trained.
    pub loss_mask: &'a [bool],
    /// The file and row it came from.
    pub origin: &'a Origin,
}

impl Example<'_> {
    /// Labels in the Hugging Face convention (input id where trained, -100 elsewhere; not shifted).
    pub fn labels(&self) -> Vec<i64> {
        self.input_ids
            .iter()
            .zip(self.loss_mask)
            .map(|(&id, &m)| if m { i64::from(id) } else { crate::IGNORE_INDEX })
            .collect()
    }
}

/// Statistics of loading one dataset (train or eval).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DatasetStats {
    /// The files read.
    pub files: Vec<PathBuf>,
    /// Rows read (before any skip; for a split dataset, the rows of the whole file set).
    pub rows: u64,
    /// Examples kept.
    pub examples: usize,
    /// Tokens in the kept examples.
    pub tokens: u64,
    /// Trained tokens (loss-mask true) in the kept examples.
    pub trained_tokens: u64,
    /// Shortest kept example, in tokens.
    pub min_tokens: usize,
    /// Longest kept example, in tokens.
    pub max_tokens: usize,
    /// Invalid rows skipped (`data.on_invalid = "skip"`).
    pub skipped_invalid: u64,
    /// Rows skipped because a required value was null (`data.on_invalid = "skip"`).
    pub skipped_null: u64,
    /// Examples longer than `max_seq_len` dropped (`data.truncation = "drop"`).
    pub dropped_too_long: u64,
    /// Examples longer than `max_seq_len` cut to it (`data.truncation = "truncate"`).
    pub truncated: u64,
    /// Examples dropped because no token was trained (e.g. every assistant message has weight 0).
    pub dropped_untrained: u64,
    /// Rows moved to the eval split (`data.eval_fraction`), counted on the train side.
    pub held_out: u64,
    /// The first few skip reasons, "FILE row N: ...".
    pub skip_examples: Vec<String>,
}

impl DatasetStats {
    /// Trained tokens / tokens (0 when empty).
    pub fn trained_fraction(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.trained_tokens as f64 / self.tokens as f64
        }
    }

    /// Mean example length in tokens.
    pub fn mean_tokens(&self) -> f64 {
        if self.examples == 0 {
            0.0
        } else {
            self.tokens as f64 / self.examples as f64
        }
    }

    fn note_skip(&mut self, origin: &Origin, problem: &Problem) {
        if self.skip_examples.len() < SKIP_EXAMPLES {
            self.skip_examples.push(format!("{origin}: {problem}"));
        }
    }
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.origins.len()
    }

    /// `true` when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// Example `i` (panics if out of range, like slice indexing).
    pub fn example(&self, i: usize) -> Example<'_> {
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        Example { input_ids: &self.ids[a..b], loss_mask: &self.mask[a..b], origin: &self.origins[i] }
    }

    /// Length of example `i` in tokens.
    pub fn example_len(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i]
    }

    /// Iterates over the examples in order.
    pub fn iter(&self) -> impl Iterator<Item = Example<'_>> {
        (0..self.len()).map(|i| self.example(i))
    }

    /// A hash of every token id and mask bit: two datasets with the same fingerprint encode to the same examples.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Builds a dataset from already encoded examples (for tests and programmatic use).
    pub fn from_examples(examples: impl IntoIterator<Item = (Encoded, Origin)>) -> Dataset {
        let mut d = Dataset { offsets: vec![0], ..Default::default() };
        for (e, o) in examples {
            d.push(e, o);
        }
        d.finish();
        d
    }

    fn push(&mut self, e: Encoded, origin: Origin) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        let s = &mut self.stats;
        let n = e.input_ids.len();
        s.tokens += n as u64;
        s.trained_tokens += e.trained() as u64;
        s.min_tokens = if s.examples == 0 { n } else { s.min_tokens.min(n) };
        s.max_tokens = s.max_tokens.max(n);
        s.examples += 1;
        self.ids.extend_from_slice(&e.input_ids);
        self.mask.extend_from_slice(&e.loss_mask);
        self.offsets.push(self.ids.len());
        self.origins.push(origin);
    }

    fn finish(&mut self) {
        // FNV-1a over lengths, ids and mask bits.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        eat(self.len() as u64);
        for i in 0..self.len() {
            let e = self.example(i);
            eat(e.input_ids.len() as u64);
            for (&id, &m) in e.input_ids.iter().zip(e.loss_mask) {
                eat(u64::from(id) << 1 | u64::from(m));
            }
        }
        self.fingerprint = h;
    }

    /// Splits off the examples at `eval_idx` (sorted or not) into a second dataset, keeping order in both.
    fn split(self, eval_idx: &[u32]) -> (Dataset, Dataset) {
        let mut is_eval = vec![false; self.len()];
        for &i in eval_idx {
            is_eval[i as usize] = true;
        }
        let mut train = Dataset { offsets: vec![0], ..Default::default() };
        let mut eval = Dataset { offsets: vec![0], ..Default::default() };
        for (i, &ev) in is_eval.iter().enumerate() {
            let e = self.example(i);
            let enc = Encoded { input_ids: e.input_ids.to_vec(), loss_mask: e.loss_mask.to_vec() };
            if ev {
                eval.push(enc, e.origin.clone());
            } else {
                train.push(enc, e.origin.clone());
            }
        }
        let mut base = self.stats;
        base.examples = 0;
        base.tokens = 0;
        base.trained_tokens = 0;
        base.min_tokens = 0;
        base.max_tokens = 0;
        let fill = |d: &mut Dataset, base: &DatasetStats| {
            let s = d.stats.clone();
            d.stats = DatasetStats {
                examples: s.examples,
                tokens: s.tokens,
                trained_tokens: s.trained_tokens,
                min_tokens: s.min_tokens,
                max_tokens: s.max_tokens,
                ..base.clone()
            };
        };
        fill(&mut train, &base);
        train.stats.held_out = eval.len() as u64;
        let eval_base = DatasetStats { files: base.files.clone(), rows: eval.len() as u64, ..Default::default() };
        fill(&mut eval, &eval_base);
        train.finish();
        eval.finish();
        (train, eval)
    }
}

/// The training set and, when configured, the evaluation set.
#[derive(Debug, Clone)]
pub struct LoadedData {
    /// Training examples.
    pub train: Arc<Dataset>,
    /// Evaluation examples (`data.eval_fraction` or `data.eval_files`).
    pub eval: Option<Arc<Dataset>>,
}

/// Loads the data of a recipe: reads every file, encodes every record with `encoder`, applies the length and
/// validity policies, and holds out the eval split (chosen from `seed`).
pub fn load(config: &DataConfig, encoder: &Encoder, seed: u64) -> Result<LoadedData> {
    config.validate()?;
    let files = expand_files(&config.train_entries())?;
    let mut train = load_files(&files, config, encoder, config.limit)?;
    if train.is_empty() {
        return Err(empty_error(&train.stats));
    }
    let eval = if !config.eval_files.is_empty() {
        let eval_files = expand_files(&config.eval_files)?;
        let eval = load_files(&eval_files, config, encoder, None)?;
        if eval.is_empty() {
            return Err(empty_error(&eval.stats));
        }
        Some(eval)
    } else if config.eval_fraction > 0.0 {
        let n = train.len();
        let n_eval = ((n as f64) * config.eval_fraction).round().max(1.0) as usize;
        if n_eval >= n {
            return Err(Error::Config(format!(
                "data.eval_fraction = {} leaves no training examples out of {n}",
                config.eval_fraction
            )));
        }
        let perm = rng::permutation(n, rng::mix(&[seed, 0xE7A1]));
        let (t, e) = train.split(&perm[..n_eval]);
        train = t;
        Some(e)
    } else {
        None
    };
    Ok(LoadedData { train: Arc::new(train), eval: eval.map(Arc::new) })
}

fn empty_error(s: &DatasetStats) -> Error {
    let files: Vec<String> = s.files.iter().map(|f| f.display().to_string()).collect();
    let mut msg = format!(
        "no usable examples in {} ({} rows read; {} invalid, {} null, {} too long, {} without trained tokens)",
        files.join(", "),
        s.rows,
        s.skipped_invalid,
        s.skipped_null,
        s.dropped_too_long,
        s.dropped_untrained
    );
    if let Some(first) = s.skip_examples.first() {
        msg.push_str(&format!("; first skip: {first}"));
    }
    Error::Empty(msg)
}

/// Rows encoded in parallel per chunk (results are folded in file order, so everything stays deterministic).
const CHUNK_ROWS: usize = 2048;

/// What became of one row.
enum Outcome {
    Keep(Encoded),
    Truncated(Encoded),
    TooLong,
    Untrained,
    Bad(Problem),
}

/// Reads and encodes `files` into one dataset. Rows are parsed and encoded in parallel (rayon), in chunks, and
/// folded in order.
pub fn load_files(files: &[PathBuf], config: &DataConfig, encoder: &Encoder, limit: Option<usize>) -> Result<Dataset> {
    let mut d = Dataset { offsets: vec![0], ..Default::default() };
    d.stats.files = files.to_vec();
    let mut chunk: Vec<RawRow> = Vec::with_capacity(CHUNK_ROWS);
    for_each_row(files, config.format, &config.columns, |row| {
        if limit.is_some_and(|l| d.stats.rows >= l as u64) {
            return Ok(false);
        }
        d.stats.rows += 1;
        chunk.push(row);
        if chunk.len() == CHUNK_ROWS {
            fold_chunk(&mut d, std::mem::take(&mut chunk), config, encoder)?;
        }
        Ok(true)
    })?;
    fold_chunk(&mut d, chunk, config, encoder)?;
    d.finish();
    Ok(d)
}

fn fold_chunk(d: &mut Dataset, rows: Vec<RawRow>, config: &DataConfig, encoder: &Encoder) -> Result<()> {
    let outcomes: Vec<(Origin, Outcome)> =
        rows.into_par_iter().map(|row| (row.origin, encode_row(row.layout, row.values, config, encoder))).collect();
    for (origin, outcome) in outcomes {
        match outcome {
            Outcome::Keep(e) => d.push(e, origin),
            Outcome::Truncated(e) => {
                d.stats.truncated += 1;
                d.push(e, origin)
            }
            Outcome::TooLong => d.stats.dropped_too_long += 1,
            Outcome::Untrained => d.stats.dropped_untrained += 1,
            Outcome::Bad(problem) => {
                if config.on_invalid == OnInvalid::Error || problem.kind == ProblemKind::TooLong {
                    return Err(Error::Record(RecordError { origin, problem }));
                }
                match problem.kind {
                    ProblemKind::Null => d.stats.skipped_null += 1,
                    _ => d.stats.skipped_invalid += 1,
                }
                d.stats.note_skip(&origin, &problem);
            }
        }
    }
    Ok(())
}

fn encode_row(
    layout: Arc<Layout>,
    values: std::result::Result<Vec<Json>, Problem>,
    config: &DataConfig,
    encoder: &Encoder,
) -> Outcome {
    let max = config.max_seq_len;
    let encoded = values
        .and_then(|mut values| parse_record(&layout, config, &mut values))
        .and_then(|record| encoder.encode_record(&record, config.text_eos));
    let mut e = match encoded {
        Ok(e) => e,
        Err(p) => return Outcome::Bad(p),
    };
    let mut truncated = false;
    if e.len() > max {
        match config.truncation {
            Truncation::Error => {
                return Outcome::Bad(Problem {
                    kind: ProblemKind::TooLong,
                    message: format!(
                        "the example has {} tokens, more than data.max_seq_len = {max} (set data.truncation = \
                         \"drop\" or \"truncate\", or raise max_seq_len)",
                        e.len()
                    ),
                })
            }
            Truncation::Drop => return Outcome::TooLong,
            Truncation::Truncate => {
                e.input_ids.truncate(max);
                e.loss_mask.truncate(max);
                truncated = true;
            }
        }
    }
    if e.trained() == 0 {
        Outcome::Untrained
    } else if truncated {
        Outcome::Truncated(e)
    } else {
        Outcome::Keep(e)
    }
}
