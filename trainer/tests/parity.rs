//! Our Mistral/Mixtral decoder against transformers 5 (goldens from tests/fixtures/models/generate.py):
//! full-sequence logits, losses, greedy generation and every parameter's gradient.

mod common;

use candle_core::{Tensor, Var};
use common::{max_abs, max_abs_diff, model_dir, Golden};
use trainer::infer::{generate, GenerateRequest, SamplingParams};
use trainer::model::{load_model, Layout, LoadOptions, LoadedModel, Model};
use trainer::train::loss::{labelled_nll_sum, ShiftedTargets};

/// (model directory, golden name)
const CASES: [(&str, &str); 4] = [
    ("tiny-mistral", "tiny-mistral"),
    ("tiny-mistral-bf16-sharded", "tiny-mistral-bf16-sharded"),
    ("tiny-mixtral", "tiny-mixtral"),
    ("tiny-mixtral-fused", "tiny-mixtral"),
];

fn load(dir: &str, trainable: bool) -> LoadedModel {
    load_model(&model_dir(dir), &LoadOptions { trainable, ..LoadOptions::default() }).unwrap()
}

fn input_ids(golden: &Golden) -> Tensor {
    golden.tensor("input_ids").to_dtype(candle_core::DType::U32).unwrap()
}

/// Mean loss over the labelled tokens of `labels` `[b * t]`.
fn mean_loss(model: &Model, ids: &Tensor, labels: &[i64]) -> (Tensor, usize) {
    let b = ids.dim(0).unwrap();
    let targets = ShiftedTargets::new(labels, b, model.config.vocab_size, None).unwrap();
    let out = model.forward(ids, Layout::default(), None).unwrap();
    let sum = labelled_nll_sum(model, &out.hidden, &targets).unwrap().unwrap();
    ((sum / targets.len() as f64).unwrap(), targets.len())
}

#[test]
fn full_sequence_logits_match_transformers() {
    for (dir, golden) in CASES {
        let g = Golden::load(golden);
        let model = load(dir, false).model;
        let out = model.forward(&input_ids(&g), Layout::default(), None).unwrap();
        let logits = model.logits(&out.hidden).unwrap();
        let diff = max_abs_diff(&logits, g.tensor("logits"));
        assert!(diff <= 1e-4, "{dir}: logits differ from transformers by {diff}");
    }
}

#[test]
fn router_logits_match_transformers() {
    let g = Golden::load("tiny-mixtral");
    for dir in ["tiny-mixtral", "tiny-mixtral-fused"] {
        let model = load(dir, false).model;
        let out = model.forward(&input_ids(&g), Layout::default(), None).unwrap();
        assert_eq!(out.router_logits.len(), 2);
        for (l, logits) in out.router_logits.iter().enumerate() {
            let diff = max_abs_diff(logits, g.tensor(&format!("router_logits.{l}")));
            assert!(diff <= 1e-4, "{dir}: layer {l} router logits differ by {diff}");
        }
    }
}

#[test]
fn losses_match_transformers() {
    for (dir, golden) in CASES {
        let g = Golden::load(golden);
        let model = load(dir, false).model;
        let ids = input_ids(&g);
        let labels = g.i64s("labels");
        let (batch, count) = mean_loss(&model, &ids, &labels);
        assert_eq!(count as f64, g.f64("loss_batch_label_tokens"));
        let batch = batch.to_scalar::<f32>().unwrap() as f64;
        assert!((batch - g.f64("loss_batch")).abs() <= 1e-5, "{dir}: batch loss {batch} vs {}", g.f64("loss_batch"));
        let expected: Vec<f32> = g.tensor("loss_per_sequence").to_vec1().unwrap();
        let t = ids.dim(1).unwrap();
        for (row, want) in expected.iter().enumerate() {
            let row_ids = ids.narrow(0, row, 1).unwrap();
            let (loss, _) = mean_loss(&model, &row_ids, &labels[row * t..(row + 1) * t]);
            let loss = loss.to_scalar::<f32>().unwrap();
            assert!((loss - want).abs() <= 1e-5, "{dir} row {row}: loss {loss} vs {want}");
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for (dir, golden) in CASES {
        let g = Golden::load(golden);
        let model = load(dir, false).model;
        let request = GenerateRequest {
            prompt_ids: g.ids("prompt_ids"),
            max_new_tokens: 32,
            sampling: SamplingParams::default(),
            seed: 0,
            eos_ids: vec![2],
            stop_strings: vec![],
        };
        let out = generate(&model, None, &request, &mut |_| {}).unwrap();
        assert_eq!(out.ids, g.ids("greedy_ids"), "{dir}: greedy ids differ from transformers' generate");
    }
}

#[test]
fn every_parameter_gets_pytorchs_gradient() {
    for (dir, golden) in CASES {
        let g = Golden::load(golden);
        let LoadedModel { model, params } = load(dir, true);
        let expected = g.json["num_grad_tensors"].as_u64().unwrap() as usize;
        assert_eq!(params.len(), expected, "{dir}: trainable parameter count");
        let (loss, _) = mean_loss(&model, &input_ids(&g), &g.i64s("labels"));
        let grads = loss.backward().unwrap();
        for (name, var) in &params {
            let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{dir}: `{name}` received no gradient"));
            let want = g.tensor(&format!("grad.{name}"));
            let scale = max_abs(want);
            assert!(scale > 0.0, "{dir}: golden gradient of `{name}` is zero: the test would prove nothing");
            let diff = max_abs_diff(grad, want);
            assert!(diff <= 1e-4 * scale, "{dir}: gradient of `{name}` differs by {diff} (max |g| {scale})");
        }
        let _: Vec<&Var> = params.iter().map(|(_, v)| v).collect();
    }
}
