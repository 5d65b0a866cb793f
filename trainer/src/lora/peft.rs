//! PEFT adapter directories on our models: the bridge between the trainer and the `adapters` crate.
//!
//! - [`base_shape`] / [`model_facts`]: a model config as the plain numbers `adapters` works with;
//! - [`load_adapter`]: a PEFT adapter directory, validated against a model config;
//! - [`apply_adapters`]: one or several (weighted) adapters on a loaded [`Model`] for inference, unmerged: each
//!   adapted linear gets one frozen LoRA (several adapters are concatenated along the rank, `A = [A_1; A_2]`,
//!   `B = [w_1 s_1 B_1, w_2 s_2 B_2]`, scale 1, which is exactly the weighted sum of their updates and works on any
//!   base, NF4 included); a fully trained router weight replaces the base router (`W + sum w_i (W_i - W)`);
//! - [`lora_spec`] / [`lora_settings`]: our `LoraSettings` to and from the adapter's settings;
//! - [`save_adapter`]: the trained tensors of a run written as a PEFT adapter directory;
//! - [`CheckpointWeights`]: a checkpoint as the base of a merge (`adapters::merge`), bitsandbytes NF4 weights
//!   dequantized with the bitsandbytes-exact code of [`crate::quant`] (merging into the dequantized weights).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adapters::merge::BaseWeights;
use adapters::{Adapter, BaseShape, ExpertLayout, ExpertProj, LoraSpec, MlpProj, Proj, Site};
use candle_core::{DType, Device, Tensor, Var};

use super::adapter::{DropoutControl, LoraAdapter};
use super::attach::TrainableParams;
use super::config::LoraSettings;
use crate::model::checkpoint::Checkpoint;
use crate::model::decoder::FeedForward;
use crate::model::linear::Linear;
use crate::model::{Model, ModelConfig};
use crate::quant::bnb_format::QUANT_STATE_SUFFIX;
use crate::quant::{BnbParts, Nf4Weight, RawTensor};
use crate::{Error, Result};

fn adapters_err(e: adapters::Error) -> Error {
    match e {
        adapters::Error::Io { path, source } => Error::Io { path, source },
        adapters::Error::Format { path, message } => Error::Format { path, message },
        adapters::Error::Candle(e) => Error::Candle(e),
        other => Error::Invalid(other.to_string()),
    }
}

/// The dimensions of a model config as `adapters` takes them.
pub fn base_shape(c: &ModelConfig) -> BaseShape {
    BaseShape {
        num_layers: c.num_layers,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        num_experts: c.moe.as_ref().map(|m| m.num_experts),
    }
}

/// The facts GGUF export needs, from a model config.
pub fn model_facts(c: &ModelConfig) -> adapters::gguf::ModelFacts {
    adapters::gguf::ModelFacts {
        shape: base_shape(c),
        vocab_size: c.vocab_size,
        tie_word_embeddings: c.tie_word_embeddings,
        rope_theta: c.rope_theta,
        rms_norm_eps: c.rms_norm_eps,
        max_position_embeddings: c.max_position_embeddings,
        sliding_window: c.sliding_window,
        experts_per_token: c.moe.as_ref().map(|m| m.experts_per_token),
        bos_token_id: c.bos_token_id,
        eos_token_ids: c.eos_token_ids.clone(),
    }
}

/// Reads a PEFT adapter directory and checks it fits a model with this config (nothing is returned unless every
/// tensor fits).
pub fn load_adapter(dir: &Path, config: &ModelConfig) -> Result<Adapter> {
    adapters::read_adapter(dir, &base_shape(config)).map_err(adapters_err)
}

