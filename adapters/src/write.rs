//! Writing our internal adapter as a PEFT 0.21 adapter directory.
//!
//! Dense modules keep their names. Mixtral experts are written, by default, in PEFT 0.21's `target_parameters`
//! layout: per layer one LoRA on `mlp.experts.gate_up_proj` whose rank is `r1 + r3` (w1's and w3's ranks), with
//! `A_e = [A_w1; A_w3]` and a block-diagonal `B_e = [[B_w1, 0], [0, B_w3]]` (expert-major A rows, expert-minor B
//! columns), and one on `mlp.experts.down_proj` (w2). The fused rank and the alpha that keeps each expert's scale
//! are recorded through `rank_pattern` / `alpha_pattern`. Experts of one layer with different ranks are padded with
//! zero rows/columns to the largest; a module whose scale differs from its wrapper's has its B multiplied by the
//! ratio: both exact. The router's LoRA targets `mlp.gate.weight`; a fully trained router is saved through
//! `modules_to_save: ["gate"]`.
//!
//! On request the older per-expert layout (`block_sparse_moe.experts.E.wN`, router `block_sparse_moe.gate`) is
//! written instead.
//!
//! `layers_to_transform` applies only to `target_modules` in PEFT 0.21 (its `target_parameters` match by name
//! alone), so expert LoRAs restricted to some layers are written with per-layer parameter names. PEFT refuses
//! `lora_dropout != 0` on parameter targets (and on per-expert adapters, which it converts to them): such files
//! record dropout 0 (dropout has no effect on the adapter's function).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::adapter::{alpha_for_scale, lora_scale, Adapter, LoraModule};
use crate::config::{Patterns, PeftConfigOut};
use crate::naming::{BaseShape, ExpertProj, Site, PEFT_PREFIX, TARGETABLE};
use crate::ordered::OrderedMap;
use crate::read::WEIGHTS_FILE;
use crate::st::{write_file, OwnedTensor};
use crate::{Error, Result};

/// How Mixtral expert LoRAs are laid out in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertLayout {
    /// PEFT 0.21's `target_parameters` on `mlp.experts.gate_up_proj` / `down_proj` (what PEFT writes today).
    #[default]
    Fused,
    /// The transformers 4 per-expert layout `block_sparse_moe.experts.E.{w1,w2,w3}`.
    PerExpert,
}

/// A fused expert LoRA: A, B, rank per expert, alpha.
type FusedLora = (Tensor, Tensor, usize, f64);

/// A module or parameter in the file, with the name PEFT matches patterns against and its rank and alpha.
struct Entry {
    name: String,
    r: usize,
    alpha: f64,
    /// Group for a shared pattern key (`experts\.gate_up_proj`, ...), for parameter targets.
    group: Option<&'static str>,
}

