//! The speed benchmark suite: `cargo bench --bench speed [-- CASE...]`.
//!
//! Each case builds a random model at the stated dimensions (deterministic, written to a temp
//! directory), runs it in release mode, and prints tokens/s, GFLOP/s (counted as in
//! ../shared/notes/performance.md) and the process's peak RSS.
//!
//! Cases: `generate` (prefill and decode, Mistral-shaped, hidden 1024, 8 layers), `nf4` (NF4
//! quantize/dequantize of a 4096x14336 weight), `frozen-linear` (512 tokens through a 4096x4096
//! frozen linear, forward and input-gradient backward, dense and NF4, against candle's plain matmul
//! that also computes the weight gradient), `mistral-7b-2layer` (Mistral-7B-shaped model with 2 layers
//! loaded in NF4, one QLoRA training step at 512 tokens: peak RSS against the NF4 model plus
//! activations, and the NF4 bits per parameter of the linear weights), `train` (the peer's shapes:
//! Mistral- and Mixtral-shaped, hidden 512, intermediate 1536, 4 layers, 8/2 heads, vocab 32000,
//! batch 4 x 256, LoRA r=8 on all linears, with and without checkpointing, f32 and NF4 bases).

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

/// One QLoRA step on a Mistral-7B-shaped model cut to 2 layers.
fn mistral_7b_2layer_case() {
    use trainer::lora::{attach_lora, LoraInit, LoraPlan, LoraSettings};
    use trainer::model::{LoadedModel, Nf4Options};
    use trainer::train::{forward_backward, LossScaling, MicroBatch};
    let config = mistral_shaped(4096, 2, 32, 8, 14336);
    let dir = tempfile::tempdir().expect("temp dir");
    let t = Instant::now();
    write_random_model(dir.path(), &config, 1, 0.02).expect("write model");
    let written = t.elapsed().as_secs_f64();
    let rss_before = peak_rss_bytes();
    let t = Instant::now();
    let opts = LoadOptions { nf4: Some(Nf4Options::qlora()), ..LoadOptions::default() };
    let LoadedModel { mut model, .. } = load_model(dir.path(), &opts).expect("load");
    let load_secs = t.elapsed().as_secs_f64();
    let rss_loaded = peak_rss_bytes();
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let settings =
        LoraSettings { r: 8, alpha: 16.0, targets: targets.map(String::from).to_vec(), ..LoraSettings::default() };
    let params = attach_lora(&mut model, &LoraPlan::new(settings).expect("plan"), &LoraInit::Seed(0)).expect("lora");
    let counts = ParameterCounts::from_config(&config);
    let mut linear_bytes = 0usize;
    for layer in &model.layers {
        let a = &layer.self_attn;
        linear_bytes += [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj].iter().map(|l| l.memory_bytes()).sum::<usize>();
        if let trainer::model::decoder::FeedForward::Dense(m) = &layer.feed_forward {
            linear_bytes += [&m.gate_proj, &m.up_proj, &m.down_proj].iter().map(|l| l.memory_bytes()).sum::<usize>();
        }
    }
    let bits = linear_bytes as f64 * 8.0 / counts.decoder_linear as f64;
    let other_bytes = counts.other as f64 * 4.0;
    let tokens = 512usize;
    let ids: Vec<u32> = (0..tokens as u32).map(|i| 3 + (i * 7919) % 31000).collect();
    let mb = MicroBatch {
        batch: 1,
        seq_len: tokens,
        input_ids: ids.clone(),
        labels: ids.iter().map(|&i| i as i64).collect(),
        positions: None,
        documents: None,
        valid: None,
    };
    let scaling = LossScaling { label_tokens: tokens - 1, aux_coef: 0.0, aux_weight: 1.0 };
    let rss_ready = trainer::system::rss_bytes();
    let phase_reset = trainer::system::reset_peak_rss();
    let t = Instant::now();
    let out = forward_backward(&model, &params, &mb, &scaling, true).expect("step");
    let step_secs = t.elapsed().as_secs_f64();
    let peak = peak_rss_bytes();
    // 6N per token with checkpointing (frozen base: forward, recompute, input gradient) + lm_head 4x.
    let flops = 6.0 * counts.decoder_linear as f64 * tokens as f64
        + 4.0 * (config.vocab_size * config.hidden_size) as f64 * tokens as f64;
    let nf4_model = linear_bytes as f64 + other_bytes;
    // What the step itself needed on top of the loaded model and adapters (activations, gradients,
    // saved layer inputs, logits at labelled positions).
    let step_extra = match (peak, rss_ready, phase_reset) {
        (Some(p), Some(r), true) => Some(p.saturating_sub(r) as f64),
        _ => None,
    };
    println!(
        "7b-2layer wrote {:.1} GB f32 in {written:.1}s; loaded NF4 in {load_secs:.1}s; linears {:.4} bits/param (target <= 4.2); \
         model in memory {:.2} GiB (NF4 linears {:.2} GiB + f32 embed/lm_head/norms {:.2} GiB)",
        counts.total as f64 * 4.0 / 1e9,
        bits,
        nf4_model / (1u64 << 30) as f64,
        linear_bytes as f64 / (1u64 << 30) as f64,
        other_bytes / (1u64 << 30) as f64
    );
    println!(
        "7b-2layer QLoRA step, 512 tokens, r=8 on all linears, checkpointing: {step_secs:.1}s ({:.1} tok/s, {:.1} GFLOP/s), \
         loss {:.3} | peak RSS while writing {} / after loading {}; RSS ready to train {}",
        tokens as f64 / step_secs,
        flops / step_secs / 1e9,
        out.nll_sum / out.label_tokens as f64,
        gib(rss_before),
        gib(rss_loaded),
        gib(rss_ready),
    );
    if let (Some(extra), Some(p)) = (step_extra, peak) {
        let budget = 1.5 * (nf4_model + extra);
        println!(
            "7b-2layer step peak RSS {} = NF4 model {:.2} GiB + step working memory {:.2} GiB + {:.2} GiB other; \
             target < 1.5 x (model + working memory) = {:.2} GiB: {}",
            gib(Some(p)),
            nf4_model / (1u64 << 30) as f64,
            extra / (1u64 << 30) as f64,
            (p as f64 - nf4_model - extra) / (1u64 << 30) as f64,
            budget / (1u64 << 30) as f64,
            if (p as f64) < budget { "met" } else { "NOT met" }
        );
    }
}

