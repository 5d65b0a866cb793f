//! The speed benchmark suite: `cargo bench --bench speed [-- CASE...] [--no-peer] [--peer-steps=N]`.
//!
//! Each case builds a random model at the stated dimensions (deterministic, written to a temp
//! directory), runs it in release mode, and prints tokens/s, GFLOP/s (counted as in
//! ../shared/notes/performance.md) and the peak RSS of that case.
//!
//! Cases: `generate` (prefill and decode, Mistral-shaped, hidden 1024, 8 layers), `nf4` (NF4
//! quantize/dequantize of a 4096x14336 weight), `frozen-linear` (512 tokens through a 4096x4096
//! frozen linear, forward and input-gradient backward, dense and NF4, against candle's plain matmul
//! that also computes the weight gradient), `mistral-7b-2layer` (Mistral-7B-shaped model with 2 layers
//! loaded in NF4, one QLoRA training step at 512 tokens after a warm-up step: peak RSS against the NF4 model plus
//! activations, and the NF4 bits per parameter of the linear weights), `train` (the peer's shapes:
//! Mistral- and Mixtral-shaped, hidden 512, intermediate 1536, 4 layers, 8/2 heads, vocab 32000,
//! batch 4 x 256, LoRA r=8 on all linears, f32 and NF4 bases: without checkpointing; with it, keeping the
//! activations the default budget allows (what `train` does: at these shapes, every layer) and
//! recomputing every layer (what the peer does); and with bf16 products of the frozen base, each
//! configuration in its own process); `dpo-memory` (the peak RSS of a DPO step against an SFT step of the same
//! token count: the `train` case's Mistral shapes on an NF4 base, 8 rows of 256 tokens, i.e. 4 pairs of a
//! 128-token prompt with 128-token completions against 8 SFT sequences; each objective in its own process, the
//! model included in both peaks; the bound is DPO <= 1.3x SFT, since the reference model is the same
//! weights with the adapters off; no peer).
//!
//! The reference peer (transformers + PEFT + bitsandbytes on PyTorch, benches/peer.py) runs the same
//! cases in the same invocation, right after each of ours, with as many threads as we use; each case then
//! prints ours vs peer and the ratio ours/peer, and the suite ends with a Markdown summary table. The
//! peer's Python is `$TRAMONTANE_PEER_PYTHON` (default `python3`); it is used when it imports torch,
//! transformers, peft and bitsandbytes. `--no-peer` or `TRAMONTANE_PEER=0` skips it; `--peer-steps=N`
//! sets its timed training steps (default 5, after 1 warm-up).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde_json::{json, Value};
use trainer::infer::Rng;
use trainer::infer::{generate, GenerateRequest, KvCache, SamplingParams};
use trainer::model::synthetic::write_random_model;
use trainer::model::{load_model, Layout, LoadOptions, ModelConfig, ParameterCounts};
use trainer::quant::{FrozenWeight, Nf4Weight};
use trainer::system::peak_rss_bytes;

#[path = "common/flops.rs"]
mod flops;
use flops::lora_step_flops_per_token;

/// One measurement: ours, and (filled in by [`Peer::compare`]) the peer's same measurement.
struct Row {
    /// Row name in the printed comparison and the summary table.
    name: String,
    /// Unit of `ours` and `peer`; higher is better.
    unit: &'static str,
    ours: f64,
    /// Our achieved GFLOP/s, where the work is counted.
    gflops: Option<f64>,
    /// Our peak RSS during this case.
    ours_rss: Option<u64>,
    /// Key/value pairs that pick the peer's JSON record for this measurement.
    peer_key: Vec<(String, Value)>,
    /// The peer record's field comparable with `ours`, and its peak-RSS field.
    peer_field: String,
    peer_rss_field: String,
    peer: Option<f64>,
    peer_rss: Option<u64>,
}

