//! `generate`, `eval` and `inspect` through the binary, and the bad-input errors of model loading:
//! each exits non-zero with a message naming the file and the problem, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

fn tramontane(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tramontane")).args(args).output().expect("the binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A writable copy of a fixture model directory.
fn copy_model(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

fn golden(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("golden").join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_arg(values: &serde_json::Value) -> String {
    let ids: Vec<String> = values.as_array().unwrap().iter().map(|v| v.as_i64().unwrap().to_string()).collect();
    ids.join(",")
}

#[test]
fn generate_json_reproduces_transformers_greedy_ids() {
    let g = golden("tiny-mixtral");
    let prompt = ids_arg(&g["prompt_ids"]);
    let model = fixture("tiny-mixtral");
    let out = tramontane(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &prompt,
        "--max-new-tokens",
        "32",
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(ids_arg(&v["generated_ids"]), ids_arg(&g["greedy_ids"]));
    assert!(v["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["prefill_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["text"].is_string());
}

#[test]
fn generate_streams_text_and_sampling_is_seeded() {
    let model = fixture("tiny-mistral");
    let run = |seed: &str| {
        let out = tramontane(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Hello world",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.8",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--repetition-penalty",
            "1.1",
            "--seed",
            seed,
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(stdout(&out).trim()).unwrap()
    };
    let (a, b, c) = (run("1"), run("1"), run("2"));
    assert_eq!(a["generated_ids"], b["generated_ids"], "same seed, same tokens");
    assert_ne!(a["generated_ids"], c["generated_ids"], "another seed, other tokens");
    // --prompt went through the tokenizer, with BOS.
    assert_eq!(a["prompt_ids"][0], 1);
    // Streaming mode prints the text itself.
    let out = tramontane(&["generate", "--model", model.to_str().unwrap(), "--chat", "Hello", "--max-new-tokens", "8"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("tokens/s decode"));
}

#[test]
fn eval_prints_the_transformers_loss() {
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let g = golden(name);
        let safetensors = std::fs::read(fixture("golden").join(format!("{name}.safetensors"))).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&safetensors).unwrap();
        let ids = tensors.tensor("input_ids").unwrap();
        let row: Vec<String> = ids
            .data()
            .chunks_exact(8)
            .take(40)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()).to_string())
            .collect();
        let out =
            tramontane(&["eval", "--model", fixture(name).to_str().unwrap(), "--prompt-ids", &row.join(","), "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        let loss = v["loss"].as_f64().unwrap();
        let want = g["loss_unmasked_per_sequence"][0].as_f64().unwrap();
        assert!((loss - want).abs() <= 1e-5, "{name}: eval loss {loss}, transformers {want}");
        assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
        assert_eq!(v["scored_tokens"].as_u64().unwrap(), 39);
    }
}

#[test]
fn inspect_reports_architecture_counts_and_layout() {
    let out = tramontane(&["inspect", fixture("tiny-mixtral-fused").to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["architecture"], "mixtral");
    assert!(v["expert_layout"].as_str().unwrap().starts_with("fused"));
    // Everything stored on disk is accounted for by the config-derived count.
    assert_eq!(v["parameters"]["total"], v["parameters_on_disk"]);
    let total = v["parameters"]["total"].as_u64().unwrap();
    let active = v["parameters"]["active_per_token"].as_u64().unwrap();
    // 2 of 4 experts (3 * 64 * 96 weights each, 2 layers) are idle for any token.
    assert_eq!(total - active, 2 * 2 * 3 * 64 * 96);
    assert_eq!(v["tokenizer"]["vocab_size"], 1000);
    let out = tramontane(&["inspect", fixture("tiny-mistral-bf16-sharded").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("3 file(s)") && text.contains("BF16") && text.contains("head_dim 24"), "{text}");
}

/// Runs `generate` on a broken copy of tiny-mistral and checks the error names `file` and `what`.
fn assert_clean_error(dir: &Path, file: &str, what: &str) {
    let out = tramontane(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hello", "--max-new-tokens", "2"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "expected failure for {what}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    assert!(err.contains(file) && err.contains(what), "error should name `{file}` and `{what}`: {err}");
}

#[test]
fn missing_or_malformed_config_is_a_clean_error() {
    let tmp = copy_model("tiny-mistral");
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    assert_clean_error(tmp.path(), "config.json", "No such file");
    std::fs::write(tmp.path().join("config.json"), "{\"model_type\": \"mistral\", ").unwrap();
    assert_clean_error(tmp.path(), "config.json", "invalid config");
}

#[test]
fn unsupported_model_type_is_a_clean_error() {
    let tmp = copy_model("tiny-mistral");
    let path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"mistral\"", "\"llama\"");
    std::fs::write(&path, text).unwrap();
    assert_clean_error(tmp.path(), "config.json", "unsupported model_type `llama`");
}

/// Rewrites the safetensors header of `file` in `dir` with `edit` applied to its JSON.
fn edit_header(dir: &Path, file: &str, edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(n.max(text.len()), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
}

#[test]
fn missing_tensor_is_a_clean_error() {
    let tmp = copy_model("tiny-mistral");
    edit_header(tmp.path(), "model.safetensors", |h| {
        let entry = h.remove("model.layers.1.mlp.up_proj.weight").unwrap();
        h.insert("model.layers.1.mlp.up_proj.renamed".into(), entry);
    });
    let dir = tmp.path().display().to_string();
    assert_clean_error(tmp.path(), &dir, "missing tensor `model.layers.1.mlp.up_proj.weight`");
}

#[test]
fn shape_mismatch_is_a_clean_error() {
    let tmp = copy_model("tiny-mistral");
    edit_header(tmp.path(), "model.safetensors", |h| {
        h.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap()["shape"] = serde_json::json!([32, 128]);
    });
    assert_clean_error(
        tmp.path(),
        "model.safetensors",
        "`model.layers.0.self_attn.q_proj.weight` has shape [32, 128], expected [64, 64]",
    );
}

#[test]
fn truncated_safetensors_is_a_clean_error() {
    let tmp = copy_model("tiny-mistral");
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(tmp.path(), "model.safetensors", "truncated safetensors file");
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert_clean_error(tmp.path(), "model.safetensors", "truncated safetensors file");
}

#[test]
fn tokenizer_that_does_not_fit_the_model_is_a_clean_error() {
    let tmp = copy_model("tiny-mistral");
    let path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"vocab_size\": 1000", "\"vocab_size\": 500");
    assert!(text.contains("\"vocab_size\": 500"), "fixture config format changed");
    std::fs::write(&path, text).unwrap();
    assert_clean_error(
        tmp.path(),
        "tokenizer.json",
        "tokenizer has 1000 tokens but the model's config.json has vocab_size 500",
    );
}

#[test]
fn stop_strings_cut_the_text_before_them() {
    let model = fixture("tiny-mistral");
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "Hello world"];
        args.extend(["--max-new-tokens", "24", "--temperature", "0", "--ignore-eos", "--json"]);
        args.extend(extra);
        let out = tramontane(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(stdout(&out).trim()).unwrap()
    };
    let full = run(&[]);
    let text = full["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 8, "need some text to cut: {text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = run(&["--stop", &stop]);
    assert_eq!(cut["stop_reason"], "stop_string");
    assert_eq!(cut["text"].as_str().unwrap(), &text[..text.find(&stop).unwrap()]);
    assert!(cut["generated_ids"].as_array().unwrap().len() < full["generated_ids"].as_array().unwrap().len());
}

#[test]
fn every_inference_command_takes_a_device() {
    for command in ["generate", "eval", "chat", "serve", "merge"] {
        let out = tramontane(&[command, "--help"]);
        assert!(out.status.success(), "{command} --help: {}", stderr(&out));
        // Words only: clap wraps the help to the terminal's width.
        let help = stdout(&out).split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(help.contains("--device <DEVICE>"), "{command} --help:\n{help}");
        assert!(help.contains("auto (") && help.contains("cpu, cuda or cuda:N"), "{command} --help:\n{help}");
        assert!(help.contains("[default: auto]"), "{command} --help:\n{help}");
    }
}

#[test]
fn an_unknown_or_unsupported_device_is_refused_before_loading() {
    // Not a device: clap refuses it with the accepted values.
    let model = fixture("tiny-mixtral");
    let out = tramontane(&["generate", "--model", model.to_str().unwrap(), "--prompt-ids", "1", "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "invalid value 'tpu' for '--device <DEVICE>': unknown device `tpu`: expected auto, cpu, cuda or cuda:N"
        ),
        "{}",
        stderr(&out)
    );
    // A CUDA device on this build: refused before the model is even looked at (the directory does not exist).
    for (command, device) in [("generate", "cuda"), ("eval", "cuda:1")] {
        let out = tramontane(&[command, "--model", "/nonexistent/model", "--prompt-ids", "1,2", "--device", device]);
        assert_eq!(out.status.code(), Some(1), "{command}: {}", stderr(&out));
        let expected = if device == "cuda" { "cuda:0" } else { device };
        assert!(
            stderr(&out)
                .contains(&format!("--device {expected}: this build has no CUDA support: build with --features cuda")),
            "{command}: {}",
            stderr(&out)
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("merged");
    let out = tramontane(&[
        "merge",
        "--model",
        "/nonexistent/model",
        "--adapter",
        "/nonexistent/adapter",
        "--out",
        out_dir.to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--device cuda:0: this build has no CUDA support"), "{}", stderr(&out));
    assert!(!out_dir.exists());
}
