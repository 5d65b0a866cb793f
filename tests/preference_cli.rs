//! Preference tuning end to end through the binary: the DPO quickstart raises rewards/accuracies above 0.9,
//! the adapter then answers in the chosen (pirate) style rather than the rejected (plain) one, and bad pairs
//! are errors naming the file, the row and the column.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tramontane")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run(args: &[String]) -> Output {
    Command::new(bin()).args(args).output().expect("binary runs")
}

fn train_args(tmp: &Path, steps: u64, extra: &[String]) -> Vec<String> {
    let mut args =
        vec!["train".to_string(), repo("recipes/quickstart-dpo.toml").display().to_string(), "--quiet".into()];
    let sets = [
        format!("model.path={}", tmp.join("model").display()),
        format!("output.dir={}", tmp.join("run").display()),
        format!("train.max_steps={steps}"),
        "eval.every_steps=0".to_string(),
        "eval.prompts=[]".to_string(),
        "logging.every_steps=1".to_string(),
        "logging.tensorboard=false".to_string(),
    ];
    for set in sets.iter().chain(extra) {
        args.push("--set".into());
        args.push(set.clone());
    }
    args
}

#[test]
fn dpo_quickstart_prefers_the_chosen_style() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&train_args(tmp.path(), 40, &[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    let last_train: serde_json::Value = metrics
        .lines()
        .rev()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["kind"] == "train")
        .unwrap();
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"] {
        assert!(last_train[key].is_number(), "metrics.jsonl lacks {key}: {last_train}");
    }
    assert!(last_train["rewards/accuracies"].as_f64().unwrap() > 0.9, "{last_train}");
    let gen = run(&[
        "generate".into(),
        "--model".into(),
        tmp.path().join("model").display().to_string(),
        "--adapter".into(),
        tmp.path().join("run/adapter").display().to_string(),
        "--quantize".into(),
        "nf4".into(),
        "--chat".into(),
        "What color is the sky?".into(),
        "--temperature".into(),
        "0".into(),
        "--max-new-tokens".into(),
        "4".into(),
    ]);
    let text = String::from_utf8_lossy(&gen.stdout).to_string();
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    // Chosen answers open with "Arr!", rejected ones with "The".
    assert!(text.trim_start().starts_with('A') && !text.trim_start().starts_with("The"), "generated `{text}`");
}

#[test]
fn identical_chosen_and_rejected_is_an_error_naming_the_row_or_a_counted_skip() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Hi?\", \"chosen\": \"Arr!\", \"rejected\": \"Hello.\"}\n\
         {\"prompt\": \"Sky?\", \"chosen\": \"Blue.\", \"rejected\": \"Blue.\"}\n\
         {\"prompt\": \"Sea?\", \"chosen\": null, \"rejected\": \"Wet.\"}\n\
         {\"prompt\": \"Sun?\", \"chosen\": \"\", \"rejected\": \"Hot.\"}\n",
    )
    .unwrap();
    let files = format!("data.files=[\"{}\"]", data.display());
    let out = run(&train_args(tmp.path(), 1, &[files.clone(), "data.eval_fraction=0".into()]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("pairs.jsonl line 2") && err.contains("identical"), "{err}");
    let out = run(&train_args(tmp.path(), 1, &[files, "data.eval_fraction=0".into(), "data.on_invalid=skip".into()]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
