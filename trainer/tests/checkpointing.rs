//! Per-layer gradient checkpointing gives the same loss and gradients as the full graph, for
//! every trainable tensor, with the router aux loss on, padding, and packed documents.

mod common;

use candle_core::Tensor;
use common::{max_abs, max_abs_diff, model_dir, Golden};
use trainer::infer::Rng;
use trainer::lora::{attach_lora, LoraInit, LoraPlan, LoraSettings, RouterMode, TrainableParams};
use trainer::model::{load_model, LoadOptions, Model};
use trainer::train::{forward_backward, forward_backward_keeping, LossScaling, MicroBatch, MicroBatchOutput};

fn lora_model(dir: &str, router: RouterMode) -> (Model, TrainableParams) {
    let mut model = load_model(&model_dir(dir), &LoadOptions::default()).unwrap().model;
    let settings = LoraSettings {
        r: 4,
        alpha: 8.0,
        targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"]
            .map(String::from)
            .to_vec(),
        router,
        ..LoraSettings::default()
    };
    let params = attach_lora(&mut model, &LoraPlan::new(settings).unwrap(), &LoraInit::Seed(7)).unwrap();
    // B starts at zero (PEFT's init), which makes A's gradient exactly zero; give B values so
    // the comparison covers every tensor.
    let mut rng = Rng::new(99);
    for (name, var) in &params.named {
        if name.ends_with("lora_B.weight") {
            let values: Vec<f32> = (0..var.elem_count()).map(|_| (rng.next_f64() as f32 - 0.5) * 0.05).collect();
            var.set(&Tensor::from_vec(values, var.shape(), var.device()).unwrap()).unwrap();
        }
    }
    (model, params)
}

/// Golden row 0 and row 1: row 1 right-padded by 8 and split into two packed documents.
fn micro_batch(golden: &str) -> MicroBatch {
    let g = Golden::load(golden);
    let mut input_ids = g.ids("input_ids");
    let mut labels = g.i64s("labels");
    let mut valid = vec![true; 80];
    let mut documents = vec![0u32; 80];
    let mut positions: Vec<u32> = (0..40).chain(0..40).collect();
    for p in 40..80 {
        if p >= 72 {
            valid[p] = false;
            labels[p] = -100;
            input_ids[p] = 0;
        }
        if p >= 55 {
            documents[p] = 1;
            positions[p] = (p - 55) as u32;
        }
    }
    MicroBatch {
        batch: 2,
        seq_len: 40,
        input_ids,
        labels,
        positions: Some(positions),
        documents: Some(documents),
        valid: Some(valid),
    }
}

#[test]
fn checkpointed_gradients_equal_full_graph_gradients() {
    for (dir, router) in
        [("tiny-mistral", RouterMode::Frozen), ("tiny-mixtral", RouterMode::Lora), ("tiny-mixtral", RouterMode::Full)]
    {
        let (model, params) = lora_model(dir, router);
        let mb = micro_batch(if dir == "tiny-mistral" { "tiny-mistral" } else { "tiny-mixtral" });
        let scaling = LossScaling { label_tokens: 100, aux_coef: 0.02, aux_weight: 0.5 };
        let full = forward_backward(&model, &params, &mb, &scaling, false).unwrap();
        // Every layer recomputed, the last one kept, all kept (activation budgets).
        for keep in [0, 1, 99] {
            let ckpt = forward_backward_keeping(&model, &params, &mb, &scaling, true, keep).unwrap();
            compare(dir, router, &params, &full, &ckpt);
        }
    }
}

fn compare(dir: &str, router: RouterMode, params: &TrainableParams, full: &MicroBatchOutput, ckpt: &MicroBatchOutput) {
    {
        assert_eq!(full.label_tokens, ckpt.label_tokens);
        assert!((full.nll_sum - ckpt.nll_sum).abs() <= 1e-9 * full.nll_sum.abs(), "{dir}: nll differs");
        assert_eq!(full.aux.is_some(), dir == "tiny-mixtral");
        if let (Some(a), Some(b)) = (full.aux, ckpt.aux) {
            assert!((a - b).abs() <= 1e-6, "{dir}: aux {a} vs {b}");
            assert!(a > 0.9, "aux of a 4-expert top-2 router is near 1 or above, got {a}");
        }
        for ((name, _), (f, c)) in params.named.iter().zip(full.grads.iter().zip(&ckpt.grads)) {
            let f = f.as_ref().unwrap_or_else(|| panic!("{dir}: `{name}` got no gradient (full graph)"));
            let c = c.as_ref().unwrap_or_else(|| panic!("{dir}: `{name}` got no gradient (checkpointed)"));
            let scale = max_abs(f);
            assert!(scale > 0.0, "{dir}: `{name}` has an all-zero gradient");
            let diff = max_abs_diff(f, c);
            assert!(diff <= 1e-5 * scale, "{dir} {router:?}: `{name}` differs by {diff} (max |g| {scale})");
        }
    }
}

#[test]
fn the_aux_loss_gradient_reaches_the_router_only_when_on() {
    let (model, params) = lora_model("tiny-mixtral", RouterMode::Lora);
    let mut mb = micro_batch("tiny-mixtral");
    mb.labels.iter_mut().for_each(|l| *l = -100);
    let on = LossScaling { label_tokens: 1, aux_coef: 0.02, aux_weight: 1.0 };
    let out = forward_backward(&model, &params, &mb, &on, true).unwrap();
    let aux_on = out.aux.unwrap();
    let router_grads = params.named.iter().zip(&out.grads).filter(|((n, _), _)| n.contains(".gate.lora_"));
    for ((name, _), g) in router_grads {
        assert!(max_abs(g.as_ref().unwrap()) > 0.0, "`{name}`: the aux loss alone must move the router");
    }
    let off = LossScaling { aux_coef: 0.0, ..on };
    let out = forward_backward(&model, &params, &mb, &off, true).unwrap();
    assert!(out.grads.iter().all(|g| g.is_none()), "no labels and no aux: nothing to learn");
    // The aux loss is still reported, from the router logits the forward kept.
    assert!((out.aux.unwrap() - aux_on).abs() <= 1e-6 * aux_on, "aux {:?} vs {aux_on}", out.aux);
    assert_eq!(out.expert_load.len(), 2);
    for load in &out.expert_load {
        assert!((load.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn the_activation_budget_keeps_whole_layers_from_the_top() {
    use trainer::train::StepShape;
    let (model, _) = lora_model("tiny-mixtral", RouterMode::Frozen);
    let c = &model.config;
    let shape = |tokens| StepShape::for_model(&model, tokens, 0, true);
    let per_layer = shape(80).per_layer();
    assert!(per_layer > 0);
    assert_eq!(shape(160).per_layer(), 2 * per_layer, "linear in tokens");
    assert_eq!(shape(80).layers_within(0), 0);
    assert_eq!(shape(80).layers_within(per_layer - 1), 0);
    assert_eq!(shape(80).layers_within(per_layer), 1.min(c.num_layers));
    assert_eq!(shape(80).layers_within(u64::MAX), c.num_layers);
}
