//! PEFT adapters in and out, merged export and GGUF, against the goldens of `tests/fixtures/adapters/`
//! (written by its `generate.py` with PEFT 0.21 / transformers 5; see its README).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use adapters::naming::BaseShape;
use adapters::{Adapter, ExpertLayout, LoraSpec, RouterTraining, Site};
use candle_core::{DType, Device, Tensor};
use trainer::lora::peft::{apply_adapters, base_shape, load_adapter};
use trainer::model::{load_model, Layout, LoadOptions, ModelConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fx(name: &str) -> PathBuf {
    root().join("tests/fixtures/adapters").join(name)
}

fn model_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fx("golden.safetensors"), &Device::Cpu).unwrap()
}

fn input_ids() -> Tensor {
    golden()["input_ids"].to_dtype(DType::U32).unwrap()
}

fn tramontane(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tramontane")).args(args).output().expect("the binary runs")
}

fn logits_of(model: &trainer::model::Model) -> Tensor {
    let out = model.forward(&input_ids(), Layout::default(), None).unwrap();
    model.logits(&out.hidden).unwrap().to_dtype(DType::F32).unwrap()
}

/// Our logits for a model directory with adapters applied unmerged.
fn our_logits(model: &Path, adapters: &[(&Path, f64)]) -> Tensor {
    let config = ModelConfig::from_path(model).unwrap();
    let mut m = load_model(model, &LoadOptions::default()).unwrap().model;
    let list: Vec<(Adapter, f64)> = adapters.iter().map(|(d, w)| (load_adapter(d, &config).unwrap(), *w)).collect();
    apply_adapters(&mut m, &list).unwrap();
    logits_of(&m)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    let d = max_diff(a, b);
    assert!(d < tol, "{what}: max |diff| {d} >= {tol}");
}

#[test]
fn peft_made_adapters_give_pefts_logits() {
    let g = golden();
    for (adapter, model, key) in [
        ("peft-mistral", "tiny-mistral", "peft-mistral"),
        ("peft-mixtral-fused", "tiny-mixtral", "peft-mixtral-fused"),
        ("peft-mixtral-fused", "tiny-mixtral-fused", "peft-mixtral-fused"),
        ("peft-mixtral-legacy", "tiny-mixtral", "peft-mixtral-legacy"),
        ("peft-mixtral-router-full", "tiny-mixtral", "peft-mixtral-router-full"),
    ] {
        let ours = our_logits(&model_dir(model), &[(&fx(adapter), 1.0)]);
        assert_close(&ours, &g[key], 1e-4, &format!("{adapter} on {model}"));
        // The adapter changes the output (the comparison is not vacuous).
        let base = our_logits(&model_dir(model), &[]);
        assert!(max_diff(&base, &g[key]) > 1e-2, "{adapter}: the adapter has no visible effect");
    }
}

#[test]
fn shared_a_gate_up_is_split_exactly() {
    let config = ModelConfig::from_path(&model_dir("tiny-mixtral")).unwrap();
    let a = load_adapter(&fx("peft-mixtral-fused"), &config).unwrap();
    assert!(a.notes.iter().any(|n| n.contains("share A")), "{:?}", a.notes);
    // w1 and w3 of one expert carry the same A (rank r each).
    let w1 = &a.modules[&Site::Expert(0, 1, adapters::ExpertProj::W1)];
    let w3 = &a.modules[&Site::Expert(0, 1, adapters::ExpertProj::W3)];
    assert_eq!(max_diff(&w1.a, &w3.a), 0.0);
    assert_eq!(a.spec.router, RouterTraining::Lora);
}

/// Deterministic uniform values in [-bound, bound).
fn lcg(seed: &mut u64, n: usize, bound: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
        })
        .collect()
}

