//! Inference: sampling, generation, continuous batching (the KV cache they fill is the model's:
//! [`crate::model::kv_cache`], re-exported here).

pub mod batch;
pub mod generate;
pub mod generation_config;
pub mod rng;
pub mod sampler;

pub use crate::model::kv_cache::{KvCache, LayerCache};
pub use batch::{decode_step, generate_batch, Sequence};
pub use generate::{generate, GenerateRequest, Generation, StopReason};
pub use generation_config::GenerationDefaults;
pub use rng::Rng;
pub use sampler::{SamplingOverrides, SamplingParams};