/// Parses `DIR` or `DIR:WEIGHT` (weight default 1; a `:` followed by something that is not a number is part of
/// the path).
pub fn parse_adapter_arg(arg: &str) -> Result<(PathBuf, f64)> {
    if let Some((dir, w)) = arg.rsplit_once(':') {
        if let Ok(weight) = w.parse::<f64>() {
            if !weight.is_finite() {
                return Err(Error::Invalid(format!("--adapter {arg}: the weight must be a finite number")));
            }
            return Ok((PathBuf::from(dir), weight));
        }
    }
    Ok((PathBuf::from(arg), 1.0))
}

/// The linear layer of `site` in `model`.
pub(crate) fn linear_mut(model: &mut Model, site: Site) -> Result<&mut Linear> {
    let l = site.layer();
    let layer =
        model.layers.get_mut(l).ok_or_else(|| Error::Invalid(format!("adapter: the model has no layer {l}")))?;
    let missing = || Error::Invalid(format!("adapter: the model has no module `{site}`"));
    Ok(match (site, &mut layer.feed_forward) {
        (Site::Attn(_, Proj::Q), _) => &mut layer.self_attn.q_proj,
        (Site::Attn(_, Proj::K), _) => &mut layer.self_attn.k_proj,
        (Site::Attn(_, Proj::V), _) => &mut layer.self_attn.v_proj,
        (Site::Attn(_, Proj::O), _) => &mut layer.self_attn.o_proj,
        (Site::Mlp(_, m), FeedForward::Dense(mlp)) => match m {
            MlpProj::Gate => &mut mlp.gate_proj,
            MlpProj::Up => &mut mlp.up_proj,
            MlpProj::Down => &mut mlp.down_proj,
        },
        (Site::Router(_), FeedForward::Sparse(moe)) => &mut moe.router,
        (Site::Expert(_, x, w), FeedForward::Sparse(moe)) => {
            let e = moe.experts.get_mut(x).ok_or_else(missing)?;
            match w {
                ExpertProj::W1 => &mut e.gate_proj,
                ExpertProj::W2 => &mut e.down_proj,
                ExpertProj::W3 => &mut e.up_proj,
            }
        }
        _ => return Err(missing()),
    })
}

/// Puts adapters (each with a weight) on a loaded model for inference. Every adapter is checked against the
/// model first; the model is only changed when all fit. Fails if a targeted linear already has a LoRA.
pub fn apply_adapters(model: &mut Model, adapters: &[(Adapter, f64)]) -> Result<()> {
    let shape = base_shape(&model.config);
    for (a, w) in adapters {
        a.check_fits(&shape).map_err(adapters_err)?;
        if !w.is_finite() {
            return Err(Error::Invalid(format!("adapter weight {w} is not finite")));
        }
    }
    let mut sites: Vec<Site> = adapters.iter().flat_map(|(a, _)| a.modules.keys().copied()).collect();
    sites.sort();
    sites.dedup();
    for &site in &sites {
        if linear_mut(model, site)?.lora.is_some() {
            return Err(Error::Invalid(format!("`{site}` already has a LoRA attached")));
        }
    }
    // Build everything before touching the model.
    let control = Arc::new(DropoutControl::default());
    let mut built: Vec<(Site, LoraAdapter)> = Vec::with_capacity(sites.len());
    for (id, &site) in sites.iter().enumerate() {
        let parts: Vec<(&adapters::LoraModule, f64)> =
            adapters.iter().filter_map(|(a, w)| a.modules.get(&site).map(|m| (m, *w))).collect();
        let (a, b, scale) = match parts.as_slice() {
            [(m, w)] if *w == 1.0 => (m.a.clone(), m.b.clone(), m.scale),
            _ => {
                let a = Tensor::cat(&parts.iter().map(|(m, _)| m.a.clone()).collect::<Vec<_>>(), 0)?;
                let bs = parts.iter().map(|(m, w)| &m.b * (m.scale * w)).collect::<candle_core::Result<Vec<_>>>()?;
                (a, Tensor::cat(&bs, 1)?, 1.0)
            }
        };
        let dev = &model.device;
        let lora = LoraAdapter::new(
            Var::from_tensor(&a.to_device(dev)?)?,
            Var::from_tensor(&b.to_device(dev)?)?,
            scale,
            0.0,
            id as u64,
            control.clone(),
        );
        built.push((site, lora));
    }
    let mut routers: Vec<(usize, Tensor)> = Vec::new();
    for l in 0..model.config.num_layers {
        let full: Vec<(&Tensor, f64)> =
            adapters.iter().filter_map(|(a, w)| a.router_weights.get(&l).map(|t| (t, *w))).collect();
        if full.is_empty() {
            continue;
        }
        let base = linear_mut(model, Site::Router(l))?.dense_weight()?.to_dtype(DType::F32)?;
        let mut w = base.clone();
        for (t, weight) in full {
            w = (w + ((t.to_device(base.device())? - &base)? * weight)?)?;
        }
        routers.push((l, w.to_dtype(model.dtype)?.to_device(&model.device)?));
    }
    for (site, lora) in built {
        linear_mut(model, site)?.lora = Some(lora);
    }
    for (l, w) in routers {
        linear_mut(model, Site::Router(l))?.set_weight(w);
    }
    Ok(())
}

