//! Merging adapters into a base model and writing a complete Hugging Face model directory (hub layout, sharded
//! safetensors with an index, config.json, tokenizer files, generation_config.json), optionally also a GGUF file.
//!
//! The base weights come through [`BaseWeights`] (the trainer implements it over its checkpoint reader, with
//! bitsandbytes NF4 weights dequantized), tensor by tensor; output shards are written as they fill, so memory stays
//! near one shard. Everything is written into a temporary directory beside `out` and renamed at the end: on failure
//! nothing is left behind.
//!
//! **Quality trap:** merging into a quantized (NF4) base means merging into its *dequantized* weights, which is
//! what we do: the result is `dequant(W_nf4) + s B A` in the output dtype, exactly the function the QLoRA adapter
//! was trained against. Re-quantizing that merged model to NF4 (or merging into a base re-quantized after merging)
//! rounds the small LoRA update away and loses much of what training gained; keep the merged model in bf16/f16, or
//! serve the NF4 base with the unmerged adapter.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::Dtype;
use serde_json::Value as Json;

use crate::adapter::Adapter;
use crate::gguf::{gguf_name, metadata, permute_qk, GgufType, GgufWriter, ModelFacts, PlannedTensor};
use crate::naming::{ExpertProj, MlpProj, Proj, Site};
use crate::st::{write_file, OwnedTensor, ShardReader};
use crate::{Error, Result};

/// Read access to the base model's weights, by their on-disk names.
pub trait BaseWeights {
    /// Whether the checkpoint has a weight of that name (float or quantized).
    fn contains(&self, name: &str) -> bool;
    /// A whole weight as f32, row-major, dequantized if stored quantized; its shape must be `shape`.
    fn read_f32(&self, name: &str, shape: &[usize]) -> std::result::Result<Vec<f32>, String>;
    /// `count` consecutive elements from flat element `first` of a float weight (a slice of a fused expert tensor).
    fn read_range_f32(&self, name: &str, first: usize, count: usize) -> std::result::Result<Vec<f32>, String>;
    /// Whether the weight is stored quantized (NF4).
    fn is_quantized(&self, _name: &str) -> bool {
        false
    }
}

/// One output tensor: name, shape, source and the module it adapts.
type Planned = (String, Vec<usize>, Source, Option<Site>);

/// One GGUF tensor: name, shape, hub sources (stacked when several), heads of the Q/K permutation.
type GgufItem = (String, Vec<usize>, Vec<String>, Option<usize>);

/// Where one output tensor comes from.
#[derive(Debug, Clone)]
enum Source {
    Whole(String),
    Range(String, usize),
}

/// The merge request.
#[derive(Debug, Clone)]
pub struct MergeRequest {
    /// The base model directory (config.json, tokenizer and generation files are copied from it).
    pub model_dir: PathBuf,
    /// The base model's facts.
    pub facts: ModelFacts,
    /// Adapters with their weights (`W' = W + sum w_i s_i B_i A_i`).
    pub adapters: Vec<(Adapter, f64)>,
    /// Output directory (must not exist).
    pub out: PathBuf,
    /// Output dtype: F32, BF16 or F16.
    pub dtype: Dtype,
    /// Largest shard in bytes.
    pub max_shard_bytes: usize,
    /// Also write a GGUF file of this type into `out`.
    pub gguf: Option<GgufType>,
    /// Where the sums `W + w s B A` are computed (weights are read and written through host memory).
    pub device: Device,
}

/// What a merge did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Safetensors files written.
    pub shards: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Weights that received a LoRA update.
    pub merged: usize,
    /// Base weights that were stored quantized and were dequantized.
    pub dequantized: usize,
    /// The GGUF file, if one was written (its final path).
    pub gguf: Option<PathBuf>,
    /// Total bytes of the safetensors shards.
    pub total_bytes: usize,
}

