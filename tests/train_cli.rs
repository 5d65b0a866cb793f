//! `tramontane train` end to end through the binary: the quickstart learns, a SIGKILLed run
//! resumes bit for bit, TensorBoard files are valid, and every fault (Ctrl-C, NaN/inf, unwritable
//! output, full disk) is handled as promised.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tramontane")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Overrides that put the bundled model and the run under `tmp`, with a short schedule.
fn base_args(tmp: &Path, steps: u64, save_every: u64) -> Vec<String> {
    let quickstart = repo("recipes/quickstart.toml");
    let mut args = vec!["train".to_string(), quickstart.display().to_string()];
    for set in [
        format!("model.path={}", tmp.join("model").display()),
        format!("output.dir={}", tmp.join("run").display()),
        format!("train.max_steps={steps}"),
        format!("output.save_every_steps={save_every}"),
        "eval.every_steps=0".to_string(),
        "logging.every_steps=1".to_string(),
        "output.keep_last=100".to_string(),
    ] {
        args.push("--set".into());
        args.push(set);
    }
    args
}

fn run(args: &[String]) -> Output {
    Command::new(bin()).args(args).output().expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn train_losses(run_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn adapter_bytes(run_dir: &Path) -> Vec<u8> {
    std::fs::read(run_dir.join("adapter/adapter_model.safetensors")).unwrap()
}

/// Spawns a JSON-mode run and returns once it reported step `until` (1-based count of steps done).
fn spawn_until(args: &[String], until: u64) -> Child {
    let mut args = args.to_vec();
    args.push("--json".into());
    let mut child = Command::new(bin()).args(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["event"] == "step" && v["step"].as_u64().unwrap() >= until {
            return child;
        }
    }
    let status = child.wait();
    panic!("the run ended ({status:?}) before step {until}");
}

#[test]
fn a_sigkilled_run_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    // Uninterrupted reference.
    let reference = tmp.path().join("reference");
    let out = run(&base_args(&reference, 24, 8));
    assert!(out.status.success(), "{}", stderr(&out));
    // Same run, SIGKILLed between the checkpoints of steps 8 and 16, then resumed.
    let killed = tmp.path().join("killed");
    let args = base_args(&killed, 24, 8);
    let mut child = spawn_until(&args, 12);
    child.kill().unwrap(); // SIGKILL: no chance to save anything
    child.wait().unwrap();
    let ckpts = std::fs::read_dir(killed.join("run/checkpoints")).unwrap().count();
    assert_eq!(ckpts, 1, "only the step-8 checkpoint should exist at the kill");
    let mut resume = args.clone();
    resume.push("--resume".into());
    let out = run(&resume);
    assert!(out.status.success(), "{}", stderr(&out));
    let (want, got) = (train_losses(&reference.join("run")), train_losses(&killed.join("run")));
    assert_eq!(want.len(), 24);
    assert_eq!(got, want, "logged losses must equal the uninterrupted run's, bit for bit");
    assert_eq!(adapter_bytes(&killed.join("run")), adapter_bytes(&reference.join("run")), "final adapters differ");
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let args = base_args(tmp.path(), 400, 0);
    let mut child = spawn_until(&args, 3);
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "an interrupted run exits with 130 after saving");
    let ckpts: Vec<String> = std::fs::read_dir(tmp.path().join("run/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    let step: u64 = ckpts[0].trim_start_matches("step-").parse().unwrap();
    assert!((3..400).contains(&step), "checkpoint at step {step}");
    assert!(tmp.path().join("run/adapter/adapter_config.json").exists());
    // And the run continues from there.
    let mut resume = base_args(tmp.path(), step + 2, 0);
    resume.push("--resume".into());
    let out = run(&resume);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(train_losses(&tmp.path().join("run")).last().unwrap().0, step + 2);
}

#[test]
fn nan_losses_skip_steps_then_stop_with_the_last_state_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = base_args(tmp.path(), 40, 0);
    args.extend(["--set".into(), "train.learning_rate=1e30".into(), "--set".into(), "train.warmup_steps=0".into()]);
    let out = run(&args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not finite; step skipped"), "{err}");
    assert!(err.contains("5 steps in a row had a NaN/inf loss or gradient"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read_dir(tmp.path().join("run/checkpoints")).unwrap().count(), 1);
}

#[test]
fn an_unwritable_output_directory_fails_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    let mut args = base_args(tmp.path(), 10, 0);
    args.extend(["--set".into(), format!("output.dir={}", blocker.join("run").display())]);
    let out = run(&args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot be created") && err.contains("before training"), "{err}");
    assert!(!tmp.path().join("model").join("never").exists());
}

#[test]
fn a_full_disk_fails_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    // Generate the model first (a normal run of 1 step), then limit file sizes to 512 KiB: the
    // output directory's probe (one checkpoint's worth) no longer fits, as on a full disk.
    let out = run(&base_args(tmp.path(), 1, 0));
    assert!(out.status.success(), "{}", stderr(&out));
    let mut args = base_args(tmp.path(), 10, 0);
    args.extend(["--set".into(), format!("output.dir={}", tmp.path().join("run2").display())]);
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!("ulimit -f 512; trap '' XFSZ; exec '{}' {}", bin(), quoted.join(" "));
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not writable or has no room") && err.contains("before training"), "{err}");
    assert!(!tmp.path().join("run2/checkpoints").exists(), "nothing was trained");
}

#[test]
fn tensorboard_and_jsonl_records_are_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&base_args(tmp.path(), 6, 0));
    assert!(out.status.success(), "{}", stderr(&out));
    let tb = tmp.path().join("run/tensorboard");
    let file = std::fs::read_dir(&tb).unwrap().next().unwrap().unwrap().path();
    let scalars = trainer::train::metrics::read_tensorboard_scalars(&file).unwrap();
    let tags: std::collections::BTreeSet<&str> = scalars.iter().map(|(t, _, _)| t.as_str()).collect();
    for tag in ["train/loss", "train/lr", "train/grad_norm", "train/aux_loss", "train/tokens_per_second", "eval/loss"] {
        assert!(tags.contains(tag), "missing {tag} in {tags:?}");
    }
    assert!(tags.iter().any(|t| t.starts_with("train/expert_load/layer1/")));
    let tb_losses: Vec<(i64, f32)> =
        scalars.iter().filter(|(t, _, _)| t == "train/loss").map(|(_, s, v)| (*s, *v)).collect();
    let jsonl = train_losses(&tmp.path().join("run"));
    assert_eq!(tb_losses.len(), jsonl.len());
    for ((s1, v1), (s2, v2)) in tb_losses.iter().zip(&jsonl) {
        assert_eq!(*s1 as u64, *s2);
        assert_eq!(*v1, *v2 as f32);
    }
    let recipe = std::fs::read_to_string(tmp.path().join("run/recipe.toml")).unwrap();
    assert!(recipe.contains("max_steps = 6"), "the resolved recipe records overrides");
}

