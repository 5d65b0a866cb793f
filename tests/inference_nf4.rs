//! Inference on the NF4 base a QLoRA adapter was trained against: `generate --quantize nf4` with the adapter
//! answers exactly what the training run's own sample generations recorded, and `merge --quantize nf4` merges
//! into those NF4-rounded weights.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tramontane")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A few steps of the quickstart (tiny Mixtral, NF4 base with double quantization, f32) with sample
/// generations at the last step; returns the model and run directories.
fn train_qlora(tmp: &Path, steps: u64) -> (PathBuf, PathBuf) {
    let (model, run_dir) = (tmp.join("model"), tmp.join("run"));
    let mut args = vec!["train".to_string(), repo("recipes/quickstart.toml").display().to_string()];
    for set in [
        format!("model.path={}", model.display()),
        format!("output.dir={}", run_dir.display()),
        format!("train.max_steps={steps}"),
        format!("eval.every_steps={steps}"),
        "output.save_every_steps=0".to_string(),
    ] {
        args.extend(["--set".to_string(), set]);
    }
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    (model, run_dir)
}

/// The (prompt, completion) pairs `samples.jsonl` recorded at `step`.
fn samples_at(run_dir: &Path, step: u64) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(run_dir.join("samples.jsonl")).unwrap();
    let line = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["step"] == step)
        .unwrap_or_else(|| panic!("no samples at step {step}: {text}"));
    line["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
        .collect()
}

fn greedy(model: &Path, adapter: &Path, prompt: &str, flags: &[&str]) -> String {
    let (model, adapter) = (model.to_str().unwrap(), adapter.to_str().unwrap());
    let mut args = vec!["generate", "--model", model, "--adapter", adapter, "--chat", prompt, "--temperature", "0"];
    // The quickstart's eval.max_new_tokens.
    args.extend(["--max-new-tokens", "24", "--json"]);
    args.extend(flags);
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    v["text"].as_str().unwrap().trim().to_string()
}

#[test]
fn generate_on_the_nf4_base_answers_what_training_sampled() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 6;
    let (model, run_dir) = train_qlora(tmp.path(), steps);
    let adapter = run_dir.join("adapter");
    let samples = samples_at(&run_dir, steps);
    assert_eq!(samples.len(), 2, "the quickstart's two eval prompts");
    for (prompt, completion) in &samples {
        assert!(!completion.is_empty(), "{prompt}: empty sample");
        // The checkpoint is f32 (the quickstart's model.dtype), and training double-quantized.
        assert_eq!(&greedy(&model, &adapter, prompt, &["--quantize", "nf4"]), completion, "{prompt}");
    }
    // The comparison sees a different base: the dense weights, or NF4 without double quantization.
    let (prompt, completion) = &samples[0];
    assert_ne!(&greedy(&model, &adapter, prompt, &[]), completion, "the dense base answers otherwise");
    assert_ne!(
        &greedy(&model, &adapter, prompt, &["--quantize", "nf4", "--double-quant", "false"]),
        completion,
        "single quantization rounds the weights otherwise"
    );
}

/// The tensors of a safetensors file as f32 vectors, by name.
fn read_f32(path: &Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

#[test]
fn merge_with_quantize_nf4_merges_into_the_nf4_rounded_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = repo("tests/fixtures/models/tiny-mistral");
    // A zero-weighted adapter leaves the base: what is written is the base as the merge saw it.
    let adapter = format!("{}:0", repo("tests/fixtures/adapters/peft-mistral").display());
    let merge = |out: &Path, flags: &[&str]| {
        let mut args = vec!["merge", "--model", model.to_str().unwrap(), "--adapter", &adapter];
        args.extend(["--out", out.to_str().unwrap(), "--dtype", "f32"]);
        args.extend(flags);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        read_f32(&out.join("model.safetensors"))
    };
    let plain = merge(&tmp.path().join("plain"), &[]);
    let rounded = merge(&tmp.path().join("nf4"), &["--quantize", "nf4"]);
    let base = read_f32(&model.join("model.safetensors"));
    let mut linears = 0;
    for (name, (shape, values)) in &base {
        assert_eq!(&plain[name].1, values, "{name}: without --quantize the base is unchanged");
        let module = name.trim_end_matches(".weight").rsplit('.').next().unwrap();
        let expected = if module.ends_with("_proj") {
            linears += 1;
            // What the loader gives training: the NF4 quantization (double quantization by default) dequantized.
            trainer::quant::Nf4Weight::quantize(values, shape, true).unwrap().dequantize()
        } else {
            values.clone()
        };
        assert_eq!(rounded[name].1, expected, "{name}");
        if module.ends_with("_proj") {
            assert_ne!(&rounded[name].1, values, "{name}: NF4 rounding changes the weight");
        }
    }
    assert_eq!(linears, 2 * 7, "every attention and MLP linear of the 2 layers");
}

#[test]
fn merge_with_keep_unquantized_leaves_those_linears_as_the_base_has_them() {
    let tmp = tempfile::tempdir().unwrap();
    let model = repo("tests/fixtures/models/tiny-mistral");
    // A zero-weighted adapter: what is written is the base as the merge saw it.
    let adapter = format!("{}:0", repo("tests/fixtures/adapters/peft-mistral").display());
    let merge = |out: &Path, flags: &[&str]| {
        let mut args = vec!["merge", "--model", model.to_str().unwrap(), "--adapter", &adapter];
        args.extend(["--out", out.to_str().unwrap(), "--dtype", "f32", "--quantize", "nf4"]);
        args.extend(flags);
        run(&args)
    };
    let out = tmp.path().join("kept");
    let o = merge(&out, &["--keep-unquantized", "attention,down"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bits = |path: &Path| -> std::collections::HashMap<String, Vec<u32>> {
        read_f32(path)
            .into_iter()
            .map(|(name, (_, values))| (name, values.iter().map(|v| v.to_bits()).collect()))
            .collect()
    };
    let (merged, base) = (bits(&out.join("model.safetensors")), bits(&model.join("model.safetensors")));
    let (mut kept, mut rounded) = (0, 0);
    for (name, bits) in &base {
        let module = name.trim_end_matches(".weight").rsplit('.').next().unwrap();
        if module.ends_with("_proj") && !["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"].contains(&module) {
            rounded += 1;
            assert_ne!(&merged[name], bits, "{name}: NF4 rounding changes the weight");
        } else {
            kept += usize::from(module.ends_with("_proj"));
            assert_eq!(&merged[name], bits, "{name}: kept bit for bit");
        }
    }
    assert_eq!((kept, rounded), (2 * 5, 2 * 2), "attention and down_proj kept, gate and up rounded, 2 layers");
    // Only with --quantize, and only the recipe's names.
    let o = merge(&tmp.path().join("typo"), &["--keep-unquantized", "atention"]);
    assert!(!o.status.success() && stderr(&o).contains("unknown layer `atention`"), "{}", stderr(&o));
    let o = run(&["generate", "--model", model.to_str().unwrap(), "--prompt-ids", "1", "--keep-unquantized", "q"]);
    assert!(!o.status.success() && stderr(&o).contains("--quantize"), "{}", stderr(&o));
}
