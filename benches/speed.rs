//! The speed benchmark suite: `cargo bench --bench speed [-- CASE...]`.
//!
//! Each case builds a random model at the stated dimensions (deterministic, written to a temp
//! directory), runs it in release mode, and prints tokens/s, GFLOP/s (counted as in
//! ../shared/notes/performance.md) and the process's peak RSS.
//!
//! Cases: `generate` (prefill and decode, Mistral-shaped, hidden 1024, 8 layers).

use std::time::Instant;

use candle_core::Tensor;
use trainer::infer::{generate, GenerateRequest, KvCache, SamplingParams};
use trainer::model::synthetic::write_random_model;
use trainer::model::{load_model, Layout, LoadOptions, ModelConfig, ParameterCounts};
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

fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    println!("tramontane speed suite ({} threads)", rayon_threads());
    if run("generate") {
        generate_case();
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
