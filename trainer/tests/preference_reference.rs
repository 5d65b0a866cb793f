//! DPO's reference model without a second copy of the base ([`Reference`]): an `init_from` adapter frozen as the
//! reference while its copy trains (its log-probabilities equal those of a fresh model carrying that adapter), a
//! fully trained router (`lora.router = "full"`) trained by the DPO loss while the reference keeps the base's
//! router, and reference log-probabilities precomputed once (equal to those computed per micro-batch).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{model_dir, Golden};
use trainer::lora::{attach_lora, LoraInit, LoraPlan, LoraSettings, RouterMode, TrainableParams};
use trainer::model::{load_model, LoadOptions, Model};
use trainer::train::{
    pair_metrics, preference_step, sequence_logps, AdamW, AdamWConfig, DpoLossType, PairBatch, PreferenceObjective,
    PreferenceSettings, Reference, Schedule, ScheduleKind, StepSettings,
};

fn batch(kind: &str) -> Golden {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/preference");
    Golden::load_from(&dir, &format!("batch-{kind}"))
}

fn settings(kind: &str, router: RouterMode) -> LoraSettings {
    let targets: &[&str] = if kind == "mixtral" {
        &["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
    } else {
        &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    };
    LoraSettings {
        r: 4,
        alpha: 8.0,
        targets: targets.iter().map(|s| s.to_string()).collect(),
        router,
        ..LoraSettings::default()
    }
}

fn base_model(kind: &str) -> Model {
    load_model(&model_dir(&format!("tiny-{kind}")), &LoadOptions::default()).unwrap().model
}

fn with_lora(kind: &str, settings: &LoraSettings, init: &LoraInit) -> (Model, TrainableParams) {
    let mut model = base_model(kind);
    let params = attach_lora(&mut model, &LoraPlan::new(settings.clone()).unwrap(), init).unwrap();
    (model, params)
}

/// The golden batch's trajectory pairs, as a pair dataset.
fn pairs(b: &Golden) -> Arc<datasets::PairDataset> {
    let pairs = (0..b.json["trajectory_pairs"].as_u64().unwrap())
        .map(|i| datasets::EncodedPair {
            prompt: b.ids(&format!("pair{i}.prompt_ids")),
            chosen: b.ids(&format!("pair{i}.chosen_ids")),
            rejected: b.ids(&format!("pair{i}.rejected_ids")),
            origin: datasets::Origin { file: Arc::new("golden".into()), row: i, is_line: false },
        })
        .collect();
    Arc::new(datasets::PairDataset { pairs, ..Default::default() })
}

fn pad(b: &Golden) -> u32 {
    b.json["pad_id"].as_u64().unwrap() as u32
}

fn dpo() -> PreferenceSettings {
    PreferenceSettings {
        objective: PreferenceObjective::Dpo { loss_type: DpoLossType::Sigmoid, label_smoothing: 0.0 },
        beta: 0.1,
    }
}

/// `steps` DPO steps (AdamW, lr 1e-2) over the first micro-batches of `data`.
fn train(model: &Model, params: &TrainableParams, reference: &Reference, data: &Arc<datasets::PairDataset>, pad: u32) {
    let sizes: Vec<usize> = params.named.iter().map(|(_, v)| v.elem_count()).collect();
    let mut adamw = AdamW::new(AdamWConfig::default(), &sizes);
    let schedule =
        Schedule { kind: ScheduleKind::Constant, base_lr: 1e-2, warmup_steps: 0, total_steps: 3, min_lr_ratio: 0.0 };
    let step_settings =
        StepSettings { aux_coef: 0.02, max_grad_norm: 1.0, checkpointing: true, activation_budget: None };
    let mut batches = datasets::PairBatches::new(data.clone(), 2, true, 1, pad, 1).unwrap();
    for step in 0..3 {
        let mb = batches.next_batch();
        let report = preference_step(
            step,
            model,
            params,
            &mut adamw,
            &schedule,
            std::slice::from_ref(&mb),
            &dpo(),
            Some(reference),
            &step_settings,
            step,
            &mut |_| {},
        )
        .unwrap();
        assert!(report.applied, "step {step} was skipped");
    }
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn an_init_from_reference_is_the_frozen_initial_adapter_while_its_copy_trains() {
    let b = batch("mistral");
    let data = pairs(&b);
    let lora = settings("mistral", RouterMode::Frozen);
    // The "SFT" adapter DPO starts from: PEFT-shaped tensors with a non-zero B (trained, not freshly initialised).
    let (_, sft) = with_lora("mistral", &lora, &LoraInit::Seed(7));
    let init: std::collections::HashMap<String, candle_core::Tensor> = sft
        .named
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor();
            // Plain tensors, as read from a file (a Var's tensor would be shared by every model built from it).
            let t = if n.contains("lora_B") { (t.ones_like().unwrap() * 0.05).unwrap() } else { t.copy().unwrap() };
            (n.clone(), t)
        })
        .collect();
    let (model, params) = with_lora("mistral", &lora, &LoraInit::Tensors(init.clone()));
    let reference = Reference::initial(&params).unwrap();
    let base_reference = Reference::base(&params).unwrap();
    let pb = PairBatch::new(&[&data.pairs[0], &data.pairs[1]], pad(&b), 1);

    // Before training the policy is its own reference: loss ln 2, zero rewards.
    let m = pair_metrics(&model, &params, &pb, &dpo(), Some(&reference)).unwrap();
    assert!((m.loss - std::f64::consts::LN_2).abs() < 1e-12 && m.rewards_chosen == 0.0, "{m:?}");

    train(&model, &params, &reference, &data, pad(&b));

    // A fresh model carrying the initial adapter: what the reference must compute.
    let (fresh, _) = with_lora("mistral", &lora, &LoraInit::Tensors(init));
    let want = sequence_logps(&fresh, &pb).unwrap();
    let trained_before = sequence_logps(&model, &pb).unwrap();
    let got = reference.compute(&model, &params, &pb).unwrap();
    assert!(max_diff(&got, &want) <= 1e-9, "reference {got:?} vs the initial adapter's {want:?}");
    // The trained adapter moved away from it, and the reference pass put the trained weights back.
    assert!(max_diff(&trained_before, &want) > 1e-3, "training changed nothing: {trained_before:?}");
    assert_eq!(sequence_logps(&model, &pb).unwrap(), trained_before, "the trained weights were not restored");
    // The base reference is another model (the adapter switched off): the init adapter matters.
    let base = sequence_logps(&base_model("mistral"), &pb).unwrap();
    let got_base = base_reference.compute(&model, &params, &pb).unwrap();
    assert!(max_diff(&got_base, &base) <= 1e-4, "base reference {got_base:?} vs the base model's {base:?}");
    assert!(max_diff(&base, &want) > 1e-3, "the init adapter does not change the log-probabilities");
}