/// Files copied from the base directory when present.
const COPIED: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Removes the temporary directory unless disarmed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// The output tensors in hub layout: (name, shape, source, site it adapts).
fn plan(base: &dyn BaseWeights, facts: &ModelFacts) -> Result<Vec<Planned>> {
    let s = &facts.shape;
    let (h, i, v) = (s.hidden_size, s.intermediate_size, facts.vocab_size);
    let whole = |n: &str| Source::Whole(n.to_string());
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h], whole("model.embed_tokens.weight"), None)];
    for l in 0..s.num_layers {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("{p}.{n}.weight");
            out.push((name.clone(), vec![h], Source::Whole(name), None));
        }
        for proj in [Proj::Q, Proj::K, Proj::V, Proj::O] {
            let site = Site::Attn(l, proj);
            let (o, inp) = s.dims(site);
            let name = format!("{}.weight", site.module_name());
            out.push((name.clone(), vec![o, inp], Source::Whole(name), Some(site)));
        }
        match s.num_experts {
            None => {
                for m in [MlpProj::Gate, MlpProj::Up, MlpProj::Down] {
                    let site = Site::Mlp(l, m);
                    let (o, inp) = s.dims(site);
                    let name = format!("{}.weight", site.module_name());
                    out.push((name.clone(), vec![o, inp], Source::Whole(name), Some(site)));
                }
            }
            Some(e) => {
                let hub_router = format!("{p}.block_sparse_moe.gate.weight");
                let fused = !base.contains(&hub_router);
                if fused && !base.contains(&format!("{p}.mlp.experts.gate_up_proj")) {
                    return Err(Error::Base(format!(
                        "missing `{hub_router}` (or the fused `{p}.mlp.experts.gate_up_proj`)"
                    )));
                }
                let router_src = if fused { format!("{p}.mlp.gate.weight") } else { hub_router.clone() };
                out.push((hub_router, vec![e, h], Source::Whole(router_src), Some(Site::Router(l))));
                for x in 0..e {
                    for w in [ExpertProj::W1, ExpertProj::W2, ExpertProj::W3] {
                        let site = Site::Expert(l, x, w);
                        let (o, inp) = s.dims(site);
                        let name = format!("{}.weight", site.module_name());
                        let src = if !fused {
                            Source::Whole(name.clone())
                        } else {
                            match w {
                                ExpertProj::W1 => Source::Range(format!("{p}.mlp.experts.gate_up_proj"), x * 2 * i * h),
                                ExpertProj::W3 => {
                                    Source::Range(format!("{p}.mlp.experts.gate_up_proj"), x * 2 * i * h + i * h)
                                }
                                ExpertProj::W2 => Source::Range(format!("{p}.mlp.experts.down_proj"), x * h * i),
                            }
                        };
                        out.push((name, vec![o, inp], src, Some(site)));
                    }
                }
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h], whole("model.norm.weight"), None));
    if !facts.tie_word_embeddings || base.contains("lm_head.weight") {
        out.push(("lm_head.weight".to_string(), vec![v, h], whole("lm_head.weight"), None));
    }
    Ok(out)
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

/// The output dtype of a merge in `dtype` (f32, bf16 or f16; parse a name with the binary's `--dtype` parser).
pub fn output_dtype(dtype: candle_core::DType) -> Result<Dtype> {
    match dtype {
        candle_core::DType::F32 => Ok(Dtype::F32),
        candle_core::DType::BF16 => Ok(Dtype::BF16),
        candle_core::DType::F16 => Ok(Dtype::F16),
        other => Err(Error::Invalid(format!("cannot merge into {other:?}: expected f32, bf16 or f16"))),
    }
}