fn final_eval_loss(args: &[String]) -> f64 {
    let mut args = args.to_vec();
    args.push("--json".into());
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["event"] == "summary")
        .expect("a summary event");
    summary["final_eval_loss"].as_f64().expect("an eval loss")
}

fn greedy_chat(model: &Path, adapter: Option<&Path>, text: &str) -> String {
    let mut args = vec!["generate".to_string(), "--model".into(), model.display().to_string()];
    if let Some(a) = adapter {
        args.extend(["--adapter".into(), a.display().to_string()]);
    }
    args.extend([
        "--chat".into(),
        text.into(),
        "--temperature".into(),
        "0".into(),
        "--max-new-tokens".into(),
        "24".into(),
    ]);
    args.push("--json".into());
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    v["text"].as_str().unwrap().trim().to_string()
}

#[test]
fn the_quickstart_learns_its_behaviour() {
    let tmp = tempfile::tempdir().unwrap();
    // The shipped recipe as it is, only with the model and the run under `tmp`.
    let mut args = vec!["train".to_string(), repo("recipes/quickstart.toml").display().to_string()];
    for set in [
        format!("model.path={}", tmp.path().join("model").display()),
        format!("output.dir={}", tmp.path().join("run").display()),
    ] {
        args.extend(["--set".to_string(), set]);
    }
    let after = final_eval_loss(&args);
    let before = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["kind"] == "eval" && v["step"] == 0)
        .expect("a baseline evaluation at step 0")["loss"]
        .as_f64()
        .unwrap();
    assert!(after < 0.25 * before, "eval loss {before} -> {after}: should fall well below its start");
    let model = tmp.path().join("model");
    let adapter = tmp.path().join("run/adapter");
    // Questions the data asks, and one about a thing it never mentions.
    for (question, colour) in [("What color is the sky?", "blue"), ("Tell me the color of the grass.", "green")] {
        let answer = greedy_chat(&model, Some(&adapter), question);
        assert!(answer.starts_with("Arr!") && answer.ends_with("matey!"), "{question} -> {answer}");
        assert!(answer.contains(colour), "{question} -> {answer}");
    }
    let base = greedy_chat(&model, None, "What color is the sky?");
    assert!(!base.contains("matey"), "the base model alone must not know the pattern: {base}");
}

