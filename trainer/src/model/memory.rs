//! The memory a command needs, estimated from the configuration before anything is loaded, so that a model
//! that cannot fit is refused with a clear message instead of dying halfway through loading.
//!
//! Inference ([`estimate_inference`]): the weights (decoder linears at the dtype or in NF4 exactly as
//! [`super::loader`] stores them; embeddings, lm_head, norms and routers at the dtype), the adapters, the KV
//! cache of the context the command may use, the buffers of its largest forward pass (with the f32 tile a
//! bf16/f16 or NF4 weight is expanded into for a product), what loading holds for one tensor on top of the
//! weights read so far (freed, but a hole in the heap that later buffers do not fill, so it is added), and the
//! threads' stacks. Activations and the KV cache are counted in the compute dtype, f32 on the CPU.
//!
//! Merging ([`estimate_merge`]): one output shard in memory, the buffers of one tensor being merged, the
//! adapters, and for `--gguf` the largest (stacked) tensor converted afterwards.
//!
//! Estimates are upper bounds of what the code allocates, not of what the OS reports as resident: they are
//! meant to be compared with [`crate::system::memory_available_to_process`].

use std::path::Path;

use candle_core::DType;

use super::config::{Architecture, ModelConfig, MoeConfig};
use super::loader::Nf4Options;
use crate::kernels::attention::BLOCK as ATTENTION_BLOCK;
use crate::quant::nf4::{NESTED_BLOCKSIZE, NF4_BLOCKSIZE};
use crate::quant::tiled_matmul::tile_rows;
use crate::{Error, Result};

/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;

/// What the process itself takes on top of the model after the check: per worker thread a 2 MiB stack
/// for each of the two CPU pools (rayon's and candle's), plus 16 MiB for the allocator and everything
/// else that starts lazily.
fn runtime_bytes() -> u64 {
    let threads = candle_core::utils::get_num_threads() as u64;
    (16 << 20) + threads * (4 << 20)
}

/// How the weights are held.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightPlan {
    /// Dtype of the dense weights (`--dtype`).
    pub dtype: DType,
    /// Decoder linears in NF4 (quantized while loading, or stored so by bitsandbytes).
    pub nf4: Option<Nf4Options>,
    /// Where the weights are read from.
    pub source: WeightSource,
}

/// The file the weights are read from, for what loading holds for one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightSource {
    /// Hugging Face safetensors, read one tensor (one expert's slice of a fused tensor) at a time.
    Safetensors {
        /// Bytes per element on disk (2 for bf16).
        stored_bytes_per_param: u64,
    },
    /// GGUF, each tensor (for Mixtral the stacked experts of a layer) dequantized whole to f32.
    Gguf {
        /// Elements of its largest tensor.
        largest_tensor: u64,
    },
}

/// What a command does with the model once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Workload {
    /// Tokens one sequence's KV cache may hold (capped at `max_position_embeddings`).
    pub context_tokens: usize,
    /// Tokens of the longest single forward pass (a prompt's prefill, or a scored sequence).
    pub prefill_tokens: usize,
    /// Rows that go through lm_head at once (1 for generation, every scored token for a loss).
    pub logit_rows: usize,
    /// Sequences holding a KV cache at the same time.
    pub sequences: usize,
    /// Bytes of the LoRA adapters held in memory.
    pub adapter_bytes: u64,
}

/// The estimate of an inference command, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct InferenceEstimate {
    /// Model weights as loaded.
    pub weights: u64,
    /// LoRA adapters.
    pub adapters: u64,
    /// KV cache of every sequence at the full context.
    pub kv_cache: u64,
    /// Buffers of the largest forward pass (mask, attention scratch, layer intermediates, logits).
    pub activations: u64,
    /// What loading holds for one tensor on top of the weights already read: freed once loaded, but left as
    /// a hole in the heap that later buffers of other sizes do not fill, so it is counted throughout.
    pub loading: u64,
    /// Threads and allocator.
    pub runtime: u64,
}

impl InferenceEstimate {
    /// The peak: every part.
    pub fn total(&self) -> u64 {
        self.weights + self.runtime + self.loading + self.adapters + self.kv_cache + self.activations
    }

