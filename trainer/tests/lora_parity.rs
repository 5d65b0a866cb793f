//! LoRA training against PEFT/PyTorch (goldens from tests/fixtures/lora/generate.py):
//! loss and every LoRA gradient within 1e-4 relative, with the router aux loss, padding, rank and
//! alpha patterns, with and without checkpointing; and a 10-step AdamW trajectory with warmup,
//! clipping and accumulation.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::{max_abs, max_abs_diff, model_dir};
use trainer::lora::{attach_lora, LoraInit, LoraPlan, LoraSettings, RouterMode, TrainableParams};
use trainer::model::{load_model, LoadOptions, Model, Nf4Options};
use trainer::train::{
    forward_backward, optimizer_step, AdamW, AdamWConfig, LossScaling, MicroBatch, Schedule, ScheduleKind, StepSettings,
};

struct Case {
    tensors: HashMap<String, Tensor>,
    json: serde_json::Value,
}

fn case(name: &str) -> Case {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora");
    let tensors = candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu).unwrap();
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    Case { tensors, json }
}

impl Case {
    fn t(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("fixture has no `{key}`"))
    }

    fn i64s(&self, key: &str) -> Vec<i64> {
        self.t(key).flatten_all().unwrap().to_vec1::<i64>().unwrap()
    }

    fn prefixed(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone()))).collect()
    }

    /// The LoRA settings the fixture describes.
    fn settings(&self, moe: bool) -> LoraSettings {
        let c = &self.json["config"];
        let c: serde_json::Value = match c.as_str() {
            Some(text) => serde_json::from_str(text).unwrap(),
            None => c.clone(),
        };
        let patterns = |key: &str| -> Vec<(String, f64)> {
            c[key].as_object().map_or(vec![], |m| m.iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap())).collect())
        };
        let targets: Vec<&str> = if moe {
            vec!["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
        } else {
            vec!["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        };
        LoraSettings {
            r: c["r"].as_u64().unwrap() as usize,
            alpha: c["lora_alpha"].as_f64().unwrap(),
            targets: targets.into_iter().map(String::from).collect(),
            rank_pattern: patterns("rank_pattern").into_iter().map(|(k, v)| (k, v as usize)).collect(),
            alpha_pattern: patterns("alpha_pattern").into_iter().collect(),
            router: if moe { RouterMode::Lora } else { RouterMode::Frozen },
            ..LoraSettings::default()
        }
    }
}

fn setup(case: &Case, model_name: &str, nf4: bool) -> (Model, TrainableParams) {
    let moe = model_name.contains("mixtral");
    let opts = LoadOptions { nf4: nf4.then_some(Nf4Options::qlora()), ..LoadOptions::default() };
    let mut model = load_model(&model_dir(model_name), &opts).unwrap().model;
    let plan = LoraPlan::new(case.settings(moe)).unwrap();
    let params = attach_lora(&mut model, &plan, &LoraInit::Tensors(case.prefixed("adapter."))).unwrap();
    (model, params)
}

fn assert_close_rel(got: &Tensor, want: &Tensor, what: &str) {
    let scale = max_abs(want);
    assert!(scale > 0.0, "{what}: the reference is all zero, the comparison would prove nothing");
    let diff = max_abs_diff(got, want);
    assert!(diff <= 1e-4 * scale, "{what}: differs by {diff} (max |ref| {scale})");
}

fn check_gradients(name: &str, model_name: &str) {
    let c = case(name);
    let (model, params) = setup(&c, model_name, name.ends_with("-nf4"));
    let ids: Vec<u32> = c.i64s("input_ids").into_iter().map(|x| x as u32).collect();
    let valid = c.tensors.get("attention_mask").map(|m| {
        m.flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|x| *x != 0)
            .collect()
    });
    let mb = MicroBatch {
        batch: 2,
        seq_len: ids.len() / 2,
        input_ids: ids,
        labels: c.i64s("labels"),
        positions: None,
        documents: None,
        valid,
    };
    let label_tokens = c.json["label_tokens"].as_u64().unwrap() as usize;
    let aux_coef = c.json["aux_coef"].as_f64().unwrap_or(0.0);
    let scaling = LossScaling { label_tokens, aux_coef, aux_weight: 1.0 };
    let expected_grads = c.prefixed("grad.");
    assert_eq!(expected_grads.len(), params.named.len(), "{name}: number of LoRA tensors");
    for checkpointing in [false, true] {
        let out = forward_backward(&model, &params, &mb, &scaling, checkpointing).unwrap();
        let ce = out.nll_sum / label_tokens as f64;
        let loss = ce + aux_coef * out.aux.unwrap_or(0.0);
        let want = c.json["loss"].as_f64().unwrap();
        assert!((loss - want).abs() <= 1e-4 * want.abs(), "{name} (ckpt {checkpointing}): loss {loss} vs {want}");
        if let Some(aux) = c.json["aux"].as_f64() {
            assert!((out.aux.unwrap() - aux).abs() <= 1e-4 * aux, "{name}: aux {:?} vs {aux}", out.aux);
            let load = &c.json["expert_load"];
            for (l, layer) in out.expert_load.iter().enumerate() {
                for (e, x) in layer.iter().enumerate() {
                    assert!((*x as f64 - load[l][e].as_f64().unwrap()).abs() < 1e-6, "{name}: expert load {l}/{e}");
                }
            }
        }
        for ((pname, _), grad) in params.named.iter().zip(&out.grads) {
            let grad = grad.as_ref().unwrap_or_else(|| panic!("{name}: `{pname}` received no gradient"));
            assert_close_rel(grad, &expected_grads[pname], &format!("{name} (ckpt {checkpointing}) grad of {pname}"));
        }
    }
}