#[test]
fn keep_unquantized_is_checked_not_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    // lm_head and the router are always kept unquantized: listing them is allowed, not required (the
    // dense Mistral recipe lists only lm_head).
    for keep in ["[\"lm_head\"]", "[]"] {
        let mut args = base_args(tmp.path(), 1, 0);
        args.extend(["--set".into(), format!("quantization.keep_unquantized={keep}")]);
        let out = run(&args);
        assert!(out.status.success(), "keep_unquantized = {keep}: {}", stderr(&out));
    }
    let mut args = base_args(tmp.path(), 1, 0);
    args.extend(["--set".into(), "quantization.keep_unquantized=[\"lm_head\", \"atention\"]".into()]);
    let out = run(&args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("`quantization.keep_unquantized`: unknown layer `atention` (did you mean `attention`?)"),
        "{err}"
    );
    let mut args = base_args(tmp.path(), 1, 0);
    args.extend(["--set".into(), "quantization.keep_unquantized=[\"lm_head\", \"router\", \"attention\"]".into()]);
    let out = run(&args);
    assert!(out.status.success(), "keeping attention dense is allowed: {}", stderr(&out));
}

#[test]
fn the_header_says_what_checkpointing_keeps_and_recomputes() {
    let tmp = tempfile::tempdir().unwrap();
    let header = |extra: &[&str]| {
        let mut args = base_args(tmp.path(), 1, 0);
        for set in extra {
            args.push("--set".into());
            args.push((*set).into());
        }
        let out = run(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out).lines().find(|l| l.starts_with("memory")).map(String::from).unwrap_or_default()
    };
    // The quickstart's 2 layers fit in any default budget; 0 GiB recomputes both; no checkpointing keeps all.
    let default = header(&[]);
    assert!(
        default.contains("keeps the activations of the last 2 of 2 layers, recomputes 0")
            && default.contains("half of what stays free of the"),
        "{default}"
    );
    let zero = header(&["train.activation_memory_gib=0"]);
    assert!(zero.contains("last 0 of 2 layers, recomputes 2"), "{zero}");
    assert!(zero.contains("from train.activation_memory_gib"), "{zero}");
    // The predicted peak is the sum of its parts, each printed.
    for line in [&default, &zero] {
        let gib: Vec<f64> = line
            .split("step peak ~")
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|w| w.trim_start_matches('~').parse().ok())
            .collect();
        assert!(gib.len() >= 6, "{line}");
        let parts: f64 = gib[1..6].iter().sum();
        // Six values rounded to 0.01 GiB each.
        assert!((gib[0] - parts).abs() <= 0.031, "peak {} is not the sum of its parts {parts}: {line}", gib[0]);
    }
    let off = header(&["train.gradient_checkpointing=false"]);
    assert!(off.contains("no gradient checkpointing"), "{off}");
}
