//! Through the binary: a recipe rule is checked once, before anything is loaded, so `tramontane data`
//! and `tramontane train` refuse the same recipe with the same message; and a resumed run's
//! `samples.jsonl` holds each evaluation once, like `metrics.jsonl`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tramontane")
}

fn quickstart() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml").display().to_string()
}

/// `tramontane <command> quickstart.toml` with the bundled model and the run under `tmp`.
fn args(command: &str, tmp: &Path, extra: &[String]) -> Vec<String> {
    let mut args = vec![command.to_string(), quickstart()];
    let sets =
        [format!("model.path={}", tmp.join("model").display()), format!("output.dir={}", tmp.join("run").display())];
    for set in sets.iter().chain(extra) {
        args.push("--set".into());
        args.push(set.clone());
    }
    args
}

fn run(args: &[String]) -> Output {
    Command::new(bin()).args(args).output().expect("binary runs")
}

#[test]
fn data_and_train_refuse_an_unsupported_block_size_alike_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = ["quantization.block_size=128".to_string()];
    let mut errors = Vec::new();
    for command in ["data", "train"] {
        let out = run(&args(command, tmp.path(), &bad));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "tramontane {command}: {err}");
        assert!(
            err.contains(
                "--set quantization.block_size=128: `quantization.block_size`: must be 64, bitsandbytes' NF4 block \
                 and the only size supported (got 128)"
            ),
            "tramontane {command}: {err}"
        );
        errors.push(err);
    }
    assert_eq!(errors[0], errors[1], "data and train report the same error");
    // Refused before anything was loaded: the bundled model was never even generated.
    assert!(!tmp.path().join("model").exists());
}

#[test]
fn a_cuda_device_is_refused_by_data_and_train_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    // The quickstart recipe with `device = "cuda"` in its [model] section, written beside the original so its
    // relative paths still resolve.
    let text = std::fs::read_to_string(quickstart()).unwrap();
    assert!(text.contains("dtype = \"f32\"\n"));
    let recipe = tmp.path().join("cuda.toml");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/samples/pirate-chat.parquet");
    std::fs::write(&recipe, text.replacen("dtype = \"f32\"\n", "dtype = \"f32\"\ndevice = \"cuda\"\n", 1)).unwrap();
    let line = text.lines().position(|l| l == "dtype = \"f32\"").unwrap() + 2;
    for command in ["data", "train"] {
        let args: Vec<String> = vec![
            command.into(),
            recipe.display().to_string(),
            "--set".into(),
            format!("model.path={}", tmp.path().join("model").display()),
            "--set".into(),
            format!("data.files={}", data.display()),
            "--set".into(),
            format!("output.dir={}", tmp.path().join("run").display()),
        ];
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "tramontane {command}: {err}");
        assert!(
            err.contains(&format!(
                "cuda.toml:{line}: `model.device`: this build has no CUDA support: build with --features cuda"
            )),
            "tramontane {command}: {err}"
        );
    }
    assert!(!tmp.path().join("model").exists(), "refused before the bundled model was generated");
}

fn sample_steps(run_dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(run_dir.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

/// The names in the run's checkpoints directory, sorted.
fn checkpoint_names(run_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_resumed_run_writes_each_evaluations_samples_once() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let schedule: Vec<String> = [
        "train.max_steps=24",
        "output.save_every_steps=8",
        "eval.every_steps=4",
        "eval.max_batches=1",
        "eval.max_new_tokens=4",
        "logging.every_steps=1",
        "output.keep_last=100",
    ]
    .map(String::from)
    .to_vec();
    let mut train = args("train", tmp.path(), &schedule);
    // Whenever the kill below lands, no checkpoint after step 8 can have been written: a file where
    // the step-16 checkpoint's temporary directory goes makes that save fail (the run then stops with
    // an error, right after evaluating step 16). So a slow kill cannot change what this test sees.
    let blocker = run_dir.join("checkpoints").join("step-00000016.tmp");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, "not a directory").unwrap();
    // Killed (no chance to save anything) once the evaluation of step 12, written after the
    // checkpoint of step 8, is in samples.jsonl.
    let mut child = Command::new(bin())
        .args(train.iter().chain(&["--json".to_string()]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut seen = false;
    for line in BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["event"] == "eval" && v["step"] == 12 {
            seen = true;
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(seen, "the run ended before evaluating step 12");
    assert_eq!(checkpoint_names(&run_dir), ["step-00000008", "step-00000016.tmp"], "only step 8 is checkpointed");
    // Evaluations past the last checkpoint are recorded: step 12, and step 16 if the run got there
    // before the kill.
    let before = sample_steps(&run_dir);
    assert!(before == [0, 4, 8, 12] || before == [0, 4, 8, 12, 16], "{before:?}");

    std::fs::remove_file(&blocker).unwrap();
    train.push("--resume".into());
    let out = run(&train);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Step 12 is evaluated again by the resumed run, and recorded once.
    assert_eq!(sample_steps(&run_dir), vec![0, 4, 8, 12, 16, 20, 24]);
}
