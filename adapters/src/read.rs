//! Reading a PEFT adapter directory into our internal form.
//!
//! Accepted layouts (each validated completely before anything is returned):
//! - dense modules: `base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight` (and k/v/o, Mistral's
//!   `mlp.{gate,up,down}_proj`);
//! - Mixtral experts, legacy per-expert layout (transformers 4 PEFT):
//!   `...layers.L.block_sparse_moe.experts.E.{w1,w2,w3}.lora_{A,B}.weight`, router `...block_sparse_moe.gate`;
//! - Mixtral experts, PEFT 0.21 `target_parameters` layout: `...layers.L.mlp.experts.lora_{A,B}.weight` (the outer
//!   `ParamWrapper`) and `...mlp.experts.base_layer.lora_{A,B}.weight` (the inner one). PEFT nests wrappers in the
//!   order the module registers its parameters (`gate_up_proj`, then `down_proj`), so with both targeted the
//!   inner (`base_layer`) one is `gate_up_proj`. A is `[r*E, in]` with expert-major rows, B `[out, r*E]` with
//!   expert-minor columns: `A_e = A.view(E, r, in)[e]`, `B_e = B.view(out, r, E)[:, :, e]`. The router is
//!   `...mlp.gate.lora_{A,B}.weight` (a 2-D `ParamWrapper`, same shapes as a linear LoRA);
//! - the router trained fully (`modules_to_save: ["gate"]`): `...mlp.gate.weight` / `...block_sparse_moe.gate.weight`.
//!
//! A fused `gate_up_proj` LoRA of rank `k` becomes separate w1/w3 LoRAs, exactly:
//! - when its B is block-diagonal with the split at `k/2` (what our writer and PEFT's own conversion of per-expert
//!   adapters produce): w1 gets A rows `0..k/2`, w3 rows `k/2..k`;
//! - when B's w3 rows (or w1 rows) are all zero: a w1-only (w3-only) LoRA of rank `k`;
//! - otherwise (a LoRA PEFT trained on the fused tensor, whose w1 and w3 updates share one A): w1 = `(A_e, B_e[..I])`
//!   and w3 = `(A_e, B_e[I..])`, both of rank `k`, the A copied. The function is identical; continued training then
//!   treats the two copies of A as independent parameters. [`Adapter::notes`] records which case applied.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::adapter::{alpha_for_scale, check_pair, lora_scale, Adapter, LoraModule, LoraSpec, RouterTraining};
use crate::config::{Patterns, PeftConfig};
use crate::naming::{BaseShape, ExpertProj, Site, PEFT_PREFIX, TARGETABLE};
use crate::{Error, Result};

/// File name of the adapter weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// An adapter directory with its config validated and its tensors read (f32), not yet matched to a base model.
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    /// The directory.
    pub dir: PathBuf,
    /// The parsed `adapter_config.json`.
    pub config: PeftConfig,
    /// Every tensor of `adapter_model.safetensors` by its PEFT key.
    pub tensors: BTreeMap<String, Tensor>,
}

/// The expert layout an adapter file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileLayout {
    /// No expert LoRA (dense modules, maybe the router).
    Dense,
    /// Per-expert `block_sparse_moe.experts.E.wN` keys.
    PerExpert,
    /// PEFT 0.21 `target_parameters` keys on `mlp.experts`.
    Fused,
}

/// What a PEFT key names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Module {
    /// A linear-style LoRA on one of our sites; `param` is true for PEFT's 2-D `ParamWrapper` on `mlp.gate`.
    Site { site: Site, param: bool },
    /// `model.layers.L.mlp.experts` wrapped `depth` times in `base_layer`.
    Fused { layer: usize, depth: usize },
}

fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("corrupt or truncated safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => {
                data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            safetensors::Dtype::BF16 => {
                data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            safetensors::Dtype::F16 => {
                data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            other => {
                return Err(Error::format(path, format!("tensor `{name}`: dtype {other:?}, expected F32, BF16 or F16")))
            }
        };
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(path, format!("tensor `{name}`: element {bad} is not finite")));
        }
        out.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(out)
}

