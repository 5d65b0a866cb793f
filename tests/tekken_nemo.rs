//! The 131k-vocabulary tekken path end to end through the binary, on the bundled `tiny-nemo` (Nemo's shape:
//! 131072-token vocabulary, head_dim 128 != hidden/heads, a natively read `tekken.json` of format v3): `data`
//! detects v3 from the tekken file, `train` runs a few steps, `generate --chat` prompts in the training layout.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tramontane")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn recipe(tmp: &Path) -> PathBuf {
    let text = format!(
        r#"[model]
path = "{model}"
builtin = "tiny-nemo"
dtype = "f32"

[lora]
r = 4
alpha = 8.0
targets = ["q", "k", "v", "o"]

[data]
files = ["{data}"]
format = "chat"
prompt_format = "auto"
max_seq_len = 128

[train]
max_steps = 3
micro_batch_size = 2
learning_rate = 1e-3

[eval]
every_steps = 0

[output]
dir = "{run}"
"#,
        model = tmp.join("model").display(),
        data = repo("datasets/samples/pirate-chat.parquet").display(),
        run = tmp.join("run").display(),
    );
    let path = tmp.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn tiny_nemo_detects_v3_trains_and_generates_on_the_tekken_path() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = recipe(tmp.path());
    let out = Command::new(bin()).args(["data", recipe.to_str().unwrap(), "--json", "--limit", "1"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_format"], "v3", "auto picks tekken.json's config.version");
    assert!(v["tokenizer"].as_str().unwrap().ends_with("tekken.json"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("model/config.json")).unwrap()).unwrap();
    assert_eq!((config["vocab_size"].as_u64(), config["head_dim"].as_u64()), (Some(131072), Some(128)));

    let out = Command::new(bin()).args(["train", recipe.to_str().unwrap(), "--quiet"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(tmp.path().join("run/adapter/adapter_model.safetensors").exists());

    let model = tmp.path().join("model");
    let adapter = tmp.path().join("run/adapter");
    let out = Command::new(bin())
        .args(["generate", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()])
        .args(["--chat", "What color is the sky?", "--max-new-tokens", "4", "--temperature", "0", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The prompt is the training encoding of one user turn: <s> [INST] text [/INST] (ids 1, 3, ..., 4).
    let prompt: Vec<u64> = v["prompt_ids"].as_array().unwrap().iter().filter_map(|x| x.as_u64()).collect();
    assert_eq!((prompt[0], prompt[1], *prompt.last().unwrap()), (1, 3, 4), "{prompt:?}");
    // Random weights over 131072 ids: most picks lie past the 4000 ids the cut tokenizer uses (decoded as nothing).
    assert_eq!(v["generated_ids"].as_array().map(Vec::len), Some(4), "{v}");
}
