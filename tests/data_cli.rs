//! `tramontane data` end to end, through the binary: the shipped recipes and samples, text and JSON output, and
//! the error messages a user sees for bad recipes, bad overrides and bad data.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tramontane(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tramontane")).args(args).current_dir(root()).output().expect("run tramontane")
}

fn ok(args: &[&str]) -> String {
    let out = tramontane(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tramontane {args:?} failed:\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = tramontane(args);
    assert!(!out.status.success(), "tramontane {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn path(rel: &str) -> String {
    root().join(rel).display().to_string()
}

fn write_recipe(dir: &Path, body: &str) -> String {
    let p = dir.join("recipe.toml");
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

#[test]
fn quickstart_text_output_marks_trained_tokens_and_reports_statistics() {
    let out = ok(&["data", "recipes/quickstart.toml", "--limit", "2"]);
    assert!(out.contains("prompt format v1, detected"), "{out}");
    assert!(out.contains("train      360 examples from 400 rows (40 held out for eval)"), "{out}");
    assert!(out.contains("skipped: none"), "{out}");
    assert!(out.contains("packing: 360 examples -> "), "{out}");
    assert!(out.contains("eval       40 examples from 40 rows"), "{out}");
    // Not a terminal: trained spans between « », the rest (prompt, <s>) outside.
    let example = out.lines().find(|l| l.contains("[/INST]«")).expect("an example line");
    assert!(example.trim_start().starts_with("<s> [INST] "), "{example}");
    assert!(example.contains("[/INST]« Arr! The ") && example.trim_end().ends_with("matey!</s>»"), "{example}");
    assert!(!out.contains("\x1b["), "no colour codes when stdout is not a terminal");
    assert!(out.contains("sequence 0 of batch 0 · "), "{out}");
}

#[test]
fn json_output_has_ids_labels_masks_and_document_boundaries() {
    let out = ok(&["data", "recipes/quickstart.toml", "--limit", "3", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["prompt_format"], "v1");
    assert_eq!(v["train"]["examples"], 360);
    assert_eq!(v["eval"]["examples"], 40);
    let frac = v["train"]["trained_fraction"].as_f64().unwrap();
    assert!(frac > 0.3 && frac < 0.7, "{frac}");
    assert!(v["train"]["packing_efficiency"].as_f64().unwrap() > 0.9);
    let examples = v["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 3);
    for e in examples {
        let ids = e["input_ids"].as_array().unwrap();
        let labels = e["labels"].as_array().unwrap();
        let mask = e["loss_mask"].as_array().unwrap();
        assert_eq!((ids.len(), labels.len()), (mask.len(), mask.len()));
        assert_eq!(ids[0], 1, "starts with <s>");
        assert_eq!(ids.last().unwrap(), &Value::from(2), "ends with </s>");
        assert_eq!(mask.last().unwrap(), &Value::from(1), "the closing </s> is trained");
        let ignored = Value::from(-100);
        for ((id, l), m) in ids.iter().zip(labels).zip(mask) {
            assert_eq!(l, if m == 1 { id } else { &ignored });
        }
        for t in e["trained_text"].as_array().unwrap() {
            assert!(t.as_str().unwrap().starts_with(" Arr! The "), "{t}");
        }
    }
    let seq = &v["sequences"][0];
    let docs = seq["documents"].as_array().unwrap();
    assert!(docs.len() > 1, "packed");
    let positions = seq["positions"].as_array().unwrap();
    let doc_ids = seq["doc_ids"].as_array().unwrap();
    let mut end = 0;
    for (k, d) in docs.iter().enumerate() {
        let start = d["start"].as_u64().unwrap() as usize;
        let len = d["len"].as_u64().unwrap() as usize;
        assert_eq!(start, end, "documents are contiguous");
        assert_eq!(positions[start], 0, "positions restart at each document");
        assert_eq!(positions[start + len - 1], (len - 1) as u64);
        assert!(doc_ids[start..start + len].iter().all(|d| d == k as u64));
        end = start + len;
    }
    assert_eq!(end as u64, seq["num_tokens"].as_u64().unwrap());

    // --eval shows the held-out split, which shares no row with the training split.
    let out = ok(&["data", "recipes/quickstart.toml", "--limit", "40", "--json", "--eval"]);
    let e: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["split"], "eval");
    assert_eq!(e["examples"].as_array().unwrap().len(), 40);
    let eval_rows: Vec<&Value> = e["examples"].as_array().unwrap().iter().map(|x| &x["row"]).collect();
    for x in v["examples"].as_array().unwrap() {
        assert!(!eval_rows.contains(&&x["row"]));
    }
}

#[test]
fn shipped_real_model_recipes_parse_and_run_with_overrides() {
    let v3 = path("tests/fixtures/tokenizers/mistral-v3.tokenizer.json");
    let v1 = path("tests/fixtures/tokenizers/mistral-v1.tokenizer.json");
    let data = path("datasets/samples/pirate-chat.parquet");
    for (recipe, tok, format) in
        [("recipes/mistral-7b-qlora.toml", &v3, "v3"), ("recipes/mixtral-8x7b-qlora.toml", &v1, "v1")]
    {
        let out = ok(&[
            "data",
            recipe,
            "--limit",
            "1",
            "--json",
            "--set",
            &format!("model.tokenizer={tok}"),
            "--set",
            &format!("data.files={data}"),
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["prompt_format"], format, "{recipe}");
        assert_eq!(v["train"]["rows"], 400);
    }
}

#[test]
fn tools_and_instruct_samples_encode_with_their_formats() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        dir.path(),
        &format!(
            "[model]\npath = \"{}\"\ntokenizer = \"{}\"\n[data]\nfiles = [\"{}\"]\nformat = \"tools\"\n",
            dir.path().display(),
            path("tests/fixtures/tokenizers/mistral-v3.tokenizer.json"),
            path("datasets/samples/tool-calls.parquet")
        ),
    );
    let out = ok(&["data", &recipe, "--limit", "1"]);
    assert!(out.contains("prompt format v3"), "{out}");
    assert!(out.contains("[AVAILABLE_TOOLS]"), "{out}");
    assert!(out.contains("«[TOOL_CALLS] [{\"name\": "), "{out}");
    assert!(out.contains("[TOOL_RESULTS] {\"content\": "), "{out}");
    let out = ok(&[
        "data",
        &recipe,
        "--limit",
        "1",
        "--json",
        "--set",
        "data.format=instruct",
        "--set",
        &format!("data.files={}", path("datasets/samples/instruct-mini.parquet")),
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["train"]["examples"], 120);
    assert_eq!(v["examples"][0]["trained_text"].as_array().unwrap().len(), 1);
}

#[test]
fn unknown_recipe_key_names_line_and_suggests_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("recipes/quickstart.toml")).unwrap();
    let bad = text.replace("learning_rate = 3e-3", "lerning_rate = 3e-3");
    let line = bad.lines().position(|l| l.starts_with("lerning_rate")).unwrap() + 1;
    let recipe = write_recipe(dir.path(), &bad);
    let err = fails(&["data", &recipe]);
    assert!(
        err.contains(&format!("recipe.toml:{line}: `train.lerning_rate`: unknown key; [train] accepts seed,")),
        "{err}"
    );
    assert!(err.trim_end().ends_with("(did you mean `learning_rate`?)"), "{err}");
}

#[test]
fn wrong_type_in_recipe_names_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("recipes/quickstart.toml")).unwrap();
    let bad = text.replace("max_seq_len = 256", "max_seq_len = \"256\"");
    let line = bad.lines().position(|l| l.starts_with("max_seq_len")).unwrap() + 1;
    let err = fails(&["data", &write_recipe(dir.path(), &bad)]);
    assert!(
        err.contains(&format!(
            "recipe.toml:{line}: `data.max_seq_len`: expected a non-negative integer, found string \"256\""
        )),
        "{err}"
    );
}

