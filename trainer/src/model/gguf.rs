//! Loading a llama-architecture GGUF file (what `tramontane merge --gguf` writes, and llama.cpp's files for Mistral
//! and Mixtral) into our [`Model`]: weights dequantized to the compute dtype, llama.cpp's Q/K row permutation
//! undone, Mixtral's stacked `ffn_*_exps` tensors split per expert, and the tokenizer rebuilt from
//! `tokenizer.huggingface.json` when the file carries it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::attention::Attention;
use super::config::{Architecture, ModelConfig, MoeConfig};
use super::decoder::{DecoderLayer, FeedForward, Model};
use super::linear::Linear;
use super::mlp::Mlp;
use super::moe::SparseMoe;
use super::norm::RmsNorm;
use super::tokenizer::ModelTokenizer;
use crate::{Error, Result};

/// A model read from GGUF, with its tokenizer when the file has one.
#[derive(Debug)]
pub struct GgufModel {
    /// The model.
    pub model: Model,
    /// The tokenizer from `tokenizer.huggingface.json`, if present.
    pub tokenizer: Option<ModelTokenizer>,
}

/// Whether `path` is a GGUF file (by its magic bytes).
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file() && File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

fn int(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<usize>> {
    let v = match md.get(key) {
        None => return Ok(None),
        Some(v) => v,
    };
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        other => return Err(Error::format(path, format!("metadata `{key}`: expected an integer, found {other:?}"))),
    };
    Ok(Some(n as usize))
}

fn need(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<usize> {
    int(md, key, path)?.ok_or_else(|| Error::format(path, format!("missing metadata key `{key}`")))
}

fn float(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<f64>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(*x as f64)),
        Some(Value::F64(x)) => Ok(Some(*x)),
        Some(other) => Err(Error::format(path, format!("metadata `{key}`: expected a float, found {other:?}"))),
    }
}