impl AdapterFiles {
    /// Opens an adapter directory: validates `adapter_config.json` and reads `adapter_model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::format(dir, "not an adapter directory (it does not exist or is not a directory)"));
        }
        let config = PeftConfig::load(dir)?;
        let path = dir.join(WEIGHTS_FILE);
        if !path.exists() {
            let msg = if dir.join("adapter_model.bin").exists() {
                "adapter_model.bin (a PyTorch pickle) is not supported: load the adapter in PEFT and save it with \
                 `save_pretrained(dir, safe_serialization=True)` to get adapter_model.safetensors"
            } else {
                "missing adapter_model.safetensors"
            };
            return Err(Error::format(dir, msg));
        }
        let tensors = read_tensors(&path)?;
        if tensors.is_empty() {
            return Err(Error::format(&path, "the file holds no tensors"));
        }
        Ok(AdapterFiles { dir: dir.to_path_buf(), config, tensors })
    }

    fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }

    /// The expert layout of the file.
    pub fn layout(&self) -> FileLayout {
        if self.tensors.keys().any(|k| k.contains(".mlp.experts.")) {
            FileLayout::Fused
        } else if self.tensors.keys().any(|k| k.contains(".block_sparse_moe.experts.")) {
            FileLayout::PerExpert
        } else {
            FileLayout::Dense
        }
    }

    /// Number of scalars stored.
    pub fn parameter_count(&self) -> usize {
        self.tensors.values().map(Tensor::elem_count).sum()
    }

    /// Parses one key into (module, `Some('A' | 'B')` or `None` for a whole router weight).
    fn classify(&self, key: &str) -> Result<(Module, Option<char>)> {
        let path = self.weights_path();
        let bad = |m: &str| Error::format(&path, format!("tensor `{key}`: {m}"));
        let rest =
            key.strip_prefix(PEFT_PREFIX).ok_or_else(|| bad("not a PEFT key (no `base_model.model.` prefix)"))?;
        let (module, ab) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, Some('A'))
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, Some('B'))
        } else if rest.contains("lora_magnitude_vector") {
            return Err(Error::unsupported(&path, "use_dora", format!("tensor `{key}` is a DoRA magnitude vector")));
        } else if rest.contains("lora_embedding_") {
            return Err(bad("embedding LoRAs are not supported"));
        } else if let Some(m) = rest.strip_suffix(".weight") {
            (m, None)
        } else {
            return Err(bad("expected `...lora_A.weight`, `...lora_B.weight` or a saved router `...gate.weight`"));
        };
        if let Some(site) = Site::parse(module) {
            let param = module.ends_with(".mlp.gate");
            return match (ab, site) {
                (Some(_), _) => Ok((Module::Site { site, param }, ab)),
                (None, Site::Router(_)) if self.config.saves_router() => Ok((Module::Site { site, param }, None)),
                (None, Site::Router(_)) => {
                    Err(bad("a whole router weight, but `modules_to_save` does not list `gate`"))
                }
                (None, _) => Err(bad("whole module weights (modules_to_save) are supported for the router only")),
            };
        }
        if let (Some(_), Some(fused)) = (ab, module.strip_prefix("model.layers.")) {
            if let Some((l, tail)) = fused.split_once('.') {
                if let (Ok(layer), Some(mut tail)) = (l.parse::<usize>(), tail.strip_prefix("mlp.experts")) {
                    let mut depth = 0;
                    while let Some(t) = tail.strip_prefix(".base_layer") {
                        depth += 1;
                        tail = t;
                    }
                    if tail.is_empty() {
                        return Ok((Module::Fused { layer, depth }, ab));
                    }
                }
            }
        }
        Err(bad(&format!("`{module}` is not a Mistral/Mixtral module we can adapt")))
    }

    /// Matches the adapter to a base model and converts it to our internal form, validating every tensor, rank
    /// and targeting rule first.
    pub fn resolve(&self, base: &BaseShape) -> Result<Adapter> {
        let path = self.weights_path();
        let cfg = &self.config;
        let cfg_path = self.dir.join("adapter_config.json");
        let ranks = Patterns::compile(&cfg.rank_pattern.0, &cfg_path, "rank_pattern")?;
        let alphas = Patterns::compile(&cfg.alpha_pattern.0, &cfg_path, "alpha_pattern")?;
        let rs = cfg.use_rslora;

        // Group A/B halves per module.
        let mut pairs: BTreeMap<Module, (Option<&Tensor>, Option<&Tensor>)> = BTreeMap::new();
        let mut router_full: BTreeMap<usize, &Tensor> = BTreeMap::new();
        for (key, t) in &self.tensors {
            let (module, ab) = self.classify(key)?;
            match (ab, &module) {
                (Some('A'), _) => pairs.entry(module).or_default().0 = Some(t),
                (Some(_), _) => pairs.entry(module).or_default().1 = Some(t),
                (None, Module::Site { site: Site::Router(l), .. }) => {
                    router_full.insert(*l, t);
                }
                (None, _) => return Err(Error::format(&path, format!("tensor `{key}` is not understood"))),
            }
        }

        let layer_check = |l: usize, what: &str| -> Result<()> {
            if l >= base.num_layers {
                return Err(Error::Mismatch(format!(
                    "the adapter has {what} in layer {l}, the base model has {} layers",
                    base.num_layers
                )));
            }
            Ok(())
        };
        let mut modules: BTreeMap<Site, LoraModule> = BTreeMap::new();
        let mut notes = Vec::new();
        let mut fused: BTreeMap<usize, BTreeMap<usize, (&Tensor, &Tensor)>> = BTreeMap::new();
        for (module, (a, b)) in &pairs {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (*a, *b),
                _ => {
                    return Err(Error::format(
                        &path,
                        format!("{module:?}: lora_A and lora_B must both be present (one is missing)"),
                    ))
                }
            };
            match *module {
                Module::Site { site, param } => {
                    layer_check(site.layer(), &format!("`{site}`"))?;
                    if !base.has(site) {
                        let why = match site {
                            Site::Mlp(..) => "the base model is a mixture of experts and has no dense MLP",
                            Site::Router(_) | Site::Expert(..) => "the base model is dense (no experts)",
                            Site::Attn(..) => "no such module",
                        };
                        return Err(Error::Mismatch(format!("the adapter adapts `{site}`: {why}")));
                    }
                    // The name PEFT matched targets and patterns against.
                    let key = if param {
                        format!("model.layers.{}.mlp.gate.weight", site.layer())
                    } else {
                        site.module_name()
                    };
                    let targeted = if param { cfg.targets_parameter(&key) } else { cfg.targets_module(&key, true) };
                    if !targeted {
                        return Err(Error::format(
                            &path,
                            format!("holds a LoRA for `{key}` but adapter_config.json does not target it"),
                        ));
                    }
                    let r = ranks.lookup(&key).unwrap_or(cfg.r);
                    check_pair(&site.module_name(), a, b, base.dims(site), None)?;
                    if a.dims()[0] != r {
                        return Err(Error::format(
                            &path,
                            format!(
                                "`{key}` has rank {} but adapter_config.json (r / rank_pattern) says {r}",
                                a.dims()[0]
                            ),
                        ));
                    }
                    let alpha = alphas.lookup(&key).unwrap_or(cfg.lora_alpha);
                    modules.insert(
                        site,
                        LoraModule { a: a.clone(), b: b.clone(), alpha, scale: lora_scale(r, alpha, rs) },
                    );
                }
                Module::Fused { layer, depth } => {
                    layer_check(layer, "fused expert LoRAs")?;
                    if !base.is_moe() {
                        return Err(Error::Mismatch(
                            "the adapter adapts Mixtral experts; the base model is dense".into(),
                        ));
                    }
                    fused.entry(layer).or_default().insert(depth, (a, b));
                }
            }
        }

        // Fused expert LoRAs: which wrapper is which, then split per expert.
        for (layer, depths) in &fused {
            let gu_key = format!("model.layers.{layer}.mlp.experts.gate_up_proj");
            let dn_key = format!("model.layers.{layer}.mlp.experts.down_proj");
            // Innermost wrapper = first registered parameter; depth 0 = outermost.
            let targeted: Vec<&String> = [&gu_key, &dn_key].into_iter().filter(|k| cfg.targets_parameter(k)).collect();
            let expected: BTreeSet<usize> = (0..targeted.len()).collect();
            let present: BTreeSet<usize> = depths.keys().copied().collect();
            if expected != present || targeted.is_empty() {
                return Err(Error::format(
                    &path,
                    format!(
                        "layer {layer}: the file has fused expert LoRAs at wrapper depths {present:?} but \
                         adapter_config.json's target_parameters target {} of gate_up_proj/down_proj there",
                        targeted.len()
                    ),
                ));
            }
            for (i, key) in targeted.iter().enumerate() {
                let depth = targeted.len() - 1 - i;
                let (a, b) = depths[&depth];
                let r_total = a.dims().first().copied().unwrap_or(0);
                let rank = ranks.lookup(key).unwrap_or(cfg.r);
                let alpha = alphas.lookup(key).unwrap_or(cfg.lora_alpha);
                let scale = lora_scale(rank, alpha, rs);
                let e = base.num_experts.unwrap_or(1);
                if r_total != rank * e {
                    return Err(Error::format(
                        &path,
                        format!(
                            "`{key}`: lora_A has {r_total} rows; adapter_config.json (r / rank_pattern) says rank {rank} \
                             for each of the base model's {e} experts ({} rows)",
                            rank * e
                        ),
                    ));
                }
                if key.ends_with("gate_up_proj") {
                    let i_sz = base.intermediate_size;
                    check_pair(key, a, b, (2 * i_sz, base.hidden_size), None)?;
                    let (experts, split) = split_gate_up(a, b, e, rank, i_sz)?;
                    notes.push(format!("layer {layer} gate_up_proj (rank {rank}): {split}"));
                    for (x, (w1, w3)) in experts.into_iter().enumerate() {
                        for (w, piece) in [(ExpertProj::W1, w1), (ExpertProj::W3, w3)] {
                            if let Some((pa, pb)) = piece {
                                let pr = pa.dims()[0];
                                modules.insert(
                                    Site::Expert(*layer, x, w),
                                    LoraModule { a: pa, b: pb, alpha: alpha_for_scale(pr, scale, rs), scale },
                                );
                            }
                        }
                    }
                } else {
                    check_pair(key, a, b, (base.hidden_size, base.intermediate_size), None)?;
                    for x in 0..e {
                        let (pa, pb) = expert_slice(a, b, e, rank, x)?;
                        modules
                            .insert(Site::Expert(*layer, x, ExpertProj::W2), LoraModule { a: pa, b: pb, alpha, scale });
                    }
                }
            }
        }

        // Router saved whole.
        let mut router_weights = BTreeMap::new();
        for (l, w) in &router_full {
            layer_check(*l, "a router weight")?;
            if !base.has(Site::Router(*l)) {
                return Err(Error::Mismatch("the adapter holds a router weight; the base model is dense".into()));
            }
            let (e, h) = base.dims(Site::Router(*l));
            if w.dims() != [e, h] {
                return Err(Error::Mismatch(format!(
                    "the saved router weight of layer {l} is {:?}; the base router is [{e}, {h}]",
                    w.dims()
                )));
            }
            router_weights.insert(*l, (*w).clone());
        }
        if cfg.saves_router() && base.is_moe() {
            if let Some(l) = (0..base.num_layers).find(|l| !router_full.contains_key(l)) {
                return Err(Error::format(
                    &path,
                    format!("modules_to_save lists the router but layer {l}'s router weight is missing"),
                ));
            }
        }

        // Every module the config targets must be present (PEFT would silently leave it at its init).
        let fused_layout = !fused.is_empty() || cfg.target_parameters.as_ref().is_some_and(|t| !t.is_empty());
        for site in base.sites() {
            let targeted = match site {
                Site::Attn(..) | Site::Mlp(..) => cfg.targets_module(&site.module_name(), true),
                Site::Router(l) if fused_layout => cfg.targets_parameter(&format!("model.layers.{l}.mlp.gate.weight")),
                Site::Expert(l, _, w) if fused_layout => cfg.targets_parameter(&format!(
                    "model.layers.{l}.mlp.experts.{}",
                    if w == ExpertProj::W2 { "down_proj" } else { "gate_up_proj" }
                )),
                Site::Router(_) | Site::Expert(..) => {
                    cfg.targets_module(&site.module_name(), true)
                        || (matches!(site, Site::Router(_))
                            && cfg.targets_module(&format!("model.layers.{}.mlp.gate", site.layer()), true))
                }
            };
            let fused_gate_up = matches!(site, Site::Expert(_, _, ExpertProj::W1 | ExpertProj::W3)) && fused_layout;
            if targeted && !modules.contains_key(&site) && !fused_gate_up {
                return Err(Error::format(
                    &path,
                    format!("adapter_config.json targets `{site}` but the file has no LoRA for it"),
                ));
            }
            if fused_gate_up && targeted && !fused.contains_key(&site.layer()) {
                return Err(Error::format(
                    &path,
                    format!(
                        "adapter_config.json targets layer {}'s fused experts but the file has no LoRA for them",
                        site.layer()
                    ),
                ));
            }
        }

        let spec = spec_from_modules(cfg, base, &modules, !router_weights.is_empty());
        Ok(Adapter { spec, base_model: cfg.base_model_name_or_path.clone(), modules, router_weights, notes })
    }
}

