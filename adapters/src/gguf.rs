//! GGUF export for llama.cpp (and Ollama): the `llama` architecture that llama.cpp uses for Mistral and Mixtral,
//! its tensor names, its Q/K row permutation, its tokenizer metadata, and a streaming writer.
//!
//! The writer is ours rather than `candle_core::quantized::gguf_file::write` because that one needs every tensor
//! quantized in memory at once; ours writes the header from the planned shapes and types, then quantizes and
//! writes one tensor at a time with `QTensor::quantize` (same format: GGUF v3, 32-byte alignment, candle's
//! `Value` types). Files read back with `gguf_file::Content::read`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use serde_json::Value as Json;

use crate::naming::BaseShape;
use crate::{Error, Result};

/// The GGUF tensor type requested with `--gguf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// IEEE half for every matrix.
    F16,
    /// 8-bit blocks of 32.
    Q8_0,
    /// 4-bit k-quants (super-blocks of 256; rows not a multiple of 256 fall back to Q8_0).
    Q4K,
}

impl GgufType {
    /// Parses `f16`, `q8_0` or `q4_k`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(GgufType::F16),
            "q8_0" => Ok(GgufType::Q8_0),
            "q4_k" | "q4_k_m" | "q4_k_s" => Ok(GgufType::Q4K),
            other => Err(Error::Invalid(format!("unknown GGUF type `{other}`: expected f16, q8_0 or q4_k"))),
        }
    }

    /// The name used in file names (`f16`, `q8_0`, `q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4K => "q4_k",
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Q4K => 14,
        }
    }

    /// The ggml type of a matrix whose rows have `cols` elements (with llama.cpp-style fallbacks).
    pub fn matrix_type(self, cols: usize) -> GgmlDType {
        match self {
            GgufType::F16 => GgmlDType::F16,
            GgufType::Q4K if cols.is_multiple_of(256) => GgmlDType::Q4K,
            GgufType::Q8_0 | GgufType::Q4K if cols.is_multiple_of(32) => GgmlDType::Q8_0,
            _ => GgmlDType::F16,
        }
    }
}

/// The model facts GGUF metadata needs, as plain numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFacts {
    /// Dimensions.
    pub shape: BaseShape,
    /// Vocabulary size (embedding rows).
    pub vocab_size: usize,
    /// Whether lm_head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Trained context length.
    pub max_position_embeddings: usize,
    /// Sliding attention window, if any.
    pub sliding_window: Option<usize>,
    /// Experts chosen per token (Mixtral).
    pub experts_per_token: Option<usize>,
    /// BOS id.
    pub bos_token_id: Option<u32>,
    /// EOS ids (the first is written).
    pub eos_token_ids: Vec<u32>,
}

/// Metadata keys llama.cpp's loader requires for the llama architecture (MoE adds the expert counts).
pub const REQUIRED_KEYS: [&str; 16] = [
    "general.architecture",
    "general.quantization_version",
    "llama.context_length",
    "llama.embedding_length",
    "llama.block_count",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.dimension_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
];

/// The GGUF name of a hub-layout tensor (`None` for tensors llama.cpp has no use for).
pub fn gguf_name(hub: &str) -> Option<String> {
    let simple = match hub {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = hub.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let t = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "block_sparse_moe.gate.weight" => "ffn_gate_inp.weight",
        _ => return None,
    };
    Some(format!("blk.{l}.{t}"))
}

