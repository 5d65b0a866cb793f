//! Bundled models, generated deterministically on first use (so the repository carries no
//! weights): `tiny-mixtral`, the quickstart's base — a small random Mixtral in the real Hugging
//! Face format with a 1000-token Mistral-v1-style tokenizer; `tiny-nemo`, a small random model of
//! Mistral Nemo's shape where it matters for the code paths (131072-token vocabulary, head_dim 128
//! != hidden/heads, untied lm_head) with a tekken tokenizer (`tekken.json`, format v3: Nemo's
//! vocabulary cut to its first 3000 ranks, so 4000 of the 131072 ids are in use).

use std::path::Path;

use super::config::ModelConfig;
use super::synthetic::write_random_model;
use crate::{Error, Result};

/// The bundled tokenizer (tests/fixtures/models/generate.py made it).
const TINY_TOKENIZER: &str = include_str!("../../assets/tiny-tokenizer.json");
const TINY_TOKENIZER_CONFIG: &str = include_str!("../../assets/tiny-tokenizer_config.json");
/// The bundled tekken file (tests/fixtures/tekken/generate.py made it from mistral-common's Nemo file).
const TINY_TEKKEN: &str = include_str!("../../assets/tiny-tekken.json");

/// Names of the bundled models.
pub const BUILTIN: [&str; 2] = ["tiny-mixtral", "tiny-nemo"];

/// The configuration of a bundled model.
pub fn builtin_config(name: &str) -> Result<ModelConfig> {
    let json = match name {
        "tiny-mixtral" => serde_json::json!({
            "model_type": "mixtral", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02,
            "rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "sliding_window": null,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false
        }),
        "tiny-nemo" => serde_json::json!({
            "model_type": "mistral", "vocab_size": 131072, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
            "rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024, "sliding_window": null,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false
        }),
        other => {
            return Err(Error::Invalid(format!(
                "model.builtin: unknown bundled model `{other}`; available: {}",
                BUILTIN.join(", ")
            )))
        }
    };
    ModelConfig::from_json_str(&json.to_string()).map_err(Error::Invalid)
}

/// Generates bundled model `name` into `dir` unless `dir/config.json` already exists. Written
/// into a temporary directory first, so an interrupted generation never leaves a half model.
pub fn ensure(name: &str, dir: &Path) -> Result<()> {
    let config = builtin_config(name)?;
    if dir.join("config.json").exists() {
        return Ok(());
    }
    // One temporary directory per process: concurrent first uses do not trample each other.
    let tmp = dir.with_extension(format!("generating-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    write_random_model(&tmp, &config, 20261121, 0.1)?;
    let files: &[(&str, &str)] = match name {
        "tiny-nemo" => &[("tekken.json", TINY_TEKKEN)],
        _ => &[("tokenizer.json", TINY_TOKENIZER), ("tokenizer_config.json", TINY_TOKENIZER_CONFIG)],
    };
    for &(file, text) in files {
        std::fs::write(tmp.join(file), text).map_err(|e| Error::io(tmp.join(file), e))?;
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    match std::fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another process finished first: its model is the same, keep it.
        Err(_) if dir.join("config.json").exists() => std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e)),
        Err(e) => Err(Error::io(dir, e)),
    }
}