impl Row {
    fn new(name: impl Into<String>, unit: &'static str, ours: f64, peer_key: &[(&str, Value)]) -> Row {
        Row {
            name: name.into(),
            unit,
            ours,
            gflops: None,
            ours_rss: None,
            peer_key: peer_key.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            peer_field: "tokens_per_s".into(),
            peer_rss_field: "peak_rss_bytes".into(),
            peer: None,
            peer_rss: None,
        }
    }

    fn gflops(mut self, gflops: f64) -> Row {
        self.gflops = Some(gflops);
        self
    }

    fn rss(mut self, rss: Option<u64>) -> Row {
        self.ours_rss = rss;
        self
    }

    fn peer_fields(mut self, value: &str, rss: &str) -> Row {
        self.peer_field = value.into();
        self.peer_rss_field = rss.into();
        self
    }

    fn matches(&self, record: &Value) -> bool {
        self.peer_key.iter().all(|(k, v)| record.get(k) == Some(v))
    }

    /// Our side of the row, as one line of JSON (a case's process hands its rows to the suite's).
    fn to_json(&self) -> String {
        json!({
            "name": self.name, "unit": self.unit, "ours": self.ours, "gflops": self.gflops, "ours_rss": self.ours_rss,
            "peer_key": self.peer_key.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            "peer_field": self.peer_field, "peer_rss_field": self.peer_rss_field,
        })
        .to_string()
    }

    fn from_json(text: &str) -> Option<Row> {
        let v: Value = serde_json::from_str(text).ok()?;
        let unit = ["tok/s", "Gparam/s", "GFLOP/s"].into_iter().find(|u| v["unit"] == *u)?;
        let peer_key = v["peer_key"]
            .as_array()?
            .iter()
            .map(|kv| Some((kv[0].as_str()?.to_string(), kv[1].clone())))
            .collect::<Option<Vec<_>>>()?;
        Some(Row {
            name: v["name"].as_str()?.into(),
            unit,
            ours: v["ours"].as_f64()?,
            gflops: v["gflops"].as_f64(),
            ours_rss: v["ours_rss"].as_u64(),
            peer_key,
            peer_field: v["peer_field"].as_str()?.into(),
            peer_rss_field: v["peer_rss_field"].as_str()?.into(),
            peer: None,
            peer_rss: None,
        })
    }
}

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
fn generate_case() -> Vec<Row> {
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
    let rss = peak_rss_bytes();
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
        gib(rss)
    );
    let key = [("case", json!("generate"))];
    vec![
        Row::new("generate prefill (256-token prompt)", "tok/s", prefill, &key)
            .gflops(prefill * per_token / 1e9)
            .rss(rss)
            .peer_fields("prefill_tokens_per_s", "peak_rss_bytes"),
        Row::new("generate decode (64 new tokens)", "tok/s", decode, &key)
            .gflops(decode * per_token / 1e9)
            .rss(rss)
            .peer_fields("decode_tokens_per_s", "peak_rss_bytes"),
    ]
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
fn nf4_case() -> Vec<Row> {
    let (rows, cols) = (4096usize, 14336usize);
    let input = random(9, rows * cols, 0.02);
    let mut out_rows = Vec::new();
    for double_quant in [false, true] {
        let secs = best_of(3, &mut || {
            std::hint::black_box(Nf4Weight::quantize(&input, &[rows, cols], double_quant).expect("quantize"));
        });
        println!(
            "nf4       quantize {rows}x{cols} double_quant={double_quant}: {:.1} ms ({:.2} Gparam/s)",
            secs * 1e3,
            (rows * cols) as f64 / secs / 1e9
        );
        out_rows.push(
            Row::new(
                format!("nf4 quantize 4096x14336 double_quant={double_quant}"),
                "Gparam/s",
                (rows * cols) as f64 / secs / 1e9,
                &[("case", json!("nf4")), ("op", json!("quantize")), ("double_quant", json!(double_quant))],
            )
            .peer_fields("gparam_per_s", "peak_rss_bytes"),
        );
    }
    let w = Nf4Weight::quantize(&input, &[rows, cols], true).expect("quantize");
    let mut out = vec![0f32; rows * cols];
    let secs = best_of(3, &mut || w.dequantize_rows(0..rows, &mut out).expect("dequantize"));
    let rss = peak_rss_bytes();
    println!(
        "nf4       dequantize {rows}x{cols}: {:.1} ms ({:.2} Gparam/s); {:.4} bits/param | peak RSS {}",
        secs * 1e3,
        (rows * cols) as f64 / secs / 1e9,
        w.bits_per_param(),
        gib(rss)
    );
    out_rows.push(
        Row::new(
            "nf4 dequantize 4096x14336",
            "Gparam/s",
            (rows * cols) as f64 / secs / 1e9,
            &[("case", json!("nf4")), ("op", json!("dequantize"))],
        )
        .rss(rss)
        .peer_fields("gparam_per_s", "peak_rss_bytes"),
    );
    out_rows
}