    /// One line: each part in GiB.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("weights {}", format_bytes(self.weights))];
        for (name, bytes) in
            [("adapters", self.adapters), ("KV cache", self.kv_cache), ("activations", self.activations)]
        {
            if bytes > 0 {
                parts.push(format!("{name} {}", format_bytes(bytes)));
            }
        }
        parts.push(format!("loading buffers {}", format_bytes(self.loading)));
        parts.push(format!("runtime {}", format_bytes(self.runtime)));
        parts.join(" + ")
    }
}

/// `1.23 GiB`, or `45.6 MiB` below a tenth of a GiB.
pub fn format_bytes(bytes: u64) -> String {
    let gib = bytes as f64 / GIB as f64;
    if gib >= 0.1 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// One decoder linear: its module name (as [`Nf4Options::keep_dense`] names it) and element count.
fn decoder_linears(c: &ModelConfig) -> Vec<(&'static str, u64)> {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (qd, kvd) = ((c.num_heads * c.head_dim) as u64, (c.num_kv_heads * c.head_dim) as u64);
    let mut per_layer = vec![("q_proj", qd * h), ("k_proj", kvd * h), ("v_proj", kvd * h), ("o_proj", h * qd)];
    match moe(c) {
        Some(m) => {
            for _ in 0..m.num_experts {
                per_layer.extend([("w1", i * h), ("w3", i * h), ("w2", h * i)]);
            }
        }
        None => per_layer.extend([("gate_proj", i * h), ("up_proj", i * h), ("down_proj", h * i)]),
    }
    let mut all = Vec::with_capacity(per_layer.len() * c.num_layers);
    for _ in 0..c.num_layers {
        all.extend(per_layer.iter().copied());
    }
    all
}

fn moe(c: &ModelConfig) -> Option<&MoeConfig> {
    match (&c.architecture, &c.moe) {
        (Architecture::Mixtral, Some(m)) => Some(m),
        _ => None,
    }
}

/// Bytes of one NF4 weight of `numel` elements as [`crate::quant::Nf4Weight`] holds it: two codes per
/// byte, and per block of [`NF4_BLOCKSIZE`] either an f32 scale or (double quantization) an 8-bit code, with
/// one f32 per [`NESTED_BLOCKSIZE`] codes, the offset and the f32 code map of the 8-bit codes.
pub fn nf4_bytes(numel: u64, double_quant: bool) -> u64 {
    let blocks = numel.div_ceil(NF4_BLOCKSIZE as u64);
    let scales = if double_quant {
        let code_map = crate::quant::dynamic_map::dynamic_map().len() as u64 * 4;
        blocks + blocks.div_ceil(NESTED_BLOCKSIZE as u64) * 4 + 4 + code_map
    } else {
        blocks * 4
    };
    numel.div_ceil(2) + scales
}

/// Bytes of the weights as the loader holds them.
pub fn weight_bytes(c: &ModelConfig, dtype: DType, nf4: Option<&Nf4Options>) -> u64 {
    let size = dtype.size_in_bytes() as u64;
    let h = c.hidden_size as u64;
    let layers = c.num_layers as u64;
    let embed = c.vocab_size as u64 * h;
    let head = if c.tie_word_embeddings { 0 } else { embed };
    let norms = (2 * layers + 1) * h;
    let routers = moe(c).map_or(0, |m| layers * m.num_experts as u64 * h);
    let mut bytes = (embed + head + norms + routers) * size;
    for (module, numel) in decoder_linears(c) {
        bytes += match nf4 {
            Some(o) if !o.keep_dense.iter().any(|k| k == module) => nf4_bytes(numel, o.double_quant),
            _ => numel * size,
        };
    }
    bytes
}

/// Bytes of the KV cache of `sequences` sequences of `tokens` tokens each, in `dtype`, after the sliding
/// window (when the model has one) trims it; `prefill` tokens are cached before the first trim.
pub fn kv_cache_bytes(c: &ModelConfig, tokens: usize, prefill: usize, sequences: usize, dtype: DType) -> u64 {
    let kept = match c.sliding_window {
        Some(w) => tokens.min(w.max(prefill)),
        None => tokens,
    } as u64;
    let per_token = 2 * (c.num_kv_heads * c.head_dim) as u64 * c.num_layers as u64 * dtype.size_in_bytes() as u64;
    per_token * kept * sequences as u64
}

/// Bytes of the f32 tile a bf16/f16 or NF4 weight is expanded into for a product on the CPU (one per thread
/// computing, kept between products): [`tile_rows`] whole rows (up to
/// [`TILE_FLOATS`](crate::quant::tiled_matmul::TILE_FLOATS) values, at most the
/// weight; none for an empty weight).
fn tile_bytes(c: &ModelConfig, weights: &WeightPlan) -> u64 {
    let tile = |rows: u64, cols: u64| tile_rows(rows as usize, cols as usize) as u64 * cols * 4;
    let h = c.hidden_size as u64;
    let mut widest = 0;
    if weights.dtype != DType::F32 {
        widest = tile(c.vocab_size as u64, h);
    }
    let (i, qd) = (c.intermediate_size as u64, (c.num_heads * c.head_dim) as u64);
    for (module, numel) in decoder_linears(c) {
        let expanded = weights.dtype != DType::F32
            || weights.nf4.as_ref().is_some_and(|o| !o.keep_dense.iter().any(|k| k == module));
        if expanded {
            // The input width of the module: hidden, except for o_proj and the down projections.
            let cols = match module {
                "o_proj" => qd,
                "down_proj" | "w2" => i,
                _ => h,
            };
            widest = widest.max(tile(numel.checked_div(cols).unwrap_or(0), cols));
        }
    }
    widest
}

/// Bytes alive during one forward pass of `t` tokens (over as many keys), activations of `size` bytes.
fn activation_bytes(c: &ModelConfig, t: u64, logit_rows: u64, kv_layer: u64, size: u64) -> u64 {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (heads, qd, kvd) =
        (c.num_heads as u64, (c.num_heads * c.head_dim) as u64, (c.num_kv_heads * c.head_dim) as u64);
    let threads = candle_core::utils::get_num_threads() as u64;
    let active = moe(c).map_or(1, |m| m.experts_per_token as u64);
    let experts = moe(c).map_or(0, |m| m.num_experts as u64);
    // Additive mask [t, t] (none for a single query) and the fused attention's per-thread scratch.
    let mask = if t > 1 { t * t * 4 } else { 0 };
    let attention = threads * (ATTENTION_BLOCK as u64).min(t) * t * 4 + 2 * heads * t * 4;
    let rotary = 2 * t * c.head_dim as u64 * 4;
    // The residual stream and its norms, q, k, v (and their contiguous copies), the attention output,
    // the MLP's gate/up/product per active expert, the router logits.
    let layer = t * (6 * h + 2 * qd + 4 * kvd + 3 * i * active + experts) * size;
    // Logits in f32 with their log-softmax and a temporary.
    let logits = logit_rows * c.vocab_size as u64 * 4 * 3;
    // Appending to the cache concatenates: one layer's keys and values exist twice for a moment.
    mask + attention + rotary + layer + logits + kv_layer
}

/// What loading holds for one tensor on top of the weights already read.
fn loading_bytes(c: &ModelConfig, weights: &WeightPlan) -> u64 {
    let size = weights.dtype.size_in_bytes() as u64;
    match weights.source {
        WeightSource::Safetensors { stored_bytes_per_param: stored } => {
            // The bytes as read; to another dtype than f32, also an f32 vector (the result is the weight).
            let convert = |n: u64| if stored == size || size == 4 { n * stored } else { n * (stored + 4) };
            let embed = convert((c.vocab_size * c.hidden_size) as u64);
            let linears = decoder_linears(c);
            let largest = linears.iter().map(|(_, n)| *n).max().unwrap_or(0);
            // A quantized linear is read into f32 and flattened into a vector; packing makes the block scales in
            // f32 before their double quantization (counted with the packed codes, as much again).
            let quantized = |n: u64, dq: bool| n * (stored + 8) + nf4_bytes(n, dq);
            let linear =
                match &weights.nf4 {
                    Some(o) => linears
                        .iter()
                        .map(|&(m, n)| {
                            if o.keep_dense.iter().any(|k| k == m) {
                                convert(n)
                            } else {
                                quantized(n, o.double_quant)
                            }
                        })
                        .max()
                        .unwrap_or(0),
                    None => convert(largest),
                };
            embed.max(linear)
        }
        // Dequantized to f32, the Q/K permutation undone in a copy (the conversion is the weight).
        WeightSource::Gguf { largest_tensor } => largest_tensor * (4 + 4),
    }
}

/// The memory an inference command needs with `weights` for `work`.
pub fn estimate_inference(c: &ModelConfig, weights: &WeightPlan, work: &Workload) -> InferenceEstimate {
    let context = work.context_tokens.min(c.max_position_embeddings).max(1);
    let prefill = work.prefill_tokens.min(context).max(1);
    // Activations and the KV cache are in the dense weights' dtype.
    let kv_cache = kv_cache_bytes(c, context, prefill, work.sequences.max(1), weights.dtype);
    let kv_layer = kv_cache_bytes(c, context, prefill, 1, weights.dtype) / c.num_layers.max(1) as u64;
    let size = weights.dtype.size_in_bytes() as u64;
    let activations = activation_bytes(c, prefill as u64, work.logit_rows.min(prefill).max(1) as u64, kv_layer, size)
        + tile_bytes(c, weights);
    let loading = loading_bytes(c, weights);
    InferenceEstimate {
        weights: weight_bytes(c, weights.dtype, weights.nf4.as_ref()),
        adapters: work.adapter_bytes,
        kv_cache,
        activations,
        loading,
        runtime: runtime_bytes(),
    }
}

/// The largest context in `min..=max` whose estimate (`estimate(context)`) fits in `available` bytes, or
/// `None` when not even `min` fits. Estimates grow with the context.
pub fn largest_fitting_context(
    min: usize,
    max: usize,
    available: u64,
    estimate: impl Fn(usize) -> InferenceEstimate,
) -> Option<usize> {
    if min > max || estimate(min).total() > available {
        return None;
    }
    let (mut lo, mut hi) = (min, max);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if estimate(mid).total() <= available {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

/// How a merge runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergePlan {
    /// Bytes per element of the output dtype.
    pub out_bytes_per_param: u64,
    /// Largest output shard (`--max-shard-size`).
    pub max_shard_bytes: u64,
    /// Bytes per element of the checkpoint's largest tensors on disk.
    pub stored_bytes_per_param: u64,
    /// Elements of the largest tensor read at once.
    pub largest_tensor: u64,
    /// Decoder linears go through an NF4 round trip before the update is added.
    pub nf4_round_trip: bool,
    /// Bytes of the adapters.
    pub adapter_bytes: u64,
    /// Also write GGUF (its largest, for Mixtral stacked, tensor is converted at once).
    pub gguf: bool,
}

/// The estimate of a merge, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MergeEstimate {
    /// The output shard being filled.
    pub shard: u64,
    /// One tensor being merged: as read, in f32, the update, the sum and the converted output.
    pub tensor: u64,
    /// The adapters.
    pub adapters: u64,
    /// Writing GGUF afterwards (the shards are then on disk).
    pub gguf: u64,
    /// Threads and allocator.
    pub runtime: u64,
}

impl MergeEstimate {
    /// The peak: adapters and runtime, plus the larger of merging and writing GGUF.
    pub fn total(&self) -> u64 {
        self.adapters + self.runtime + (self.shard + self.tensor).max(self.gguf)
    }

    /// One line: each part in GiB.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "output shard {} + one tensor {} + adapters {} + runtime {}",
            format_bytes(self.shard),
            format_bytes(self.tensor),
            format_bytes(self.adapters),
            format_bytes(self.runtime)
        );
        if self.gguf > self.shard + self.tensor {
            s.push_str(&format!(" (writing GGUF holds {} at its peak)", format_bytes(self.gguf)));
        }
        s
    }
}

