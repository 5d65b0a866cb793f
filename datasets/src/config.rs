//! The data settings: the `[data]` section of a tramontane recipe.
//!
//! ```toml
//! [data]
//! files = ["train.parquet"]      # files and/or directories (every *.parquet, *.jsonl, *.json inside, sorted)
//! format = "chat"                # text | instruct | chat | tools | tokens | preference
//! prompt_format = "auto"         # auto | v1 | v2 | v3 | v7 | v11 | v13 | v15
//! max_seq_len = 2048
//! packing = true
//! truncation = "drop"            # drop | truncate | error
//! eval_fraction = 0.05           # or eval_files = ["eval.parquet"]
//!
//! [data.columns]
//! messages = "conversations"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::record::Role;

/// The `[data]` section: where the data is, how to read it, how to turn it into training sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training data: Parquet (`.parquet`) or JSON-lines (`.jsonl`, `.json`) files, or directories whose such
    /// files (sorted by name, not recursive) are read in order. Relative paths resolve from the recipe's directory.
    pub files: Vec<PathBuf>,
    /// A directory of data files; the same as listing it in `files`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// How rows are interpreted. Default `chat`.
    pub format: Format,
    /// Mistral prompt format for `chat`, `tools` and `instruct` data. Default `auto`: what the tokenizer declares
    /// (see [`crate::prompt_format`]); an explicit format the tokenizer does not allow is an error.
    pub prompt_format: PromptFormatChoice,
    /// Column names (and message field names).
    pub columns: Columns,
    /// Extra role names mapped to the four roles, e.g. `{ human = "user", gpt = "assistant" }` for ShareGPT data.
    pub roles: BTreeMap<String, Role>,
    /// Longest training sequence in tokens. Default 2048.
    pub max_seq_len: usize,
    /// Pack several examples into each sequence of up to `max_seq_len` tokens (with per-document attention and
    /// positions). Default `true`. When `false`, each example is its own row, padded to the batch's longest.
    pub packing: bool,
    /// What to do with an example longer than `max_seq_len`. Default `drop` (counted and reported).
    pub truncation: Truncation,
    /// What to do with an invalid record (null value, bad role, bad structure...). Default `error`.
    pub on_invalid: OnInvalid,
    /// Shuffle the examples every epoch (deterministically, from `train.seed` and the epoch). Default `true`.
    pub shuffle: bool,
    /// Fraction of the examples held out for evaluation (chosen deterministically from the seed). Default 0.
    pub eval_fraction: f64,
    /// Separate evaluation files (instead of `eval_fraction`).
    pub eval_files: Vec<PathBuf>,
    /// Read at most this many rows (across all files), for quick experiments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// `text` format: append `</s>` to every document (so the model learns where documents end). Default `true`.
    pub text_eos: bool,
    /// Without packing, round each batch's length up to a multiple of this (1 = no rounding). Default 8.
    pub pad_to_multiple_of: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            files: Vec::new(),
            dir: None,
            format: Format::Chat,
            prompt_format: PromptFormatChoice::Auto,
            columns: Columns::default(),
            roles: BTreeMap::new(),
            max_seq_len: 2048,
            packing: true,
            truncation: Truncation::Drop,
            on_invalid: OnInvalid::Error,
            shuffle: true,
            eval_fraction: 0.0,
            eval_files: Vec::new(),
            limit: None,
            text_eos: true,
            pad_to_multiple_of: 8,
        }
    }
}

impl DataConfig {
    /// Checks the settings on their own (sizes, fractions, exclusive options). The error reads
    /// "data.KEY: what is wrong".
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|(key, message)| Error::Config(format!("{key}: {message}")))
    }

    /// [`DataConfig::validate`] with the key (`data.max_seq_len`, ...) and the message apart.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.files.is_empty() && self.dir.is_none() {
            return Err(("data.files", "no training data given (set data.files or data.dir)".into()));
        }
        if self.max_seq_len == 0 {
            return Err(("data.max_seq_len", "must be at least 1 (got 0)".into()));
        }
        if self.pad_to_multiple_of == 0 {
            return Err(("data.pad_to_multiple_of", "must be at least 1 (got 0)".into()));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) || self.eval_fraction.is_nan() {
            return Err(("data.eval_fraction", format!("must be in [0, 1) (got {})", self.eval_fraction)));
        }
        if self.eval_fraction > 0.0 && !self.eval_files.is_empty() {
            return Err(("data.eval_files", "data.eval_fraction and data.eval_files are exclusive: set one".into()));
        }
        if self.limit == Some(0) {
            return Err(("data.limit", "must be at least 1 (or absent for no limit)".into()));
        }
        Ok(())
    }

    /// All training file entries (`files` then `dir`).
    pub fn train_entries(&self) -> Vec<PathBuf> {
        let mut v = self.files.clone();
        v.extend(self.dir.clone());
        v
    }

    /// Makes every relative path absolute against `base` (the recipe's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.files.iter_mut().for_each(fix);
        self.eval_files.iter_mut().for_each(fix);
        if let Some(d) = self.dir.as_mut() {
            fix(d);
        }
    }
}