/// The frozen linear (no weight gradient) against candle's matmul (which computes one).
fn frozen_linear_case() -> Vec<Row> {
    let (m, n, k) = (512usize, 4096usize, 4096usize);
    let wv = random(20, n * k, 0.02);
    let dense = Tensor::from_vec(wv.clone(), (n, k), &Device::Cpu).expect("tensor");
    let q = Nf4Weight::quantize(&wv, &[n, k], true).expect("quantize");
    let x = Var::from_tensor(&Tensor::from_vec(random(21, m * k, 1.0), (m, k), &Device::Cpu).expect("x")).expect("var");
    let c = Tensor::from_vec(random(22, m * n, 1.0), (m, n), &Device::Cpu).expect("c");
    let gflop = 2.0 * (m * n * k) as f64 / 1e9;
    let mut rows = Vec::new();
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
        let key = [("case", json!("frozen-linear")), ("kind", json!(label))];
        for (dir, secs, field) in
            [("forward", fwd, "forward_gflops"), ("input-gradient backward", both - fwd, "backward_gflops")]
        {
            let rate = gflop / secs.max(1e-9);
            rows.push(
                Row::new(format!("frozen-linear {label} {dir}"), "GFLOP/s", rate, &key)
                    .gflops(rate)
                    .peer_fields(field, "peak_rss_bytes"),
            );
        }
    }
    let plain = best_of(3, &mut || {
        let y = x.as_tensor().matmul(&dense.t().expect("t")).expect("matmul");
        std::hint::black_box((y * &c).and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("backward"));
    });
    let rss = peak_rss_bytes();
    println!(
        "frozen    candle matmul forward+backward (computes dW too): {:.1} ms | peak RSS {}",
        plain * 1e3,
        gib(rss)
    );
    // Forward, input gradient and weight gradient: three matmuls of the same size.
    rows.push(
        Row::new(
            "frozen-linear plain matmul forward+backward (with dW)",
            "GFLOP/s",
            3.0 * gflop / plain,
            &[("case", json!("frozen-linear")), ("kind", json!("plain"))],
        )
        .gflops(3.0 * gflop / plain)
        .rss(rss)
        .peer_fields("gflops", "peak_rss_bytes"),
    );
    rows
}

