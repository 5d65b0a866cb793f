//! Error types: every message names the file, the row and column (or the setting) and what was expected.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a record came from: a file and a 0-based row (Parquet) or a 1-based line (JSON lines).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The file.
    pub file: Arc<PathBuf>,
    /// 0-based row index in a Parquet file (as `pandas.read_parquet(...).iloc[row]`), or 1-based line number in a
    /// JSON-lines file.
    pub row: u64,
    /// `true` when `row` is a line number of a JSON-lines file.
    pub is_line: bool,
}

impl Origin {
    /// The file name without its directories, for compact display.
    pub fn file_name(&self) -> String {
        self.file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.file.display().to_string())
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.is_line { "line" } else { "row" };
        write!(f, "{} {what} {}", self.file.display(), self.row)
    }
}

/// Why one record could not be used. The message starts with the column and element when known, e.g.
/// "column `messages` element 3: role `assitant` is not one of system/user/assistant/tool".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What category of problem this is (used to count skips).
    pub kind: ProblemKind,
    /// Human-readable description, without the file and row.
    pub message: String,
}

impl Problem {
    /// A problem of kind [`ProblemKind::Invalid`].
    pub fn invalid(message: impl Into<String>) -> Problem {
        Problem { kind: ProblemKind::Invalid, message: message.into() }
    }

    /// A problem of kind [`ProblemKind::Null`].
    pub fn null(message: impl Into<String>) -> Problem {
        Problem { kind: ProblemKind::Null, message: message.into() }
    }

    /// Prefixes the message with a location inside the record ("column `messages` element 3").
    pub fn within(mut self, context: impl fmt::Display) -> Problem {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Categories of bad records, for the skip counters in [`crate::DatasetStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A required value is null or missing.
    Null,
    /// The value has the wrong shape or content (bad role, bad tool call, conversation structure...).
    Invalid,
    /// The encoded example is longer than `max_seq_len` and the truncation policy says `error`.
    TooLong,
}

/// A record that failed, with its origin. Displays as "FILE row N: column `c` ...: what is wrong".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// Where the record came from.
    pub origin: Origin,
    /// What is wrong with it.
    pub problem: Problem,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.problem)
    }
}

impl std::error::Error for RecordError {}

/// Errors of the datasets crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not valid Parquet (or is corrupt).
    #[error("{}: not a readable Parquet file: {message}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What the Parquet reader said.
        message: String,
    },
    /// A column the format needs is not in the file.
    #[error("{}: no column `{column}` (needed by format `{format}`{hint}); columns found: {found}", path.display())]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The missing column.
        column: String,
        /// The record format that needs it.
        format: String,
        /// A hint, e.g. "; set data.columns.messages to use another name".
        hint: String,
        /// The columns the file has, comma separated.
        found: String,
    },
    /// A column has a type the format cannot read.
    #[error("{}: column `{column}` has type {found}; expected {expected}", path.display())]
    ColumnType {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
        /// What the format accepts.
        expected: String,
        /// The Arrow type found.
        found: String,
    },
    /// A record is invalid (and `data.on_invalid = "error"`), or too long (and `data.truncation = "error"`).
    #[error("{0}")]
    Record(#[from] RecordError),
    /// A line of a JSON-lines file is not a JSON object.
    #[error("{}:{line}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// No usable examples.
    #[error("empty dataset: {0}")]
    Empty(String),
    /// A data setting is invalid (the message names the `data.*` key).
    #[error("{0}")]
    Config(String),
    /// The tokenizer failed, or lacks a token the prompt format needs.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A saved [`crate::DataPosition`] does not belong to this dataset.
    #[error("cannot resume the data position: {0}")]
    Position(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.to_path_buf(), source }
    }
}