/// llama.cpp's `permute` of Q/K rows for the llama architecture: within each head, the rotate-half layout of
/// Hugging Face (`[2, hd/2]`) becomes interleaved pairs (`[hd/2, 2]`).
pub fn permute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, 2, hd / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// The inverse of [`permute_qk`].
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// llama.cpp token types.
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The `tokenizer.ggml.*` vocabulary of a Hugging Face `tokenizer.json` of the SentencePiece-BPE kind Mistral uses
/// (byte fallback, `▁` for spaces): tokens in id order padded to `vocab_size`, scores that reproduce the BPE merge
/// order under llama.cpp's SentencePiece tokenizer (`-rank` of the merge creating the token, 0 for the rest) and
/// token types.
pub fn llama_vocab(tokenizer_json: &Json, vocab_size: usize, path: &Path) -> Result<(Vec<String>, Vec<f32>, Vec<i32>)> {
    let bad = |m: String| Error::format(path, m);
    let model = tokenizer_json.get("model").ok_or_else(|| bad("no `model` in tokenizer.json".into()))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE")
        || model.get("byte_fallback").and_then(Json::as_bool) != Some(true)
    {
        return Err(bad(
            "GGUF export supports SentencePiece-style tokenizers (BPE with byte_fallback, as Mistral's); this \
             tokenizer.json is of another kind"
                .into(),
        ));
    }
    let vocab =
        model.get("vocab").and_then(Json::as_object).ok_or_else(|| bad("`model.vocab` is not an object".into()))?;
    let mut tokens: BTreeMap<usize, String> = BTreeMap::new();
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or_else(|| bad(format!("vocab entry `{tok}` has a non-integer id")))? as usize;
        tokens.insert(id, tok.clone());
    }
    let mut special: BTreeMap<usize, bool> = BTreeMap::new();
    for t in tokenizer_json.get("added_tokens").and_then(Json::as_array).into_iter().flatten() {
        if let (Some(id), Some(content)) = (t.get("id").and_then(Json::as_u64), t.get("content").and_then(Json::as_str))
        {
            tokens.insert(id as usize, content.to_string());
            special.insert(id as usize, t.get("special").and_then(Json::as_bool).unwrap_or(false));
        }
    }
    let n = tokens.keys().next_back().map_or(0, |m| m + 1).max(vocab_size);
    if n > vocab_size {
        return Err(bad(format!("the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")));
    }
    let mut scores_by_token: BTreeMap<String, f32> = BTreeMap::new();
    for (rank, m) in model.get("merges").and_then(Json::as_array).into_iter().flatten().enumerate() {
        let merged = match m {
            Json::String(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}")),
            Json::Array(pair) => match (pair.first().and_then(Json::as_str), pair.get(1).and_then(Json::as_str)) {
                (Some(a), Some(b)) => Some(format!("{a}{b}")),
                _ => None,
            },
            _ => None,
        };
        if let Some(t) = merged {
            scores_by_token.entry(t).or_insert(-(rank as f32));
        }
    }
    let unk = model.get("unk_token").and_then(Json::as_str);
    let byte_re = regex::Regex::new("^<0x[0-9A-Fa-f]{2}>$").map_err(|e| bad(e.to_string()))?;
    let mut out_tokens = Vec::with_capacity(n);
    let mut scores = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for id in 0..n {
        match tokens.get(&id) {
            None => {
                out_tokens.push(format!("[PAD{id}]"));
                scores.push(-1000.0);
                types.push(token_type::UNUSED);
            }
            Some(t) => {
                let ty = if Some(t.as_str()) == unk {
                    token_type::UNKNOWN
                } else if let Some(&sp) = special.get(&id) {
                    if sp {
                        token_type::CONTROL
                    } else {
                        token_type::USER_DEFINED
                    }
                } else if byte_re.is_match(t) {
                    token_type::BYTE
                } else {
                    token_type::NORMAL
                };
                scores.push(if ty == token_type::NORMAL {
                    scores_by_token.get(t).copied().unwrap_or(0.0)
                } else {
                    0.0
                });
                out_tokens.push(t.clone());
                types.push(ty);
            }
        }
    }
    Ok((out_tokens, scores, types))
}

