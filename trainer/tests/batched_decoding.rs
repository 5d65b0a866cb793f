//! Continuous batching gives exactly what `generate` gives for each request alone: greedy and seeded sampling,
//! token for token, on a sliding-window Mistral, a Mixtral (MoE) and a Mistral with a PEFT adapter, with
//! prompts of different lengths, sequences joining mid-way and leaving on EOS, a stop string or the budget.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use common::{max_abs_diff, model_dir};
use trainer::infer::batch::forward_step;
use trainer::infer::{
    decode_step, generate, generate_batch, GenerateRequest, Generation, KvCache, SamplingParams, Sequence, StopReason,
};
use trainer::model::{load_model, Layout, LoadOptions, Model, ModelTokenizer};

fn load(dir: &str) -> (Model, ModelTokenizer) {
    let path = model_dir(dir);
    let model = load_model(&path, &LoadOptions::default()).unwrap().model;
    let tokenizer = ModelTokenizer::load(&path, &model.config).unwrap();
    (model, tokenizer)
}

/// tiny-mistral with the PEFT fixture adapter applied (every dense target, rank patterns).
fn with_adapter() -> (Model, ModelTokenizer) {
    let (mut model, tokenizer) = load("tiny-mistral");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/adapters/peft-mistral");
    let adapter = trainer::lora::peft::load_adapter(&dir, &model.config).unwrap();
    trainer::lora::peft::apply_adapters(&mut model, &[(adapter, 1.0)]).unwrap();
    (model, tokenizer)
}

/// Deterministic prompts of the given lengths (BOS first, ids inside the ordinary vocabulary).
fn prompt(len: usize, salt: u32) -> Vec<u32> {
    let mut ids = vec![1];
    ids.extend((1..len as u32).map(|i| 259 + (i * 37 + salt * 101) % 700));
    ids
}

fn request(prompt_ids: Vec<u32>, max_new_tokens: usize, sampling: SamplingParams, seed: u64) -> GenerateRequest {
    GenerateRequest { prompt_ids, max_new_tokens, sampling, seed, eos_ids: vec![2], stop_strings: Vec::new() }
}

fn alone(model: &Model, tokenizer: &ModelTokenizer, r: &GenerateRequest) -> (Generation, String) {
    let mut streamed = String::new();
    let g = generate(model, Some(tokenizer), r, &mut |p| streamed.push_str(p)).unwrap();
    (g, streamed)
}

/// Requests that leave the batch at different steps and for every reason: the budget, EOS (a token `generate`
/// produces mid-way, declared EOS for that request), and a stop string (text `generate` produces mid-way).
fn mixed_requests(model: &Model, tokenizer: &ModelTokenizer, sampling: &SamplingParams) -> Vec<GenerateRequest> {
    // Lengths 3, 11 and 25 (past tiny-mistral's window of 16 from the start), budgets past the window too.
    let mut requests = vec![
        request(prompt(3, 0), 30, sampling.clone(), 11),
        request(prompt(11, 1), 12, sampling.clone(), 12),
        request(prompt(25, 2), 40, sampling.clone(), 13),
        request(prompt(7, 3), 24, sampling.clone(), 14),
        request(prompt(16, 4), 1, sampling.clone(), 15),
    ];
    // EOS: the first new token of request 3 that did not occur before, from step 6 on.
    let (g, _) = alone(model, tokenizer, &requests[3]);
    let eos = (6..g.ids.len()).find(|&i| !g.ids[..i].contains(&g.ids[i])).map(|i| g.ids[i]);
    if let Some(eos) = eos {
        requests[3].eos_ids.push(eos);
    }
    // A stop string: a few characters from the middle of request 0's text.
    let (g, _) = alone(model, tokenizer, &requests[0]);
    let chars: Vec<char> = g.text.chars().collect();
    if chars.len() > 12 {
        requests[0].stop_strings.push(chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect());
    }
    requests
}