#[test]
fn bad_set_overrides_are_refused() {
    let err = fails(&["data", "recipes/quickstart.toml", "--set", "train.learning_rate=fast"]);
    assert!(
        err.contains("--set train.learning_rate=fast: `train.learning_rate`: expected a number, found `fast`"),
        "{err}"
    );
    let err = fails(&["data", "recipes/quickstart.toml", "--set", "data.max_seq=100"]);
    assert!(
        err.contains("--set data.max_seq=100: `data.max_seq`: unknown key")
            && err.contains("did you mean `max_seq_len`?"),
        "{err}"
    );
    let err = fails(&["data", "recipes/quickstart.toml", "--set", "lora.r=0"]);
    assert!(err.contains("--set lora.r=0: `lora.r`: must be at least 1 (got 0)"), "{err}");
    let err = fails(&["data", "recipes/quickstart.toml", "--set", "max_seq_len"]);
    assert!(err.contains("expected `section.key=value`"), "{err}");
}

#[test]
fn data_errors_name_file_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    // Missing column: the message lists the columns the file has.
    let err = fails(&[
        "data",
        "recipes/quickstart.toml",
        "--set",
        &format!("data.files={}", path("tests/fixtures/datasets/flavours.parquet")),
        "--set",
        "data.columns.messages=conversations",
    ]);
    assert!(err.contains("flavours.parquet: no column `conversations`"), "{err}");
    assert!(err.contains("columns found: messages, text, prompt, completion"), "{err}");
    // Wrong column type.
    let err = fails(&[
        "data",
        "recipes/quickstart.toml",
        "--set",
        &format!("data.files={}", path("tests/fixtures/datasets/wrong_type.parquet")),
    ]);
    assert!(err.contains("column `messages` has type Int64; expected a list of structs"), "{err}");
    // A bad role in a JSON-lines file: file, line, column, element, and the likely spelling.
    let data = dir.path().join("chats.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assitant\", \"content\": \"yo\"}]}\n",
    )
    .unwrap();
    let err = fails(&[
        "data",
        "recipes/quickstart.toml",
        "--set",
        &format!("data.files={}", data.display()),
        "--set",
        "data.eval_fraction=0",
    ]);
    assert!(
        err.contains("chats.jsonl line 1: column `messages` element 1: role `assitant` is not one of system/user/assistant/tool (did you mean `assistant`?)"),
        "{err}"
    );
}