/// How rows are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Raw text (continued pre-training / completion): `<s>` text `</s>`, loss on every token.
    Text,
    /// A prompt and a completion (or the instruction / input / output triple), encoded as a one-turn conversation.
    Instruct,
    /// A list of `{role, content}` messages; every assistant turn is trained.
    Chat,
    /// `chat` plus a `tools` column, assistant `tool_calls` and tool results with ids (prompt format v3).
    Tools,
    /// Pre-tokenized `input_ids`, with optional `labels` (-100 = masked) or `loss_mask`.
    Tokens,
    /// Preference pairs for DPO/ORPO: a `prompt` (text or messages) and a `chosen` and a `rejected` completion
    /// (text, an assistant message, or a list of messages); see [`crate::preference`].
    Preference,
}

impl Format {
    /// The name used in recipes.
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Instruct => "instruct",
            Format::Chat => "chat",
            Format::Tools => "tools",
            Format::Tokens => "tokens",
            Format::Preference => "preference",
        }
    }
}

/// The prompt format choice in a recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormatChoice {
    /// What the tokenizer declares (a tekken file's `config.version`, else its control tokens and chat template).
    Auto,
    /// Mistral v1: `[INST]` as text (Mistral 7B v0.1/v0.2, Mixtral 8x7B v0.1).
    V1,
    /// Mistral v2: control tokens, tool calls without ids.
    V2,
    /// Mistral v3: control tokens, tool calls and results with ids (Mistral 7B v0.3, Mixtral 8x22B, Nemo).
    V3,
    /// Mistral v7: `[SYSTEM_PROMPT]` in place (Mistral Small 3, Large 2411).
    V7,
    /// Mistral v11: `[TOOL_CALLS] name [CALL_ID] id [ARGS] arguments` (Mistral Small 3.1, Devstral).
    V11,
    /// Mistral v13: `[TOOL_CALLS] name [ARGS] arguments`, tools before the first user message (Mistral Small 3.2,
    /// Magistral).
    V13,
    /// Mistral v15: v13 plus model settings (encoded without settings).
    V15,
}

impl PromptFormatChoice {
    /// The explicit format chosen (`None` for `auto`).
    pub fn format(self) -> Option<crate::prompt_format::PromptFormat> {
        use crate::prompt_format::PromptFormat as F;
        Some(match self {
            PromptFormatChoice::Auto => return None,
            PromptFormatChoice::V1 => F::V1,
            PromptFormatChoice::V2 => F::V2,
            PromptFormatChoice::V3 => F::V3,
            PromptFormatChoice::V7 => F::V7,
            PromptFormatChoice::V11 => F::V11,
            PromptFormatChoice::V13 => F::V13,
            PromptFormatChoice::V15 => F::V15,
        })
    }
}

/// What to do with an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Skip it (counted in the statistics).
    Drop,
    /// Keep its first `max_seq_len` tokens (counted in the statistics).
    Truncate,
    /// Stop with an error naming the row.
    Error,
}

/// What to do with an invalid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalid {
    /// Stop with an error naming the file, row and column.
    Error,
    /// Skip it (counted, and the first few reasons reported).
    Skip,
}

/// Column names, and field names inside message structs. Every name has a sensible default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Columns {
    /// `text` format: the text column. Default `text`.
    pub text: String,
    /// `instruct` and `preference` formats: the prompt column. Default `prompt`.
    pub prompt: String,
    /// `preference` format: the preferred completion. Default `chosen`.
    pub chosen: String,
    /// `preference` format: the dispreferred completion. Default `rejected`.
    pub rejected: String,
    /// `instruct` format: the completion column. Default `completion`.
    pub completion: String,
    /// `instruct` format, Alpaca style: the instruction column (used when `prompt` is absent). Default `instruction`.
    pub instruction: String,
    /// `instruct` format, Alpaca style: the optional input column, appended to the instruction after a blank line.
    /// Default `input`.
    pub input: String,
    /// `instruct` format, Alpaca style: the output column. Default `output`.
    pub output: String,
    /// `instruct` and `preference` formats: an optional system-prompt column. Default `system`.
    pub system: String,
    /// `chat`/`tools` formats: the list of messages. Default `messages`.
    pub messages: String,
    /// `tools` format: the tool specifications (a JSON string, or a list of JSON strings or structs). Default
    /// `tools`.
    pub tools: String,
    /// Field of a message holding its role. Default `role` (ShareGPT: `from`).
    pub role: String,
    /// Field of a message holding its text. Default `content` (ShareGPT: `value`).
    pub content: String,
    /// Field of a message holding its loss weight (0 or 1). Default `weight`.
    pub weight: String,
    /// `tokens` format: the token ids. Default `input_ids`.
    pub input_ids: String,
    /// `tokens` format: optional labels (-100 = masked, otherwise equal to the input id). Default `labels`.
    pub labels: String,
    /// `tokens` format: optional loss mask (1/true = trained). Default `loss_mask`.
    pub loss_mask: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            text: "text".into(),
            prompt: "prompt".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
            completion: "completion".into(),
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
            system: "system".into(),
            messages: "messages".into(),
            tools: "tools".into(),
            role: "role".into(),
            content: "content".into(),
            weight: "weight".into(),
            input_ids: "input_ids".into(),
            labels: "labels".into(),
            loss_mask: "loss_mask".into(),
        }
    }
}