#[test]
fn a_fully_trained_router_learns_from_dpo_while_the_reference_keeps_the_base_router() {
    let b = batch("mixtral");
    let data = pairs(&b);
    let (model, params) = with_lora("mixtral", &settings("mixtral", RouterMode::Full), &LoraInit::Seed(0));
    let routers: Vec<usize> =
        (0..params.named.len()).filter(|&i| params.named[i].0.ends_with(".block_sparse_moe.gate.weight")).collect();
    assert_eq!(routers.len(), model.config.num_layers, "one trained router per layer");
    let before: Vec<candle_core::Tensor> =
        routers.iter().map(|&i| params.named[i].1.as_tensor().copy().unwrap()).collect();
    let reference = Reference::base(&params).unwrap();
    train(&model, &params, &reference, &data, pad(&b));
    for (&i, old) in routers.iter().zip(&before) {
        let diff = common::max_abs_diff(params.named[i].1.as_tensor(), old);
        assert!(diff > 1e-6, "`{}` did not change ({diff})", params.named[i].0);
    }
    // The reference is the base model, router included.
    let pb = PairBatch::new(&[&data.pairs[0], &data.pairs[1]], pad(&b), 1);
    let want = sequence_logps(&base_model("mixtral"), &pb).unwrap();
    let got = reference.compute(&model, &params, &pb).unwrap();
    assert!(max_diff(&got, &want) <= 1e-4, "reference {got:?} vs the base model's {want:?}");
    // Switching the adapters off alone would keep the trained router: refused rather than silently wrong.
    let e = pair_metrics(&model, &params, &pb, &dpo(), None).unwrap_err();
    assert!(e.to_string().contains("fully trained router"), "{e}");
}

#[test]
fn precomputed_reference_log_probs_equal_those_computed_per_micro_batch() {
    let b = batch("mixtral");
    let data = pairs(&b);
    let (model, params) = with_lora("mixtral", &settings("mixtral", RouterMode::Lora), &LoraInit::Seed(3));
    let mut reference = Reference::base(&params).unwrap();
    let on_the_fly = reference.clone();
    assert_eq!(reference.precompute(&model, &params, &data, 3, pad(&b), 1).unwrap(), data.len());
    assert!(reference.is_precomputed());
    // Shuffled micro-batches of another size (other padding) than the precomputing pass.
    let mut batches = datasets::PairBatches::new(data.clone(), 2, true, 5, pad(&b), 1).unwrap();
    for pb in batches.rest_of_epoch() {
        let pre = reference.logps(&model, &params, &pb).unwrap();
        let now = on_the_fly.logps(&model, &params, &pb).unwrap();
        let scale = now.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        assert!(max_diff(&pre, &now) <= 1e-6 * scale, "pairs {:?}: {pre:?} vs {now:?}", pb.indices);
    }
    // A batch laid out from loose pairs has no indices: computed, not looked up.
    let loose = PairBatch::new(&[&data.pairs[1]], pad(&b), 1);
    assert_eq!(reference.logps(&model, &params, &loose).unwrap(), on_the_fly.compute(&model, &params, &loose).unwrap());
}
