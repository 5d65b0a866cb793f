//! The memory check before loading: under a real address-space limit (`ulimit -v`, RLIMIT_AS), a model that does
//! not fit makes `generate`, `eval`, `chat`, `serve` and `merge` exit with a message naming what is needed, what is
//! available and the flag that would fit; never Rust's `memory allocation of N bytes failed` abort. The flag it
//! suggests does fit under the same limit. `serve` sizes the context so that `--max-batch-size` sequences fit.
//!
//! The model is tiny in files but not in memory: a Mistral of ~119M parameters whose safetensors data is a sparse
//! file of zeros (no disk blocks), declared float32 and stored in bf16. In f32 it needs ~0.5 GiB, in bf16 ~0.3 GiB,
//! with NF4 decoder weights ~0.2 GiB; the binary itself starts in ~30 MiB of address space, measured first.
// Linux only: it reads /proc and limits the binary with `ulimit -v`.
#![cfg(target_os = "linux")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MIB: u64 = 1 << 20;

/// Hidden size, MLP width, layers and vocabulary (the fixtures' tokenizer has 1000 tokens).
const HIDDEN: usize = 1024;
const INTERMEDIATE: usize = 8192;
const LAYERS: usize = 4;
const VOCAB: usize = 1000;

/// Worker threads of the binaries run here: the estimate reserves stack and scratch per thread, so the limits
/// below hold on any machine.
const THREADS: &str = "2";

fn fixtures(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// Writes a safetensors file whose data is zeros without writing them (the file is extended, not filled).
fn write_sparse_safetensors(path: &Path, tensors: &[(String, Vec<usize>)], dtype: &str, elem: usize) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * elem;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.set_len((8 + text.len() + offset) as u64).unwrap();
}

/// The model directory described in the module documentation.
fn big_sparse_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": null, "tie_word_embeddings": false,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures("models").join(f), dir.join(f)).unwrap();
    }
    let (h, i) = (HIDDEN, INTERMEDIATE);
    let mut tensors = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, h])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((format!("{p}.{n}.weight"), vec![h]));
        }
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            tensors.push((format!("{p}.self_attn.{n}.weight"), vec![h, h]));
        }
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    tensors.push(("model.norm.weight".into(), vec![h]));
    tensors.push(("lm_head.weight".into(), vec![VOCAB, h]));
    write_sparse_safetensors(&dir.join("model.safetensors"), &tensors, "BF16", 2);
}

/// A rank-1 PEFT adapter on layer 0's q_proj of that model.
fn adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({"peft_type": "LORA", "r": 1, "lora_alpha": 1.0, "target_modules": ["q_proj"],
        "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": false, "layers_to_transform": [0]});
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let p = "base_model.model.model.layers.0.self_attn.q_proj";
    let tensors = [(format!("{p}.lora_A.weight"), vec![1, HIDDEN]), (format!("{p}.lora_B.weight"), vec![HIDDEN, 1])];
    write_sparse_safetensors(&dir.join("adapter_model.safetensors"), &tensors, "F32", 4);
}

/// This binary's virtual size when the memory check runs, measured: `tramontane chat` on a small fixture,
/// waiting on stdin.
fn startup_vm_size() -> u64 {
    let model = fixtures("models/tiny-mistral");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tramontane"))
        .args(["chat", "--model", model.to_str().unwrap()])
        .env("RAYON_NUM_THREADS", THREADS)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The greeting on stderr says the model is loaded.
    let mut err = child.stderr.take().unwrap();
    let mut byte = [0u8; 1];
    while std::io::Read::read(&mut err, &mut byte).unwrap() == 1 && byte[0] != b'\n' {}
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    drop(child.stdin.take());
    child.wait().unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize in /proc/PID/status");
    kb * 1024
}