/// One QLoRA step on a Mistral-7B-shaped model cut to 2 layers.
fn mistral_7b_2layer_case() -> Vec<Row> {
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
    // One warm-up step (first-touch page faults, per-thread buffers), then the timed one, as the peer does.
    forward_backward(&model, &params, &mb, &scaling, true).expect("warm-up step");
    let t = Instant::now();
    let out = forward_backward(&model, &params, &mb, &scaling, true).expect("step");
    let step_secs = t.elapsed().as_secs_f64();
    let peak = peak_rss_bytes();
    // The same step with bf16 products of the frozen base (matmul precision "medium").
    trainer::kernels::set_matmul_precision(trainer::kernels::MatmulPrecision::Medium);
    let t = Instant::now();
    forward_backward(&model, &params, &mb, &scaling, true).expect("bf16-matmul step");
    let bf16_secs = t.elapsed().as_secs_f64();
    trainer::kernels::set_matmul_precision(trainer::kernels::MatmulPrecision::Highest);
    // Counted as in the training cases: 6N with checkpointing, lm_head 4x, attention, LoRA.
    let flops = lora_step_flops_per_token(&config, tokens, 8, config.num_layers) * tokens as f64;
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
    println!(
        "7b-2layer the same step with bf16-matmul: {bf16_secs:.1}s ({:.1} tok/s, {:.1} GFLOP/s)",
        tokens as f64 / bf16_secs,
        flops / bf16_secs / 1e9
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
    // The peer reports its step's peak the same way (reset after loading), falling back to the process peak.
    vec![
        Row::new(
            "mistral-7b-2layer NF4 QLoRA step, 512 tokens, ckpt",
            "tok/s",
            tokens as f64 / step_secs,
            &[("case", json!("mistral-7b-2layer"))],
        )
        .gflops(flops / step_secs / 1e9)
        .rss(if phase_reset { peak } else { None })
        .peer_fields("tokens_per_s", "step_peak_rss_bytes"),
        Row::new(
            "mistral-7b-2layer NF4 QLoRA step, 512 tokens, ckpt, bf16-matmul",
            "tok/s",
            tokens as f64 / bf16_secs,
            &[("case", json!("mistral-7b-2layer"))],
        )
        .gflops(flops / bf16_secs / 1e9)
        .peer_fields("tokens_per_s", "step_peak_rss_bytes"),
    ]
}

/// Training tokens/s at the reference peer's shapes (see ../shared/notes/performance.md).
/// Training configurations measured: 2 models x 4 variants x 2 bases.
const TRAIN_CONFIGS: usize = 16;
/// Configurations per model.
const PER_MODEL: usize = TRAIN_CONFIGS / 2;

/// The training rows; `only` picks one configuration (0..TRAIN_CONFIGS, in the order printed).
fn training_cases(only: Option<usize>) -> Vec<Row> {
    use trainer::kernels::MatmulPrecision;
    use trainer::lora::{attach_lora, LoraInit, LoraPlan, LoraSettings};
    use trainer::model::Nf4Options;
    use trainer::train::{optimizer_step, AdamW, AdamWConfig, MicroBatch, Schedule, ScheduleKind, StepSettings};
    let mut rows = Vec::new();
    for moe in [false, true] {
        if only.is_some_and(|o| o / PER_MODEL != usize::from(moe)) {
            continue;
        }
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
        let (b, t) = (4usize, 256usize);
        let targets: Vec<String> = if moe {
            ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"].map(String::from).to_vec()
        } else {
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec()
        };
        // f32 products without checkpointing; with it, keeping what the default activation budget allows
        // (what `train` does) and recomputing every layer (as the peer does); then bf16 products (matmul
        // precision "medium") with the default budget. Each on an f32 and an NF4 base.
        // At these shapes (~50 MB of activations per layer) the budget `train` computes after loading keeps
        // every layer on any machine this runs on.
        let default_budget = u64::MAX;
        let variants = [
            (false, MatmulPrecision::Highest, None),
            (true, MatmulPrecision::Highest, Some(default_budget)),
            (true, MatmulPrecision::Highest, Some(0)),
            (true, MatmulPrecision::Medium, Some(default_budget)),
        ];
        for (v, (checkpointing, precision, activation_budget)) in variants.into_iter().enumerate() {
            for nf4 in [false, true] {
                let index = usize::from(moe) * PER_MODEL + v * 2 + usize::from(nf4);
                if only.is_some_and(|o| o != index) {
                    continue;
                }
                trainer::kernels::set_matmul_precision(precision);
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
                let settings = StepSettings { aux_coef: 0.02, max_grad_norm: 1.0, checkpointing, activation_budget };
                let kept = activation_budget.map_or(0, |budget| {
                    trainer::train::StepShape::for_model(&model, b * t, 0, true).layers_within(budget)
                });
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
                        &mut |_| {},
                    )
                    .expect("step");
                    if step > 0 {
                        times.push(start.elapsed().as_secs_f64());
                    }
                }
                times.sort_by(f64::total_cmp);
                let secs = times[times.len() / 2];
                let tokens = (b * t) as f64;
                let recomputed = if checkpointing { config.num_layers - kept } else { 0 };
                let per_token = lora_step_flops_per_token(&config, t, 8, recomputed);
                let rss = peak_rss_bytes();
                let (model_name, base, ckpt) = (
                    if moe { "mixtral" } else { "mistral" },
                    if nf4 { "nf4" } else { "f32" },
                    match (checkpointing, precision, activation_budget) {
                        (false, ..) => "no-ckpt",
                        (true, MatmulPrecision::Highest, Some(0)) => "ckpt recompute-all",
                        (true, MatmulPrecision::Highest, _) => "ckpt",
                        (true, MatmulPrecision::Medium, _) => "ckpt bf16-matmul",
                    },
                );
                println!(
                    "train     {model_name}-shaped {base:4} {ckpt:18} | {:.0} tok/s | {:.1} GFLOP/s | peak RSS {} | {}",
                    tokens / secs,
                    tokens * per_token / secs / 1e9,
                    gib(rss),
                    if checkpointing {
                        format!("recomputes {recomputed} of {} layers", config.num_layers)
                    } else {
                        "no recompute".into()
                    }
                );
                rows.push(
                    Row::new(
                        format!("train {model_name} {base} {ckpt}"),
                        "tok/s",
                        tokens / secs,
                        &[
                            ("case", json!("train")),
                            ("model", json!(model_name)),
                            ("base", json!(base)),
                            ("ckpt", json!(checkpointing)),
                        ],
                    )
                    .gflops(tokens * per_token / secs / 1e9)
                    .rss(rss),
                );
            }
        }
    }
    rows
}

