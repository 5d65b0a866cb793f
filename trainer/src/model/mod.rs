//! The Mistral/Mixtral decoder and its loading from Hugging Face checkpoints.

pub mod attention;
pub mod builtin;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod gguf;
pub mod kv_cache;
pub mod linear;
pub mod loader;
pub mod mask;
pub mod memory;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod stats;
pub mod synthetic;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use config::{Architecture, ModelConfig, MoeConfig};
pub use decoder::{DecoderOutput, Layout, Model};
pub use loader::{load_model, ExpertLayout, LoadOptions, LoadedModel, Nf4Options};
pub use stats::ParameterCounts;
pub use tokenizer::ModelTokenizer;
