//! `tramontane eval --data`: dataset loss/perplexity with the trainer's masking, and `--generate` scoring on the
//! quickstart's held-out prompts, base and adapter side by side.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tramontane")
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path).display().to_string()
}

#[test]
fn eval_generate_on_held_out_quickstart_data_shows_the_fine_tune_beating_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model").display().to_string();
    let run = tmp.path().join("run");
    let mut args = vec!["train".to_string(), repo("recipes/quickstart.toml")];
    for set in [
        format!("model.path={model}"),
        format!("output.dir={}", run.display()),
        "train.max_steps=80".to_string(),
        "eval.every_steps=0".to_string(),
    ] {
        args.extend(["--set".to_string(), set]);
    }
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let adapter = run.join("adapter").display().to_string();
    // The recipe's split: eval_fraction 0.1 with train.seed 0.
    let data = repo("datasets/samples/pirate-chat.parquet");
    let base_args = ["eval", "--model", &model, "--adapter", &adapter, "--data", &data, "--held-out", "0.1"];
    let out = Command::new(bin()).args(base_args).args(["--generate", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["examples"], 40, "{report}");
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let (base, tuned) = (&results[0], &results[1]);
    assert_eq!(base["model"], "base");
    assert_eq!(tuned["model"], adapter.as_str());
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {v}"));
    assert!(f(tuned, "loss") < f(base, "loss"), "{report}");
    assert!(f(tuned, "perplexity") < f(base, "perplexity"), "{report}");
    assert!(f(tuned, "token_f1") > f(base, "token_f1") + 0.3, "{report}");
    assert!(f(tuned, "contains") >= f(base, "contains"), "{report}");
    assert!(f(tuned, "exact_match") >= f(base, "exact_match"), "{report}");
    for k in ["exact_match", "contains", "token_f1"] {
        assert!((0.0..=1.0).contains(&f(tuned, k)), "{k} out of range: {report}");
    }
    assert!(!tuned["samples"].as_array().unwrap().is_empty());

    // Loss-only mode prints the side-by-side table.
    let out = Command::new(bin()).args(base_args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("perplexity") && table.contains("base") && table.contains("(40 examples)"), "{table}");

    // Errors are reported, not panics.
    let out = Command::new(bin()).args(["eval", "--model", &model, "--data", "/nonexistent.jsonl"]).output().unwrap();
    assert!(!out.status.success());
    let out =
        Command::new(bin()).args(["eval", "--model", &model, "--data", &data, "--format", "bogus"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--format"));
}
