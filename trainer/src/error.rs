//! The engine's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the engine, with the file or field it concerns.
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
    /// A file's content is not what was expected (bad JSON, bad header, wrong field...).
    #[error("{path}: {message}")]
    Format {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The model directory or file searched.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found.
        actual: Vec<usize>,
    },
    /// An argument or setting is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The device asked for is unknown or not supported by this build.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
}

/// Result alias for the engine.
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
}