/// The adapters our writer fixtures hold: (directory, base model, layout, spec).
fn our_cases() -> Vec<(&'static str, &'static str, ExpertLayout, LoraSpec)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        (
            "ours-mistral",
            "tiny-mistral",
            ExpertLayout::Fused,
            LoraSpec {
                r: 4,
                alpha: 8.0,
                dropout: 0.05,
                use_rslora: true,
                targets: s(&["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                rank_pattern: vec![("v_proj".into(), 2)],
                alpha_pattern: vec![("o_proj".into(), 16.0)],
                layers: Some(vec![1]),
                router: RouterTraining::Frozen,
            },
        ),
        (
            "ours-mixtral",
            "tiny-mixtral",
            ExpertLayout::Fused,
            LoraSpec {
                r: 2,
                alpha: 4.0,
                dropout: 0.1,
                use_rslora: false,
                targets: s(&["q_proj", "k_proj", "w1", "w2", "w3"]),
                rank_pattern: vec![("w2".into(), 3)],
                alpha_pattern: vec![("w1".into(), 8.0)],
                layers: Some(vec![1]),
                router: RouterTraining::Lora,
            },
        ),
        (
            "ours-mixtral-legacy",
            "tiny-mixtral",
            ExpertLayout::PerExpert,
            LoraSpec {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                use_rslora: false,
                targets: s(&["q_proj", "v_proj", "w1", "w2", "w3"]),
                rank_pattern: vec![],
                alpha_pattern: vec![],
                layers: None,
                router: RouterTraining::Lora,
            },
        ),
    ]
}

/// A deterministic adapter for a spec (what training would checkpoint), in our internal names.
fn make_adapter(spec: &LoraSpec, base: &BaseShape, seed: u64) -> Adapter {
    let mut seed = seed;
    let mut tensors = Vec::new();
    for site in base.sites() {
        let targeted = match site {
            Site::Router(_) => spec.router == RouterTraining::Lora,
            _ => {
                spec.targets.iter().any(|t| t == site.short())
                    && spec.layers.as_ref().is_none_or(|l| l.contains(&site.layer()))
            }
        };
        if !targeted {
            continue;
        }
        let (r, _) = spec.resolve(&site.module_name()).unwrap();
        let (out, inp) = base.dims(site);
        let a = lcg(&mut seed, r * inp, 1.0 / (inp as f32).sqrt());
        let b = lcg(&mut seed, out * r, 0.08);
        tensors.push((
            adapters::adapter::lora_tensor_name(site, 'A'),
            Tensor::from_vec(a, (r, inp), &Device::Cpu).unwrap(),
        ));
        tensors.push((
            adapters::adapter::lora_tensor_name(site, 'B'),
            Tensor::from_vec(b, (out, r), &Device::Cpu).unwrap(),
        ));
    }
    let base_model = Some("tests/fixtures/models/tiny-mixtral".to_string());
    Adapter::from_internal(spec.clone(), base_model, tensors, base).unwrap()
}

#[test]
fn writer_reproduces_committed_files() {
    let write = std::env::var("TRAMONTANE_WRITE_ADAPTER_FIXTURES").is_ok();
    for (i, (dir, model, layout, spec)) in our_cases().into_iter().enumerate() {
        let config = ModelConfig::from_path(&model_dir(model)).unwrap();
        let base = base_shape(&config);
        let mut adapter = make_adapter(&spec, &base, 1000 + i as u64);
        adapter.base_model = Some(format!("tests/fixtures/models/{model}"));
        if write {
            let _ = std::fs::remove_dir_all(fx(dir));
            adapters::write_adapter(&adapter, &base, &fx(dir), layout).unwrap();
            continue;
        }
        let (cfg, tensors) = adapters::peft_files(&adapter, &base, layout).unwrap();
        let committed: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fx(dir).join("adapter_config.json")).unwrap()).unwrap();
        let ours: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
        assert_eq!(ours, committed, "{dir}: adapter_config.json differs");
        let file = candle_core::safetensors::load(fx(dir).join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(file.len(), tensors.len(), "{dir}: tensor count");
        for (name, t) in &tensors {
            let c = file.get(name).unwrap_or_else(|| panic!("{dir}: missing `{name}`"));
            assert_eq!(c.dims(), t.dims(), "{dir}: `{name}` shape");
            assert_eq!(max_diff(c, t), 0.0, "{dir}: `{name}` differs");
        }
        // Reading our file back gives the same function per module.
        let back = adapters::read_adapter(&fx(dir), &base).unwrap();
        assert_eq!(back.modules.len(), adapter.modules.len(), "{dir}: module count");
        for (site, m) in &adapter.modules {
            let r = &back.modules[site];
            assert!(max_diff(&m.delta().unwrap(), &r.delta().unwrap()) < 1e-6, "{dir}: `{site}` delta differs");
        }
    }
}

