//! Putting LoRA adapters on a loaded model, named as PEFT names them
//! (`base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight`; Mixtral experts in the
//! per-expert form `...block_sparse_moe.experts.E.w1.lora_A.weight`).

use std::collections::HashMap;
use std::sync::Arc;

use adapters::naming::{Site, PEFT_PREFIX};
use candle_core::{DType, Device, Tensor, Var};

use super::adapter::{DropoutControl, LoraAdapter};
use super::config::{LoraPlan, RouterMode};
use super::peft::{base_shape, linear_mut};
use crate::infer::Rng;
use crate::model::linear::Linear;
use crate::model::Model;
use crate::{Error, Result};

/// Where the initial adapter weights come from.
#[derive(Debug, Clone)]
pub enum LoraInit {
    /// PEFT's init (A kaiming-uniform, B zero) drawn from this seed.
    Seed(u64),
    /// Existing tensors by PEFT name (continuing an adapter); every adapter must be present.
    Tensors(HashMap<String, Tensor>),
}

/// The trainable tensors of a LoRA-equipped model.
#[derive(Debug, Clone)]
pub struct TrainableParams {
    /// Every trainable tensor by its PEFT name, in a fixed order.
    pub named: Vec<(String, Var)>,
    /// Switch and seed of the adapters' dropout.
    pub dropout: Arc<DropoutControl>,
}

impl TrainableParams {
    /// Number of trainable scalars.
    pub fn count(&self) -> usize {
        self.named.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

struct Attacher<'a> {
    plan: &'a LoraPlan,
    init: &'a LoraInit,
    rng: Rng,
    /// The model's device: the adapters live there.
    device: Device,
    control: Arc<DropoutControl>,
    named: Vec<(String, Var)>,
}

impl Attacher<'_> {
    /// Attaches a LoRA to `linear`, the module `module` (PEFT name without `base_model.model.`).
    fn attach(&mut self, linear: &mut Linear, module: &str) -> Result<()> {
        let m = self.plan.module(module);
        let (out, inp) = linear.shape();
        let prefix = format!("{PEFT_PREFIX}{module}");
        let (a, b) = match self.init {
            LoraInit::Seed(_) => LoraAdapter::init_tensors(m.r, inp, out, &mut self.rng, &self.device)?,
            LoraInit::Tensors(map) => {
                let get = |suffix: &str, shape: [usize; 2]| -> Result<Tensor> {
                    let name = format!("{prefix}.{suffix}");
                    let t = map
                        .get(&name)
                        .ok_or_else(|| Error::Invalid(format!("initial adapter has no tensor `{name}`")))?;
                    if t.dims() != shape {
                        return Err(Error::Invalid(format!(
                            "initial adapter tensor `{name}` has shape {:?}, expected {shape:?}",
                            t.dims()
                        )));
                    }
                    Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?)
                };
                (get("lora_A.weight", [m.r, inp])?, get("lora_B.weight", [out, m.r])?)
            }
        };
        let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        self.named.push((format!("{prefix}.lora_A.weight"), a.clone()));
        self.named.push((format!("{prefix}.lora_B.weight"), b.clone()));
        let id = self.named.len() as u64;
        let dropout = self.plan.settings().dropout;
        linear.lora = Some(LoraAdapter::new(a, b, m.scale, dropout, id, self.control.clone()));
        Ok(())
    }
}

/// Attaches adapters to every targeted module of `model` (removing any it had) and returns the
/// trainable tensors. The base weights stay frozen.
pub fn attach_lora(model: &mut Model, plan: &LoraPlan, init: &LoraInit) -> Result<TrainableParams> {
    let seed = match init {
        LoraInit::Seed(s) => *s,
        LoraInit::Tensors(_) => 0,
    };
    let mut at = Attacher {
        plan,
        init,
        rng: Rng::new(seed),
        device: model.device.clone(),
        control: Arc::new(DropoutControl::default()),
        named: Vec::new(),
    };
    // Every module LoRA can sit on, in model order (the order of the trainable tensors and of the adapters' ids).
    for site in base_shape(&model.config).sites() {
        let linear = linear_mut(model, site)?;
        linear.lora = None;
        let module = site.module_name();
        match site {
            Site::Router(_) => match plan.settings().router {
                RouterMode::Frozen => {}
                RouterMode::Lora => at.attach(linear, &module)?,
                RouterMode::Full => {
                    // The Var itself becomes the layer's weight (f32 master weights, whatever the
                    // model's dtype): a converted copy would not be a Var and would never train.
                    let var = Var::from_tensor(&linear.dense_weight()?.to_dtype(DType::F32)?)?;
                    linear.set_weight(var.as_tensor().clone());
                    at.named.push((format!("{PEFT_PREFIX}{module}.weight"), var));
                }
            },
            _ if plan.targets(site.layer(), site.short()) => at.attach(linear, &module)?,
            _ => {}
        }
    }
    if at.named.is_empty() {
        return Err(Error::Invalid(
            "lora: no module of this model matches lora.targets / lora.layers_to_transform".into(),
        ));
    }
    if let LoraInit::Tensors(map) = init {
        let known: std::collections::HashSet<&str> = at.named.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = map.keys().find(|k| !known.contains(k.as_str())) {
            return Err(Error::Invalid(format!(
                "initial adapter tensor `{extra}` matches no LoRA module of this configuration"
            )));
        }
    }
    Ok(TrainableParams { named: at.named, dropout: at.control })
}
