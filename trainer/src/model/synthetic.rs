//! Deterministic random checkpoints in the real Hugging Face format (hub-style config.json,
//! per-expert Mixtral layout, safetensors), written tensor by tensor so that even 7B-shaped
//! models never sit in memory. Used for benchmarks at real dimensions and for the bundled
//! quickstart model.

use std::io::{BufWriter, Write};
use std::path::Path;

use super::config::{Architecture, ModelConfig};
use crate::infer::Rng;
use crate::{Error, Result};

/// The `(name, shape)` of every tensor of a model in the hub layout, in file order.
pub fn hub_tensor_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (n, shape) in [("q_proj", [qd, h]), ("k_proj", [kvd, h]), ("v_proj", [kvd, h]), ("o_proj", [h, qd])] {
            out.push((format!("{p}.self_attn.{n}.weight"), shape.to_vec()));
        }
        match &c.moe {
            None => {
                for (n, shape) in [("gate_proj", [i, h]), ("up_proj", [i, h]), ("down_proj", [h, i])] {
                    out.push((format!("{p}.mlp.{n}.weight"), shape.to_vec()));
                }
            }
            Some(m) => {
                out.push((format!("{p}.block_sparse_moe.gate.weight"), vec![m.num_experts, h]));
                for e in 0..m.num_experts {
                    for (n, shape) in [("w1", [i, h]), ("w2", [h, i]), ("w3", [i, h])] {
                        out.push((format!("{p}.block_sparse_moe.experts.{e}.{n}.weight"), shape.to_vec()));
                    }
                }
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// The hub-style `config.json` of a configuration.
pub fn config_json(c: &ModelConfig) -> serde_json::Value {
    let mut j = serde_json::json!({
        "architectures": [match c.architecture { Architecture::Mistral => "MistralForCausalLM", Architecture::Mixtral => "MixtralForCausalLM" }],
        "model_type": c.architecture.model_type(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "sliding_window": c.sliding_window,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": "float32",
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
    });
    if let Some(m) = &c.moe {
        j["num_local_experts"] = m.num_experts.into();
        j["num_experts_per_tok"] = m.experts_per_token.into();
        j["router_aux_loss_coef"] = m.router_aux_loss_coef.into();
    }
    j
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut Rng) -> f64 {
    let u1 = rng.next_f64().max(1e-300);
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Writes `config.json`, `generation_config.json` and `model.safetensors` (f32) of a random
/// model into `dir`: weights `std * N(0, 1)`, norms 1, routers `4 * std * N(0, 1)`.
pub fn write_random_model(dir: &Path, c: &ModelConfig, seed: u64, std: f64) -> Result<()> {
    write_random_checkpoint(dir, c, seed, std, StoredDtype::F32, usize::MAX)
}

/// The dtype a random checkpoint is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    /// float32, 4 bytes per value.
    F32,
    /// bfloat16 (round to nearest even), 2 bytes per value, as real Mistral checkpoints ship.
    Bf16,
}

impl StoredDtype {
    fn bytes(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::Bf16 => 2,
        }
    }
    fn safetensors_name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "F32",
            StoredDtype::Bf16 => "BF16",
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "float32",
            StoredDtype::Bf16 => "bfloat16",
        }
    }
}

/// [`write_random_model`] in `dtype`, split into shards of at most `shard_bytes` (whole tensors;
/// `model-0000N-of-0000M.safetensors` plus `model.safetensors.index.json` when there are several, as the
/// hub writes them), written one tensor at a time: a 7B model never sits in memory. The same values
/// whatever the dtype and sharding (bf16 rounds them).
pub fn write_random_checkpoint(
    dir: &Path,
    c: &ModelConfig,
    seed: u64,
    std: f64,
    dtype: StoredDtype,
    shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    };
    let mut config = config_json(c);
    config["torch_dtype"] = dtype.torch_name().into();
    write_json("config.json", &config)?;
    write_json(
        "generation_config.json",
        &serde_json::json!({"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids.first()}),
    )?;
    // Tensors grouped into shards in file order.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut in_shard = 0usize;
    for (name, shape) in hub_tensor_shapes(c) {
        let bytes = shape.iter().product::<usize>() * dtype.bytes();
        if in_shard > 0 && in_shard.saturating_add(bytes) > shard_bytes {
            shards.push(Vec::new());
            in_shard = 0;
        }
        in_shard += bytes;
        if let Some(last) = shards.last_mut() {
            last.push((name, shape));
        }
    }
    let count = shards.len();
    let file_name = |i: usize| {
        if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        }
    };
    let mut rng = Rng::new(seed);
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, shape) in shard {
            let bytes = shape.iter().product::<usize>() * dtype.bytes();
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            weight_map.insert(name.clone(), file_name(i).into());
            offset += bytes;
        }
        let mut header_text = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
        while header_text.len() % 8 != 0 {
            header_text.push(b' ');
        }
        let path = dir.join(file_name(i));
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut out = BufWriter::new(file);
        let io = |e| Error::io(&path, e);
        out.write_all(&(header_text.len() as u64).to_le_bytes()).map_err(io)?;
        out.write_all(&header_text).map_err(io)?;
        for (name, shape) in shard {
            let n: usize = shape.iter().product();
            let is_norm = name.ends_with("norm.weight");
            let sd = if name.contains(".gate.weight") { 4.0 * std } else { std };
            let mut buf = Vec::with_capacity(n * dtype.bytes());
            for _ in 0..n {
                let x = if is_norm { 1.0f32 } else { (normal(&mut rng) * sd) as f32 };
                match dtype {
                    StoredDtype::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                    StoredDtype::Bf16 => buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                }
            }
            out.write_all(&buf).map_err(io)?;
        }
        out.flush().map_err(io)?;
    }
    if count > 1 {
        write_json("model.safetensors.index.json", &serde_json::json!({"metadata": {}, "weight_map": weight_map}))?;
    }
    Ok(())
}