/// Batched generation equals generation alone: ids, text, stop reason and the streamed text.
fn check_batch_equals_alone(model: &Model, tokenizer: &ModelTokenizer, sampling: SamplingParams, what: &str) {
    let requests = mixed_requests(model, tokenizer, &sampling);
    let mut streamed: HashMap<usize, String> = HashMap::new();
    let batched =
        generate_batch(model, Some(tokenizer), &requests, &mut |i, p| streamed.entry(i).or_default().push_str(p))
            .unwrap();
    let mut reasons = Vec::new();
    for (i, (r, b)) in requests.iter().zip(&batched).enumerate() {
        let (a, a_streamed) = alone(model, tokenizer, r);
        assert_eq!(b.ids, a.ids, "{what}: request {i} ids");
        assert_eq!(b.text, a.text, "{what}: request {i} text");
        assert_eq!(b.stop_reason, a.stop_reason, "{what}: request {i} stop reason");
        assert_eq!(streamed.get(&i).cloned().unwrap_or_default(), a_streamed, "{what}: request {i} stream");
        reasons.push(b.stop_reason);
    }
    // The mix really exercised early exits (the sequences left the batch at different steps).
    assert!(reasons.contains(&StopReason::Length), "{what}: {reasons:?}");
    assert!(reasons.iter().any(|r| *r != StopReason::Length), "{what}: {reasons:?}");
    let lengths: Vec<usize> = batched.iter().map(|g| g.ids.len()).collect();
    assert!(lengths.iter().any(|&l| l != lengths[0]), "{what}: lengths {lengths:?}");
}

fn greedy() -> SamplingParams {
    SamplingParams::default()
}

fn sampled() -> SamplingParams {
    SamplingParams { temperature: 0.9, top_k: 40, top_p: 0.95, repetition_penalty: 1.1 }
}

#[test]
fn greedy_batches_equal_generate_sliding_window_mistral() {
    let (model, tokenizer) = load("tiny-mistral");
    assert_eq!(model.config.sliding_window, Some(16));
    check_batch_equals_alone(&model, &tokenizer, greedy(), "tiny-mistral greedy");
}

#[test]
fn greedy_batches_equal_generate_mixtral() {
    let (model, tokenizer) = load("tiny-mixtral");
    assert!(model.config.moe.is_some());
    check_batch_equals_alone(&model, &tokenizer, greedy(), "tiny-mixtral greedy");
}

#[test]
fn greedy_batches_equal_generate_with_an_adapter() {
    let (model, tokenizer) = with_adapter();
    check_batch_equals_alone(&model, &tokenizer, greedy(), "tiny-mistral + peft-mistral greedy");
}

#[test]
fn seeded_sampling_batches_equal_generate() {
    for dir in ["tiny-mistral", "tiny-mixtral"] {
        let (model, tokenizer) = load(dir);
        check_batch_equals_alone(&model, &tokenizer, sampled(), &format!("{dir} sampled"));
    }
}

/// The server's schedule: sequences join at different steps (each prefilled alone) and decode together.
#[test]
fn sequences_join_and_leave_mid_way() {
    for dir in ["tiny-mistral", "tiny-mixtral"] {
        let (model, tokenizer) = load(dir);
        let requests: Vec<GenerateRequest> =
            [(5, 20, greedy()), (18, 14, sampled()), (9, 26, greedy()), (2, 8, sampled())]
                .into_iter()
                .enumerate()
                .map(|(i, (len, max, s))| request(prompt(len, i as u32 + 7), max, s, 100 + i as u64))
                .collect();
        let joins = [0usize, 3, 4, 10];
        let mut seqs: Vec<Option<Sequence>> = vec![None; requests.len()];
        let mut step = 0;
        let mut widest = 0;
        loop {
            for (i, &at) in joins.iter().enumerate() {
                if at == step {
                    let mut s = Sequence::new(&model, Some(&tokenizer), requests[i].clone()).unwrap();
                    s.prefill(&model, Some(&tokenizer), &mut |_| {}).unwrap();
                    seqs[i] = Some(s);
                }
            }
            let mut active: Vec<&mut Sequence> = seqs.iter_mut().flatten().filter(|s| s.is_decoding()).collect();
            widest = widest.max(active.len());
            if active.is_empty() && step > joins[joins.len() - 1] {
                break;
            }
            decode_step(&model, Some(&tokenizer), &mut active, &mut |_, _| {}).unwrap();
            step += 1;
        }
        assert!(widest >= 3, "{dir}: at most {widest} sequences decoded together");
        for (i, (r, s)) in requests.iter().zip(seqs).enumerate() {
            let b = s.unwrap().into_generation();
            let (a, _) = alone(&model, &tokenizer, r);
            assert_eq!(b.ids, a.ids, "{dir}: request {i}");
            assert_eq!(b.text, a.text, "{dir}: request {i}");
        }
    }
}