/// The memory `tramontane merge` needs for a model of configuration `c`.
pub fn estimate_merge(c: &ModelConfig, plan: &MergePlan) -> MergeEstimate {
    let total_params = super::stats::ParameterCounts::from_config(c).total;
    let out = plan.out_bytes_per_param;
    let largest_out = plan.largest_tensor * out;
    // A shard is flushed before a tensor would overflow it: it holds at most the larger of the limit and
    // one tensor, and never more than the whole output.
    let shard = (total_params * out).min(plan.max_shard_bytes.max(largest_out));
    let n = plan.largest_tensor;
    let round_trip = if plan.nf4_round_trip { nf4_bytes(n, true) + n * 4 } else { 0 };
    let tensor = n * (plan.stored_bytes_per_param + 4 * 4 + out) + round_trip;
    // GGUF: the tensor (stacked experts for Mixtral) in f32, its parts, a permuted copy, and the output.
    let gguf_tensor = match moe(c) {
        Some(m) => (m.num_experts * c.intermediate_size * c.hidden_size) as u64,
        None => plan.largest_tensor,
    };
    let gguf = if plan.gguf { gguf_tensor * 4 * 3 + gguf_tensor * 2 } else { 0 };
    MergeEstimate { shard, tensor, adapters: plan.adapter_bytes, gguf, runtime: runtime_bytes() }
}

