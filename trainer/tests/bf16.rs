//! `model.dtype = "bf16"` against transformers + PEFT running the same checkpoint in bf16 (goldens from
//! tests/fixtures/bf16/generate.py), and the rule that every trainable tensor trains in every dtype.
//!
//! Tolerances: a bf16 implementation may round in another order than PyTorch's, so it is held to the
//! reference's own spread, `spread = |PyTorch bf16 - PyTorch f32 on the same bf16 weights|` (per logit, per
//! loss, per gradient tensor in norm): ours must be within `2 x spread` of PyTorch's bf16 AND within
//! `2 x spread` of the f32 computation. Like transformers we keep every activation in bf16 (our kernels
//! compute in f32 and round their results to bf16, PyTorch's bf16 ops round per op), so each of the two bf16
//! computations is about one spread from exact arithmetic and, their rounding errors being independent, at
//! most about twice that from each other. The loss's spread is the mean absolute per-token cross-entropy
//! difference of the references.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, model_dir, Golden};
use trainer::lora::{attach_lora, LoraInit, LoraPlan, LoraSettings, RouterMode};
use trainer::model::{load_model, LoadOptions, Model, Nf4Options};
use trainer::train::{forward_backward, LossScaling, MicroBatch};

fn fixture(kind: &str) -> Golden {
    Golden::load_from(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bf16"), kind)
}

/// The fixture's one-row batch.
fn micro_batch(f: &Golden) -> MicroBatch {
    let ids = f.ids("input_ids");
    MicroBatch {
        batch: 1,
        seq_len: ids.len(),
        input_ids: ids,
        labels: f.i64s("labels"),
        positions: None,
        documents: None,
        valid: None,
    }
}

fn lora_settings(kind: &str, r: usize, alpha: f64, router: RouterMode) -> LoraSettings {
    let targets: &[&str] = if kind == "mixtral" {
        &["q_proj", "k_proj", "v_proj", "o_proj"]
    } else {
        &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    };
    LoraSettings {
        r,
        alpha,
        targets: targets.iter().map(|s| s.to_string()).collect(),
        router,
        ..LoraSettings::default()
    }
}

fn load(kind: &str, dtype: DType, nf4: bool) -> Model {
    let opts = LoadOptions { dtype, nf4: nf4.then(Nf4Options::qlora), ..LoadOptions::default() };
    load_model(&model_dir(&format!("tiny-{kind}")), &opts).unwrap().model
}

fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
}

fn check_against_references(kind: &str) {
    let f = fixture(kind);
    let mut model = load(kind, DType::BF16, false);
    assert_eq!(model.dtype, DType::BF16);
    assert_eq!(model.embed_tokens.dtype(), DType::BF16, "weights are stored in bf16");
    let settings = lora_settings(kind, 4, 8.0, RouterMode::Frozen);
    let params =
        attach_lora(&mut model, &LoraPlan::new(settings).unwrap(), &LoraInit::Tensors(f.prefixed("adapter."))).unwrap();
    let mb = micro_batch(&f);

    // Logits of the row.
    let ids = Tensor::from_vec(mb.input_ids.clone(), (1, mb.seq_len), &Device::Cpu).unwrap();
    let hidden = model.forward(&ids, Default::default(), None).unwrap().hidden;
    // Activations stay bf16 through every layer and the final norm (what halves a kept layer's bytes).
    assert_eq!(hidden.dtype(), DType::BF16, "{kind}: activations are not kept in bf16");
    let logits = model.logits(&hidden).unwrap().squeeze(0).unwrap().to_dtype(DType::F32).unwrap();
    let (want_bf16, want_f32) = (f.tensor("bf16.logits"), f.tensor("f32w.logits"));
    let spread = max_abs_diff(want_bf16, want_f32);
    assert!(spread > 0.0, "{kind}: the references agree exactly; the tolerance would be zero");
    let (to_bf16, to_f32) = (max_abs_diff(&logits, want_bf16), max_abs_diff(&logits, want_f32));
    assert!(to_bf16 <= 2.0 * spread, "{kind}: logits differ from PyTorch bf16 by {to_bf16} (spread {spread})");
    assert!(to_f32 <= 2.0 * spread, "{kind}: logits differ from f32 arithmetic by {to_f32} (spread {spread})");

    // Loss and every LoRA gradient, with and without checkpointing.
    let aux_coef = f.f64("aux_coef");
    let label_tokens = mb.labels.iter().skip(1).filter(|&&l| l != -100).count();
    let scaling = LossScaling { label_tokens, aux_coef, aux_weight: 1.0 };
    let (loss_bf16, loss_f32) = (f.f64("bf16_loss"), f.f64("f32w_loss"));
    // The loss is a mean of per-token terms whose rounding errors partly cancel, so the difference of the two
    // references' losses understates it: its spread is the mean absolute per-token difference.
    let loss_spread = f.f64("token_ce_spread");
    for checkpointing in [false, true] {
        let out = forward_backward(&model, &params, &mb, &scaling, checkpointing).unwrap();
        let loss = out.nll_sum / label_tokens as f64 + aux_coef * out.aux.unwrap_or(0.0);
        assert!(
            (loss - loss_bf16).abs() <= 2.0 * loss_spread && (loss - loss_f32).abs() <= 2.0 * loss_spread,
            "{kind} (ckpt {checkpointing}): loss {loss}, PyTorch bf16 {loss_bf16}, f32 {loss_f32}"
        );
        let want = f.prefixed("bf16.grad.");
        let exact = f.prefixed("f32w.grad.");
        assert_eq!(want.len(), params.named.len(), "{kind}: number of LoRA tensors");
        for ((name, var), grad) in params.named.iter().zip(&out.grads) {
            assert_eq!(var.dtype(), DType::F32, "{name}: LoRA weights are f32 master weights");
            let grad = grad.as_ref().unwrap_or_else(|| panic!("{kind}: `{name}` received no gradient"));
            let (w, e) = (&want[name], &exact[name]);
            let spread = norm(&(w - e).unwrap());
            let to_bf16 = norm(&(grad - w).unwrap());
            let to_f32 = norm(&(grad - e).unwrap());
            if std::env::var_os("BF16_REPORT").is_some() {
                eprintln!(
                    "{kind} ckpt {checkpointing} {name}: bf16 {:.2} f32 {:.2}",
                    to_bf16 / spread,
                    to_f32 / spread
                );
            }
            assert!(spread > 0.0, "{kind}: {name}: references agree exactly");
            assert!(
                to_bf16 <= 2.0 * spread && to_f32 <= 2.0 * spread,
                "{kind} (ckpt {checkpointing}) {name}: |ours - bf16| {to_bf16:.3e}, |ours - f32| {to_f32:.3e}, spread {spread:.3e} (|grad| {:.3e})",
                norm(e)
            );
        }
    }
}