/// Training tokens/s at the reference peer's shapes (see ../shared/notes/performance.md).
fn training_cases() {
    use trainer::lora::{attach_lora, LoraInit, LoraPlan, LoraSettings};
    use trainer::model::Nf4Options;
    use trainer::train::{optimizer_step, AdamW, AdamWConfig, MicroBatch, Schedule, ScheduleKind, StepSettings};
    for moe in [false, true] {
        let mut json = serde_json::json!({
            "model_type": if moe { "mixtral" } else { "mistral" }, "vocab_size": 32000, "hidden_size": 512,
            "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
            "rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2
        });
        if moe {
            json["num_local_experts"] = 4.into();
            json["num_experts_per_tok"] = 2.into();
        }
        let config = ModelConfig::from_json_str(&json.to_string()).expect("config");
        let dir = tempfile::tempdir().expect("temp dir");
        write_random_model(dir.path(), &config, 3, 0.02).expect("write model");
        let counts = ParameterCounts::from_config(&config);
        let (b, t) = (4usize, 256usize);
        let targets: Vec<String> = if moe {
            ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"].map(String::from).to_vec()
        } else {
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec()
        };
        for nf4 in [false, true] {
            for checkpointing in [false, true] {
                trainer::system::reset_peak_rss();
                let opts = LoadOptions { nf4: nf4.then(Nf4Options::qlora), ..LoadOptions::default() };
                let mut model = load_model(dir.path(), &opts).expect("load").model;
                let settings = LoraSettings { r: 8, alpha: 16.0, targets: targets.clone(), ..LoraSettings::default() };
                let params =
                    attach_lora(&mut model, &LoraPlan::new(settings).expect("plan"), &LoraInit::Seed(0)).expect("lora");
                let sizes: Vec<usize> = params.named.iter().map(|(_, v)| v.elem_count()).collect();
                let mut adamw = AdamW::new(AdamWConfig::default(), &sizes);
                let schedule = Schedule {
                    kind: ScheduleKind::Constant,
                    base_lr: 1e-4,
                    warmup_steps: 0,
                    total_steps: 10,
                    min_lr_ratio: 0.0,
                };
                let settings = StepSettings { aux_coef: 0.02, max_grad_norm: 1.0, checkpointing };
                let ids: Vec<u32> = (0..(b * t) as u32).map(|i| 3 + (i * 7919) % 31000).collect();
                let mb = MicroBatch {
                    batch: b,
                    seq_len: t,
                    input_ids: ids.clone(),
                    labels: ids.iter().map(|&i| i as i64).collect(),
                    positions: None,
                    documents: None,
                    valid: None,
                };
                let mut times = Vec::new();
                for step in 0..4u64 {
                    let start = Instant::now();
                    optimizer_step(
                        step,
                        &model,
                        &params,
                        &mut adamw,
                        &schedule,
                        std::slice::from_ref(&mb),
                        &settings,
                        step,
                    )
                    .expect("step");
                    if step > 0 {
                        times.push(start.elapsed().as_secs_f64());
                    }
                }
                times.sort_by(f64::total_cmp);
                let secs = times[times.len() / 2];
                let tokens = (b * t) as f64;
                // Frozen matmul parameters a token touches: forward 2N, input gradient 2N, recompute 2N.
                let n =
                    (counts.active_per_token - counts.other) as f64 + (config.vocab_size * config.hidden_size) as f64;
                let attention = 2.0 * (config.num_layers * config.hidden_size * t) as f64;
                let per_token = (if checkpointing { 3.0 } else { 2.0 }) * (2.0 * n + attention);
                println!(
                    "train     {}-shaped {} {:7} | {:.0} tok/s | {:.1} GFLOP/s | peak RSS {}",
                    if moe { "mixtral" } else { "mistral" },
                    if nf4 { "nf4 " } else { "f32 " },
                    if checkpointing { "ckpt" } else { "no-ckpt" },
                    tokens / secs,
                    tokens * per_token / secs / 1e9,
                    gib(peak_rss_bytes())
                );
            }
        }
    }
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
    if run("train") {
        training_cases();
    }
    if run("mistral-7b-2layer") {
        mistral_7b_2layer_case();
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