#[test]
fn our_written_adapters_give_pefts_logits() {
    let g = golden();
    for (dir, model, _, _) in our_cases() {
        let ours = our_logits(&model_dir(model), &[(&fx(dir), 1.0)]);
        assert_close(&ours, &g[dir], 1e-4, &format!("{dir} (PEFT's logits for our file)"));
    }
}

#[test]
fn fused_writer_records_the_rank_trick() {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx("ours-mixtral/adapter_config.json")).unwrap()).unwrap();
    // Experts restricted to layer 1: per-layer parameter names; router in every layer.
    let tp = cfg["target_parameters"].as_array().unwrap();
    assert!(tp.iter().any(|v| v == "model.layers.1.mlp.experts.gate_up_proj"), "{tp:?}");
    assert!(tp.iter().any(|v| v == "mlp.gate.weight"), "{tp:?}");
    // gate_up rank = r(w1) + r(w3) = 4, its alpha keeps w1's scale 8/2 = 4 -> 16.
    assert_eq!(cfg["rank_pattern"]["experts\\.gate_up_proj"], 4);
    assert_eq!(cfg["alpha_pattern"]["experts\\.gate_up_proj"], 16.0);
    assert_eq!(cfg["rank_pattern"]["experts\\.down_proj"], 3);
    assert_eq!(cfg["lora_dropout"], 0.0);
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([1]));
}

fn merge(model: &str, adapters: &[&str], out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["merge".to_string(), "--model".into(), model_dir(model).display().to_string()];
    for a in adapters {
        args.push("--adapter".into());
        args.push(a.to_string());
    }
    args.push("--out".into());
    args.push(out.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    tramontane(&refs)
}

fn dir_logits(dir: &Path) -> Tensor {
    logits_of(&load_model(dir, &LoadOptions::default()).unwrap().model)
}

#[test]
fn merged_directories_match_transformers_and_unmerged() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    for (model, adapter, key, unmerged, extra) in [
        ("tiny-mistral", "peft-mistral", "merged-mistral", "peft-mistral", vec!["--dtype", "f32"]),
        (
            "tiny-mixtral-fused",
            "peft-mixtral-fused",
            "merged-mixtral",
            "peft-mixtral-fused",
            vec!["--dtype", "f32", "--max-shard-size", "400KB"],
        ),
    ] {
        let out = tmp.path().join(key);
        let o = merge(model, &[fx(adapter).to_str().unwrap()], &out, &extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert!(out.join(f).is_file(), "{key}: missing {f}");
        }
        let ours = dir_logits(&out);
        assert_close(&ours, &g[key], 1e-4, &format!("{key}: ours vs transformers on the merged dir"));
        assert_close(&ours, &g[unmerged], 1e-4, &format!("{key}: merged vs PEFT unmerged"));
        assert_close(&ours, &our_logits(&model_dir(model), &[(&fx(adapter), 1.0)]), 1e-4, "merged vs our unmerged");
    }
    // Sharded output with an index, hub layout for the fused base.
    let idx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("merged-mixtral/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = idx["weight_map"].as_object().unwrap();
    assert!(map.contains_key("model.layers.0.block_sparse_moe.experts.3.w2.weight"));
    assert!(
        map.values().any(|v| v == "model-00002-of-00004.safetensors" || v == "model-00002-of-00003.safetensors"),
        "{map:?}"
    );
}

#[test]
fn nf4_base_is_merged_into_its_dequantized_weights() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let (nf4, adapter) = (fx("nf4-mistral"), fx("peft-mistral"));
    let args = [
        "merge",
        "--model",
        nf4.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f32",
        "--json",
    ];
    let o = tramontane(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["dequantized_nf4"], 14);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());
    let ours = dir_logits(&out);
    assert_close(&ours, &g["merged-nf4"], 1e-4, "ours vs transformers on the merged NF4 dir");
    assert_close(&ours, &g["peft-mistral-nf4"], 1e-4, "merged NF4 vs PEFT on the dequantized base");
}

