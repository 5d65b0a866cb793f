//! QLoRA training at real model sizes: `cargo bench --bench real_shapes [-- SHAPE...] [--tokens=512,2048]
//! [--dtypes=f32,bf16] [--configs=DTYPE:TOKENS[:VARIANT],...] [--layers=N] [--precision=P] [--dir=PATH]`.
//!
//! Shapes: `mistral-7b` (Mistral-7B-v0.3: vocab 32768, hidden 4096, 32 layers, 32/8 heads, intermediate
//! 14336; full depth), `mixtral-8x7b-cut` (Mixtral-8x7B with 2 of its 32 layers, 8 experts top-2), `nemo-cut`
//! (Mistral-Nemo-12B with 2 of its 40 layers: vocab 131072, hidden 5120, head_dim 128). For each shape the
//! bench writes a random bf16 checkpoint at those dimensions to disk (sharded as the hub does; 14.5 GB for the
//! 7B: make sure there is room, or pass `--dir`), then, for each dtype and token count, in a fresh process (so
//! the peak RSS is its own): loads it quantizing every decoder linear to NF4 (double quantization), attaches
//! LoRA r=16 to every linear, and runs one training step of one sequence with gradient checkpointing twice:
//! recomputing every layer, then keeping the layers the default activation budget allows (what `train`
//! does), after an uncounted warm-up step on 128 tokens. Each prints load seconds, seconds per step, tokens/s, GFLOP/s (benches/common/flops.rs, as the speed bench) and
//! the peak RSS measured against the `memory` header's prediction for that step ([`StepShape::memory`]).
//! `--configs` lists the configurations instead (e.g. `f32:512,bf16:512,bf16:2048:recompute-all`; a variant
//! runs only that step). The frozen products run at the shipped recipes' `matmul_precision`: "highest" (f32)
//! for f32 models, "medium" (bf16 operands, f32 accumulation) for bf16 models; `--precision=highest|medium`
//! sets one for every row. The CPU's own GEMM peaks (f32, and bf16 operands on each path it runs: AMX
//! tiles, AVX-512 BF16; this process, 2048 x 4096 x 4096) are measured first.
//! The checkpoint is deleted at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::DType;
use trainer::kernels::{bf16_gemm_on, set_matmul_precision, sgemm, Bf16Path, MatRef, MatmulPrecision};
use trainer::lora::{attach_lora, LoraInit, LoraPlan, LoraSettings};
use trainer::model::synthetic::{write_random_checkpoint, StoredDtype};
use trainer::model::{load_model, LoadOptions, ModelConfig, Nf4Options};
use trainer::system::{memory_available_to_process, peak_rss_bytes, reset_peak_rss, rss_bytes};
use trainer::train::{forward_backward_keeping, LossScaling, MicroBatch, StepShape};

#[path = "common/flops.rs"]
mod flops;
use flops::lora_step_flops_per_token;

fn config(shape: &str, layers: Option<usize>) -> ModelConfig {
    let mut j = match shape {
        "mistral-7b" => serde_json::json!({
            "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1e6,
        }),
        "mixtral-8x7b-cut" => serde_json::json!({
            "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1e6,
            "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02,
        }),
        "nemo-cut" => serde_json::json!({
            "model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 14336,
            "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "rope_theta": 1e6,
        }),
        other => {
            eprintln!("unknown shape `{other}`: mistral-7b, mixtral-8x7b-cut, nemo-cut");
            std::process::exit(2)
        }
    };
    j["rms_norm_eps"] = 1e-5.into();
    j["max_position_embeddings"] = 32768.into();
    j["bos_token_id"] = 1.into();
    j["eos_token_id"] = 2.into();
    if let Some(l) = layers {
        j["num_hidden_layers"] = l.into();
    }
    ModelConfig::from_json_str(&j.to_string()).expect("valid benchmark config")
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn arg(name: &str) -> Option<String> {
    std::env::args().find_map(|a| a.strip_prefix(&format!("--{name}=")).map(String::from))
}

/// GFLOP/s of one `[m, k] x [k, n]` product (best of 3): f32, then bf16 operands on every path this CPU
/// runs (AMX tiles, AVX-512 BF16), as `(name, GFLOP/s)`.
fn gemm_peaks() -> Vec<(String, f64)> {
    let (m, k, n) = (2048usize, 4096usize, 4096usize);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut c = vec![0f32; m * n];
    let mut best = |path: Option<Bf16Path>| {
        let mut secs = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let (ar, br) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
            match path {
                Some(path) => bf16_gemm_on(path, ar, br, &mut c, n, false),
                None => sgemm(ar, br, &mut c, n, false),
            }
            .expect("gemm");
            secs = secs.min(t.elapsed().as_secs_f64());
        }
        2.0 * (m * k * n) as f64 / secs / 1e9
    };
    let mut peaks = vec![("f32".to_string(), best(None))];
    for path in Bf16Path::supported().into_iter().filter(|&p| p != Bf16Path::F32) {
        let name = match path {
            Bf16Path::Amx => "bf16 AMX",
            _ => "bf16 AVX-512",
        };
        peaks.push((name.to_string(), best(Some(path))));
    }
    peaks
}