/// Our LoRA settings as the adapter's settings (targets as PEFT module names, in canonical order).
pub fn lora_spec(s: &LoraSettings) -> LoraSpec {
    LoraSpec {
        r: s.r,
        alpha: s.alpha,
        dropout: s.dropout,
        use_rslora: s.use_rslora,
        targets: s.target_modules(),
        rank_pattern: s.rank_pattern.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        alpha_pattern: s.alpha_pattern.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        layers: (!s.layers_to_transform.is_empty()).then(|| s.layers_to_transform.clone()),
        router: s.router,
    }
}

/// The LoRA settings that continue training an adapter. The patterns keep the spec's order (the first matching
/// key wins, as in PEFT).
pub fn lora_settings(spec: &LoraSpec) -> LoraSettings {
    LoraSettings {
        r: spec.r,
        alpha: spec.alpha,
        dropout: spec.dropout,
        use_rslora: spec.use_rslora,
        targets: spec.targets.clone(),
        rank_pattern: spec.rank_pattern.iter().cloned().collect(),
        alpha_pattern: spec.alpha_pattern.iter().cloned().collect(),
        layers_to_transform: spec.layers.clone().unwrap_or_default(),
        router: spec.router,
        init_from: None,
    }
}

/// Writes the trainable tensors of a run (our names) as a PEFT adapter directory.
pub fn save_adapter(
    params: &TrainableParams,
    settings: &LoraSettings,
    config: &ModelConfig,
    base_model: Option<String>,
    dir: &Path,
    layout: ExpertLayout,
) -> Result<()> {
    let tensors = params.named.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone()));
    let shape = base_shape(config);
    let adapter = Adapter::from_internal(lora_spec(settings), base_model, tensors, &shape).map_err(adapters_err)?;
    adapters::write_adapter(&adapter, &shape, dir, layout).map_err(adapters_err)
}

/// Converts an `adapters` error into the engine's.
pub fn from_adapters_error(e: adapters::Error) -> Error {
    adapters_err(e)
}

/// A checkpoint as the source of a merge.
#[derive(Debug)]
pub struct CheckpointWeights {
    ckpt: Checkpoint,
    nf4: HashSet<String>,
}

impl CheckpointWeights {
    /// Opens the safetensors of a model directory (headers only).
    pub fn open(dir: &Path) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let nf4 = ckpt.tensors().filter_map(|(n, _)| n.strip_suffix(QUANT_STATE_SUFFIX).map(String::from)).collect();
        Ok(CheckpointWeights { ckpt, nf4 })
    }

    fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let path = self.ckpt.dir.clone();
        let parts = BnbParts::collect(name, &path, |full| {
            if !self.ckpt.contains(full) {
                return Ok(None);
            }
            let (bytes, info) = self.ckpt.load_raw(full)?;
            Ok(Some(RawTensor { dtype: info.dtype.to_safetensors(), shape: info.shape.clone(), data: bytes.into() }))
        })?;
        Ok(Nf4Weight::from_bnb_parts(&parts, name, &path)?.dequantize())
    }
}

