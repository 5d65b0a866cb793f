//! What a person or a script sees of a run through the binary: step numbers that agree between
//! `--json`, metrics.jsonl and the log, progress lines at `logging.every_steps` with an ETA when
//! stderr is not a terminal, micro-batch events, and `inspect` text without Rust debug output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tramontane")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A short quickstart run under `tmp` with extra `--set` overrides.
fn train(tmp: &Path, sets: &[&str], json: bool) -> Output {
    let mut args = vec!["train".to_string(), repo("recipes/quickstart.toml").display().to_string()];
    let mut all = vec![
        format!("model.path={}", tmp.join("model").display()),
        format!("output.dir={}", tmp.join("run").display()),
        "output.save_every_steps=0".to_string(),
        "eval.prompts=[]".to_string(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    for set in all {
        args.extend(["--set".to_string(), set]);
    }
    if json {
        args.push("--json".into());
    }
    let out = Command::new(bin()).args(&args).output().expect("the binary runs");
    assert!(out.status.success(), "{}", stderr(&out));
    out
}

fn json_events(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// `(kind, step)` of each metrics.jsonl row.
fn metric_steps(run_dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["kind"].as_str().unwrap_or("").to_string(), v["step"].as_u64().unwrap()))
        .collect()
}

#[test]
fn json_steps_and_metrics_rows_count_steps_done_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(
        tmp.path(),
        &["train.max_steps=3", "logging.every_steps=1", "eval.every_steps=2", "train.grad_accum_steps=1"],
        true,
    );
    let events = json_events(&out);
    let of = |kind: &str| -> Vec<u64> {
        events.iter().filter(|v| v["event"] == kind).map(|v| v["step"].as_u64().unwrap()).collect()
    };
    let metrics = metric_steps(&tmp.path().join("run"));
    let rows = |kind: &str| -> Vec<u64> { metrics.iter().filter(|(k, _)| k == kind).map(|(_, s)| *s).collect() };
    assert_eq!(of("step"), [1, 2, 3], "the first step done is step 1");
    assert_eq!(rows("train"), of("step"), "metrics.jsonl and --json agree");
    // The baseline (0 steps done), the periodic one after step 2, the final one after step 3.
    assert_eq!(of("eval"), [0, 2, 3]);
    assert_eq!(rows("eval"), of("eval"));
    let summary = events.iter().find(|v| v["event"] == "summary").expect("a summary");
    assert_eq!(summary["steps"], 3);
}

#[test]
fn json_reports_each_micro_batch_of_a_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(tmp.path(), &["train.max_steps=2", "train.grad_accum_steps=2", "eval.every_steps=0"], true);
    let seen: Vec<String> = json_events(&out)
        .iter()
        .filter_map(|v| match v["event"].as_str() {
            Some("micro_batch") => Some(format!("mb {} {}/{}", v["step"], v["micro_batch"], v["of"])),
            Some("step") => Some(format!("step {}", v["step"])),
            _ => None,
        })
        .collect();
    assert_eq!(seen, ["mb 1 1/2", "mb 1 2/2", "step 1", "mb 2 1/2", "mb 2 2/2", "step 2"]);
}

#[test]
fn a_log_gets_progress_lines_at_logging_every_steps_with_an_eta() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(tmp.path(), &["train.max_steps=4", "logging.every_steps=2", "eval.every_steps=0"], false);
    let err = stderr(&out);
    // stderr is a pipe here, so no bar: lines.
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("step ")).collect();
    let steps: Vec<&str> = lines.iter().map(|l| l.split(' ').nth(1).unwrap_or("")).collect();
    assert_eq!(steps, ["2/4", "4/4"], "{err}");
    let eta_of =
        |line: &str| -> String { line.rsplit_once("| eta ").unwrap_or_else(|| panic!("no ETA: {line}")).1.to_string() };
    for line in &lines {
        let eta = eta_of(line);
        assert!(eta == "estimating" || duration_secs(&eta).is_some(), "ETA `{eta}` in: {line}");
        assert!(line.contains("loss ") && line.contains("lr ") && line.contains("tok/s"), "{line}");
        assert!(line.contains("| elapsed "), "{line}");
    }
    // After the last step the ETA is measured, and nothing remains.
    let last = lines.last().unwrap();
    assert_eq!(duration_secs(&eta_of(last)), Some(0), "{last}");
    assert!(!err.contains("Some(") && !err.contains("None"), "{err}");
}