/// One configuration, in this process: load, attach, two steps; prints one line per step.
fn measure(dir: &Path, shape: &str, c: &ModelConfig, dtype: DType, tokens: usize, only: Option<&str>) {
    let precision = match arg("precision").as_deref() {
        Some("highest") => MatmulPrecision::Highest,
        Some("medium") => MatmulPrecision::Medium,
        // As the shipped recipes run: f32 models multiply in f32, bf16 models with bf16 operands.
        _ if dtype == DType::BF16 => MatmulPrecision::Medium,
        _ => MatmulPrecision::Highest,
    };
    set_matmul_precision(precision);
    let t = Instant::now();
    let opts = LoadOptions { dtype, nf4: Some(Nf4Options::qlora()), ..LoadOptions::default() };
    let mut model = load_model(dir, &opts).expect("load").model;
    let load_secs = t.elapsed().as_secs_f64();
    let loaded = rss_bytes().unwrap_or(0);
    let targets: &[&str] = if c.moe.is_some() {
        &["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
    } else {
        &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    };
    let settings = LoraSettings {
        r: 16,
        alpha: 32.0,
        targets: targets.iter().map(|s| s.to_string()).collect(),
        ..LoraSettings::default()
    };
    let params = attach_lora(&mut model, &LoraPlan::new(settings).expect("plan"), &LoraInit::Seed(0)).expect("lora");
    let step_shape = StepShape::for_model(&model, tokens, params.count(), true);
    let ids: Vec<u32> = (0..tokens as u32).map(|i| 3 + (i * 7919) % (c.vocab_size as u32 - 3)).collect();
    let mb = MicroBatch {
        batch: 1,
        seq_len: tokens,
        labels: ids.iter().map(|&i| i as i64).collect(),
        input_ids: ids,
        positions: None,
        documents: None,
        valid: None,
    };
    let scaling = LossScaling { label_tokens: tokens - 1, aux_coef: 0.02, aux_weight: 1.0 };
    let available = memory_available_to_process().map_or(0, |a| a.bytes);
    let default_kept = step_shape.layers_within(step_shape.default_budget(available));
    println!(
        "{shape} {} {tokens} tokens: loaded NF4 in {load_secs:.1}s, RSS {:.2} GiB; {} LoRA parameters; {:.2} GiB \
         available after loading; frozen products at matmul_precision {}",
        dtype.as_str(),
        gib(loaded),
        params.count(),
        gib(available),
        precision.name()
    );
    // Warm-up on a short sequence (thread buffers, first use of every code path), not counted.
    let warm = MicroBatch {
        batch: 1,
        seq_len: 128,
        input_ids: mb.input_ids[..128].to_vec(),
        labels: mb.labels[..128].to_vec(),
        positions: None,
        documents: None,
        valid: None,
    };
    let warm_scaling = LossScaling { label_tokens: 127, ..scaling };
    forward_backward_keeping(&model, &params, &warm, &warm_scaling, true, 0).expect("warm-up step");
    for (name, kept) in [("recompute-all", 0usize), ("default-budget", default_kept)] {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let predicted = step_shape.memory(loaded, kept);
        let phase = reset_peak_rss();
        let t = Instant::now();
        let out = forward_backward_keeping(&model, &params, &mb, &scaling, true, kept).expect("step");
        let secs = t.elapsed().as_secs_f64();
        let peak = peak_rss_bytes().unwrap_or(0);
        let flops = lora_step_flops_per_token(c, tokens, 16, c.num_layers - kept) * tokens as f64;
        let ratio = peak as f64 / predicted.total() as f64;
        println!(
            "{shape} {} {tokens} tokens {name} (keeps {kept} of {} layers): {secs:.1} s/step, {:.2} tok/s, {:.1} \
             GFLOP/s, loss {:.3}; peak RSS {:.2} GiB{}, predicted {:.2} GiB (loaded {:.2} + LoRA/AdamW {:.2} + \
             inputs {:.2} + kept {:.2} + working {:.2}): measured/predicted {ratio:.2} {}",
            dtype.as_str(),
            c.num_layers,
            tokens as f64 / secs,
            flops / secs / 1e9,
            out.nll_sum / out.label_tokens.max(1) as f64,
            gib(peak),
            if phase { "" } else { " (process peak)" },
            gib(predicted.total()),
            gib(predicted.loaded),
            gib(predicted.trainable),
            gib(predicted.layer_inputs),
            gib(predicted.kept_activations),
            gib(predicted.working),
            if (0.85..=1.15).contains(&ratio) { "(within 15%)" } else { "(NOT within 15%)" }
        );
    }
}

fn main() {
    trainer::system::tune_process();
    let shapes: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let layers = arg("layers").and_then(|l| l.parse().ok());
    if let (Some(dir), Some(run)) = (arg("dir"), arg("measure")) {
        // A child process: `--measure=SHAPE,DTYPE,TOKENS[,VARIANT]`.
        let parts: Vec<&str> = run.split(',').collect();
        let (shape, dtype, tokens) = (parts[0], parts[1], parts[2].parse().expect("tokens"));
        let dtype = if dtype == "bf16" { DType::BF16 } else { DType::F32 };
        measure(Path::new(&dir), shape, &config(shape, layers), dtype, tokens, parts.get(3).copied());
        return;
    }
    let shapes = if shapes.is_empty() { vec!["mistral-7b".to_string()] } else { shapes };
    let tokens = arg("tokens").unwrap_or_else(|| "512,2048".into());
    let dtypes = arg("dtypes").unwrap_or_else(|| "f32,bf16".into());
    // `dtype,tokens[,variant]` per measuring process.
    let configs: Vec<String> = match arg("configs") {
        Some(list) => list.split(',').map(|c| c.replace(':', ",")).collect(),
        None => dtypes.split(',').flat_map(|d| tokens.split(',').map(move |t| format!("{d},{t}"))).collect(),
    };
    let peaks: Vec<String> = gemm_peaks().iter().map(|(name, g)| format!("{name} {g:.0}")).collect();
    println!(
        "tramontane real-shape bench ({} threads); this CPU's GEMM (2048x4096x4096) in GFLOP/s: {}",
        candle_core::utils::get_num_threads(),
        peaks.join(", ")
    );
    for shape in &shapes {
        let c = config(shape, layers);
        let dir = arg("dir").map_or_else(|| PathBuf::from("target/real-shapes").join(shape), PathBuf::from);
        let t = Instant::now();
        write_random_checkpoint(&dir, &c, 1, 0.02, StoredDtype::Bf16, 5 << 30).expect("write checkpoint");
        println!(
            "{shape}: {} layers, wrote a random bf16 checkpoint to {} in {:.1}s",
            c.num_layers,
            dir.display(),
            t.elapsed().as_secs_f64()
        );
        for config in &configs {
            let exe = std::env::current_exe().expect("bench executable");
            let mut cmd = Command::new(exe);
            cmd.arg(format!("--dir={}", dir.display())).arg(format!("--measure={shape},{config}"));
            if let Some(l) = layers {
                cmd.arg(format!("--layers={l}"));
            }
            if let Some(p) = arg("precision") {
                cmd.arg(format!("--precision={p}"));
            }
            match cmd.status() {
                Ok(s) if s.success() => {}
                s => println!("{shape} {config}: the measuring process failed ({s:?})"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