/// The `--objective=NAME` argument of a `dpo-memory` case process (`sft` or `dpo`).
fn memory_objective() -> String {
    std::env::args().find_map(|a| a.strip_prefix("--objective=").map(String::from)).unwrap_or_else(|| "sft".into())
}

/// One row: a few training steps of `objective` (`sft` or `dpo`) at the same token count, and this process's
/// peak RSS (model loading included).
fn dpo_memory_case(objective: &str) -> Vec<Row> {
    use trainer::lora::{attach_lora, LoraInit, LoraPlan, LoraSettings};
    use trainer::model::Nf4Options;
    use trainer::train::{
        optimizer_step, preference_step, AdamW, AdamWConfig, DpoLossType, MicroBatch, PairBatch, PreferenceObjective,
        PreferenceSettings, Reference, Schedule, ScheduleKind, StepSettings,
    };
    let json = serde_json::json!({
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1536,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "rope_theta": 1e6,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2
    });
    let config = ModelConfig::from_json_str(&json.to_string()).expect("config");
    let dir = tempfile::tempdir().expect("temp dir");
    write_random_model(dir.path(), &config, 3, 0.02).expect("write model");
    // From here: loading and the steps, not writing the random model.
    trainer::system::reset_peak_rss();
    let (rows, t, prompt) = (8usize, 256usize, 128usize);
    let opts = LoadOptions { nf4: Some(Nf4Options::qlora()), ..LoadOptions::default() };
    let mut model = load_model(dir.path(), &opts).expect("load").model;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from);
    let settings = LoraSettings { r: 8, alpha: 16.0, targets: targets.to_vec(), ..LoraSettings::default() };
    let params = attach_lora(&mut model, &LoraPlan::new(settings).expect("plan"), &LoraInit::Seed(0)).expect("lora");
    let sizes: Vec<usize> = params.named.iter().map(|(_, v)| v.elem_count()).collect();
    let mut adamw = AdamW::new(AdamWConfig::default(), &sizes);
    let schedule =
        Schedule { kind: ScheduleKind::Constant, base_lr: 1e-4, warmup_steps: 0, total_steps: 10, min_lr_ratio: 0.0 };
    let step_settings =
        StepSettings { aux_coef: 0.0, max_grad_norm: 1.0, checkpointing: true, activation_budget: Some(u64::MAX) };
    let ids: Vec<u32> = (0..(rows * t) as u32).map(|i| 3 + (i * 7919) % 31000).collect();
    let sft = MicroBatch {
        batch: rows,
        seq_len: t,
        input_ids: ids.clone(),
        labels: ids.iter().map(|&i| i as i64).collect(),
        positions: None,
        documents: None,
        valid: None,
    };
    // Pair i's rows i (chosen) and 4 + i (rejected) share their first `prompt` tokens.
    let pairs = rows / 2;
    let mut pair_ids = ids.clone();
    for i in 0..pairs {
        let (c, r) = (i * t, (pairs + i) * t);
        let shared: Vec<u32> = pair_ids[c..c + prompt].to_vec();
        pair_ids[r..r + prompt].copy_from_slice(&shared);
    }
    let pb = PairBatch {
        pairs,
        seq_len: t,
        input_ids: pair_ids,
        completion: (0..rows * t).map(|k| k % t >= prompt).collect(),
        valid: vec![true; rows * t],
        indices: Vec::new(),
    };
    let dpo = PreferenceSettings {
        objective: PreferenceObjective::Dpo { loss_type: DpoLossType::Sigmoid, label_smoothing: 0.0 },
        beta: 0.1,
    };
    let reference = Reference::base(&params).expect("reference");
    let mut times = Vec::new();
    for step in 0..3u64 {
        let start = Instant::now();
        if objective == "dpo" {
            preference_step(
                step,
                &model,
                &params,
                &mut adamw,
                &schedule,
                std::slice::from_ref(&pb),
                &dpo,
                Some(&reference),
                &step_settings,
                step,
                &mut |_| {},
            )
            .expect("dpo step");
        } else {
            optimizer_step(
                step,
                &model,
                &params,
                &mut adamw,
                &schedule,
                std::slice::from_ref(&sft),
                &step_settings,
                step,
                &mut |_| {},
            )
            .expect("sft step");
        }
        if step > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    let rss = peak_rss_bytes();
    println!(
        "dpo-mem   {objective:3} step, mistral-shaped NF4, {rows} rows x {t} tokens | {:.0} tok/s | peak RSS {}",
        (rows * t) as f64 / secs,
        gib(rss)
    );
    vec![Row::new(
        format!("{objective} step {rows}x{t} nf4 (memory)"),
        "tok/s",
        (rows * t) as f64 / secs,
        &[("case", json!("dpo-memory")), ("objective", json!(objective))],
    )
    .rss(rss)]
}

