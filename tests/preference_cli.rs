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

fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn data_shows_each_pair_with_its_prompt_completions_and_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = repo("recipes/quickstart-dpo.toml").display().to_string();
    let model = format!("model.path={}", tmp.path().join("model").display());
    let v = json_of(&run(&[
        "data".into(),
        recipe.clone(),
        "--set".into(),
        model.clone(),
        "--limit".into(),
        "2".into(),
        "--json".into(),
    ]));
    assert_eq!(v["format"], "preference");
    assert_eq!(v["objective"], "dpo");
    let (train, eval) = (&v["train"], &v["eval"]);
    assert_eq!(train["pairs"].as_u64().unwrap() + eval["pairs"].as_u64().unwrap(), train["rows"].as_u64().unwrap());
    assert_eq!(train["held_out"], eval["pairs"]);
    let pairs = v["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 2);
    for p in pairs {
        let ids = |k: &str| -> Vec<u64> { p[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect() };
        let prompt = ids("prompt_ids");
        assert_eq!(prompt[0], 1, "the prompt starts with <s>");
        for side in ["chosen", "rejected"] {
            let completion = ids(&format!("{side}_ids"));
            let row = &p[side];
            let row_ids: Vec<u64> = row["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
            let mask: Vec<u64> = row["loss_mask"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
            // The row is the shared prompt then the completion; exactly the completion's tokens count.
            assert_eq!(row_ids, [prompt.clone(), completion.clone()].concat(), "{side}");
            let want_mask: Vec<u64> = (0..row_ids.len()).map(|k| u64::from(k >= prompt.len())).collect();
            assert_eq!(mask, want_mask, "{side}");
            assert_eq!(row["num_trained"].as_u64().unwrap() as usize, completion.len());
            assert!(row.get("nll_mask").is_none(), "DPO has no NLL term");
        }
        let trained = |side: &str| p[side]["trained_text"][0].as_str().unwrap().to_string();
        assert!(trained("chosen").starts_with(" Arr!") && trained("chosen").ends_with("</s>"), "{p}");
        assert!(trained("rejected").starts_with(" The"), "{p}");
    }
    // The first micro-batch: 2 rows per pair, chosen rows first, completions as counted above.
    let b = &v["batch"];
    assert_eq!(b["rows"].as_u64().unwrap(), 2 * b["pairs"].as_u64().unwrap());
    // Text: each pair's two rows, the counted completion between « ».
    let out = run(&["data".into(), recipe, "--set".into(), model, "--limit".into(), "1".into()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("train      360 pairs from 400 rows (40 held out for eval)"), "{text}");
    let line = |side: &str| text.lines().find(|l| l.trim_start().starts_with(side)).unwrap_or_default().to_string();
    assert!(line("chosen").contains("[/INST]« Arr!") && line("chosen").trim_end().ends_with("</s>»"), "{text}");
    assert!(line("rejected").contains("[/INST]« The "), "{text}");
    assert!(text.contains("completion tokens count, prompt tokens do not"), "{text}");
}

#[test]
fn eval_reports_the_runs_preference_metrics_on_the_held_out_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&train_args(tmp.path(), 10, &[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The run's final evaluation of its held-out split (40 pairs, in micro-batches of 4).
    let metrics = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    let run_eval: serde_json::Value = metrics
        .lines()
        .rev()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["kind"] == "eval")
        .unwrap();
    let model = tmp.path().join("model").display().to_string();
    let adapter = tmp.path().join("run/adapter").display().to_string();
    let eval = |extra: &[&str]| {
        let mut args: Vec<String> = ["eval", "--model", &model, "--quantize", "nf4", "--adapter", &adapter, "--json"]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        json_of(&run(&args))
    };
    let recipe = repo("recipes/quickstart-dpo.toml").display().to_string();
    let data = repo("datasets/samples/pirate-preference.parquet").display().to_string();
    let by_recipe = eval(&["--recipe", &recipe]);
    // The same split and objective from flags.
    let by_flags = eval(&["--data", &data, "--format", "preference", "--held-out", "0.1", "--objective", "dpo"]);
    for v in [&by_recipe, &by_flags] {
        assert_eq!(v["pairs"], 40, "{v}");
        let base = &v["results"][0];
        assert!(
            (base["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-9,
            "the base is its own reference"
        );
        let trained = &v["results"][1];
        for key in [
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            let (got, want) = (trained[key].as_f64().unwrap(), run_eval[key].as_f64().unwrap());
            assert!((got - want).abs() <= 1e-4 * want.abs().max(1e-2), "{key}: eval {got}, the run's eval {want}");
        }
    }
    // ORPO from flags reports its NLL and log-odds terms.
    let orpo = eval(&["--data", &data, "--format", "preference", "--limit", "4", "--objective", "orpo"]);
    for key in ["nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies"] {
        assert!(orpo["results"][1][key].is_number(), "ORPO lacks {key}: {orpo}");
    }
}

/// A DPO run's arguments without `--quiet` (the resume tests follow its `--json` events).
fn resumable_args(tmp: &Path, steps: u64, extra: &[String]) -> Vec<String> {
    let mut sets = vec!["output.save_every_steps=4".to_string(), "output.keep_last=100".to_string()];
    sets.extend_from_slice(extra);
    train_args(tmp, steps, &sets).into_iter().filter(|a| a != "--quiet").collect()
}

/// `(step, loss, rewards/margins)` of every training record.
fn train_records(run_dir: &Path) -> Vec<(u64, f64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["rewards/margins"].as_f64().unwrap()))
        .collect()
}

fn adapter_bytes(run_dir: &Path) -> Vec<u8> {
    std::fs::read(run_dir.join("adapter/adapter_model.safetensors")).unwrap()
}

/// Spawns a JSON-mode run and returns once it reported step `until`.
fn spawn_until(args: &[String], until: u64) -> std::process::Child {
    use std::io::BufRead;
    let mut args = args.to_vec();
    args.push("--json".into());
    let mut child = Command::new(bin())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    for line in std::io::BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["event"] == "step" && v["step"].as_u64().unwrap() >= until {
            return child;
        }
    }
    let status = child.wait();
    panic!("the run ended ({status:?}) before step {until}");
}

/// An uninterrupted DPO run, and the same run SIGKILLed between its checkpoints of steps 4 and 8 then resumed:
/// the same metrics, bit for bit, and the same final adapter.
fn killed_and_resumed_equals_uninterrupted(extra: &[String]) {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let out = run(&resumable_args(&reference, 12, extra));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let killed = tmp.path().join("killed");
    let args = resumable_args(&killed, 12, extra);
    let mut child = spawn_until(&args, 6);
    child.kill().unwrap(); // SIGKILL: no chance to save anything
    child.wait().unwrap();
    let ckpts = std::fs::read_dir(killed.join("run/checkpoints")).unwrap().count();
    assert_eq!(ckpts, 1, "only the step-4 checkpoint should exist at the kill");
    let mut resume = args.clone();
    resume.push("--resume".into());
    let out = run(&resume);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (want, got) = (train_records(&reference.join("run")), train_records(&killed.join("run")));
    assert_eq!(want.len(), 12);
    assert_eq!(got, want, "logged losses and margins must equal the uninterrupted run's, bit for bit");
    assert_eq!(adapter_bytes(&killed.join("run")), adapter_bytes(&reference.join("run")), "final adapters differ");
}

#[test]
fn a_sigkilled_dpo_run_resumes_bit_for_bit() {
    killed_and_resumed_equals_uninterrupted(&[]);
}

#[test]
fn precomputed_reference_log_probs_give_the_same_losses_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 6;
    let on_the_fly = tmp.path().join("on-the-fly");
    let out = run(&train_args(&on_the_fly, steps, &[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let precomputed = tmp.path().join("precomputed");
    let mut args = resumable_args(&precomputed, steps, &["train.precompute_reference=true".into()]);
    args.push("--json".into());
    let out = run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The header says the reference pass ran once, before training, over every training pair.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("reference log-probs of 360 pairs precomputed"), "{stdout}");
    let (want, got) = (train_records(&on_the_fly.join("run")), train_records(&precomputed.join("run")));
    assert_eq!(want.len(), steps as usize);
    for ((s, loss_w, margin_w), (_, loss_g, margin_g)) in want.iter().zip(&got) {
        assert!(
            (loss_g - loss_w).abs() <= 1e-6,
            "step {s}: loss {loss_g} with precomputed reference, {loss_w} without"
        );
        assert!((margin_g - margin_w).abs() <= 1e-6, "step {s}: margins {margin_g} vs {margin_w}");
    }
    killed_and_resumed_equals_uninterrupted(&["train.precompute_reference=true".into()]);
}

#[test]
fn dpo_from_an_init_from_adapter_takes_that_adapter_as_its_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    let out = run(&train_args(&first, 4, &[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let init = format!("lora.init_from={}", first.join("run/adapter").display());
    let model = format!("model.path={}", first.join("model").display());
    let first_step = |dir: &Path, extra: &[String]| {
        let mut sets = vec![init.clone()];
        sets.extend_from_slice(extra);
        let mut args = train_args(dir, 1, &sets);
        // The first run's model directory (the adapter's base).
        let at = args.iter().position(|a| a.starts_with("model.path=")).unwrap();
        args[at] = model.clone();
        let out = run(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
        metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["kind"] == "train")
            .unwrap()
    };
    // Default with init_from: the reference is the init adapter, so the first step's policy equals it.
    let v = first_step(&tmp.path().join("init-ref"), &[]);
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins"] {
        assert_eq!(v[key].as_f64().unwrap(), 0.0, "{key}: {v}");
    }
    // `train.reference = "base"`: the trained adapter is already ahead of the base.
    let v = first_step(&tmp.path().join("base-ref"), &["train.reference=base".into()]);
    assert!(v["rewards/margins"].as_f64().unwrap() > 0.0, "{v}");
}
