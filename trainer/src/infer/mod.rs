//! Inference: KV cache, sampling, generation, continuous batching.

pub mod batch;
pub mod generate;
pub mod generation_config;
pub mod kv_cache;
pub mod rng;
pub mod sampler;

pub use batch::{decode_step, generate_batch, Sequence};
pub use generate::{generate, GenerateRequest, Generation, StopReason};
pub use generation_config::GenerationDefaults;
pub use kv_cache::{KvCache, LayerCache};
pub use rng::Rng;
pub use sampler::{SamplingOverrides, SamplingParams};
