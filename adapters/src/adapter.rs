//! Our internal adapter: one LoRA (A `[r, in]`, B `[out, r]`, f32) per module under our module names, plus the
//! Mixtral router's full weight when it was trained fully, and the settings that describe it.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::Patterns;
use crate::naming::{BaseShape, Site, PEFT_PREFIX, TARGETABLE};
use crate::{Error, Result};

/// What happens to the Mixtral router (`block_sparse_moe.gate`): the one type for it, the trainer's `RouterMode`
/// and the recipe's `lora.router` (`frozen`, `lora` or `full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterTraining {
    /// The router is not adapted (kept frozen).
    #[default]
    Frozen,
    /// The router has a LoRA.
    Lora,
    /// The router's weight is trained (and saved) whole.
    Full,
}

/// The LoRA settings an adapter was made with (mirrors the trainer's `LoraSettings`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub alpha: f64,
    /// Training dropout on the LoRA input (no effect on the adapter's function).
    pub dropout: f64,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Targeted module short names (`q_proj`, ..., `w1`, `w2`, `w3`).
    pub targets: Vec<String>,
    /// Rank overrides `(regex key, rank)`, first match wins (PEFT semantics, matched against our module names).
    pub rank_pattern: Vec<(String, usize)>,
    /// Alpha overrides `(regex key, alpha)`, first match wins.
    pub alpha_pattern: Vec<(String, f64)>,
    /// Layers the targets apply to (`None`: all); PEFT's `layers_to_transform`.
    pub layers: Option<Vec<usize>>,
    /// The router's treatment.
    pub router: RouterTraining,
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            use_rslora: false,
            targets: Vec::new(),
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            layers: None,
            router: RouterTraining::Frozen,
        }
    }
}

/// The LoRA multiplier for rank `r` and `alpha`.
pub fn lora_scale(r: usize, alpha: f64, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// The alpha that gives `scale` at rank `r`.
pub fn alpha_for_scale(r: usize, scale: f64, use_rslora: bool) -> f64 {
    if use_rslora {
        scale * (r as f64).sqrt()
    } else {
        scale * r as f64
    }
}

impl LoraSpec {
    /// Rank and alpha of module `name` (our name) under this spec's patterns.
    pub fn resolve(&self, name: &str) -> Result<(usize, f64)> {
        let here = Path::new("lora settings");
        let ranks = Patterns::compile(&self.rank_pattern, here, "rank_pattern")?;
        let alphas = Patterns::compile(&self.alpha_pattern, here, "alpha_pattern")?;
        Ok((ranks.lookup(name).unwrap_or(self.r), alphas.lookup(name).unwrap_or(self.alpha)))
    }
}

/// One module's LoRA.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// Down projection `[r, in]`, f32 on the CPU.
    pub a: Tensor,
    /// Up projection `[out, r]`, f32 on the CPU.
    pub b: Tensor,
    /// Alpha (with the rank, gives the scale).
    pub alpha: f64,
    /// The multiplier of `B A x`.
    pub scale: f64,
}

impl LoraModule {
    /// Rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scale * B A`, `[out, in]` f32.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }

    /// [`LoraModule::delta`] computed on `device`.
    pub fn delta_on(&self, device: &Device) -> Result<Tensor> {
        Ok((self.b.to_device(device)?.matmul(&self.a.to_device(device)?)? * self.scale)?)
    }
}

/// A LoRA adapter in our internal form.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The settings (for continuing training and for writing the PEFT config).
    pub spec: LoraSpec,
    /// The base model the adapter was made for (`base_model_name_or_path`).
    pub base_model: Option<String>,
    /// The LoRA of each adapted module.
    pub modules: BTreeMap<Site, LoraModule>,
    /// Full router weights `[experts, hidden]` by layer (router trained fully).
    pub router_weights: BTreeMap<usize, Tensor>,
    /// How the adapter was converted on reading (e.g. a fused gate_up LoRA with a shared A), for users.
    pub notes: Vec<String>,
}

/// Our tensor name of a module's LoRA factor (`A` or `B`).
pub fn lora_tensor_name(site: Site, ab: char) -> String {
    format!("{PEFT_PREFIX}{}.lora_{ab}.weight", site.module_name())
}

/// Our tensor name of a fully trained router weight.
pub fn router_tensor_name(layer: usize) -> String {
    format!("{PEFT_PREFIX}model.layers.{layer}.block_sparse_moe.gate.weight")
}

fn f32_cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?)
}

