//! `config.json` of a Hugging Face Mistral or Mixtral checkpoint, in both the hub style (top-level
//! `rope_theta`, `torch_dtype`) and the transformers 5 style (`rope_parameters`, `dtype`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// The decoder families this engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Dense decoder (Mistral 7B and kin).
    Mistral,
    /// Sparse mixture-of-experts decoder (Mixtral 8x7B / 8x22B).
    Mixtral,
}

impl Architecture {
    /// The `model_type` string of config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Mistral => "mistral",
            Architecture::Mixtral => "mixtral",
        }
    }
}

/// Mixture-of-experts settings (Mixtral only).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Number of experts per layer (`num_local_experts`).
    pub num_experts: usize,
    /// Experts chosen per token (`num_experts_per_tok`).
    pub experts_per_token: usize,
    /// The config's default coefficient of the router load-balancing loss.
    pub router_aux_loss_coef: f64,
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Dense or mixture-of-experts.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding and of lm_head).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of each (expert) feed-forward network.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Sliding attention window: query i attends key j iff `0 <= i - j < window`.
    pub sliding_window: Option<usize>,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`), if any.
    pub declared_dtype: Option<String>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// Mixture-of-experts settings (Mixtral).
    pub moe: Option<MoeConfig>,
}

/// An integer or a list of integers (`eos_token_id` may be either).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The raw fields of config.json that we read; unknown keys are tolerated.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    sliding_window: Option<usize>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    router_aux_loss_coef: Option<f64>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

impl ModelConfig {
    /// Reads and validates `config.json` in a model directory (or the file itself).
    pub fn from_path(path: &Path) -> Result<Self> {
        let file: PathBuf = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::from_json_str(&text).map_err(|message| Error::format(&file, message))
    }

    /// Parses and validates config.json text; the error is a message naming the key.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| format!("invalid config: {e}"))?;
        raw.validate()
    }

    /// Query heads sharing one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Whether the model is a mixture of experts.
    pub fn is_moe(&self) -> bool {
        self.moe.is_some()
    }
}

impl RawConfig {
    fn validate(self) -> std::result::Result<ModelConfig, String> {
        let architecture = match self.model_type.as_deref() {
            Some("mistral") => Architecture::Mistral,
            Some("mixtral") => Architecture::Mixtral,
            Some(other) => {
                return Err(format!("unsupported model_type `{other}`: tramontane supports `mistral` and `mixtral`"))
            }
            None => return Err("missing key `model_type` (expected `mistral` or `mixtral`)".into()),
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!("unsupported hidden_act `{act}`: only `silu` is implemented"));
            }
        }
        for (key, on) in [("attention_bias", self.attention_bias), ("mlp_bias", self.mlp_bias)] {
            if on == Some(true) {
                return Err(format!("unsupported `{key}: true`: Mistral-family layers have no biases"));
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                return Err(format!("unsupported `rope_scaling` {scaling}: only plain RoPE is implemented"));
            }
        }
        let rope_theta = match (&self.rope_parameters, self.rope_theta) {
            (Some(params), top) if !params.is_null() => {
                let kind = params.get("rope_type").and_then(|v| v.as_str()).unwrap_or("default");
                if kind != "default" {
                    return Err(format!(
                        "unsupported rope_parameters.rope_type `{kind}`: only `default` is implemented"
                    ));
                }
                match params.get("rope_theta").and_then(|v| v.as_f64()).or(top) {
                    Some(theta) => theta,
                    None => return Err("missing key `rope_parameters.rope_theta`".into()),
                }
            }
            (_, Some(theta)) => theta,
            (_, None) => 10_000.0,
        };
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", num_kv_heads),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("`{key}` must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({num_kv_heads})",
                self.num_attention_heads
            ));
        }
        let head_dim = match self.head_dim {
            Some(0) => return Err("`head_dim` must be positive".into()),
            Some(d) => d,
            None => {
                if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
                    return Err(format!(
                        "`hidden_size` ({}) is not divisible by `num_attention_heads` ({}) and `head_dim` is not set",
                        self.hidden_size, self.num_attention_heads
                    ));
                }
                self.hidden_size / self.num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!("`head_dim` ({head_dim}) must be even for RoPE"));
        }
        if self.sliding_window == Some(0) {
            return Err("`sliding_window` must be positive or null".into());
        }
        let moe = match architecture {
            Architecture::Mistral => None,
            Architecture::Mixtral => {
                let num_experts = self.num_local_experts.ok_or("missing key `num_local_experts`")?;
                let experts_per_token = self.num_experts_per_tok.ok_or("missing key `num_experts_per_tok`")?;
                if experts_per_token == 0 || experts_per_token > num_experts {
                    return Err(format!(
                        "`num_experts_per_tok` ({experts_per_token}) must be between 1 and `num_local_experts` ({num_experts})"
                    ));
                }
                Some(MoeConfig {
                    num_experts,
                    experts_per_token,
                    router_aux_loss_coef: self.router_aux_loss_coef.unwrap_or(0.001),
                })
            }
        };
        Ok(ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-5),
            sliding_window: self.sliding_window,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(32_768),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            declared_dtype: self.dtype.or(self.torch_dtype),
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
            moe,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB: &str = r#"{"model_type":"mistral","vocab_size":32000,"hidden_size":4096,
        "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
        "rope_theta":10000.0,"rms_norm_eps":1e-5,"sliding_window":4096,"torch_dtype":"bfloat16",
        "eos_token_id":2,"bos_token_id":1}"#;

    #[test]
    fn hub_style() {
        let c = ModelConfig::from_json_str(HUB).unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.kv_groups(), 4);
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.declared_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn transformers5_style() {
        let text = r#"{"model_type":"mixtral","vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":null,
            "rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},"sliding_window":null,
            "dtype":"bfloat16","num_local_experts":8,"num_experts_per_tok":2,"eos_token_id":[2,3]}"#;
        let c = ModelConfig::from_json_str(text).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.moe.as_ref().unwrap().num_experts, 8);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
    }

    #[test]
    fn errors_name_the_key() {
        let bad = HUB.replace("\"mistral\"", "\"llama\"");
        assert!(ModelConfig::from_json_str(&bad).unwrap_err().contains("model_type `llama`"));
        let bad = HUB.replace("\"hidden_size\":4096,", "");
        assert!(ModelConfig::from_json_str(&bad).unwrap_err().contains("hidden_size"));
        let bad = HUB.replace("\"num_key_value_heads\":8", "\"num_key_value_heads\":5");
        assert!(ModelConfig::from_json_str(&bad).unwrap_err().contains("num_key_value_heads"));
        let bad = HUB.replace("\"rope_theta\":10000.0", "\"rope_scaling\":{\"type\":\"linear\"}");
        assert!(ModelConfig::from_json_str(&bad).unwrap_err().contains("rope_scaling"));
    }
}