impl BaseWeights for CheckpointWeights {
    fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }

    fn read_f32(&self, name: &str, shape: &[usize]) -> std::result::Result<Vec<f32>, String> {
        if self.nf4.contains(name) {
            let v = self.dequantize(name).map_err(|e| e.to_string())?;
            if v.len() != shape.iter().product::<usize>() {
                return Err(format!("NF4 weight `{name}` has {} elements, expected shape {shape:?}", v.len()));
            }
            return Ok(v);
        }
        // Merges read and write through host memory (`BaseWeights` hands out host vectors).
        self.ckpt
            .load(name, shape, DType::F32, &Device::Cpu)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .map_err(|e| e.to_string())
    }

    fn read_range_f32(&self, name: &str, first: usize, count: usize) -> std::result::Result<Vec<f32>, String> {
        if self.nf4.contains(name) {
            let v = self.dequantize(name).map_err(|e| e.to_string())?;
            return v
                .get(first..first + count)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| format!("`{name}`: range out of bounds"));
        }
        // Host memory, as `read_f32`.
        self.ckpt
            .load_range(name, first, &[count], DType::F32, &Device::Cpu)
            .and_then(|t| Ok(t.to_vec1::<f32>()?))
            .map_err(|e| e.to_string())
    }

    fn is_quantized(&self, name: &str) -> bool {
        self.nf4.contains(name)
    }
}