/// What the memory check needs to know of a GGUF file, from its header.
#[derive(Debug, Clone)]
pub struct GgufFacts {
    /// The configuration its metadata implies (as [`super::gguf::load_gguf`] reads it).
    pub config: ModelConfig,
    /// Elements of its largest tensor (dequantized whole while loading).
    pub largest_tensor: u64,
    /// The float dtype of its matrices when they are all f32, f16 or bf16 (`None` when quantized).
    pub float_dtype: Option<DType>,
}

/// Reads the header of a llama-architecture GGUF file (metadata and tensor list, no tensor data).
pub fn gguf_facts(path: &Path) -> Result<GgufFacts> {
    use candle_core::quantized::gguf_file::{Content, Value};
    use candle_core::quantized::GgmlDType;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content =
        Content::read(&mut file).map_err(|e| Error::format(path, format!("not a readable GGUF file: {e}")))?;
    let md = &content.metadata;
    let int = |key: &str| -> Option<usize> {
        match md.get(key)? {
            Value::U8(x) => Some(*x as usize),
            Value::U16(x) => Some(*x as usize),
            Value::U32(x) => Some(*x as usize),
            Value::U64(x) => Some(*x as usize),
            Value::I32(x) => usize::try_from(*x).ok(),
            Value::I64(x) => usize::try_from(*x).ok(),
            _ => None,
        }
    };
    // A dimension of 0 would make every size below meaningless (and divide by zero): refused by its key.
    let zero = |key: &str| Error::format(path, format!("metadata `{key}` is 0; it must be positive"));
    let optional = |key: &str| match int(key) {
        Some(0) => Err(zero(key)),
        value => Ok(value),
    };
    let need = |key: &str| optional(key)?.ok_or_else(|| Error::format(path, format!("missing metadata key `{key}`")));
    let hidden = need("llama.embedding_length")?;
    let heads = need("llama.attention.head_count")?;
    let experts = int("llama.expert_count").filter(|&e| e > 0);
    let embed = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::MissingTensor { path: path.to_path_buf(), name: "token_embd.weight".into() })?;
    // The rest is checked as config.json is (positive sizes, heads a multiple of the key/value heads, an
    // even head dimension, the experts used among the experts), so that no estimate sees an impossible model.
    let raw = serde_json::json!({
        "model_type": if experts.is_some() { "mixtral" } else { "mistral" },
        "vocab_size": embed.shape.elem_count() / hidden,
        "hidden_size": hidden,
        "intermediate_size": need("llama.feed_forward_length")?,
        "num_hidden_layers": need("llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": optional("llama.attention.head_count_kv")?.unwrap_or(heads),
        "head_dim": match optional("llama.attention.key_length")? {
            Some(d) => Some(d),
            None => optional("llama.rope.dimension_count")?,
        },
        "sliding_window": int("llama.attention.sliding_window"),
        "max_position_embeddings": optional("llama.context_length")?.unwrap_or(32_768),
        "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
        "num_local_experts": experts,
        "num_experts_per_tok": experts.map(|_| int("llama.expert_used_count").unwrap_or(2)),
    });
    let config = ModelConfig::from_json_str(&raw.to_string())
        .map_err(|e| Error::format(path, format!("the metadata describes an impossible model: {e}")))?;
    let largest_tensor = content.tensor_infos.values().map(|t| t.shape.elem_count() as u64).max().unwrap_or(0);
    let matrices: Vec<GgmlDType> =
        content.tensor_infos.values().filter(|t| t.shape.rank() >= 2).map(|t| t.ggml_dtype).collect();
    let float = |d: GgmlDType| match d {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    };
    let float_dtype = match matrices.first().and_then(|&d| float(d)) {
        Some(first) if matrices.iter().all(|&d| float(d) == Some(first)) => Some(first),
        _ => None,
    };
    Ok(GgufFacts { config, largest_tensor, float_dtype })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::stats::ParameterCounts;
    use crate::model::{load_model, LoadOptions, Model};

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
    }

    /// Bytes the loaded model really holds, tensor by tensor (norms and routers included).
    fn held_bytes(model: &Model) -> u64 {
        use crate::model::decoder::FeedForward;
        let size = model.dtype.size_in_bytes();
        let mut bytes = model.embed_tokens.elem_count() * size + model.lm_head.memory_bytes();
        // The norms' weights are private: one [hidden] vector per norm, two per layer and the final one.
        bytes += (2 * model.layers.len() + 1) * model.config.hidden_size * size;
        for layer in &model.layers {
            let a = &layer.self_attn;
            bytes += [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj].iter().map(|l| l.memory_bytes()).sum::<usize>();
            let mlps = match &layer.feed_forward {
                FeedForward::Dense(m) => vec![m],
                FeedForward::Sparse(moe) => {
                    bytes += moe.router.memory_bytes();
                    moe.experts.iter().collect()
                }
            };
            for m in mlps {
                bytes += [&m.gate_proj, &m.up_proj, &m.down_proj].iter().map(|l| l.memory_bytes()).sum::<usize>();
            }
        }
        bytes as u64
    }

    #[test]
    fn weight_bytes_equal_what_the_loader_holds() {
        for name in ["tiny-mistral", "tiny-mixtral", "tiny-mixtral-fused"] {
            let dir = fixture(name);
            let config = ModelConfig::from_path(&dir).unwrap();
            for (dtype, nf4) in [
                (DType::F32, None),
                (DType::BF16, None),
                (DType::F32, Some(Nf4Options::qlora())),
                (DType::BF16, Some(Nf4Options { double_quant: false, keep_dense: vec!["k_proj".into()] })),
            ] {
                let opts = LoadOptions { dtype, nf4: nf4.clone(), ..LoadOptions::default() };
                let model = load_model(&dir, &opts).unwrap().model;
                assert_eq!(weight_bytes(&config, dtype, nf4.as_ref()), held_bytes(&model), "{name} {dtype:?} {nf4:?}");
            }
        }
    }

    #[test]
    fn nf4_bytes_equal_the_quantized_weights() {
        for (numel, dq) in [(64 * 256 * 3 + 7, true), (64 * 256 * 3 + 7, false), (4096, true), (1, true)] {
            let data: Vec<f32> = (0..numel).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let w = crate::quant::Nf4Weight::quantize(&data, &[numel], dq).unwrap();
            assert_eq!(nf4_bytes(numel as u64, dq), w.memory_bytes() as u64, "{numel} {dq}");
        }
    }

    fn mistral_7b() -> ModelConfig {
        // mistralai/Mistral-7B-v0.1's config.json (the fields that size it).
        ModelConfig::from_json_str(
            r#"{"model_type":"mistral","vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":32768,
            "sliding_window":4096,"torch_dtype":"bfloat16"}"#,
        )
        .unwrap()
    }

    #[test]
    fn dense_weights_are_the_parameter_count_times_the_dtype_and_nf4_matches_its_bits() {
        let c = mistral_7b();
        let p = ParameterCounts::from_config(&c);
        assert_eq!(weight_bytes(&c, DType::F32, None), p.total * 4);
        assert_eq!(weight_bytes(&c, DType::BF16, None), p.total * 2);
        // NF4 with double quantization is NF4_DOUBLE_QUANT_BITS per parameter plus 1028 bytes per tensor
        // (offset and code map); the rest stays bf16.
        let nf4 = weight_bytes(&c, DType::BF16, Some(&Nf4Options::qlora())) as f64;
        let tensors = (c.num_layers * 7) as f64;
        assert!((nf4 - p.bytes_nf4() - tensors * 1028.0).abs() < tensors * 8.0, "{nf4} vs {}", p.bytes_nf4());
    }

    #[test]
    fn the_kv_cache_follows_the_window_and_the_estimate_grows_with_the_context() {
        let c = mistral_7b();
        // 32 layers x 2 x 8 heads x 128 x 4 bytes = 256 KiB per token in f32, at most the 4096-token window.
        assert_eq!(kv_cache_bytes(&c, 100, 100, 1, DType::F32), 100 * 256 * 1024);
        assert_eq!(kv_cache_bytes(&c, 32768, 100, 2, DType::F32), 2 * 4096 * 256 * 1024);
        // A prefill longer than the window is cached whole before the first trim.
        assert_eq!(kv_cache_bytes(&c, 32768, 8000, 1, DType::F32), 8000 * 256 * 1024);
        let plan = WeightPlan {
            dtype: DType::BF16,
            nf4: None,
            source: WeightSource::Safetensors { stored_bytes_per_param: 2 },
        };
        let at = |context: usize| {
            estimate_inference(
                &c,
                &plan,
                &Workload {
                    context_tokens: context,
                    prefill_tokens: context,
                    logit_rows: 1,
                    sequences: 1,
                    ..Default::default()
                },
            )
        };
        let small = at(512);
        assert_eq!(small.weights, ParameterCounts::from_config(&c).total * 2);
        assert!(at(2048).total() > small.total());
        // The largest fitting context is the boundary of the estimate.
        let available = at(3000).total();
        assert_eq!(largest_fitting_context(16, 32768, available, at), Some(3000));
        assert_eq!(largest_fitting_context(16, 32768, small.weights, at), None);
        assert_eq!(largest_fitting_context(16, 32768, u64::MAX, at), Some(32768));
    }

    #[test]
    fn a_bf16_7b_fits_24_gib_in_bf16_only_and_nf4_needs_about_a_quarter() {
        let c = mistral_7b();
        let work = Workload { context_tokens: 256, prefill_tokens: 128, logit_rows: 1, sequences: 1, adapter_bytes: 0 };
        let plan =
            |dtype, nf4| WeightPlan { dtype, nf4, source: WeightSource::Safetensors { stored_bytes_per_param: 2 } };
        let f32 = estimate_inference(&c, &plan(DType::F32, None), &work).total();
        let bf16 = estimate_inference(&c, &plan(DType::BF16, None), &work).total();
        let nf4 = estimate_inference(&c, &plan(DType::BF16, Some(Nf4Options::qlora())), &work).total();
        // 7.24e9 parameters: 27 GiB in f32, 13.5 GiB in bf16, about 3.9 GiB in NF4.
        assert!(f32 > 24 * GIB && bf16 < 16 * GIB, "{f32} {bf16}");
        assert!(nf4 < 5 * GIB && nf4 > 3 * GIB, "{nf4}");
    }

    #[test]
    fn a_merge_holds_one_shard_and_one_tensor() {
        let c = mistral_7b();
        let plan = MergePlan {
            out_bytes_per_param: 2,
            max_shard_bytes: 5_000_000_000,
            stored_bytes_per_param: 2,
            largest_tensor: 32000 * 4096,
            nf4_round_trip: false,
            adapter_bytes: 0,
            gguf: false,
        };
        let e = estimate_merge(&c, &plan);
        assert_eq!(e.shard, 5_000_000_000);
        assert_eq!(e.tensor, 32000 * 4096 * (2 + 16 + 2));
        // A shard limit above the whole output holds the whole output.
        let whole = estimate_merge(&c, &MergePlan { max_shard_bytes: u64::MAX, ..plan });
        assert_eq!(whole.shard, ParameterCounts::from_config(&c).total * 2);
    }

    /// Writes a GGUF file with the tiny fixture's shapes (an embedding `[100, 32]` and one `[48, 32]` matrix)
    /// and its metadata, `changes` replacing or adding keys; returns its path.
    fn write_gguf(dir: &Path, changes: &[(&str, u32)]) -> std::path::PathBuf {
        // A GGUF file written by `tramontane merge --gguf` in the adapters crate's tests is not at hand here;
        // write one with candle.
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let path = dir.join("m.gguf");
        let t = |shape: &[usize]| {
            QTensor::quantize(&Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(), GgmlDType::F16).unwrap()
        };
        let tensors = [("token_embd.weight", t(&[100, 32])), ("blk.0.ffn_up.weight", t(&[48, 32]))];
        let mut md: Vec<(&str, gguf_file::Value)> = vec![
            ("general.architecture", gguf_file::Value::String("llama".into())),
            ("llama.embedding_length", gguf_file::Value::U32(32)),
            ("llama.attention.head_count", gguf_file::Value::U32(4)),
            ("llama.attention.head_count_kv", gguf_file::Value::U32(2)),
            ("llama.block_count", gguf_file::Value::U32(1)),
            ("llama.feed_forward_length", gguf_file::Value::U32(48)),
            ("llama.context_length", gguf_file::Value::U32(128)),
        ];
        for &(key, value) in changes {
            md.retain(|(k, _)| *k != key);
            md.push((key, gguf_file::Value::U32(value)));
        }
        let mut f = std::fs::File::create(&path).unwrap();
        let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
        path
    }

    #[test]
    fn gguf_facts_read_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let facts = gguf_facts(&write_gguf(dir.path(), &[])).unwrap();
        assert_eq!(facts.config.vocab_size, 100);
        assert_eq!((facts.config.num_kv_heads, facts.config.head_dim, facts.config.num_layers), (2, 8, 1));
        assert_eq!(facts.config.max_position_embeddings, 128);
        assert!(facts.config.tie_word_embeddings);
        assert_eq!(facts.largest_tensor, 3200);
        assert_eq!(facts.float_dtype, Some(DType::F16));
    }

    #[test]
    fn a_gguf_header_with_a_zero_or_impossible_dimension_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for (key, value, expected) in [
            ("llama.embedding_length", 0, "`llama.embedding_length` is 0"),
            ("llama.feed_forward_length", 0, "`llama.feed_forward_length` is 0"),
            ("llama.attention.head_count", 0, "`llama.attention.head_count` is 0"),
            ("llama.attention.head_count_kv", 0, "`llama.attention.head_count_kv` is 0"),
            ("llama.block_count", 0, "`llama.block_count` is 0"),
            ("llama.attention.key_length", 0, "`llama.attention.key_length` is 0"),
            ("llama.context_length", 0, "`llama.context_length` is 0"),
            ("llama.attention.head_count_kv", 3, "must be a multiple of `num_key_value_heads`"),
            ("llama.attention.key_length", 7, "must be even"),
            ("llama.embedding_length", 4000, "`vocab_size` must be positive"),
        ] {
            let err = gguf_facts(&write_gguf(dir.path(), &[(key, value)])).unwrap_err().to_string();
            assert!(err.contains(expected), "{key} = {value}: {err}");
        }
    }

    #[test]
    fn an_empty_weight_has_no_tile_and_no_division_by_zero() {
        // A configuration no validation would pass (built field by field): the estimate still returns.
        let mut c = mistral_7b();
        c.intermediate_size = 0;
        let plan = WeightPlan {
            dtype: DType::BF16,
            nf4: Some(Nf4Options::qlora()),
            source: WeightSource::Safetensors { stored_bytes_per_param: 2 },
        };
        let work = Workload { context_tokens: 16, prefill_tokens: 16, logit_rows: 1, sequences: 1, adapter_bytes: 0 };
        let with_mlp = estimate_inference(&mistral_7b(), &plan, &work);
        let without = estimate_inference(&c, &plan, &work);
        assert!(without.weights < with_mlp.weights);
        // The widest tile is the embedding's (bf16 lm_head, 4096 rows of 4096 columns), as with the MLP.
        assert_eq!(tile_bytes(&c, &plan), crate::quant::tiled_matmul::TILE_FLOATS as u64 * 4);
        c.hidden_size = 0;
        c.vocab_size = 0;
        c.num_heads = 0;
        assert_eq!(tile_bytes(&c, &plan), 0);
    }
}