/// Expert `x`'s `(A [r, in], B [out, r])` of a fused LoRA.
fn expert_slice(a: &Tensor, b: &Tensor, e: usize, r: usize, x: usize) -> Result<(Tensor, Tensor)> {
    let inp = a.dims()[1];
    let out = b.dims()[0];
    let ax = a.reshape((e, r, inp))?.get(x)?.contiguous()?;
    let bx = b.reshape((out, r, e))?.narrow(2, x, 1)?.squeeze(2)?.contiguous()?;
    Ok((ax, bx))
}

type Piece = Option<(Tensor, Tensor)>;

fn all_zero(t: &Tensor) -> Result<bool> {
    Ok(t.abs()?.max_all()?.to_scalar::<f32>()? == 0.0 || t.elem_count() == 0)
}

/// Splits a fused gate_up LoRA into per-expert (w1, w3) LoRAs; returns them and a description of the split.
fn split_gate_up(a: &Tensor, b: &Tensor, e: usize, r: usize, i: usize) -> Result<(Vec<(Piece, Piece)>, String)> {
    let mut per: Vec<(Tensor, Tensor, Tensor)> = Vec::with_capacity(e);
    for x in 0..e {
        let (ax, bx) = expert_slice(a, b, e, r, x)?;
        let top = bx.narrow(0, 0, i)?.contiguous()?;
        let bottom = bx.narrow(0, i, i)?.contiguous()?;
        per.push((ax, top, bottom));
    }
    let mut block_diag = r.is_multiple_of(2);
    if block_diag {
        let h = r / 2;
        for (_, top, bottom) in &per {
            if !all_zero(&top.narrow(1, h, h)?)? || !all_zero(&bottom.narrow(1, 0, h)?)? {
                block_diag = false;
                break;
            }
        }
    }
    if block_diag {
        let h = r / 2;
        let mut out = Vec::with_capacity(e);
        for (ax, top, bottom) in per {
            let w1 = (ax.narrow(0, 0, h)?.contiguous()?, top.narrow(1, 0, h)?.contiguous()?);
            let w3 = (ax.narrow(0, h, h)?.contiguous()?, bottom.narrow(1, h, h)?.contiguous()?);
            out.push((Some(w1), Some(w3)));
        }
        return Ok((out, format!("block-diagonal B: separate w1/w3 LoRAs of rank {h}")));
    }
    let mut w1_only = true;
    let mut w3_only = true;
    for (_, top, bottom) in &per {
        w1_only &= all_zero(bottom)?;
        w3_only &= all_zero(top)?;
    }
    let mut out = Vec::with_capacity(e);
    let what = if w1_only {
        "w3 rows of B are zero: w1-only LoRAs"
    } else if w3_only {
        "w1 rows of B are zero: w3-only LoRAs"
    } else {
        "w1 and w3 share A (B is not block-diagonal): separate w1/w3 LoRAs with a copy of A each, exact"
    };
    for (ax, top, bottom) in per {
        let w1 = (!w3_only).then(|| (ax.clone(), top));
        let w3 = (!w1_only).then_some((ax, bottom));
        out.push((w1, w3));
    }
    Ok((out, format!("{what} (rank {r})")))
}