/// A description of an adapter directory for `tramontane inspect`: its settings, targets, ranks, trainable
/// parameters, layout and, when `base_model_name_or_path` (or `base`) is a local model directory, whether it fits
/// that base. Returns the JSON form and the text lines.
pub fn describe_adapter(dir: &Path, base: Option<&Path>) -> Result<(serde_json::Value, Vec<String>)> {
    use std::collections::BTreeMap;
    let files = adapters::AdapterFiles::open(dir).map_err(adapters_err)?;
    let c = &files.config;
    let layout = match files.layout() {
        adapters::FileLayout::Dense => "dense modules only",
        adapters::FileLayout::PerExpert => "per-expert (block_sparse_moe.experts.E.wN)",
        adapters::FileLayout::Fused => "PEFT 0.21 target_parameters (mlp.experts.gate_up_proj / down_proj)",
    };
    // Ranks as stored, by module kind.
    let mut ranks: BTreeMap<String, std::collections::BTreeSet<usize>> = BTreeMap::new();
    let mut layers = std::collections::BTreeSet::new();
    let mut hidden = None;
    for (k, t) in &files.tensors {
        if let Some(m) = k.strip_suffix(".lora_A.weight") {
            let kind = m.split('.').skip(4).filter(|p| p.parse::<usize>().is_err()).collect::<Vec<_>>().join(".");
            ranks.entry(kind).or_default().insert(t.dims()[0]);
            if m.ends_with("self_attn.q_proj") {
                hidden = Some(t.dims()[1]);
            }
        }
        if let Some(l) = k.strip_prefix("base_model.model.model.layers.").and_then(|r| r.split('.').next()) {
            if let Ok(l) = l.parse::<usize>() {
                layers.insert(l);
            }
        }
    }
    let base_dir = base
        .map(Path::to_path_buf)
        .or_else(|| c.base_model_name_or_path.as_ref().map(PathBuf::from).filter(|p| p.join("config.json").is_file()));
    let fit = base_dir.as_ref().map(|b| {
        let r = ModelConfig::from_path(b).and_then(|cfg| load_adapter(dir, &cfg));
        match r {
            Ok(a) => (b.clone(), Ok(a.parameter_count())),
            Err(e) => (b.clone(), Err(e.to_string())),
        }
    });
    let ranks_json: BTreeMap<&String, Vec<usize>> =
        ranks.iter().map(|(k, v)| (k, v.iter().copied().collect())).collect();
    let json = serde_json::json!({
        "kind": "peft_adapter",
        "dir": dir,
        "peft_type": c.peft_type,
        "base_model_name_or_path": c.base_model_name_or_path,
        "r": c.r, "lora_alpha": c.lora_alpha, "use_rslora": c.use_rslora, "lora_dropout": c.lora_dropout,
        "target_modules": c.target_modules, "target_parameters": c.target_parameters,
        "modules_to_save": c.modules_to_save, "layers_to_transform": c.layers_to_transform,
        "rank_pattern": c.rank_pattern.0.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "alpha_pattern": c.alpha_pattern.0.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "layout": layout,
        "tensors": files.tensors.len(),
        "stored_parameters": files.parameter_count(),
        "stored_ranks": ranks_json,
        "layers_with_tensors": layers,
        "hidden_size_inferred": hidden,
        "fits_base": fit.as_ref().map(|(b, r)| serde_json::json!({
            "base": b, "fits": r.is_ok(), "trainable_parameters": r.as_ref().ok(), "error": r.as_ref().err(),
        })),
    });
    let scale = if c.use_rslora { "alpha/sqrt(r)" } else { "alpha/r" };
    // Human text, not Rust debug output: lists comma-separated, absent values as "none".
    let list = |v: Option<&Vec<String>>| v.filter(|v| !v.is_empty()).map_or("none".to_string(), |v| v.join(", "));
    let modules = match &c.target_modules {
        None => "none".to_string(),
        Some(adapters::config::ModuleSelector::Regex(r)) => format!("matching `{r}`"),
        Some(adapters::config::ModuleSelector::List(v)) => list(Some(v)),
    };
    let pattern = |p: Vec<String>| if p.is_empty() { "none".to_string() } else { p.join(", ") };
    let mut lines = vec![
        format!("adapter      {} (PEFT {})", dir.display(), c.peft_type.as_deref().unwrap_or("?")),
        format!("base model   {}", c.base_model_name_or_path.as_deref().unwrap_or("-")),
        format!("rank/alpha   r {}, alpha {}, scale {scale}, dropout {}", c.r, c.lora_alpha, c.lora_dropout),
        format!("targets      modules {modules}, parameters {}", list(c.target_parameters.as_ref())),
        format!("layout       {layout}"),
    ];
    if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
        lines.push(format!(
            "patterns     rank {}, alpha {}",
            pattern(c.rank_pattern.0.iter().map(|(k, v)| format!("{k}: {v}")).collect()),
            pattern(c.alpha_pattern.0.iter().map(|(k, v)| format!("{k}: {v}")).collect())
        ));
    }
    if let Some(l) = &c.layers_to_transform {
        lines.push(format!("layers       {:?}", l.to_vec()));
    }
    if let Some(m) = &c.modules_to_save {
        lines.push(format!("saved whole  {}", list(Some(m))));
    }
    let rk: Vec<String> = ranks
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.iter().map(usize::to_string).collect::<Vec<_>>().join("/")))
        .collect();
    lines.push(format!("ranks        {}", rk.join(", ")));
    lines.push(format!(
        "tensors      {} ({} parameters), layers {:?}, hidden size {}",
        files.tensors.len(),
        files.parameter_count(),
        layers.iter().collect::<Vec<_>>(),
        hidden.map_or("?".into(), |h| h.to_string())
    ));
    match &fit {
        Some((b, Ok(n))) => lines.push(format!("fits         {} (yes; {n} trainable parameters)", b.display())),
        Some((b, Err(e))) => lines.push(format!("fits         {}: NO: {e}", b.display())),
        None => lines.push("fits         (base model not found locally; pass --model to check)".into()),
    }
    Ok((json, lines))
}