/// The config and tensors of the PEFT files for `adapter` (tensors f32, PEFT keys).
pub fn peft_files(
    adapter: &Adapter,
    base: &BaseShape,
    layout: ExpertLayout,
) -> Result<(PeftConfigOut, Vec<(String, Tensor)>)> {
    adapter.check_fits(base)?;
    let spec = &adapter.spec;
    let rs = spec.use_rslora;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    // (layer, short) pairs of modules written through target_modules.
    let mut module_pairs: BTreeSet<(usize, &'static str)> = BTreeSet::new();
    let mut target_parameters: Vec<String> = Vec::new();
    let push = |tensors: &mut Vec<(String, Tensor)>, module: &str, a: Tensor, b: Tensor| {
        tensors.push((format!("{PEFT_PREFIX}{module}.lora_A.weight"), a));
        tensors.push((format!("{PEFT_PREFIX}{module}.lora_B.weight"), b));
    };

    let mut experts: BTreeMap<usize, BTreeMap<(usize, ExpertProj), &LoraModule>> = BTreeMap::new();
    let mut router_layers = BTreeSet::new();
    for (site, m) in &adapter.modules {
        match (*site, layout) {
            (Site::Expert(l, x, w), ExpertLayout::Fused) => {
                experts.entry(l).or_default().insert((x, w), m);
            }
            (Site::Router(l), ExpertLayout::Fused) => {
                router_layers.insert(l);
                let module = format!("model.layers.{l}.mlp.gate");
                push(&mut tensors, &module, m.a.clone(), m.b.clone());
                entries.push(Entry {
                    name: format!("{module}.weight"),
                    r: m.rank(),
                    alpha: m.alpha,
                    group: Some("mlp\\.gate\\.weight"),
                });
            }
            (site, _) => {
                module_pairs.insert((site.layer(), site.short()));
                push(&mut tensors, &site.module_name(), m.a.clone(), m.b.clone());
                entries.push(Entry { name: site.module_name(), r: m.rank(), alpha: m.alpha, group: None });
            }
        }
    }
    if !router_layers.is_empty() {
        if router_layers.len() == base.num_layers {
            target_parameters.push("mlp.gate.weight".into());
        } else {
            target_parameters.extend(router_layers.iter().map(|l| format!("model.layers.{l}.mlp.gate.weight")));
        }
    }

    // Fused expert LoRAs.
    let e = base.num_experts.unwrap_or(0);
    let (h, i) = (base.hidden_size, base.intermediate_size);
    let mut gu_layers = BTreeSet::new();
    let mut dn_layers = BTreeSet::new();
    let mut fused_tensors: BTreeMap<usize, (Option<FusedLora>, Option<FusedLora>)> = BTreeMap::new();
    for (l, mods) in &experts {
        let rank_of = |w: ExpertProj| (0..e).filter_map(|x| mods.get(&(x, w))).map(|m| m.rank()).max().unwrap_or(0);
        let scale_of = |ws: &[ExpertProj]| {
            (0..e).flat_map(|x| ws.iter().map(move |w| (x, *w))).find_map(|k| mods.get(&k)).map(|m| m.scale)
        };
        // gate_up: [A_w1; A_w3], block-diagonal B.
        let (r1, r3) = (rank_of(ExpertProj::W1), rank_of(ExpertProj::W3));
        if let Some(s) = scale_of(&[ExpertProj::W1, ExpertProj::W3]) {
            let rg = r1 + r3;
            let mut a_all = Vec::with_capacity(e);
            let mut b_all = Vec::with_capacity(e);
            for x in 0..e {
                let mut a = Tensor::zeros((rg, h), DType::F32, &Device::Cpu)?;
                let mut b = Tensor::zeros((2 * i, rg), DType::F32, &Device::Cpu)?;
                for (w, row0, rows) in [(ExpertProj::W1, 0, 0..r1), (ExpertProj::W3, i, r1..rg)] {
                    if let Some(m) = mods.get(&(x, w)) {
                        let bm = if m.scale == s { m.b.clone() } else { (&m.b * (m.scale / s))? };
                        a = a.slice_assign(&[rows.start..rows.start + m.rank(), 0..h], &m.a)?;
                        b = b.slice_assign(&[row0..row0 + i, rows.start..rows.start + m.rank()], &bm)?;
                    }
                }
                a_all.push(a);
                b_all.push(b);
            }
            let a = Tensor::stack(&a_all, 0)?.reshape((e * rg, h))?;
            let b = Tensor::stack(&b_all, 2)?.reshape((2 * i, rg * e))?;
            fused_tensors.entry(*l).or_default().0 = Some((a, b, rg, alpha_for_scale(rg, s, rs)));
            gu_layers.insert(*l);
        }
        let rd = rank_of(ExpertProj::W2);
        if let Some(s) = scale_of(&[ExpertProj::W2]) {
            let mut a_all = Vec::with_capacity(e);
            let mut b_all = Vec::with_capacity(e);
            for x in 0..e {
                let mut a = Tensor::zeros((rd, i), DType::F32, &Device::Cpu)?;
                let mut b = Tensor::zeros((h, rd), DType::F32, &Device::Cpu)?;
                if let Some(m) = mods.get(&(x, ExpertProj::W2)) {
                    let bm = if m.scale == s { m.b.clone() } else { (&m.b * (m.scale / s))? };
                    a = a.slice_assign(&[0..m.rank(), 0..i], &m.a)?;
                    b = b.slice_assign(&[0..h, 0..m.rank()], &bm)?;
                }
                a_all.push(a);
                b_all.push(b);
            }
            let a = Tensor::stack(&a_all, 0)?.reshape((e * rd, i))?;
            let b = Tensor::stack(&b_all, 2)?.reshape((h, rd * e))?;
            fused_tensors.entry(*l).or_default().1 = Some((a, b, rd, alpha_for_scale(rd, s, rs)));
            dn_layers.insert(*l);
        }
    }
    for (l, (gu, dn)) in fused_tensors {
        let p = format!("model.layers.{l}.mlp.experts");
        let both = gu.is_some() && dn.is_some();
        if let Some((a, b, r, alpha)) = gu {
            let module = if both { format!("{p}.base_layer") } else { p.clone() };
            push(&mut tensors, &module, a, b);
            entries.push(Entry { name: format!("{p}.gate_up_proj"), r, alpha, group: Some("experts\\.gate_up_proj") });
        }
        if let Some((a, b, r, alpha)) = dn {
            push(&mut tensors, &p, a, b);
            entries.push(Entry { name: format!("{p}.down_proj"), r, alpha, group: Some("experts\\.down_proj") });
        }
    }
    for (layers, name) in [(&gu_layers, "gate_up_proj"), (&dn_layers, "down_proj")] {
        if layers.is_empty() {
            continue;
        }
        if layers.len() == base.num_layers {
            target_parameters.push(format!("mlp.experts.{name}"));
        } else {
            target_parameters.extend(layers.iter().map(|l| format!("model.layers.{l}.mlp.experts.{name}")));
        }
    }
    target_parameters.sort();

    // target_modules + layers_to_transform must describe exactly the (layer, module) pairs present.
    let shorts: BTreeSet<&str> = module_pairs.iter().map(|(_, s)| *s).collect();
    let layers: BTreeSet<usize> = module_pairs.iter().map(|(l, _)| *l).collect();
    if module_pairs.len() != shorts.len() * layers.len() {
        return Err(Error::Invalid(
            "the adapter's modules differ between layers in a way PEFT's target_modules + layers_to_transform \
             cannot express"
                .into(),
        ));
    }
    let layers_to_transform =
        (!layers.is_empty() && layers.len() != base.num_layers).then(|| layers.iter().copied().collect());
    let mut target_modules: Vec<String> =
        TARGETABLE.iter().filter(|t| shorts.contains(*t)).map(|t| t.to_string()).collect();
    if shorts.contains("gate") {
        target_modules.push("gate".into());
    }

    // Router trained fully.
    let modules_to_save = if adapter.router_weights.is_empty() {
        None
    } else {
        if adapter.router_weights.len() != base.num_layers {
            return Err(Error::Invalid(
                "PEFT's modules_to_save saves the router of every layer; this adapter has full router weights for \
                 some layers only"
                    .into(),
            ));
        }
        for (l, w) in &adapter.router_weights {
            let name = match layout {
                ExpertLayout::Fused => format!("{PEFT_PREFIX}model.layers.{l}.mlp.gate.weight"),
                ExpertLayout::PerExpert => format!("{PEFT_PREFIX}model.layers.{l}.block_sparse_moe.gate.weight"),
            };
            tensors.push((name, w.clone()));
        }
        Some(vec!["gate".to_string()])
    };

    let rank_pattern = patterns(&entries, &spec.rank_pattern, spec.r, |e| e.r, "rank_pattern")?;
    let alpha_pattern = patterns(&entries, &spec.alpha_pattern, spec.alpha, |e| e.alpha, "alpha_pattern")?;
    let param_targets = !target_parameters.is_empty()
        || adapter.modules.keys().any(|s| matches!(s, Site::Expert(..) | Site::Router(_)));
    let config = PeftConfigOut {
        alpha_pattern,
        base_model_name_or_path: adapter.base_model.clone(),
        bias: "none",
        exclude_modules: None,
        fan_in_fan_out: false,
        inference_mode: true,
        init_lora_weights: true,
        layers_pattern: None,
        layers_to_transform,
        lora_alpha: spec.alpha,
        lora_bias: false,
        lora_dropout: if param_targets { 0.0 } else { spec.dropout },
        modules_to_save,
        peft_type: "LORA",
        r: spec.r,
        rank_pattern,
        revision: None,
        target_modules,
        target_parameters: (!target_parameters.is_empty()).then_some(target_parameters),
        task_type: "CAUSAL_LM",
        use_dora: false,
        use_rslora: rs,
    };
    // Sanity: our scale of every module equals what PEFT will compute from the config.
    debug_assert!(entries.iter().all(|e| lora_scale(e.r, e.alpha, rs).is_finite()));
    Ok((config, tensors))
}

/// PEFT patterns (in match order) giving every entry its value: explicit entries first where the user's patterns
/// (kept verbatim, after them) would not.
fn patterns<T: Copy + PartialEq + std::fmt::Debug + serde::Serialize>(
    entries: &[Entry],
    user: &[(String, T)],
    default: T,
    value: impl Fn(&Entry) -> T,
    field: &str,
) -> Result<OrderedMap<T>> {
    let here = Path::new("lora settings");
    let compiled = Patterns::compile(user, here, field)?;
    let wrong: Vec<&Entry> =
        entries.iter().filter(|e| compiled.lookup(&e.name).unwrap_or(default) != value(e)).collect();
    let mut explicit: Vec<(String, T)> = Vec::new();
    let mut done_groups = BTreeSet::new();
    for e in &wrong {
        if let Some(g) = e.group {
            // One shared key when every entry of the group needs the same value.
            let members: Vec<&Entry> = entries.iter().filter(|x| x.group == Some(g)).collect();
            if members.iter().all(|x| value(x) == value(e)) {
                if done_groups.insert(g) {
                    explicit.push((g.to_string(), value(e)));
                }
                continue;
            }
        }
        explicit.push((regex::escape(&e.name), value(e)));
    }
    explicit.extend(user.iter().cloned());
    let check = Patterns::compile(&explicit, here, field)?;
    if let Some(e) = entries.iter().find(|e| check.lookup(&e.name).unwrap_or(default) != value(e)) {
        return Err(Error::Invalid(format!("{field}: cannot express the value of `{}` ({:?})", e.name, value(e))));
    }
    Ok(OrderedMap(explicit))
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir` (created if needed; each file
/// is written to a temporary name and renamed, so a failure leaves no half-written file).
pub fn write_adapter(adapter: &Adapter, base: &BaseShape, dir: &Path, layout: ExpertLayout) -> Result<()> {
    let (config, tensors) = peft_files(adapter, base, layout)?;
    let owned =
        tensors.iter().map(|(n, t)| Ok((n.clone(), OwnedTensor::from_tensor(t)?))).collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let st_tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    let cfg_tmp = dir.join(".adapter_config.json.tmp");
    let result = (|| {
        write_file(&owned, &st_tmp)?;
        std::fs::write(&cfg_tmp, config.to_json()).map_err(|e| Error::io(&cfg_tmp, e))?;
        let st = dir.join(WEIGHTS_FILE);
        std::fs::rename(&st_tmp, &st).map_err(|e| Error::io(&st, e))?;
        let cfg = dir.join("adapter_config.json");
        std::fs::rename(&cfg_tmp, &cfg).map_err(|e| Error::io(&cfg, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&st_tmp);
        let _ = std::fs::remove_file(&cfg_tmp);
    }
    result
}
