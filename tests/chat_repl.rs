//! `tramontane chat` driven through a pipe: streamed replies equal `generate`'s (greedy), multi-turn history,
//! `/reset`, `/system`, `/adapter`, `/params`, and bad commands reported without ending the session.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tramontane")
}

fn generate(model: &str, adapter: Option<&str>, question: &str) -> String {
    let mut cmd = Command::new(bin());
    cmd.args(["generate", "--model", model]);
    if let Some(a) = adapter {
        cmd.args(["--adapter", a]);
    }
    let out = cmd.args(["--chat", question, "--temperature", "0", "--max-new-tokens", "12"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn chat(model: &str, input: &str) -> (String, String) {
    let mut child = Command::new(bin())
        .args(["chat", "--model", model, "--temperature", "0", "--max-new-tokens", "12"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn piped_chat_streams_keeps_history_and_obeys_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model").display().to_string();
    let run = tmp.path().join("run");
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml");
    let mut args = vec!["train".to_string(), recipe.display().to_string()];
    for set in [
        format!("model.path={model}"),
        format!("output.dir={}", run.display()),
        "train.max_steps=20".to_string(),
        "eval.every_steps=0".to_string(),
    ] {
        args.extend(["--set".to_string(), set]);
    }
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let adapter = run.join("adapter").display().to_string();
    let q = "What color is the sky?";
    let base_answer = generate(&model, None, q);
    let tuned_answer = generate(&model, Some(&adapter), q);
    assert_ne!(base_answer, tuned_answer);

    // Turn 1 on the base; switch adapter (resets); turn 2 fresh on the adapter; turn 3 with history;
    // reset; turn 4 equals turn 2 again. Bad commands in between change nothing.
    let input = format!(
        "{q}\n/params top_k=0 max_tokens=12\n/adapter {adapter}\n{q}\nAnd the grass?\n/params temperature=-1 nope=3\n\
         /frob\n/adapter /does/not/exist\n/reset\n{q}\n/system Answer briefly.\n/adapter none\n/system\n{q}\n/quit\n\
         never read\n"
    );
    let (stdout, stderr) = chat(&model, &input);
    let rest = stdout.strip_prefix(&base_answer).unwrap_or_else(|| panic!("turn 1: {stdout:?} vs {base_answer:?}"));
    let rest = rest.strip_prefix(&tuned_answer).unwrap_or_else(|| panic!("turn 2: {rest:?} vs {tuned_answer:?}"));
    // Turn 3 (with history), then turn 4 after /reset equals turn 2, then the base again after /adapter none.
    let tail = format!("{tuned_answer}{base_answer}");
    assert!(rest.ends_with(&tail) && rest.len() > tail.len(), "turns 3-5: {rest:?}");
    for needle in [
        "[conversation reset]",
        "temperature must be >= 0",
        "unknown parameter `nope`",
        "unknown command /frob",
        "/does/not/exist",
        "[system prompt set; conversation reset]",
        "[system prompt cleared; conversation reset]",
        "[adapter: none; conversation reset]",
    ] {
        assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    }
    assert!(!stdout.contains("never read"));
}
