//! Preference tuning against TRL 1.16 (goldens from tests/fixtures/preference/generate.py): DPO (sigmoid,
//! ipo, robust) and ORPO on a tiny Mistral and a tiny Mixtral (aux loss, right padding) with a PEFT adapter:
//! the loss, TRL's reward metrics and every LoRA gradient within 1e-4 relative, with and without
//! checkpointing; and 5-step AdamW trajectories with clipping and accumulation (losses within 1e-4, final
//! adapters within 1e-3).

mod common;

use std::path::PathBuf;

use candle_core::Tensor;
use common::{max_abs, max_abs_diff, model_dir, Golden};
use trainer::lora::{attach_lora, LoraInit, LoraPlan, LoraSettings, RouterMode, TrainableParams};
use trainer::model::{load_model, LoadOptions, Model};
use trainer::train::{
    pair_forward_backward, preference_step, AdamW, AdamWConfig, DpoLossType, PairBatch, PreferenceObjective,
    PreferenceSettings, Schedule, ScheduleKind, StepSettings,
};

fn fixture(name: &str) -> Golden {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/preference");
    Golden::load_from(&dir, name)
}

fn settings(kind: &str, batch: &Golden) -> LoraSettings {
    let c = &batch.json["config"];
    let moe = kind == "mixtral";
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

fn setup(kind: &str, batch: &Golden) -> (Model, TrainableParams) {
    let mut model = load_model(&model_dir(&format!("tiny-{kind}")), &LoadOptions::default()).unwrap().model;
    let plan = LoraPlan::new(settings(kind, batch)).unwrap();
    let params = attach_lora(&mut model, &plan, &LoraInit::Tensors(batch.prefixed("adapter."))).unwrap();
    (model, params)
}

fn objective(case: &Golden) -> PreferenceSettings {
    let beta = case.f64("beta");
    let objective = match case.json["objective"].as_str().unwrap() {
        "orpo" => PreferenceObjective::Orpo,
        _ => PreferenceObjective::Dpo {
            loss_type: match case.json["loss_type"].as_str().unwrap() {
                "sigmoid" => DpoLossType::Sigmoid,
                "ipo" => DpoLossType::Ipo,
                _ => DpoLossType::Robust,
            },
            label_smoothing: case.json["label_smoothing"].as_f64().unwrap_or(0.0),
        },
    };
    PreferenceSettings { objective, beta }
}

/// TRL's collated batch: `input_ids`, `attention_mask`, `completion_mask` `[2 pairs, T]`.
fn collated(batch: &Golden) -> PairBatch {
    let flags = |key: &str| batch.i64s(key).into_iter().map(|x| x != 0).collect::<Vec<bool>>();
    let rows = batch.tensor("input_ids").dims()[0];
    let input_ids = batch.ids("input_ids");
    PairBatch {
        pairs: rows / 2,
        seq_len: input_ids.len() / rows,
        input_ids,
        completion: flags("completion_mask"),
        valid: flags("attention_mask"),
        indices: Vec::new(),
    }
}

fn close(got: f64, want: f64, what: &str) {
    let tol = 1e-4 * want.abs().max(1e-2);
    assert!((got - want).abs() <= tol, "{what}: {got} vs TRL {want}");
}

fn assert_close_rel(got: &Tensor, want: &Tensor, what: &str) {
    let scale = max_abs(want);
    assert!(scale > 0.0, "{what}: the reference is all zero, the comparison would prove nothing");
    let diff = max_abs_diff(got, want);
    assert!(diff <= 1e-4 * scale, "{what}: differs by {diff} (max |ref| {scale})");
}

fn check_case(case_name: &str, kind: &str) {
    let batch = fixture(&format!("batch-{kind}"));
    let case = fixture(&format!("{case_name}-{kind}"));
    let (model, params) = setup(kind, &batch);
    let pb = collated(&batch);
    let pref = objective(&case);
    let aux_coef = batch.f64("aux_coef");
    let want_grads = case.prefixed("grad.");
    assert_eq!(want_grads.len(), params.named.len(), "{case_name}-{kind}: number of LoRA tensors");
    let metrics = &case.json["metrics"];
    for checkpointing in [false, true] {
        let what = format!("{case_name}-{kind} (ckpt {checkpointing})");
        let out = pair_forward_backward(&model, &params, &pb, &pref, None, aux_coef, 1.0, checkpointing, 0).unwrap();
        let loss = out.metrics.loss + aux_coef * out.aux.unwrap_or(0.0);
        close(loss, case.f64("loss"), &format!("{what} loss"));
        if let Some(aux) = metrics["aux_loss"].as_f64() {
            close(out.aux.unwrap(), aux, &format!("{what} aux"));
        }
        for (name, value) in out.metrics.scalars() {
            let want = metrics[name].as_f64().unwrap_or_else(|| panic!("TRL logged no `{name}`"));
            close(value, want, &format!("{what} {name}"));
        }
        for ((pname, _), grad) in params.named.iter().zip(&out.grads) {
            let grad = grad.as_ref().unwrap_or_else(|| panic!("{what}: `{pname}` received no gradient"));
            assert_close_rel(grad, &want_grads[pname], &format!("{what} grad of {pname}"));
        }
    }
}

#[test]
fn dpo_sigmoid_matches_trl_on_mistral() {
    check_case("dpo-sigmoid", "mistral");
}

#[test]
fn dpo_sigmoid_with_aux_loss_and_padding_matches_trl_on_mixtral() {
    check_case("dpo-sigmoid", "mixtral");
}

#[test]
fn dpo_ipo_matches_trl() {
    check_case("dpo-ipo", "mistral");
    check_case("dpo-ipo", "mixtral");
}

#[test]
fn dpo_robust_label_smoothing_matches_trl() {
    check_case("dpo-robust", "mistral");
    check_case("dpo-robust", "mixtral");
}

#[test]
fn orpo_matches_trl() {
    check_case("orpo", "mistral");
    check_case("orpo", "mixtral");
}

fn check_trajectory(case_name: &str, kind: &str) {
    let batch = fixture(&format!("batch-{kind}"));
    let case = fixture(&format!("trajectory-{case_name}-{kind}"));
    let (model, params) = setup(kind, &batch);
    let pref = objective(&case);
    let pad = batch.json["pad_id"].as_u64().unwrap() as u32;
    let pairs: Vec<datasets::EncodedPair> = (0..batch.json["trajectory_pairs"].as_u64().unwrap())
        .map(|i| datasets::EncodedPair {
            prompt: batch.ids(&format!("pair{i}.prompt_ids")),
            chosen: batch.ids(&format!("pair{i}.chosen_ids")),
            rejected: batch.ids(&format!("pair{i}.rejected_ids")),
            origin: datasets::Origin { file: std::sync::Arc::new("golden".into()), row: i, is_line: false },
        })
        .collect();
    let per = case.json["pairs_per_micro_batch"].as_u64().unwrap() as usize;
    let accum = case.json["accum"].as_u64().unwrap() as usize;
    let steps = case.json["steps"].as_u64().unwrap();
    let betas = &case.json["betas"];
    let cfg = AdamWConfig {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: case.f64("eps"),
        weight_decay: case.f64("weight_decay"),
    };
    let sizes: Vec<usize> = params.named.iter().map(|(_, v)| v.elem_count()).collect();
    let mut optimizer = AdamW::new(cfg, &sizes);
    let schedule = Schedule {
        kind: ScheduleKind::Linear,
        base_lr: case.f64("lr"),
        warmup_steps: case.json["warmup_steps"].as_u64().unwrap(),
        total_steps: steps,
        min_lr_ratio: 0.0,
    };
    let step_settings = StepSettings {
        aux_coef: batch.f64("aux_coef"),
        max_grad_norm: case.f64("max_grad_norm"),
        checkpointing: true,
        activation_budget: None,
    };
    for s in 0..steps as usize {
        let mbs: Vec<PairBatch> = (0..accum)
            .map(|m| {
                let first = per * (s * accum + m);
                let refs: Vec<&datasets::EncodedPair> = pairs[first..first + per].iter().collect();
                PairBatch::new(&refs, pad, 1)
            })
            .collect();
        let report = preference_step(
            s as u64,
            &model,
            &params,
            &mut optimizer,
            &schedule,
            &mbs,
            &pref,
            None,
            &step_settings,
            0,
            &mut |_| {},
        )
        .unwrap();
        close(report.loss, case.json["losses"][s].as_f64().unwrap(), &format!("step {s} loss"));
        close(report.grad_norm, case.json["grad_norms"][s].as_f64().unwrap(), &format!("step {s} grad norm"));
        close(report.lr, case.json["lrs"][s].as_f64().unwrap(), &format!("step {s} lr"));
    }
    let finals = case.prefixed("final.");
    for (name, var) in &params.named {
        let want = &finals[name];
        let diff = max_abs_diff(var.as_tensor(), want);
        assert!(diff <= 1e-3 * max_abs(want), "final `{name}` differs by {diff}");
    }
}

#[test]
fn dpo_trajectory_with_aux_loss_clipping_and_accumulation_matches_trl() {
    check_trajectory("dpo-sigmoid", "mixtral");
}

#[test]
fn orpo_trajectory_matches_trl() {
    check_trajectory("orpo", "mistral");
}