#[test]
fn weighted_adapters_sum_their_updates() {
    let m = model_dir("tiny-mixtral");
    let (a, b) = (fx("peft-mixtral-fused"), fx("ours-mixtral-legacy"));
    let combo = our_logits(&m, &[(&a, 0.7), (&b, 0.3)]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let o = merge(
        "tiny-mixtral",
        &[&format!("{}:0.7", a.display()), &format!("{}:0.3", b.display())],
        &out,
        &["--dtype", "f32"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close(&dir_logits(&out), &combo, 1e-4, "merged weighted pair vs unmerged weighted pair");
}

fn greedy(model: &str) -> Vec<i64> {
    let o = tramontane(&[
        "generate",
        "--model",
        model,
        "--dtype",
        "f16",
        "--prompt-ids",
        "1,415,293,9",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["generated_ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn gguf_export_reads_back_and_generates_like_the_merged_model() {
    use candle_core::quantized::gguf_file::Content;
    let tmp = tempfile::tempdir().unwrap();
    for (model, adapter, moe) in
        [("tiny-mistral", "peft-mistral", false), ("tiny-mixtral", "peft-mixtral-legacy", true)]
    {
        let out = tmp.path().join(model);
        let o = merge(model, &[fx(adapter).to_str().unwrap()], &out, &["--dtype", "f32", "--gguf", "f16"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let gguf = out.join(format!("{model}-f16.gguf"));
        let content = Content::read(&mut std::fs::File::open(&gguf).unwrap()).unwrap();
        let mut required: Vec<&str> = adapters::gguf::REQUIRED_KEYS.to_vec();
        required.extend(["tokenizer.ggml.eos_token_id", "general.file_type"]);
        if moe {
            required.extend(["llama.expert_count", "llama.expert_used_count"]);
            assert!(content.tensor_infos.contains_key("blk.1.ffn_gate_exps.weight"));
            assert!(content.tensor_infos.contains_key("blk.1.ffn_gate_inp.weight"));
        }
        for k in required {
            assert!(content.metadata.contains_key(k), "{model}: missing GGUF key {k}");
        }
        assert_eq!(content.metadata["general.architecture"].to_string().unwrap(), "llama");
        let tokens = content.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
        assert_eq!(tokens.len(), 1000);
        for t in
            ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "output_norm.weight", "output.weight"]
        {
            assert!(content.tensor_infos.contains_key(t), "{model}: missing tensor {t}");
        }
        assert_eq!(
            greedy(gguf.to_str().unwrap()),
            greedy(out.to_str().unwrap()),
            "{model}: GGUF vs safetensors greedy at f16"
        );
        // Every weight read back equals the merged one (after undoing llama.cpp's Q/K permutation).
        let g = trainer::model::gguf::load_gguf(&gguf, DType::F32, &Device::Cpu).unwrap();
        let st = load_model(&out, &LoadOptions { dtype: DType::F16, ..LoadOptions::default() }).unwrap().model;
        let q_gguf = g.model.layers[1].self_attn.q_proj.dense_weight().unwrap();
        let q_st = st.layers[1].self_attn.q_proj.dense_weight().unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(max_diff(&q_gguf, &q_st), 0.0);
        assert!(g.tokenizer.is_some());
    }
}

#[test]
fn gguf_quantized_types_load() {
    let tmp = tempfile::tempdir().unwrap();
    let merged_logits = {
        let out = tmp.path().join("f32");
        assert!(merge("tiny-mistral", &[fx("peft-mistral").to_str().unwrap()], &out, &["--dtype", "f32"])
            .status
            .success());
        dir_logits(&out)
    };
    for ty in ["q8_0", "q4_k"] {
        let out = tmp.path().join(ty);
        let o = merge("tiny-mistral", &[fx("peft-mistral").to_str().unwrap()], &out, &["--dtype", "f32", "--gguf", ty]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let g =
            trainer::model::gguf::load_gguf(&out.join(format!("{ty}-{ty}.gguf")), DType::F32, &Device::Cpu).unwrap();
        let ql = logits_of(&g.model);
        let d = max_diff(&ql, &merged_logits);
        assert!(d < 0.25, "{ty}: logits differ by {d}");
        // The adapter's effect (several logits units here) survives quantization.
        let base = our_logits(&model_dir("tiny-mistral"), &[]);
        assert!(max_diff(&ql, &base) > 1.0, "{ty}: the adapter's effect is lost");
    }
    // q4_k uses Q4_K where rows are a multiple of 256, else Q8_0.
    use adapters::gguf::GgufType;
    use candle_core::quantized::GgmlDType;
    assert_eq!(GgufType::Q4K.matrix_type(4096), GgmlDType::Q4K);
    assert_eq!(GgufType::Q4K.matrix_type(64), GgmlDType::Q8_0);
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn fails_with(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_inputs_are_clear_errors_with_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let model = model_dir("tiny-mixtral");
    let gen = |adapter: &Path| {
        tramontane(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt-ids",
            "1,2,3",
            "--max-new-tokens",
            "2",
        ])
    };
    // Adapter for a dense model on a mixture of experts.
    fails_with(&gen(&fx("peft-mistral")), "dense MLP");
    fails_with(&merge("tiny-mixtral", &[fx("peft-mistral").to_str().unwrap()], &out, &[]), "dense MLP");
    // Adapter for another shape.
    fails_with(&merge("tiny-mistral-bf16-sharded", &[fx("peft-mistral").to_str().unwrap()], &out, &[]), "does not fit");
    // Missing files.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails_with(&gen(&empty), "no adapter_config.json");
    let no_weights = tmp.path().join("no-weights");
    std::fs::create_dir(&no_weights).unwrap();
    std::fs::copy(fx("peft-mixtral-fused/adapter_config.json"), no_weights.join("adapter_config.json")).unwrap();
    fails_with(&gen(&no_weights), "missing adapter_model.safetensors");
    std::fs::write(no_weights.join("adapter_model.bin"), b"pickle").unwrap();
    fails_with(&gen(&no_weights), "adapter_model.bin");
    // Unknown peft_type, DoRA.
    for (from, to, needle) in
        [("\"LORA\"", "\"IA3\"", "`peft_type`"), ("\"use_dora\": false", "\"use_dora\": true", "`use_dora`")]
    {
        let bad = tmp.path().join(format!("bad-{needle}").replace('`', ""));
        copy_dir(&fx("peft-mixtral-fused"), &bad);
        let text = std::fs::read_to_string(bad.join("adapter_config.json")).unwrap();
        assert!(text.contains(from), "{from}");
        std::fs::write(bad.join("adapter_config.json"), text.replace(from, to)).unwrap();
        fails_with(&gen(&bad), needle);
    }
    // Corrupt safetensors.
    let corrupt = tmp.path().join("corrupt");
    copy_dir(&fx("peft-mixtral-fused"), &corrupt);
    let bytes = std::fs::read(corrupt.join("adapter_model.safetensors")).unwrap();
    std::fs::write(corrupt.join("adapter_model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&gen(&corrupt), "corrupt or truncated safetensors");
    fails_with(&merge("tiny-mixtral", &[corrupt.to_str().unwrap()], &out, &[]), "corrupt");
    // A merge that fails midway (corrupt base weights) leaves nothing behind.
    let bad_base = tmp.path().join("bad-base");
    copy_dir(&model_dir("tiny-mistral"), &bad_base);
    let bytes = std::fs::read(bad_base.join("model.safetensors")).unwrap();
    std::fs::write(bad_base.join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    let o = tramontane(&[
        "merge",
        "--model",
        bad_base.to_str().unwrap(),
        "--adapter",
        fx("peft-mistral").to_str().unwrap(),
        "--out",
        out_s,
    ]);
    fails_with(&o, "truncated");
    assert!(!out.exists());
    // Output directory exists.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    fails_with(&merge("tiny-mistral", &[fx("peft-mistral").to_str().unwrap()], &out, &[]), "already exists");
    assert!(out.join("keep").exists());
    // No temporary directories left beside the output.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.contains(".tmp").then_some(n)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn inspect_describes_an_adapter() {
    let o = tramontane(&[
        "inspect",
        fx("peft-mixtral-fused").to_str().unwrap(),
        "--model",
        model_dir("tiny-mixtral").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "peft_adapter");
    assert_eq!(v["r"], 2);
    assert!(v["layout"].as_str().unwrap().contains("target_parameters"));
    assert_eq!(v["fits_base"]["fits"], true);
    assert!(v["fits_base"]["trainable_parameters"].as_u64().unwrap() > 0);
    let o = tramontane(&[
        "inspect",
        fx("peft-mistral").to_str().unwrap(),
        "--model",
        model_dir("tiny-mixtral").to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("NO:"));
}