#[test]
fn mistral_lora_gradients_match_peft() {
    check_gradients("grads-mistral", "tiny-mistral");
}

#[test]
fn mixtral_lora_gradients_with_aux_loss_and_padding_match_peft() {
    check_gradients("grads-mixtral", "tiny-mixtral");
}

#[test]
fn mistral_lora_gradients_on_an_nf4_base_match_bitsandbytes() {
    check_gradients("grads-mistral-nf4", "tiny-mistral");
}

#[test]
fn mixtral_lora_gradients_on_nf4_attention_and_experts_match_bitsandbytes() {
    check_gradients("grads-mixtral-nf4", "tiny-mixtral");
}

fn check_trajectory(name: &str, model_name: &str, kind: ScheduleKind) {
    let c = case(name);
    let (model, params) = setup(&c, model_name, false);
    let j = &c.json;
    let opt = &j["optimizer"];
    let betas = opt["betas"].as_array().unwrap();
    let config = AdamWConfig {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: opt["eps"].as_f64().unwrap(),
        weight_decay: opt["weight_decay"].as_f64().unwrap(),
    };
    let sizes: Vec<usize> = params.named.iter().map(|(_, v)| v.elem_count()).collect();
    let mut adamw = AdamW::new(config, &sizes);
    let schedule = Schedule {
        kind,
        base_lr: opt["lr"].as_f64().unwrap(),
        warmup_steps: j["schedule"]["num_warmup_steps"].as_u64().unwrap(),
        total_steps: j["schedule"]["num_training_steps"].as_u64().unwrap(),
        min_lr_ratio: 0.0,
    };
    let settings = StepSettings {
        aux_coef: j["aux_coef"].as_f64().unwrap_or(0.0),
        max_grad_norm: j["clipping"]["max_grad_norm"].as_f64().unwrap(),
        checkpointing: true,
        activation_budget: None,
    };
    let ids = c.i64s("micro_input_ids");
    let labels = c.i64s("micro_labels");
    let t = 40;
    let row = |r: usize| MicroBatch {
        batch: 1,
        seq_len: t,
        input_ids: ids[r * t..(r + 1) * t].iter().map(|x| *x as u32).collect(),
        labels: labels[r * t..(r + 1) * t].to_vec(),
        positions: None,
        documents: None,
        valid: None,
    };
    let losses = j["losses"].as_array().unwrap();
    for s in 0..10u64 {
        let mbs = [row(2 * s as usize), row(2 * s as usize + 1)];
        let report =
            optimizer_step(s, &model, &params, &mut adamw, &schedule, &mbs, &settings, 0, &mut |_| {}).unwrap();
        let want = losses[s as usize].as_f64().unwrap();
        assert!((report.loss - want).abs() <= 1e-4 * want.abs(), "{name} step {s}: loss {} vs {want}", report.loss);
        let norm = j["grad_norms"][s as usize].as_f64().unwrap();
        assert!(
            (report.grad_norm - norm).abs() <= 1e-4 * norm,
            "{name} step {s}: grad norm {} vs {norm}",
            report.grad_norm
        );
        let lr = j["lrs"][s as usize].as_f64().unwrap();
        assert!((report.lr - lr).abs() <= 1e-12, "{name} step {s}: lr {} vs {lr}", report.lr);
        assert_eq!(report.label_tokens as u64, j["label_tokens"][s as usize].as_u64().unwrap());
    }
    let finals = c.prefixed("final.");
    let exp_avg = c.prefixed("exp_avg.");
    let exp_avg_sq = c.prefixed("exp_avg_sq.");
    for (i, (pname, var)) in params.named.iter().enumerate() {
        assert_close_rel(var.as_tensor(), &finals[pname], &format!("{name}: final {pname}"));
        if let (Some(m), Some(v)) = (exp_avg.get(pname), exp_avg_sq.get(pname)) {
            let (gm, gv) = adamw.moments(i);
            let shape = var.shape();
            assert_close_rel(
                &Tensor::from_slice(gm, shape, &Device::Cpu).unwrap(),
                m,
                &format!("{name}: exp_avg {pname}"),
            );
            assert_close_rel(
                &Tensor::from_slice(gv, shape, &Device::Cpu).unwrap(),
                v,
                &format!("{name}: exp_avg_sq {pname}"),
            );
        }
    }
    assert_eq!(adamw.step_count(), 10);
}

#[test]
fn mistral_trajectory_matches_pytorch() {
    check_trajectory("trajectory-mistral", "tiny-mistral", ScheduleKind::Cosine);
}

#[test]
fn mixtral_trajectory_with_aux_loss_matches_pytorch() {
    check_trajectory("trajectory-mixtral", "tiny-mixtral", ScheduleKind::Linear);
}
