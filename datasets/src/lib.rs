//! Parquet datasets, record formats, Mistral prompt encoders, loss masks and packing for tramontane.
//!
//! The path of the data: files ([`source`]: Parquet or JSON lines) -> records ([`record`]: text, instruct, chat,
//! tools, tokens) -> token ids and loss masks ([`encode`]: Mistral v1 to v15, token-for-token equal to
//! mistral-common, on `tokenizer.json` or a natively read `tekken.json`) -> an in-memory [`Dataset`] with statistics and an eval split ([`dataset`]) -> shuffled, packed
//! micro-batches with per-document positions and ids and a resumable [`DataPosition`] ([`batch`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use datasets::{load, BatchConfig, Batches, DataConfig, Encoder};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tokenizer = tokenizers::Tokenizer::from_file("model/tokenizer.json").map_err(|e| e.to_string())?;
//! let config = DataConfig { files: vec!["train.parquet".into()], ..DataConfig::default() };
//! let encoder = Encoder::new(&tokenizer, config.prompt_format)?;
//! let data = load(&config, &encoder, 0)?;
//! let mut batches = Batches::new(data.train.clone(), BatchConfig::new(&config, 4, 0, encoder.eos_id()))?;
//! let batch = batches.next_batch();
//! assert_eq!(batch.input_ids.len(), batch.batch_size * batch.seq_len);
//! # Ok(()) }
//! ```
//!
//! This crate knows nothing of the model or of candle: it hands out plain vectors.

#![warn(missing_docs)]

pub mod answer;
pub mod batch;
pub mod config;
pub mod dataset;
pub mod encode;
pub mod error;
pub mod json;
pub mod normalize;
pub mod preference;
pub mod prompt_format;
pub mod record;
pub mod rng;
pub mod shortcut;
pub mod source;
pub mod suggest;
pub mod tekken;
pub mod tokenizer_file;
pub mod validate;

pub use answer::{Answer, AnswerCall};
pub use batch::{build_batch, Batch, BatchConfig, Batches, DataPosition, DocSpan, EpochPlan, PackingStats};
pub use config::{Columns, DataConfig, Format, OnInvalid, PromptFormatChoice, Truncation};
pub use dataset::{load, load_files, Dataset, DatasetStats, Example, LoadedData};
pub use encode::{Encoded, Encoder};
pub use error::{Error, Origin, Problem, ProblemKind, RecordError, Result};
pub use json::Json;
pub use preference::{load_pairs, EncodedPair, LoadedPairs, PairBatch, PairBatches, PairDataset, PairStats};
pub use prompt_format::{Declared, PromptFormat};
pub use record::{Conversation, Message, Record, Role, ToolCall, ToolSpec};
pub use tekken::{load_tekken, TekkenInfo};
pub use tokenizer_file::{load_tokenizer, tokenizer_in_dir, LoadedTokenizer};

/// The label of a token that is not trained (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;
