//! The adapters crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing or merging an adapter, with the file or field concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file's content is malformed (bad JSON, corrupt safetensors, bad tensor name...).
    #[error("{path}: {message}")]
    Format {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The adapter uses a feature we cannot reproduce exactly; `field` names the adapter_config.json key.
    #[error("{path}: unsupported `{field}`: {message}")]
    Unsupported {
        /// The adapter_config.json concerned.
        path: PathBuf,
        /// The offending configuration key.
        field: String,
        /// Why it is refused.
        message: String,
    },
    /// The adapter does not fit the base model (shape, layer, expert or architecture mismatch).
    #[error("adapter does not fit the base model: {0}")]
    Mismatch(String),
    /// An invalid argument or setting.
    #[error("{0}")]
    Invalid(String),
    /// Reading the base model's weights failed (reported by the [`crate::merge::BaseWeights`] implementation).
    #[error("base model: {0}")]
    Base(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A format error about `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format { path: path.into(), message: message.into() }
    }

    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// An unsupported-feature error naming the config field.
    pub fn unsupported(path: impl Into<PathBuf>, field: &str, message: impl Into<String>) -> Self {
        Error::Unsupported { path: path.into(), field: field.to_string(), message: message.into() }
    }
}