/// The metadata of a llama-architecture GGUF for this model; `tokenizer_dir` holds tokenizer.json (and maybe
/// tokenizer_config.json with a chat template).
pub fn metadata(facts: &ModelFacts, ty: GgufType, name: &str, tokenizer_dir: &Path) -> Result<Vec<(String, Value)>> {
    let s = &facts.shape;
    let u = |v: usize| Value::U32(v as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name.to_string())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
        ("llama.vocab_size".into(), u(facts.vocab_size)),
        ("llama.context_length".into(), u(facts.max_position_embeddings)),
        ("llama.embedding_length".into(), u(s.hidden_size)),
        ("llama.block_count".into(), u(s.num_layers)),
        ("llama.feed_forward_length".into(), u(s.intermediate_size)),
        ("llama.attention.head_count".into(), u(s.num_heads)),
        ("llama.attention.head_count_kv".into(), u(s.num_kv_heads)),
        ("llama.attention.key_length".into(), u(s.head_dim)),
        ("llama.attention.value_length".into(), u(s.head_dim)),
        ("llama.rope.freq_base".into(), Value::F32(facts.rope_theta as f32)),
        ("llama.rope.dimension_count".into(), u(s.head_dim)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(facts.rms_norm_eps as f32)),
    ];
    if let Some(w) = facts.sliding_window {
        md.push(("llama.attention.sliding_window".into(), u(w)));
    }
    if let (Some(e), Some(k)) = (s.num_experts, facts.experts_per_token) {
        md.push(("llama.expert_count".into(), u(e)));
        md.push(("llama.expert_used_count".into(), u(k)));
    }
    let tok_path = tokenizer_dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
    let json: Json = serde_json::from_str(&text).map_err(|e| Error::format(&tok_path, format!("invalid JSON: {e}")))?;
    let (tokens, scores, types) = llama_vocab(&json, facts.vocab_size, &tok_path)?;
    let find = |t: &str| tokens.iter().position(|x| x == t).map(|i| i as u32);
    md.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
    md.push(("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().cloned().map(Value::String).collect())));
    md.push(("tokenizer.ggml.scores".into(), Value::Array(scores.into_iter().map(Value::F32).collect())));
    md.push(("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())));
    let bos = facts.bos_token_id.or_else(|| find("<s>"));
    let eos = facts.eos_token_ids.first().copied().or_else(|| find("</s>"));
    let bos = bos.ok_or_else(|| Error::format(&tok_path, "no BOS token (config bos_token_id or `<s>`)"))?;
    md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    if let Some(eos) = eos {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    if let Some(unk) = json.pointer("/model/unk_token").and_then(Json::as_str).and_then(find) {
        md.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(unk)));
    }
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)));
    md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    md.push(("tokenizer.huggingface.json".into(), Value::String(text)));
    let tc = tokenizer_dir.join("tokenizer_config.json");
    if let Ok(t) = std::fs::read_to_string(&tc) {
        if let Some(tpl) = serde_json::from_str::<Json>(&t)
            .ok()
            .and_then(|j| j.get("chat_template").and_then(Json::as_str).map(String::from))
        {
            md.push(("tokenizer.chat_template".into(), Value::String(tpl)));
        }
    }
    Ok(md)
}

/// ggml's numeric id of a tensor type (`enum ggml_type`).
pub fn ggml_type_id(d: GgmlDType) -> u32 {
    match d {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Data alignment of the files we write.
pub const ALIGNMENT: usize = 32;

/// One tensor of a GGUF file to be written: name, shape (outermost first, as candle) and type.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// GGUF name.
    pub name: String,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlDType,
}

impl PlannedTensor {
    fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// A GGUF file written tensor by tensor in a planned order.
pub struct GgufWriter {
    out: BufWriter<File>,
    path: PathBuf,
    plan: Vec<PlannedTensor>,
    next: usize,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::Array(items) => {
            let ty = items.first().map_or(4, value_type);
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|x| write_value(w, x))
        }
    }
}

fn pad(w: &mut impl Write, pos: usize) -> std::io::Result<usize> {
    let n = (ALIGNMENT - pos % ALIGNMENT) % ALIGNMENT;
    w.write_all(&vec![0u8; n])?;
    Ok(n)
}

