//! Parameter counts and memory estimates derived from a configuration.

use super::config::ModelConfig;

/// Bits per parameter of NF4 with double quantization: 4-bit codes, one 8-bit absmax code per
/// 64-block, one f32 absmax per 256 such codes, plus the offset (negligible).
pub const NF4_DOUBLE_QUANT_BITS: f64 = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0);

/// How many parameters a model has, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParameterCounts {
    /// Every parameter.
    pub total: u64,
    /// Parameters a single token uses (all of them for dense models; top-k of the experts for MoE).
    pub active_per_token: u64,
    /// Decoder linear weights (attention and feed-forward / experts): what NF4 quantizes.
    pub decoder_linear: u64,
    /// Embedding, lm_head, norms and routers: kept at the compute dtype.
    pub other: u64,
}

impl ParameterCounts {
    /// Counts the parameters the configuration implies.
    pub fn from_config(c: &ModelConfig) -> Self {
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let attn = h * (c.num_heads * c.head_dim) as u64 * 2 + h * (c.num_kv_heads * c.head_dim) as u64 * 2;
        let mlp = 3 * h * i;
        let (experts, active_experts, router) = match &c.moe {
            Some(m) => (m.num_experts as u64, m.experts_per_token as u64, m.num_experts as u64 * h),
            None => (1, 1, 0),
        };
        let layers = c.num_layers as u64;
        let decoder_linear = layers * (attn + experts * mlp);
        let head = if c.tie_word_embeddings { 0 } else { c.vocab_size as u64 * h };
        let other = c.vocab_size as u64 * h + head + layers * (2 * h + router) + h;
        let total = decoder_linear + other;
        let active_per_token = total - layers * (experts - active_experts) * mlp;
        ParameterCounts { total, active_per_token, decoder_linear, other }
    }

    /// Bytes of the weights at a float width of `bytes_per_param`.
    pub fn bytes_at(&self, bytes_per_param: f64) -> f64 {
        self.total as f64 * bytes_per_param
    }

    /// Bytes with the decoder linears in NF4 (double quant) and the rest in bf16.
    pub fn bytes_nf4(&self) -> f64 {
        self.decoder_linear as f64 * NF4_DOUBLE_QUANT_BITS / 8.0 + self.other as f64 * 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistral_7b_and_mixtral_8x7b_have_their_published_sizes() {
        let mistral = r#"{"model_type":"mistral","vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8}"#;
        let c = ModelConfig::from_json_str(mistral).unwrap();
        // 7,241,732,096 parameters: the count of mistralai/Mistral-7B-v0.1's safetensors.
        assert_eq!(ParameterCounts::from_config(&c).total, 7_241_732_096);
        let mixtral = r#"{"model_type":"mixtral","vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"num_local_experts":8,
            "num_experts_per_tok":2}"#;
        let p = ParameterCounts::from_config(&ModelConfig::from_json_str(mixtral).unwrap());
        // 46,702,792,704 total and ~12.9B active: mistralai/Mixtral-8x7B-v0.1's published counts.
        assert_eq!(p.total, 46_702_792_704);
        assert_eq!(p.active_per_token, 12_879_925_248);
    }
}