/// Merges the adapters into the base and writes the model directory (and GGUF) at `req.out`.
pub fn merge(base: &dyn BaseWeights, req: &MergeRequest) -> Result<MergeReport> {
    let out = &req.out;
    if out.exists() {
        return Err(Error::Invalid(format!(
            "{}: the output directory already exists; choose a new path (nothing was written)",
            out.display()
        )));
    }
    if !matches!(req.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        return Err(Error::Invalid("the output dtype must be f32, bf16 or f16".into()));
    }
    for (a, w) in &req.adapters {
        a.check_fits(&req.facts.shape)?;
        if !w.is_finite() {
            return Err(Error::Invalid(format!("adapter weight {w} is not finite")));
        }
    }
    let config_path = req.model_dir.join("config.json");
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let mut config: Json =
        serde_json::from_str(&config_text).map_err(|e| Error::format(&config_path, format!("invalid JSON: {e}")))?;
    let tensors = plan(base, &req.facts)?;

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Invalid(format!("{}: the parent directory does not exist", parent.display())));
    }
    let leaf = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "merged".into());
    let tmp = parent.join(format!(".{leaf}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut guard = TempDir(Some(tmp.clone()));

    let mut report = MergeReport::default();
    let mut shard: Vec<(String, OwnedTensor)> = Vec::new();
    let mut shard_bytes = 0usize;
    let mut shard_files: Vec<(PathBuf, Vec<String>)> = Vec::new();
    let flush = |shard: &mut Vec<(String, OwnedTensor)>, files: &mut Vec<(PathBuf, Vec<String>)>| -> Result<()> {
        let path = tmp.join(format!("shard-{}.tmp", files.len()));
        write_file(shard, &path)?;
        files.push((path, shard.iter().map(|(n, _)| n.clone()).collect()));
        shard.clear();
        Ok(())
    };
    for (name, shape, src, site) in &tensors {
        let count: usize = shape.iter().product();
        let values = match src {
            Source::Whole(n) => {
                if base.is_quantized(n) {
                    report.dequantized += 1;
                }
                base.read_f32(n, shape)
            }
            Source::Range(n, first) => base.read_range_f32(n, *first, count),
        }
        .map_err(Error::Base)?;
        if values.len() != count {
            return Err(Error::Base(format!("`{name}`: read {} values, expected {count}", values.len())));
        }
        let mut w = Tensor::from_vec(values, shape.clone(), &req.device)?;
        if let Some(site) = site {
            let mut changed = false;
            for (a, weight) in &req.adapters {
                if let Some(m) = a.modules.get(site) {
                    w = (w + (m.delta_on(&req.device)? * *weight)?)?;
                    changed = true;
                }
                if let Site::Router(l) = site {
                    if let Some(full) = a.router_weights.get(l) {
                        let base_w = w.clone();
                        w = (&base_w + ((full.to_device(&req.device)? - &base_w)? * *weight)?)?;
                        changed = true;
                    }
                }
            }
            report.merged += usize::from(changed);
        }
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let t = OwnedTensor::from_f32(&values, shape.clone(), req.dtype)?;
        if shard_bytes > 0 && shard_bytes + t.nbytes() > req.max_shard_bytes {
            flush(&mut shard, &mut shard_files)?;
            shard_bytes = 0;
        }
        shard_bytes += t.nbytes();
        report.total_bytes += t.nbytes();
        shard.push((name.clone(), t));
        report.tensors += 1;
    }
    if !shard.is_empty() {
        flush(&mut shard, &mut shard_files)?;
    }
    let n = shard_files.len();
    report.shards = n;
    if n == 1 {
        let dest = tmp.join("model.safetensors");
        std::fs::rename(&shard_files[0].0, &dest).map_err(|e| Error::io(&dest, e))?;
    } else {
        let mut weight_map = serde_json::Map::new();
        for (k, (path, names)) in shard_files.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
            let dest = tmp.join(&file);
            std::fs::rename(path, &dest).map_err(|e| Error::io(&dest, e))?;
            for nm in names {
                weight_map.insert(nm.clone(), Json::String(file.clone()));
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": report.total_bytes}, "weight_map": weight_map});
        write_json(&tmp.join("model.safetensors.index.json"), &index)?;
    }

    // config.json: same model, new dtype, no quantization.
    if let Some(obj) = config.as_object_mut() {
        obj.remove("quantization_config");
        obj.insert("torch_dtype".into(), Json::String(dtype_name(req.dtype).into()));
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), Json::String(dtype_name(req.dtype).into()));
        }
    }
    write_json(&tmp.join("config.json"), &config)?;
    for f in COPIED {
        let src = req.model_dir.join(f);
        if src.is_file() {
            let dest = tmp.join(f);
            std::fs::copy(&src, &dest).map_err(|e| Error::io(&dest, e))?;
        }
    }
    if !tmp.join("generation_config.json").exists() {
        let mut g = serde_json::Map::new();
        if let Some(b) = req.facts.bos_token_id {
            g.insert("bos_token_id".into(), b.into());
        }
        match req.facts.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                g.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                g.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        write_json(&tmp.join("generation_config.json"), &Json::Object(g))?;
    }

    if let Some(ty) = req.gguf {
        let file = format!("{leaf}-{}.gguf", ty.name());
        write_gguf(&tmp, &tmp.join(&file), &req.facts, ty, &leaf, &req.model_dir)?;
        report.gguf = Some(out.join(file));
    }

    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    guard.0 = None;
    Ok(report)
}