/// The reference peer: benches/peer.py under a Python with torch, transformers, peft and bitsandbytes.
struct Peer {
    python: String,
    script: PathBuf,
    extra_args: Vec<String>,
}

/// What the peer needs, for the message when it is missing.
const PEER_PACKAGES: &str = "torch transformers peft bitsandbytes";

impl Peer {
    /// The peer, unless skipped (`--no-peer`, `TRAMONTANE_PEER=0`) or not installed; says which.
    fn detect(args: &[String]) -> Option<Peer> {
        if args.iter().any(|a| a == "--no-peer") || std::env::var("TRAMONTANE_PEER").is_ok_and(|v| v == "0") {
            println!("peer      skipped (--no-peer or TRAMONTANE_PEER=0)");
            return None;
        }
        let python = std::env::var("TRAMONTANE_PEER_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches").join("peer.py");
        let ok = Command::new(&python)
            .args(["-c", "import torch, transformers, peft, bitsandbytes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!(
                "peer      not available: `{python}` cannot import {PEER_PACKAGES}; to compare with the reference \
                 peer, `pip install {PEER_PACKAGES}` (measured with torch 2.15, transformers 5.23, peft 0.21.2, \
                 bitsandbytes 0.50.2) and set TRAMONTANE_PEER_PYTHON to that python"
            );
            return None;
        }
        // The same thread count as ours (rayon uses every core).
        let mut extra_args = vec![format!("--threads={}", rayon_threads())];
        extra_args.extend(args.iter().filter_map(|a| a.strip_prefix("--peer-steps=")).map(|n| format!("--steps={n}")));
        println!("peer      {python} {} ({} threads)", script.display(), rayon_threads());
        Some(Peer { python, script, extra_args })
    }

