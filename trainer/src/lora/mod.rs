//! LoRA: settings and per-module rank/alpha, the adapter layer, attaching adapters to a model.

pub mod adapter;
pub mod attach;
pub mod config;
pub mod peft;

pub use adapter::{DropoutControl, LoraAdapter};
pub use attach::{attach_lora, LoraInit, TrainableParams};
pub use config::{LoraPlan, LoraSettings, ModuleLora, RouterMode};
