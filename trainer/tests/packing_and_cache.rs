//! Packed sequences (block-diagonal causal masks, per-document positions) and the KV cache give
//! the same logits as plain per-document forwards (which parity.rs ties to transformers).

mod common;

use candle_core::{DType, Tensor};
use common::{max_abs_diff, model_dir, Golden};
use trainer::infer::KvCache;
use trainer::model::{load_model, Layout, LoadOptions, Model};

fn model(dir: &str) -> Model {
    load_model(&model_dir(dir), &LoadOptions::default()).unwrap().model
}

fn golden_row(name: &str) -> Vec<u32> {
    let g = Golden::load(name);
    g.ids("input_ids")[..40].to_vec()
}

fn logits(model: &Model, ids: &[u32], layout: Layout<'_>) -> Tensor {
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &model.device).unwrap();
    let out = model.forward(&input, layout, None).unwrap();
    model.logits(&out.hidden).unwrap().squeeze(0).unwrap()
}

#[test]
fn packed_documents_do_not_see_each_other() {
    for (dir, golden) in [("tiny-mistral", "tiny-mistral"), ("tiny-mixtral", "tiny-mixtral")] {
        let model = model(dir);
        let row = golden_row(golden);
        // Three documents; the last (20 tokens) is longer than tiny-mistral's window of 16.
        let bounds = [(0usize, 7usize), (7, 20), (20, 40)];
        let mut documents = Vec::new();
        let mut positions = Vec::new();
        for (d, (start, end)) in bounds.iter().enumerate() {
            documents.extend(std::iter::repeat_n(d as u32, end - start));
            positions.extend(0..(end - start) as u32);
        }
        let layout = Layout { positions: Some(&positions), documents: Some(&documents), key_valid: None };
        let packed = logits(&model, &row, layout);
        for (start, end) in bounds {
            let alone = logits(&model, &row[start..end], Layout::default());
            let part = packed.narrow(0, start, end - start).unwrap();
            let diff = max_abs_diff(&part, &alone);
            assert!(diff <= 1e-5, "{dir}: document {start}..{end} differs packed vs alone by {diff}");
        }
        // And packing must matter: without the document mask the later documents change.
        let unmasked = logits(&model, &row, Layout { positions: Some(&positions), ..Layout::default() });
        assert!(max_abs_diff(&unmasked.narrow(0, 7, 33).unwrap(), &packed.narrow(0, 7, 33).unwrap()) > 1e-2);
    }
}

#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    for (dir, golden) in [("tiny-mistral", "tiny-mistral"), ("tiny-mixtral", "tiny-mixtral")] {
        let model = model(dir);
        let row = golden_row(golden);
        let full = logits(&model, &row, Layout::default());
        let mut cache = KvCache::new(model.config.num_layers, model.config.sliding_window);
        // A prefill of 10 tokens, a chunk of 9, then one token at a time past the window.
        let mut start = 0;
        for chunk in [10usize, 9].into_iter().chain(std::iter::repeat_n(1, 21)) {
            let input = Tensor::from_vec(row[start..start + chunk].to_vec(), (1, chunk), &model.device).unwrap();
            let out = model.forward(&input, Layout::default(), Some(&mut cache)).unwrap();
            let got = model.logits(&out.hidden).unwrap().squeeze(0).unwrap().to_dtype(DType::F32).unwrap();
            let diff = max_abs_diff(&got, &full.narrow(0, start, chunk).unwrap());
            assert!(diff <= 1e-4, "{dir}: cached logits at {start}..{} differ by {diff}", start + chunk);
            start += chunk;
        }
        if let Some(window) = model.config.sliding_window {
            assert!(cache.start() > 0, "the sliding window should have trimmed the cache");
            assert!(cache.seen() - cache.start() < window);
        }
    }
}