fn write_json(path: &Path, v: &Json) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes a llama-architecture GGUF of the hub-layout model in `model_dir` (tokenizer from `tokenizer_dir`).
pub fn write_gguf(
    model_dir: &Path,
    path: &Path,
    facts: &ModelFacts,
    ty: GgufType,
    name: &str,
    tokenizer_dir: &Path,
) -> Result<()> {
    let reader = ShardReader::open(model_dir)?;
    let s = &facts.shape;
    let md = metadata(facts, ty, name, tokenizer_dir)?;
    // (gguf name, shape, sources (stacked when several), permutation heads)
    let mut items: Vec<GgufItem> = Vec::new();
    let (h, i, v) = (s.hidden_size, s.intermediate_size, facts.vocab_size);
    let one = |n: &str| vec![n.to_string()];
    items.push(("token_embd.weight".into(), vec![v, h], one("model.embed_tokens.weight"), None));
    for l in 0..s.num_layers {
        let p = format!("model.layers.{l}");
        let mut push = |hub: String, shape: Vec<usize>, heads: Option<usize>| -> Result<()> {
            let g = gguf_name(&hub).ok_or_else(|| Error::Invalid(format!("no GGUF name for `{hub}`")))?;
            items.push((g, shape, vec![hub], heads));
            Ok(())
        };
        push(format!("{p}.input_layernorm.weight"), vec![h], None)?;
        for (proj, heads) in
            [(Proj::Q, Some(s.num_heads)), (Proj::K, Some(s.num_kv_heads)), (Proj::V, None), (Proj::O, None)]
        {
            let site = Site::Attn(l, proj);
            let (o, inp) = s.dims(site);
            push(format!("{}.weight", site.module_name()), vec![o, inp], heads)?;
        }
        push(format!("{p}.post_attention_layernorm.weight"), vec![h], None)?;
        match s.num_experts {
            None => {
                for m in [MlpProj::Gate, MlpProj::Up, MlpProj::Down] {
                    let site = Site::Mlp(l, m);
                    let (o, inp) = s.dims(site);
                    push(format!("{}.weight", site.module_name()), vec![o, inp], None)?;
                }
            }
            Some(e) => {
                push(format!("{p}.block_sparse_moe.gate.weight"), vec![e, h], None)?;
                for (g, w, shape) in [
                    ("ffn_gate_exps", "w1", [e, i, h]),
                    ("ffn_down_exps", "w2", [e, h, i]),
                    ("ffn_up_exps", "w3", [e, i, h]),
                ] {
                    let srcs = (0..e).map(|x| format!("{p}.block_sparse_moe.experts.{x}.{w}.weight")).collect();
                    items.push((format!("blk.{l}.{g}.weight"), shape.to_vec(), srcs, None));
                }
            }
        }
    }
    items.push(("output_norm.weight".into(), vec![h], one("model.norm.weight"), None));
    if !facts.tie_word_embeddings || reader.read("lm_head.weight").is_ok() {
        items.push(("output.weight".into(), vec![v, h], one("lm_head.weight"), None));
    }
    let plan: Vec<PlannedTensor> = items
        .iter()
        .map(|(n, shape, _, _)| {
            let dtype = if shape.len() == 1 || n.ends_with("ffn_gate_inp.weight") {
                candle_core::quantized::GgmlDType::F32
            } else {
                ty.matrix_type(shape[shape.len() - 1])
            };
            PlannedTensor { name: n.clone(), shape: shape.clone(), dtype }
        })
        .collect();
    let mut w = GgufWriter::create(path, &md, plan)?;
    for (n, _, srcs, heads) in &items {
        let t = if srcs.len() == 1 {
            reader.read(&srcs[0])?
        } else {
            let parts = srcs.iter().map(|s| reader.read(s)).collect::<Result<Vec<_>>>()?;
            Tensor::stack(&parts, 0)?
        };
        let t = match heads {
            Some(nh) => permute_qk(&t, *nh)?,
            None => t,
        };
        w.write_next(n, &t)?;
    }
    w.finish()
}