/// The internal settings that reproduce these modules' ranks and alphas (explicit per-module patterns where they
/// differ from the defaults).
fn spec_from_modules(
    cfg: &PeftConfig,
    base: &BaseShape,
    modules: &BTreeMap<Site, LoraModule>,
    router_full: bool,
) -> LoraSpec {
    let shorts: BTreeSet<&str> = modules.keys().filter(|s| !matches!(s, Site::Router(_))).map(|s| s.short()).collect();
    let targets = TARGETABLE.iter().filter(|t| shorts.contains(*t)).map(|t| t.to_string()).collect();
    let layers: BTreeSet<usize> = modules.keys().filter(|s| !matches!(s, Site::Router(_))).map(Site::layer).collect();
    let layers = (!layers.is_empty() && layers.len() != base.num_layers).then(|| layers.into_iter().collect());
    let mut rank_pattern = Vec::new();
    let mut alpha_pattern = Vec::new();
    for (site, m) in modules {
        let key = regex::escape(&site.module_name());
        if m.rank() != cfg.r {
            rank_pattern.push((key.clone(), m.rank()));
        }
        if m.alpha != cfg.lora_alpha {
            alpha_pattern.push((key, m.alpha));
        }
    }
    let router = if router_full {
        RouterTraining::Full
    } else if modules.keys().any(|s| matches!(s, Site::Router(_))) {
        RouterTraining::Lora
    } else {
        RouterTraining::Frozen
    };
    LoraSpec {
        r: cfg.r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        use_rslora: cfg.use_rslora,
        targets,
        rank_pattern,
        alpha_pattern,
        layers,
        router,
    }
}

/// Reads an adapter directory and matches it to a base model of shape `base`.
pub fn read_adapter(dir: &Path, base: &BaseShape) -> Result<Adapter> {
    AdapterFiles::open(dir)?.resolve(base)
}

/// The data type adapter tensors are held in.
pub const ADAPTER_DTYPE: DType = DType::F32;