/// llama.cpp's inverse Q/K permutation: interleaved rotary pairs back to Hugging Face's rotate-half rows.
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// Reads a GGUF file into a model with weights in `dtype` on `device`.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content =
        Content::read(&mut reader).map_err(|e| Error::format(path, format!("not a readable GGUF file: {e}")))?;
    let md = &content.metadata;
    match md.get("general.architecture") {
        Some(Value::String(a)) if a == "llama" => {}
        other => {
            return Err(Error::format(
                path,
                format!("`general.architecture` is {other:?}; only `llama` (Mistral/Mixtral) files are supported"),
            ))
        }
    }
    let hidden = need(md, "llama.embedding_length", path)?;
    let heads = need(md, "llama.attention.head_count", path)?;
    let kv_heads = int(md, "llama.attention.head_count_kv", path)?.unwrap_or(heads);
    let head_dim = int(md, "llama.attention.key_length", path)?
        .or(int(md, "llama.rope.dimension_count", path)?)
        .unwrap_or(hidden / heads.max(1));
    let num_layers = need(md, "llama.block_count", path)?;
    let intermediate = need(md, "llama.feed_forward_length", path)?;
    let experts = int(md, "llama.expert_count", path)?.filter(|&e| e > 0);
    let moe = match experts {
        Some(num_experts) => Some(MoeConfig {
            num_experts,
            experts_per_token: need(md, "llama.expert_used_count", path)?,
            router_aux_loss_coef: 0.001,
        }),
        None => None,
    };
    // Read and dequantized in host memory (a GGUF block format is decoded by candle's CPU code), then `put` on
    // `device`.
    let mut load = |name: &str| -> Result<Tensor> {
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))?;
        Ok(q.dequantize(&Device::Cpu)?)
    };
    let embed = load("token_embd.weight")?;
    let vocab_size = embed.dim(0)?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let eos = int(md, "tokenizer.ggml.eos_token_id", path)?.map(|x| x as u32);
    let config = ModelConfig {
        architecture: if moe.is_some() { Architecture::Mixtral } else { Architecture::Mistral },
        vocab_size,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rope_theta: float(md, "llama.rope.freq_base", path)?.unwrap_or(10_000.0),
        rms_norm_eps: float(md, "llama.attention.layer_norm_rms_epsilon", path)?.unwrap_or(1e-5),
        sliding_window: int(md, "llama.attention.sliding_window", path)?,
        max_position_embeddings: int(md, "llama.context_length", path)?.unwrap_or(32_768),
        tie_word_embeddings: tied,
        declared_dtype: None,
        bos_token_id: int(md, "tokenizer.ggml.bos_token_id", path)?.map(|x| x as u32),
        eos_token_ids: eos.into_iter().collect(),
        moe,
    };
    let put = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
    let check = |name: &str, t: &Tensor, shape: &[usize]| -> Result<()> {
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                path: path.to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(())
    };
    let (h, i) = (hidden, intermediate);
    let (qd, kvd) = (heads * head_dim, kv_heads * head_dim);
    let mut layers = Vec::with_capacity(num_layers);
    for l in 0..num_layers {
        let mut get = |short: &str, shape: &[usize]| -> Result<Tensor> {
            let name = format!("blk.{l}.{short}.weight");
            let t = load(&name)?;
            check(&name, &t, shape)?;
            Ok(t)
        };
        let norm_in = RmsNorm::new(put(get("attn_norm", &[h])?)?, config.rms_norm_eps);
        let q = unpermute(&get("attn_q", &[qd, h])?, heads)?;
        let k = unpermute(&get("attn_k", &[kvd, h])?, kv_heads)?;
        let v = get("attn_v", &[kvd, h])?;
        let o = get("attn_output", &[h, qd])?;
        let self_attn = Attention::new(
            [Linear::new(put(q)?), Linear::new(put(k)?), Linear::new(put(v)?), Linear::new(put(o)?)],
            heads,
            kv_heads,
            head_dim,
        );
        let norm_post = RmsNorm::new(put(get("ffn_norm", &[h])?)?, config.rms_norm_eps);
        let feed_forward = match &config.moe {
            None => FeedForward::Dense(Mlp {
                gate_proj: Linear::new(put(get("ffn_gate", &[i, h])?)?),
                up_proj: Linear::new(put(get("ffn_up", &[i, h])?)?),
                down_proj: Linear::new(put(get("ffn_down", &[h, i])?)?),
            }),
            Some(m) => {
                let e = m.num_experts;
                let router = Linear::new(put(get("ffn_gate_inp", &[e, h])?)?);
                let gate = get("ffn_gate_exps", &[e, i, h])?;
                let down = get("ffn_down_exps", &[e, h, i])?;
                let up = get("ffn_up_exps", &[e, i, h])?;
                let experts = (0..e)
                    .map(|x| {
                        Ok(Mlp {
                            gate_proj: Linear::new(put(gate.get(x)?)?),
                            up_proj: Linear::new(put(up.get(x)?)?),
                            down_proj: Linear::new(put(down.get(x)?)?),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                FeedForward::Sparse(SparseMoe::new(router, experts, m.experts_per_token))
            }
        };
        layers.push(DecoderLayer {
            input_layernorm: norm_in,
            self_attn,
            post_attention_layernorm: norm_post,
            feed_forward,
        });
    }
    let norm = RmsNorm::new(put(load("output_norm.weight")?)?, config.rms_norm_eps);
    let embed_tokens = put(embed)?;
    let lm_head = if tied { Linear::new(embed_tokens.clone()) } else { Linear::new(put(load("output.weight")?)?) };
    let tokenizer = match md.get("tokenizer.huggingface.json") {
        Some(Value::String(json)) => {
            let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
                .map_err(|e| Error::format(path, format!("tokenizer.huggingface.json: {e}")))?;
            let mut eos_ids = config.eos_token_ids.clone();
            if eos_ids.is_empty() {
                eos_ids.extend(inner.token_to_id("</s>"));
            }
            let declared = datasets::Declared::from_tokenizer_json(&inner, None);
            Some(ModelTokenizer { inner, path: path.to_path_buf(), bos_id: config.bos_token_id, eos_ids, declared })
        }
        _ => None,
    };
    let model = Model { config, embed_tokens, layers, norm, lm_head, dtype, device: device.clone() };
    Ok(GgufModel { model, tokenizer })
}