#[test]
fn mistral_bf16_loss_logits_and_lora_gradients_within_pytorchs_own_bf16_spread() {
    check_against_references("mistral");
}

#[test]
fn mixtral_bf16_with_aux_loss_within_pytorchs_own_bf16_spread() {
    check_against_references("mixtral");
}

/// Every trainable tensor (LoRA A and B of every target, the router under `router = "full"`) receives a
/// gradient and changes after one optimizer step with lr > 0, in f32 and in bf16, dense and MoE, dense and
/// NF4 bases, with the aux loss and checkpointing. B starts non-zero so that A's first gradient is non-zero
/// too (with PEFT's B = 0 init, A cannot move in the first step, in PEFT as here).
#[test]
fn every_trainable_tensor_changes_after_one_step_in_every_dtype() {
    use trainer::train::{optimizer_step, AdamW, AdamWConfig, Schedule, ScheduleKind, StepSettings};
    let cases = [
        ("mistral", false, RouterMode::Frozen),
        ("mistral", true, RouterMode::Frozen),
        ("mixtral", true, RouterMode::Lora),
        ("mixtral", false, RouterMode::Full),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (kind, nf4, router) in cases {
            let what = format!("{kind} {dtype:?} nf4 {nf4} router {router:?}");
            let mut model = load(kind, dtype, nf4);
            let mut settings = lora_settings(kind, 4, 8.0, router);
            if kind == "mixtral" {
                settings.targets.extend(["w1", "w2", "w3"].map(String::from));
            }
            let params = attach_lora(&mut model, &LoraPlan::new(settings).unwrap(), &LoraInit::Seed(3)).unwrap();
            for (name, var) in &params.named {
                if name.ends_with("lora_B.weight") {
                    let b =
                        (Tensor::randn(0f32, 0.05, var.dims(), &Device::Cpu).unwrap()).to_dtype(var.dtype()).unwrap();
                    var.set(&b).unwrap();
                }
            }
            if router == RouterMode::Full {
                assert!(
                    params.named.iter().any(|(n, _)| n.ends_with("block_sparse_moe.gate.weight")),
                    "{what}: router"
                );
            }
            let before: Vec<Tensor> = params.named.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
            let ids: Vec<u32> = (0..48u32).map(|i| 3 + (i * 7919) % 990).collect();
            let mb = MicroBatch {
                batch: 2,
                seq_len: 24,
                input_ids: ids.clone(),
                labels: ids.iter().map(|&i| i as i64).collect(),
                positions: None,
                documents: None,
                valid: None,
            };
            let sizes: Vec<usize> = params.named.iter().map(|(_, v)| v.elem_count()).collect();
            let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
            let mut optimizer = AdamW::new(config, &sizes);
            let schedule = Schedule {
                kind: ScheduleKind::Constant,
                base_lr: 1e-3,
                warmup_steps: 0,
                total_steps: 1,
                min_lr_ratio: 0.0,
            };
            let step =
                StepSettings { aux_coef: 0.02, max_grad_norm: 1.0, checkpointing: true, activation_budget: None };
            let report =
                optimizer_step(0, &model, &params, &mut optimizer, &schedule, &[mb], &step, 0, &mut |_| {}).unwrap();
            assert!(report.applied && report.loss.is_finite(), "{what}: step not applied ({report:?})");
            for ((name, var), old) in params.named.iter().zip(&before) {
                assert_eq!(var.dtype(), DType::F32, "{what}: {name} is not an f32 master weight");
                let moved = max_abs_diff(var.as_tensor(), old);
                assert!(moved > 0.0 && moved.is_finite(), "{what}: {name} did not change (moved {moved})");
            }
        }
    }
}