impl GgufWriter {
    /// Creates `path` and writes the header: metadata and every planned tensor's info.
    pub fn create(path: &Path, metadata: &[(String, Value)], plan: Vec<PlannedTensor>) -> Result<Self> {
        for (k, v) in metadata {
            if let Value::Array(items) = v {
                if items.iter().any(|x| value_type(x) != items.first().map_or(4, value_type)) {
                    return Err(Error::Invalid(format!("GGUF metadata `{k}`: mixed value types in one array")));
                }
            }
        }
        let file = File::create(path).map_err(io(path))?;
        let mut out = BufWriter::new(file);
        let mut head: Vec<u8> = Vec::new();
        let w = &mut head;
        (|| -> std::io::Result<()> {
            w.write_all(&0x4655_4747u32.to_le_bytes())?;
            w.write_all(&3u32.to_le_bytes())?;
            w.write_all(&(plan.len() as u64).to_le_bytes())?;
            w.write_all(&(metadata.len() as u64).to_le_bytes())?;
            for (k, v) in metadata {
                write_str(w, k)?;
                w.write_all(&value_type(v).to_le_bytes())?;
                write_value(w, v)?;
            }
            let mut offset = 0usize;
            for t in &plan {
                write_str(w, &t.name)?;
                w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
                for d in t.shape.iter().rev() {
                    w.write_all(&(*d as u64).to_le_bytes())?;
                }
                w.write_all(&ggml_type_id(t.dtype).to_le_bytes())?;
                w.write_all(&(offset as u64).to_le_bytes())?;
                offset += t.nbytes().div_ceil(ALIGNMENT) * ALIGNMENT;
            }
            let pos = w.len();
            pad(w, pos)?;
            Ok(())
        })()
        .map_err(io(path))?;
        out.write_all(&head).map_err(io(path))?;
        Ok(GgufWriter { out, path: path.to_path_buf(), plan, next: 0 })
    }

    /// The planned tensors.
    pub fn plan(&self) -> &[PlannedTensor] {
        &self.plan
    }

    /// Quantizes and writes the next planned tensor, whose name and shape must match the plan.
    pub fn write_next(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let p = self.plan.get(self.next).ok_or_else(|| Error::Invalid(format!("GGUF: unplanned tensor `{name}`")))?;
        if p.name != name || p.shape != t.dims() {
            return Err(Error::Invalid(format!(
                "GGUF: expected tensor `{}` {:?} next, got `{name}` {:?}",
                p.name,
                p.shape,
                t.dims()
            )));
        }
        let q = QTensor::quantize(t, p.dtype)?;
        let data = q.data()?;
        if data.len() != p.nbytes() {
            return Err(Error::Invalid(format!(
                "GGUF: tensor `{name}` has {} bytes, planned {}",
                data.len(),
                p.nbytes()
            )));
        }
        self.out.write_all(&data).map_err(io(&self.path))?;
        pad(&mut self.out, data.len()).map_err(io(&self.path))?;
        self.next += 1;
        Ok(())
    }

    /// Checks every planned tensor was written and flushes the file.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plan.len() {
            return Err(Error::Invalid(format!("GGUF: {} of {} tensors written", self.next, self.plan.len())));
        }
        self.out.flush().map_err(io(&self.path))?;
        let file = self.out.get_mut();
        let _ = file.stream_position();
        file.sync_all().map_err(io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn qk_permutation_matches_llama_cpp_and_inverts() {
        // 2 heads of dim 4, one input column: rows [h0: a0 a1 b0 b1, h1: ...] -> [a0 b0 a1 b1, ...].
        let w = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap().reshape((8, 1)).unwrap();
        let p = permute_qk(&w, 2).unwrap();
        assert_eq!(p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = unpermute_qk(&p, 2).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), (0..8).map(|x| x as f32).collect::<Vec<_>>());
    }

    #[test]
    fn vocab_types_and_merge_scores() {
        let json: Json = serde_json::json!({
            "added_tokens": [{"id": 0, "content": "<unk>", "special": true}, {"id": 1, "content": "<s>", "special": true}],
            "model": {"type": "BPE", "byte_fallback": true, "unk_token": "<unk>",
                "vocab": {"<unk>": 0, "<s>": 1, "<0x0A>": 2, "a": 3, "b": 4, "ab": 5},
                "merges": ["a b"]}
        });
        let (tokens, scores, types) = llama_vocab(&json, 8, Path::new("tokenizer.json")).unwrap();
        assert_eq!(tokens[5], "ab");
        assert_eq!(tokens[7], "[PAD7]");
        assert_eq!(types, vec![2, 3, 6, 1, 1, 1, 5, 5]);
        assert_eq!(scores[5], 0.0); // rank 0 merge
        assert!(llama_vocab(&json, 4, Path::new("t")).is_err());
    }
}
