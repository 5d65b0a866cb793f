//! The tramontane engine: a trainable Mistral/Mixtral decoder in candle, loading of Hugging Face
//! checkpoints, NF4 quantization, LoRA, the training loop and the inference path.

#![warn(missing_docs)]

pub mod device;
pub mod error;
pub mod infer;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod quant;
pub mod recipe;
pub mod system;
pub mod train;

pub use error::{Error, Result};
