//! PEFT-compatible LoRA adapters (read and write) and merged-model export.
//!
//! - [`config`]: `adapter_config.json` (PEFT 0.21), validation and PEFT's targeting/pattern rules;
//! - [`naming`]: the modules LoRA can adapt, their names and shapes ([`BaseShape`], [`Site`]);
//! - [`adapter`]: our internal adapter ([`Adapter`]): one `(A, B, alpha, scale)` per module under our names;
//! - [`read`]: PEFT adapter directories in (dense, per-expert and PEFT 0.21 fused expert layouts);
//! - [`write`]: our adapters out as PEFT 0.21 files (fused `target_parameters` layout, or per-expert on request);
//! - [`merge`]: adapters merged into a base model, written as a Hugging Face model directory (and GGUF);
//! - [`gguf`]: llama.cpp's `llama`-architecture GGUF: names, Q/K permutation, metadata, streaming writer.
//!
//! This crate does not depend on the trainer: the base model's dimensions come in as plain numbers, and base
//! weights through the [`merge::BaseWeights`] trait.

#![warn(missing_docs)]

pub mod adapter;
pub mod config;
pub mod error;
pub mod gguf;
pub mod merge;
pub mod naming;
pub mod ordered;
pub mod read;
pub mod st;
pub mod write;

pub use adapter::{Adapter, LoraModule, LoraSpec, RouterTraining};
pub use config::PeftConfig;
pub use error::{Error, Result};
pub use naming::{BaseShape, ExpertProj, MlpProj, Proj, Site, Target};
pub use read::{read_adapter, AdapterFiles, FileLayout};
pub use write::{peft_files, write_adapter, ExpertLayout};
