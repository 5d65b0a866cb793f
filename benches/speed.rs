//! The speed benchmark suite: `cargo bench --bench speed [-- CASE...]`.
//!
//! Each case builds a random model at the stated dimensions (deterministic, written to a temp
//! directory), runs it in release mode, and prints tokens/s, GFLOP/s (counted as in
//! ../shared/notes/performance.md) and the process's peak RSS.
//!
//! Cases: `generate` (prefill and decode, Mistral-shaped, hidden 1024, 8 layers), `nf4` (NF4
//! quantize/dequantize of a 4096x14336 weight), `frozen-linear` (512 tokens through a 4096x4096
//! frozen linear, forward and input-gradient backward, dense and NF4, against candle's plain matmul
//! that also computes the weight gradient).

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use trainer::infer::Rng;
use trainer::infer::{generate, GenerateRequest, KvCache, SamplingParams};
use trainer::model::synthetic::write_random_model;
use trainer::model::{load_model, Layout, LoadOptions, ModelConfig, ParameterCounts};
use trainer::quant::{FrozenWeight, Nf4Weight};
use trainer::system::peak_rss_bytes;

fn mistral_shaped(hidden: usize, layers: usize, heads: usize, kv_heads: usize, intermediate: usize) -> ModelConfig {
    let text = serde_json::json!({
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "bos_token_id": 1,
        "eos_token_id": 2
    })
    .to_string();
    ModelConfig::from_json_str(&text).expect("valid benchmark config")
}

fn gib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
}

/// Prefill and decode tokens/s of a Mistral-shaped model (hidden 1024, 8 layers).
fn generate_case() {
    let config = mistral_shaped(1024, 8, 8, 2, 3584);
    let dir = tempfile::tempdir().expect("temp dir");
    write_random_model(dir.path(), &config, 0, 0.02).expect("write model");
    let model = load_model(dir.path(), &LoadOptions::default()).expect("load").model;
    let counts = ParameterCounts::from_config(&config);
    let prompt: Vec<u32> = (0..256u32).map(|i| 3 + (i * 7919) % 31000).collect();
    // Warm-up.
    let input = Tensor::from_vec(prompt[..16].to_vec(), (1, 16), &model.device).unwrap();
    model.forward(&input, Layout::default(), Some(&mut KvCache::new(8, None))).unwrap();
    let request = GenerateRequest {
        prompt_ids: prompt.clone(),
        max_new_tokens: 64,
        sampling: SamplingParams::default(),
        seed: 0,
        eos_ids: vec![],
        stop_strings: vec![],
    };
    let start = Instant::now();
    let out = generate(&model, None, &request, &mut |_| {}).expect("generate");
    let total = start.elapsed().as_secs_f64();
    let prefill = out.prefill_tokens_per_second(prompt.len());
    let decode = out.decode_tokens_per_second();
    // Forward FLOPs per token: 2 * (parameters touched, without the embedding) + attention.
    let per_token = 2.0 * (counts.total - (config.vocab_size * config.hidden_size) as u64) as f64;
    println!(
        "generate  mistral-shaped h1024 L8 ({:.0}M params) | prompt {} | prefill {:.1} tok/s ({:.1} GFLOP/s) | decode {:.1} tok/s ({:.1} GFLOP/s) | {} new tokens in {:.2}s | peak RSS {}",
        counts.total as f64 / 1e6,
        prompt.len(),
        prefill,
        prefill * per_token / 1e9,
        decode,
        decode * per_token / 1e9,
        out.ids.len(),
        total,
        gib(peak_rss_bytes())
    );
}

fn random(seed: u64, n: usize, std: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * std * 1.732).collect()
}

fn best_of(runs: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// NF4 quantize and dequantize speed at Mistral-7B's MLP shape.
fn nf4_case() {
    let (rows, cols) = (4096usize, 14336usize);
    let input = random(9, rows * cols, 0.02);
    for double_quant in [false, true] {
        let secs = best_of(3, &mut || {
            std::hint::black_box(Nf4Weight::quantize(&input, &[rows, cols], double_quant).expect("quantize"));
        });
        println!(
            "nf4       quantize {rows}x{cols} double_quant={double_quant}: {:.1} ms ({:.2} Gparam/s)",
            secs * 1e3,
            (rows * cols) as f64 / secs / 1e9
        );
    }
    let w = Nf4Weight::quantize(&input, &[rows, cols], true).expect("quantize");
    let mut out = vec![0f32; rows * cols];
    let secs = best_of(3, &mut || w.dequantize_rows(0..rows, &mut out).expect("dequantize"));
    println!(
        "nf4       dequantize {rows}x{cols}: {:.1} ms ({:.2} Gparam/s); {:.4} bits/param | peak RSS {}",
        secs * 1e3,
        (rows * cols) as f64 / secs / 1e9,
        w.bits_per_param(),
        gib(peak_rss_bytes())
    );
}

/// The frozen linear (no weight gradient) against candle's matmul (which computes one).
fn frozen_linear_case() {
    let (m, n, k) = (512usize, 4096usize, 4096usize);
    let wv = random(20, n * k, 0.02);
    let dense = Tensor::from_vec(wv.clone(), (n, k), &Device::Cpu).expect("tensor");
    let q = Nf4Weight::quantize(&wv, &[n, k], true).expect("quantize");
    let x = Var::from_tensor(&Tensor::from_vec(random(21, m * k, 1.0), (m, k), &Device::Cpu).expect("x")).expect("var");
    let c = Tensor::from_vec(random(22, m * n, 1.0), (m, n), &Device::Cpu).expect("c");
    let gflop = 2.0 * (m * n * k) as f64 / 1e9;
    for (label, fw) in
        [("dense", FrozenWeight::dense(&dense).expect("dense")), ("nf4", FrozenWeight::nf4(q).expect("nf4"))]
    {
        let fwd = best_of(3, &mut || {
            std::hint::black_box(fw.forward(x.as_tensor()).expect("forward"));
        });
        let both = best_of(3, &mut || {
            let y = fw.forward(x.as_tensor()).expect("forward");
            std::hint::black_box((y * &c).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("backward"));
        });
        println!(
            "frozen    {label:5} 512x4096 @ 4096x4096: forward {:.1} ms ({:.0} GFLOP/s), backward {:.1} ms ({:.0} GFLOP/s)",
            fwd * 1e3,
            gflop / fwd,
            (both - fwd) * 1e3,
            gflop / (both - fwd).max(1e-9)
        );
    }
    let plain = best_of(3, &mut || {
        let y = x.as_tensor().matmul(&dense.t().expect("t")).expect("matmul");
        std::hint::black_box((y * &c).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("backward"));
    });
    println!(
        "frozen    candle matmul forward+backward (computes dW too): {:.1} ms | peak RSS {}",
        plain * 1e3,
        gib(peak_rss_bytes())
    );
}

fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    println!("tramontane speed suite ({} threads)", rayon_threads());
    if run("generate") {
        generate_case();
    }
    if run("nf4") {
        nf4_case();
    }
    if run("frozen-linear") {
        frozen_linear_case();
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