/// Runs the binary with `args` (and `stdin`) under an address-space limit of `limit` bytes.
fn under_limit(limit: u64, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {}; exec \"$0\" \"$@\"", limit / 1024))
        .arg(env!("CARGO_BIN_EXE_tramontane"))
        .args(args)
        .env("RAYON_NUM_THREADS", THREADS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The refusal every command must give: status 1, needed and available, the suggestion, no abort.
fn assert_refused(o: &Output, suggestion: &str, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    assert!(err.contains("needed") && err.contains("available"), "{what}: {err}");
    assert!(err.contains("ulimit -v"), "{what}: the message names the limit: {err}");
    assert!(err.contains(suggestion), "{what}: expected `{suggestion}`: {err}");
    assert!(!err.contains("memory allocation"), "{what}: {err}");
}

struct Setup {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    adapter: PathBuf,
    out: PathBuf,
    startup: u64,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    big_sparse_model(&model);
    let adapter_dir = tmp.path().join("adapter");
    adapter(&adapter_dir);
    let out = tmp.path().join("merged");
    Setup { model, adapter: adapter_dir, out, startup: startup_vm_size(), _tmp: tmp }
}

/// Each command's arguments on the model.
fn commands(s: &Setup) -> Vec<(&'static str, Vec<String>)> {
    let model = s.model.display().to_string();
    let adapter = s.adapter.display().to_string();
    let m = |rest: &[&str]| -> Vec<String> { rest.iter().map(|x| x.replace("MODEL", &model)).collect() };
    vec![
        ("generate", m(&["generate", "--model", "MODEL", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"])),
        ("eval", m(&["eval", "--model", "MODEL", "--prompt-ids", "1,2,3,4"])),
        ("chat", m(&["chat", "--model", "MODEL"])),
        ("serve", m(&["serve", "--model", "MODEL", "--port", "0", "--max-batch-size", "1"])),
        ("generate with an adapter", {
            let mut a = m(&["generate", "--model", "MODEL", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]);
            a.extend(["--adapter".into(), adapter]);
            a
        }),
    ]
}

#[test]
fn loading_in_f32_is_refused_with_bf16_suggested_and_bf16_then_runs() {
    let s = setup();
    // f32 needs ~0.49 GiB (chat and serve, for 512 tokens of context, ~0.58), bf16 ~0.29 (~0.39).
    let limit = s.startup + 450 * MIB;
    for (what, args) in commands(&s) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = under_limit(limit, &args, "");
        assert_refused(&o, "pass --dtype bf16", what);
    }
    // What it suggests fits under the same limit.
    let model = s.model.to_str().unwrap();
    let o = under_limit(
        limit,
        &["generate", "--model", model, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--dtype", "bf16", "--json"],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = under_limit(limit, &["chat", "--model", model, "--dtype", "bf16", "--max-new-tokens", "2"], "hello\n");
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn when_bf16_does_not_fit_nf4_is_suggested_and_then_runs() {
    let s = setup();
    // bf16 needs ~0.29 GiB, NF4 (f32 elsewhere) ~0.2.
    let limit = s.startup + 240 * MIB;
    let model = s.model.to_str().unwrap();
    for (what, args) in commands(&s).into_iter().take(2) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&under_limit(limit, &args, ""), "pass --quantize nf4", what);
    }
    let o = under_limit(
        limit,
        &["generate", "--model", model, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--quantize", "nf4"],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // --keep-unquantized reaches the loader's plan: keeping every linear dense is f32 again, which does not fit.
    let o = under_limit(
        limit,
        &[
            "generate",
            "--model",
            model,
            "--prompt-ids",
            "1,2,3",
            "--max-new-tokens",
            "2",
            "--quantize",
            "nf4",
            "--keep-unquantized",
            "all",
        ],
        "",
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("with NF4 decoder weights") && err.contains("needed"), "{err}");
}

/// Starts `serve` with `args` under `limit`, stops it once it listens (or lets it exit), and returns its stderr.
fn serve_stderr(limit: u64, args: &[&str]) -> String {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {}; exec \"$0\" \"$@\"", limit / 1024))
        .arg(env!("CARGO_BIN_EXE_tramontane"))
        .arg("serve")
        .args(args)
        .env("RAYON_NUM_THREADS", THREADS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first line on stdout is the address, once it listens; none comes when it fails.
    let mut out = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while std::io::Read::read(&mut out, &mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {}
    let _ = child.kill();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned()
}

#[test]
fn serve_sizes_the_context_so_that_max_batch_size_sequences_fit() {
    let s = setup();
    // The model allows 8192 tokens (the weights do not depend on it): memory limits the context, not the model.
    let config_path = s.model.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["max_position_embeddings"] = 8192.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let model = s.model.to_str().unwrap();
    // bf16 weights take ~0.29 GiB; each sequence's KV cache 32 KiB per token (f32), so the default 64 sequences
    // need 1 GiB even at the least context (512 tokens): refused, with a batch size that fits.
    let limit = s.startup + 600 * MIB;
    let o = under_limit(limit, &["serve", "--model", model, "--port", "0", "--dtype", "bf16"], "");
    assert_refused(&o, "pass --max-batch-size", "serve with 64 sequences");
    assert!(stderr(&o).contains("in each of 64 sequences at once"), "{}", stderr(&o));
    // With fewer sequences it starts, with as much context per sequence as they leave: less for more of them.
    let context = |batch: &str| -> (usize, String) {
        let err = serve_stderr(limit, &["--model", model, "--port", "0", "--dtype", "bf16", "--max-batch-size", batch]);
        assert!(err.contains("memory, not the model, limits the context to"), "{batch}: {err}");
        let tokens = err.split("limits the context to ").nth(1).and_then(|r| r.split(' ').next());
        (tokens.and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{batch}: {err}")), err)
    };
    let ((one, _), (four, err)) = (context("1"), context("4"));
    assert!((512..one).contains(&four) && one < 8192, "1 sequence: {one} tokens, 4 sequences: {four}");
    assert!(err.contains("tokens per sequence, for 4 sequences at once (--max-batch-size 4)"), "{err}");
}

#[test]
fn a_model_that_fits_nowhere_says_so() {
    let s = setup();
    // Even NF4 with bf16 elsewhere needs ~0.2 GiB.
    let limit = s.startup + 100 * MIB;
    for (what, args) in commands(&s) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&under_limit(limit, &args, ""), "does not fit this machine", what);
    }
}

#[test]
fn merge_is_refused_with_a_shard_size_that_fits_and_then_runs() {
    let s = setup();
    let limit = s.startup + 450 * MIB;
    let (model, adapter, out) = (s.model.to_str().unwrap(), s.adapter.to_str().unwrap(), s.out.to_str().unwrap());
    // The f32 output (~0.45 GiB) in one 5 GB shard, plus one tensor's buffers: ~0.64 GiB.
    let o = under_limit(limit, &["merge", "--model", model, "--adapter", adapter, "--out", out], "");
    assert_refused(&o, "with --max-shard-size", "merge");
    assert!(!s.out.exists());
    let o = under_limit(
        limit,
        &["merge", "--model", model, "--adapter", adapter, "--out", out, "--max-shard-size", "100MB"],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(s.out.join("model.safetensors.index.json").exists());
}

#[test]
fn without_the_check_running_out_of_memory_is_an_error_not_an_abort() {
    let s = setup();
    let limit = s.startup + 240 * MIB;
    let model = s.model.to_str().unwrap();
    let o = under_limit(
        limit,
        &["generate", "--model", model, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--no-memory-check"],
        "",
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("out of memory") && err.contains("--dtype bf16"), "{err}");
    assert!(!err.contains("memory allocation"), "{err}");
}

#[test]
fn training_out_of_memory_is_an_error_not_an_abort() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml");
    let (model, run) = (tmp.path().join("model"), tmp.path().join("run"));
    // The quickstart needs ~100 MiB of address space here; 30 MiB over the binary's start is not enough.
    let limit = startup_vm_size() + 30 * MIB;
    let o = under_limit(
        limit,
        &[
            "train",
            recipe.to_str().unwrap(),
            "--set",
            &format!("model.path={}", model.display()),
            "--set",
            &format!("output.dir={}", run.display()),
            "--set",
            "train.max_steps=2",
            "--quiet",
        ],
        "",
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("out of memory") && err.contains("micro_batch_size"), "{err}");
    assert!(!err.contains("memory allocation") && !err.contains("panicked"), "{err}");
}