impl Adapter {
    /// Builds an adapter from our named tensors (what the trainer trains and checkpoints), checking every name
    /// and shape against the base model and every rank against `spec`. Nothing is returned unless all fit.
    pub fn from_internal(
        spec: LoraSpec,
        base_model: Option<String>,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        base: &BaseShape,
    ) -> Result<Self> {
        let mut halves: BTreeMap<Site, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        let mut router_weights = BTreeMap::new();
        for (name, t) in tensors {
            let bad = |m: String| Error::Invalid(format!("adapter tensor `{name}`: {m}"));
            let module =
                name.strip_prefix(PEFT_PREFIX).ok_or_else(|| bad(format!("does not start with `{PEFT_PREFIX}`")))?;
            if let Some(m) = module.strip_suffix(".lora_A.weight").or_else(|| module.strip_suffix(".lora_B.weight")) {
                let site = Site::parse(m).ok_or_else(|| bad("not a module LoRA can adapt".into()))?;
                if !base.has(site) {
                    return Err(Error::Mismatch(format!("tensor `{name}`: the base model has no module `{site}`")));
                }
                let entry = halves.entry(site).or_default();
                if module.ends_with(".lora_A.weight") {
                    entry.0 = Some(f32_cpu(&t)?);
                } else {
                    entry.1 = Some(f32_cpu(&t)?);
                }
            } else if let Some(m) = module.strip_suffix(".weight") {
                match Site::parse(m) {
                    Some(Site::Router(l)) if base.has(Site::Router(l)) => {
                        let (e, h) = base.dims(Site::Router(l));
                        if t.dims() != [e, h] {
                            return Err(Error::Mismatch(format!(
                                "tensor `{name}` has shape {:?}, the base router is [{e}, {h}]",
                                t.dims()
                            )));
                        }
                        router_weights.insert(l, f32_cpu(&t)?);
                    }
                    _ => return Err(bad("only the Mixtral router can be stored whole".into())),
                }
            } else {
                return Err(bad("expected `...lora_A.weight`, `...lora_B.weight` or a router `...gate.weight`".into()));
            }
        }
        let mut modules = BTreeMap::new();
        for (site, (a, b)) in halves {
            let name = site.module_name();
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (None, _) => return Err(Error::Invalid(format!("module `{name}` has lora_B but no lora_A"))),
                (_, None) => return Err(Error::Invalid(format!("module `{name}` has lora_A but no lora_B"))),
            };
            let (r, alpha) = spec.resolve(&name)?;
            check_pair(&name, &a, &b, base.dims(site), Some(r))?;
            modules.insert(site, LoraModule { a, b, alpha, scale: lora_scale(r, alpha, spec.use_rslora) });
        }
        if modules.is_empty() && router_weights.is_empty() {
            return Err(Error::Invalid("the adapter has no tensors".into()));
        }
        Ok(Adapter { spec, base_model, modules, router_weights, notes: Vec::new() })
    }

    /// Our named tensors (the trainer's names), in a fixed order.
    pub fn internal_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (site, m) in &self.modules {
            out.push((lora_tensor_name(*site, 'A'), m.a.clone()));
            out.push((lora_tensor_name(*site, 'B'), m.b.clone()));
        }
        for (l, w) in &self.router_weights {
            out.push((router_tensor_name(*l), w.clone()));
        }
        out
    }

    /// Number of trainable scalars the adapter holds.
    pub fn parameter_count(&self) -> usize {
        self.modules.values().map(|m| m.a.elem_count() + m.b.elem_count()).sum::<usize>()
            + self.router_weights.values().map(Tensor::elem_count).sum::<usize>()
    }

    /// The targeted short names present, in [`TARGETABLE`] order (the router is not included).
    pub fn present_targets(&self) -> Vec<String> {
        let shorts: std::collections::BTreeSet<&str> =
            self.modules.keys().filter(|s| !matches!(s, Site::Router(_))).map(|s| s.short()).collect();
        TARGETABLE.iter().filter(|t| shorts.contains(*t)).map(|t| t.to_string()).collect()
    }

    /// Checks that every module fits a base model of this shape.
    pub fn check_fits(&self, base: &BaseShape) -> Result<()> {
        for (site, m) in &self.modules {
            if !base.has(*site) {
                return Err(Error::Mismatch(format!("the base model has no module `{site}`")));
            }
            check_pair(&site.module_name(), &m.a, &m.b, base.dims(*site), None)?;
        }
        for (l, w) in &self.router_weights {
            if !base.has(Site::Router(*l)) {
                return Err(Error::Mismatch(format!("the base model has no router in layer {l}")));
            }
            let (e, h) = base.dims(Site::Router(*l));
            if w.dims() != [e, h] {
                return Err(Error::Mismatch(format!(
                    "router weight of layer {l} is {:?}, expected [{e}, {h}]",
                    w.dims()
                )));
            }
        }
        Ok(())
    }
}

/// Checks A `[r, in]` and B `[out, r]` against the module's `(out, in)` and, when given, the expected rank.
pub(crate) fn check_pair(
    name: &str,
    a: &Tensor,
    b: &Tensor,
    (out, inp): (usize, usize),
    r: Option<usize>,
) -> Result<()> {
    let (ad, bd) = (a.dims(), b.dims());
    if ad.len() != 2 || bd.len() != 2 {
        return Err(Error::Mismatch(format!("`{name}`: lora_A {ad:?} and lora_B {bd:?} must be matrices")));
    }
    if ad[1] != inp || bd[0] != out {
        return Err(Error::Mismatch(format!(
            "`{name}`: lora_A is {ad:?} and lora_B is {bd:?}, but the base module is [{out}, {inp}] \
             (expected lora_A [r, {inp}] and lora_B [{out}, r])"
        )));
    }
    if ad[0] != bd[1] || ad[0] == 0 {
        return Err(Error::Mismatch(format!("`{name}`: lora_A {ad:?} and lora_B {bd:?} disagree on the rank")));
    }
    if let Some(r) = r {
        if ad[0] != r {
            return Err(Error::Mismatch(format!(
                "`{name}`: the tensors have rank {}, the settings (r / rank_pattern) say {r}",
                ad[0]
            )));
        }
    }
    Ok(())
}