    /// Runs the peer's `case` and fills in the peer's numbers of `rows`, printing ours vs peer.
    fn compare(&self, case: &str, rows: &mut [Row]) {
        let start = Instant::now();
        let output =
            Command::new(&self.python).arg(&self.script).arg(case).args(&self.extra_args).stdin(Stdio::null()).output();
        let output = match output {
            Ok(o) => o,
            Err(e) => {
                println!("vs peer   {case}: could not run the peer: {e}");
                return;
            }
        };
        let records: Vec<Value> =
            String::from_utf8_lossy(&output.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
            println!("vs peer   {case}: the peer failed ({}); its last stderr lines:", output.status);
            for line in tail.iter().rev() {
                println!("          {line}");
            }
        }
        for row in rows.iter_mut() {
            let Some(record) = records.iter().find(|r| row.matches(r)) else {
                println!("vs peer   {}: no peer result", row.name);
                continue;
            };
            row.peer = record.get(&row.peer_field).and_then(Value::as_f64);
            row.peer_rss = record.get(&row.peer_rss_field).and_then(Value::as_u64);
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "n/a".into(),
            };
            let mut line = format!(
                "vs peer   {}: ours {} vs peer {} {}: ours/peer {}",
                row.name,
                num(row.ours),
                row.peer.map_or("n/a".into(), num),
                row.unit,
                ratio(Some(row.ours), row.peer)
            );
            if row.ours_rss.is_some() || row.peer_rss.is_some() {
                line += &format!(
                    " | peak RSS ours {} vs peer {}: ours/peer {}",
                    gib(row.ours_rss),
                    gib(row.peer_rss),
                    ratio(row.ours_rss.map(|b| b as f64), row.peer_rss.map(|b| b as f64))
                );
            }
            println!("{line}");
        }
        println!("vs peer   ({case}: the peer took {:.0}s)", start.elapsed().as_secs_f64());
    }
}

/// A number with about three significant digits.
fn num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// The summary in Markdown, ready for the README. Ratio is ours/peer (above 1: we are faster).
fn print_summary(rows: &[Row]) {
    let cell = |x: Option<f64>, unit: &str| match x {
        Some(v) if unit == "tok/s" => num(v),
        Some(v) => format!("{} {unit}", num(v)),
        None => "–".into(),
    };
    let mem = |b: Option<u64>| b.map_or("–".into(), |_| gib(b));
    println!();
    println!("| case | ours tok/s | peer tok/s | ratio | ours GFLOP/s | ours peak RSS | peer peak RSS |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        let ratio = match r.peer {
            Some(p) if p > 0.0 => format!("{:.2}x", r.ours / p),
            _ => "–".into(),
        };
        println!(
            "| {} | {} | {} | {ratio} | {} | {} | {} |",
            r.name,
            cell(Some(r.ours), r.unit),
            cell(r.peer, r.unit),
            r.gflops.map_or("–".into(), |g| format!("{g:.1}")),
            mem(r.ours_rss),
            mem(r.peer_rss)
        );
    }
}

/// Our side of one case, in this process.
fn run_case(case: &str) -> Vec<Row> {
    match case {
        "generate" => generate_case(),
        "nf4" => nf4_case(),
        "frozen-linear" => frozen_linear_case(),
        "train" => training_cases(train_config()),
        "dpo-memory" => dpo_memory_case(&memory_objective()),
        _ => mistral_7b_2layer_case(),
    }
}