/// One batched step computes, row for row, the logits a one-token cached forward computes.
#[test]
fn a_batched_step_gives_the_logits_of_single_steps() {
    for dir in ["tiny-mistral", "tiny-mixtral"] {
        let (model, _) = load(dir);
        let c = &model.config;
        let prompts = [prompt(4, 1), prompt(21, 2), prompt(13, 3)];
        let next = [300u32, 400, 500];
        let mut batched: Vec<KvCache> = Vec::new();
        let mut single = Vec::new();
        for p in &prompts {
            let mut cache = KvCache::new(c.num_layers, c.sliding_window);
            let input = Tensor::from_vec(p.clone(), (1, p.len()), &model.device).unwrap();
            model.forward(&input, Layout::default(), Some(&mut cache)).unwrap();
            batched.push(cache.clone());
            single.push(cache);
        }
        let mut refs: Vec<&mut KvCache> = batched.iter_mut().collect();
        let logits = forward_step(&model, &next, &mut refs).unwrap();
        assert_eq!(logits.dims(), [3, c.vocab_size]);
        for (i, cache) in single.iter_mut().enumerate() {
            let input = Tensor::from_vec(vec![next[i]], (1, 1), &model.device).unwrap();
            let out = model.forward(&input, Layout::default(), Some(cache)).unwrap();
            let want = model.last_logits(&out.hidden).unwrap().squeeze(0).unwrap().to_dtype(DType::F32).unwrap();
            let got = logits.get(i).unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(diff <= 1e-5, "{dir}: row {i} differs by {diff}");
            assert_eq!(batched[i].seen(), cache.seen());
            assert_eq!(batched[i].start(), cache.start());
        }
    }
}

#[test]
fn bad_batches_are_errors() {
    let (model, tokenizer) = load("tiny-mistral");
    let mut fresh = Sequence::new(&model, Some(&tokenizer), request(prompt(4, 0), 4, greedy(), 0)).unwrap();
    let err = decode_step(&model, Some(&tokenizer), &mut [&mut fresh], &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("not prefilled"), "{err}");
    assert!(Sequence::new(&model, None, request(vec![], 4, greedy(), 0)).is_err());
    assert!(Sequence::new(&model, None, request(vec![1, 5000], 4, greedy(), 0)).is_err());
    let mut stop = request(prompt(4, 0), 4, greedy(), 0);
    stop.stop_strings.push("x".into());
    assert!(Sequence::new(&model, None, stop).is_err());
    // Zero tokens: finished at prefill, like `generate`.
    let mut zero = Sequence::new(&model, Some(&tokenizer), request(prompt(4, 0), 0, greedy(), 0)).unwrap();
    zero.prefill(&model, Some(&tokenizer), &mut |_| {}).unwrap();
    assert!(zero.is_finished() && !zero.is_decoding());
    assert!(zero.into_generation().ids.is_empty());
}

/// Half precision and an NF4 base run through the batched step too (greedy ids agree on these tiny models).
#[test]
fn bf16_and_nf4_models_batch() {
    let path = model_dir("tiny-mixtral");
    for opts in [
        LoadOptions { dtype: DType::BF16, ..LoadOptions::default() },
        LoadOptions { nf4: Some(trainer::model::Nf4Options::qlora()), ..LoadOptions::default() },
    ] {
        let model = load_model(&path, &opts).unwrap().model;
        let tokenizer = ModelTokenizer::load(&path, &model.config).unwrap();
        let requests: Vec<GenerateRequest> =
            (0..3).map(|i| request(prompt(4 + 5 * i, i as u32), 6 + 4 * i, greedy(), i as u64)).collect();
        let batched = generate_batch(&model, Some(&tokenizer), &requests, &mut |_, _| {}).unwrap();
        for (r, b) in requests.iter().zip(&batched) {
            assert!(!b.ids.is_empty() && b.ids.len() <= r.max_new_tokens);
            assert_eq!(b.ids, alone(&model, &tokenizer, r).0.ids, "{:?} {:?}", opts.dtype, opts.nf4);
        }
    }
}
