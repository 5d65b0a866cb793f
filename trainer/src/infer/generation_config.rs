//! `generation_config.json`: the checkpoint's default decoding settings.

use std::path::Path;

use serde::Deserialize;

use super::sampler::SamplingParams;
use crate::model::config::OneOrMany;
use crate::{Error, Result};

/// Decoding defaults read from a model directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// Whether the model's authors sample by default.
    pub do_sample: Option<bool>,
    /// Default temperature.
    pub temperature: Option<f64>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default top-p.
    pub top_p: Option<f64>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f64>,
    /// Default number of new tokens.
    pub max_new_tokens: Option<usize>,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct Raw {
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    repetition_penalty: Option<f64>,
    max_new_tokens: Option<usize>,
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<u32>,
}

impl GenerationDefaults {
    /// Reads `dir/generation_config.json`; absent file gives the empty defaults.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let raw: Raw = serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
        Ok(GenerationDefaults {
            do_sample: raw.do_sample,
            temperature: raw.temperature,
            top_k: raw.top_k,
            top_p: raw.top_p,
            repetition_penalty: raw.repetition_penalty,
            max_new_tokens: raw.max_new_tokens,
            eos_token_ids: raw.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
            bos_token_id: raw.bos_token_id,
        })
    }

    /// The sampling settings these defaults imply (greedy unless `do_sample` is true).
    pub fn sampling(&self) -> SamplingParams {
        let mut p = SamplingParams::default();
        if self.do_sample == Some(true) {
            p.temperature = self.temperature.unwrap_or(1.0);
            p.top_k = self.top_k.unwrap_or(50);
            p.top_p = self.top_p.unwrap_or(1.0);
        }
        p.repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        p
    }
}