/// Marks the lines a case's process uses to hand its rows back.
const ROW_LINE: &str = "speed-row\t";

/// Our side of one case in a fresh process of this benchmark (`CASE --case-process`), so that its peak RSS
/// is its own: memory an earlier case freed stays resident in the allocator and would count again. Its
/// output passes through; runs the case here when the process cannot be started.
fn run_case_process(case: &str) -> Vec<Row> {
    if case == "train" {
        // One process per configuration: the allocator keeps what a configuration freed, so a shared
        // process would carry one configuration's peak into the next.
        return (0..TRAIN_CONFIGS).flat_map(|i| run_process(case, &[format!("--train-config={i}")])).collect();
    }
    if case == "dpo-memory" {
        let rows: Vec<Row> =
            ["sft", "dpo"].iter().flat_map(|o| run_process(case, &[format!("--objective={o}")])).collect();
        if let [sft, dpo] = rows.as_slice() {
            if let (Some(s), Some(d)) = (sft.ours_rss, dpo.ours_rss) {
                println!(
                    "dpo-mem   peak RSS: DPO step {} vs SFT step {} at the same token count: DPO/SFT {:.3}x (bound 1.3x)",
                    gib(Some(d)),
                    gib(Some(s)),
                    d as f64 / s as f64
                );
            }
        }
        return rows;
    }
    run_process(case, &[])
}

/// The `--train-config=N` argument of a case process.
fn train_config() -> Option<usize> {
    std::env::args().find_map(|a| a.strip_prefix("--train-config=").and_then(|n| n.parse().ok()))
}

/// Runs `case` in a child process of this benchmark with extra arguments and collects its rows.
fn run_process(case: &str, extra: &[String]) -> Vec<Row> {
    use std::io::BufRead;
    let child = std::env::current_exe().and_then(|exe| {
        Command::new(exe).args([case, "--case-process"]).args(extra).stdin(Stdio::null()).stdout(Stdio::piped()).spawn()
    });
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            println!("(could not start a process for {case}: {e}; running it in this one)");
            return run_case(case);
        }
    };
    let mut rows = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            match line.strip_prefix(ROW_LINE) {
                Some(row) => rows.extend(Row::from_json(row)),
                None => println!("{line}"),
            }
        }
    }
    match child.wait() {
        Ok(status) if status.success() => {}
        status => println!("{case} failed: {status:?}"),
    }
    rows
}

fn main() {
    // What the tramontane binary does at startup (allocator and thread settings).
    trainer::system::tune_process();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let wanted: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let cases = ["generate", "nf4", "frozen-linear", "train", "mistral-7b-2layer", "dpo-memory"];
    if let Some(unknown) = wanted.iter().find(|w| !cases.contains(&w.as_str())) {
        eprintln!("unknown case `{unknown}`; cases: {}", cases.join(" "));
        std::process::exit(2);
    }
    if args.iter().any(|a| a == "--case-process") {
        for case in &wanted {
            for row in run_case(case) {
                println!("{ROW_LINE}{}", row.to_json());
            }
        }
        return;
    }
    let load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split(' ').next().map(String::from));
    println!(
        "tramontane speed suite ({} threads{})",
        rayon_threads(),
        load.map_or(String::new(), |l| format!("; load average {l} before starting"))
    );
    let peer = Peer::detect(&args);
    let mut rows = Vec::new();
    for case in cases {
        if !(wanted.is_empty() || wanted.iter().any(|w| *w == case)) {
            continue;
        }
        let mut case_rows = run_case_process(case);
        // The peer has no preference case: the DPO/SFT memory ratio is ours alone.
        if let Some(peer) = peer.as_ref().filter(|_| case != "dpo-memory") {
            peer.compare(case, &mut case_rows);
        }
        rows.extend(case_rows);
    }
    print_summary(&rows);
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
