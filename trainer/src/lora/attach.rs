//! Putting LoRA adapters on a loaded model, named as PEFT names them
//! (`base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight`; Mixtral experts in the
//! per-expert form `...block_sparse_moe.experts.E.w1.lora_A.weight`).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::adapter::{DropoutControl, LoraAdapter};
use super::config::{LoraPlan, RouterMode};
use crate::infer::Rng;
use crate::model::decoder::FeedForward;
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
    control: Arc<DropoutControl>,
    named: Vec<(String, Var)>,
}

impl Attacher<'_> {
    /// Attaches a LoRA to `linear`, the module `module` (PEFT name without `base_model.model.`).
    fn attach(&mut self, linear: &mut Linear, module: &str) -> Result<()> {
        let m = self.plan.module(module);
        let (out, inp) = linear.shape();
        let prefix = format!("base_model.model.{module}");
        let (a, b) = match self.init {
            LoraInit::Seed(_) => LoraAdapter::init_tensors(m.r, inp, out, &mut self.rng)?,
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
                    Ok(t.to_dtype(DType::F32)?)
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

    fn maybe(&mut self, linear: &mut Linear, layer: usize, short: &str, module: String) -> Result<()> {
        if self.plan.targets(layer, short) {
            self.attach(linear, &module)?;
        }
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
    let mut at =
        Attacher { plan, init, rng: Rng::new(seed), control: Arc::new(DropoutControl::default()), named: Vec::new() };
    for (l, layer) in model.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{l}");
        let attn = &mut layer.self_attn;
        for (short, linear) in [
            ("q_proj", &mut attn.q_proj),
            ("k_proj", &mut attn.k_proj),
            ("v_proj", &mut attn.v_proj),
            ("o_proj", &mut attn.o_proj),
        ] {
            linear.lora = None;
            at.maybe(linear, l, short, format!("{p}.self_attn.{short}"))?;
        }
        match &mut layer.feed_forward {
            FeedForward::Dense(mlp) => {
                for (short, linear) in [
                    ("gate_proj", &mut mlp.gate_proj),
                    ("up_proj", &mut mlp.up_proj),
                    ("down_proj", &mut mlp.down_proj),
                ] {
                    linear.lora = None;
                    at.maybe(linear, l, short, format!("{p}.mlp.{short}"))?;
                }
            }
            FeedForward::Sparse(moe) => {
                let router = format!("{p}.block_sparse_moe.gate");
                moe.router.lora = None;
                match plan.settings().router {
                    RouterMode::Frozen => {}
                    RouterMode::Lora => at.attach(&mut moe.router, &router)?,
                    RouterMode::Full => {
                        // The Var itself becomes the layer's weight (f32 master weights, whatever the
                        // model's dtype): a converted copy would not be a Var and would never train.
                        let var = Var::from_tensor(&moe.router.dense_weight()?.to_dtype(DType::F32)?)?;
                        moe.router.set_weight(var.as_tensor().clone());
                        at.named.push((format!("base_model.model.{router}.weight"), var));
                    }
                }
                for (e, expert) in moe.experts.iter_mut().enumerate() {
                    let x = format!("{p}.block_sparse_moe.experts.{e}");
                    for (short, linear) in
                        [("w1", &mut expert.gate_proj), ("w2", &mut expert.down_proj), ("w3", &mut expert.up_proj)]
                    {
                        linear.lora = None;
                        at.maybe(linear, l, short, format!("{x}.{short}"))?;
                    }
                }
            }
        }
    }
    if at.named.is_empty() {
        return Err(Error::Invalid("lora: no module of this model matches lora.targets / lora.layers".into()));
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