/// The seconds of a duration as the progress reporter prints it (`12s`, `4m05s`, `3h07m`); `None`
/// for anything else.
fn duration_secs(text: &str) -> Option<u64> {
    let number = |d: &str| -> Option<u64> {
        if d.is_empty() || !d.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        d.parse().ok()
    };
    // The part after the larger unit: exactly two digits, below 60.
    let part = |d: &str| number(d).filter(|&n| d.len() == 2 && n < 60);
    if let Some(rest) = text.strip_suffix('s') {
        match rest.split_once('m') {
            Some((m, s)) => Some(number(m).filter(|&m| m > 0 && m < 60)? * 60 + part(s)?),
            None => number(rest).filter(|&s| s < 60),
        }
    } else {
        let (h, m) = text.strip_suffix('m')?.split_once('h')?;
        Some(number(h).filter(|&h| h > 0)? * 3600 + part(m)? * 60)
    }
}

#[test]
fn durations_parse_as_the_reporter_prints_them() {
    assert_eq!(duration_secs("0s"), Some(0));
    assert_eq!(duration_secs("59s"), Some(59));
    assert_eq!(duration_secs("4m05s"), Some(245));
    assert_eq!(duration_secs("3h07m"), Some(3 * 3600 + 7 * 60));
    for bad in ["", "s", "60s", "4m5s", "4m", "h07m", "3h7m", "estimating", "1.5s", "-1s", "12"] {
        assert_eq!(duration_secs(bad), None, "{bad}");
    }
}

/// Rust debug text that must not reach a person.
fn assert_no_debug_text(what: &str, text: &str) {
    for bad in ["Some(", "None", "List(", "Regex(", "[\"", "(\"", "{"] {
        assert!(!text.contains(bad), "{what}: `{bad}` in\n{text}");
    }
}

#[test]
fn inspect_prints_human_text_for_models_and_adapters() {
    let inspect = |args: &[&Path]| {
        let mut cmd = Command::new(bin());
        cmd.arg("inspect").arg(args[0]);
        if let Some(model) = args.get(1) {
            cmd.arg("--model").arg(model);
        }
        let out = cmd.output().expect("the binary runs");
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let models = repo("tests/fixtures/models");
    for name in ["tiny-mistral", "tiny-mixtral", "tiny-mixtral-fused"] {
        let text = inspect(&[&models.join(name)]);
        assert!(text.contains("tokenizer    1000 tokens, bos 1, eos 2,"), "{text}");
        assert_no_debug_text(name, &text);
    }
    let adapters = repo("tests/fixtures/adapters");
    for (name, base) in [
        ("ours-mistral", "tiny-mistral"),
        ("ours-mixtral", "tiny-mixtral"),
        ("peft-mistral", "tiny-mistral"),
        ("peft-mixtral-router-full", "tiny-mixtral"),
    ] {
        let text = inspect(&[&adapters.join(name), &models.join(base)]);
        assert!(text.contains("targets      modules "), "{text}");
        assert_no_debug_text(name, &text);
    }
    let text = inspect(&[&adapters.join("peft-mistral"), &models.join("tiny-mistral")]);
    assert!(
        text.contains("modules gate_proj, v_proj, o_proj, k_proj, up_proj, down_proj, q_proj, parameters none"),
        "{text}"
    );
    let text = inspect(&[&adapters.join("peft-mixtral-router-full"), &models.join("tiny-mixtral")]);
    assert!(text.contains("saved whole  gate"), "{text}");
}
