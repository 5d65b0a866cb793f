//! tekken.json read natively, and the v2/v3/v7/v11/v13/v15 encoders, token for token against mistral-common.
//!
//! Fixtures: `tests/fixtures/tekken/` (made by its `generate.py` with mistral-common 1.13.1): `tekken-base.json`
//! (Nemo's tekken file cut to 10000 ranks), `texts.json` (3200 texts and their ids and decodings) and
//! `golden.json` (per version: the overlay that makes the version's tekken file from the base, conversations with
//! their ids and loss masks, and conversations mistral-common rejects).

use std::path::{Path, PathBuf};

use datasets::record::{parse_messages, parse_tools};
use datasets::{
    load_tokenizer, Conversation, DataConfig, Encoder, Json, LoadedTokenizer, PromptFormat, PromptFormatChoice,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tekken")
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The tekken file of a version: the base file with the overlay's keys replaced (`config.*`) or added, as the
/// generator builds it. Written as `dir/tekken.json`.
fn tekken_file(dir: &Path, overlay: &serde_json::Value) -> PathBuf {
    let mut base = read_json(&fixtures().join("tekken-base.json"));
    for (k, v) in overlay.as_object().unwrap() {
        if k == "config" {
            for (ck, cv) in v.as_object().unwrap() {
                base["config"][ck] = cv.clone();
            }
        } else {
            base[k] = v.clone();
        }
    }
    let path = dir.join("tekken.json");
    std::fs::write(&path, serde_json::to_string(&base).unwrap()).unwrap();
    path
}

fn items(j: &Json) -> &[Json] {
    match j {
        Json::Array(v) => v,
        other => panic!("expected a list, got {other}"),
    }
}

fn ints(j: &Json) -> Vec<i64> {
    items(j).iter().map(|v| v.as_i64().unwrap()).collect()
}

fn base() -> LoadedTokenizer {
    load_tokenizer(&fixtures().join("tekken-base.json")).unwrap()
}

#[test]
fn tekken_reads_natively_with_mistral_commons_ids_on_3000_texts() {
    let loaded = base();
    let info = loaded.tekken.as_ref().unwrap();
    assert_eq!(
        (info.version.as_str(), info.num_special, info.vocab_size, info.vocab_entries),
        ("v3", 1000, 11000, 10000)
    );
    let enc = Encoder::for_tokenizer(&loaded, PromptFormatChoice::Auto).unwrap();
    assert_eq!(enc.prompt_format(), PromptFormat::V3);
    assert_eq!(enc.vocab_size(), 11000);
    assert!(enc.uses_shortcut(), "the byte-level shortcut applies to tekken");
    let fixture = Json::parse(&std::fs::read_to_string(fixtures().join("texts.json")).unwrap()).unwrap();
    let rows = items(fixture.get("texts").unwrap());
    assert!(rows.len() >= 3000, "{} texts", rows.len());
    let (mut bad_ids, mut bad_text) = (0, 0);
    for row in rows {
        let text = row.get("text").unwrap().as_str().unwrap();
        let want: Vec<u32> = ints(row.get("ids").unwrap()).into_iter().map(|i| i as u32).collect();
        let got = enc.encode_text(text).unwrap();
        let general = enc.encode_text_general(text).unwrap();
        if got != want || general != want {
            bad_ids += 1;
            eprintln!("ids differ on {text:?}:\n want {want:?}\n  got {got:?} (general pipeline {general:?})");
        }
        let want_text = row.get("decoded").and_then(Json::as_str).unwrap_or(text);
        let decoded = loaded.tokenizer.decode(&want, true).unwrap();
        if decoded != want_text {
            bad_text += 1;
            eprintln!("decoding differs on {text:?}: {decoded:?}");
        }
        if let Some(keep) = row.get("decoded_keep").and_then(Json::as_str) {
            let ids: Vec<u32> = [enc.bos_id()].into_iter().chain(want.iter().copied()).chain([enc.eos_id()]).collect();
            assert_eq!(loaded.tokenizer.decode(&ids, false).unwrap(), keep, "decoding with special tokens kept");
        }
    }
    assert_eq!((bad_ids, bad_text), (0, 0), "texts whose ids / decoding differ from mistral-common");
}

fn conversation(case: &Json) -> Result<Conversation, datasets::Problem> {
    let config = DataConfig::default();
    let messages = parse_messages(case.get("messages").unwrap().clone(), "messages", &config)?;
    let tools = parse_tools(case.get("tools").unwrap().clone(), "tools")?;
    Ok(Conversation { messages, tools })
}

#[test]
fn every_version_matches_mistral_common_ids_and_trained_positions() {
    // datasets' own JSON keeps the file's key order (tool schemas are encoded in it).
    let golden = Json::parse(&std::fs::read_to_string(fixtures().join("golden.json")).unwrap()).unwrap();
    let Some(Json::Object(versions)) = golden.get("versions") else { panic!("no versions") };
    let names: Vec<PromptFormat> = versions.iter().map(|(k, _)| PromptFormat::parse(k).unwrap()).collect();
    assert_eq!(names, &PromptFormat::ALL[1..], "every version after v1 has fixtures");
    for (version, section) in versions {
        let dir = tempfile::tempdir().unwrap();
        let overlay: serde_json::Value = serde_json::from_str(&section.get("overlay").unwrap().to_string()).unwrap();
        let loaded = load_tokenizer(&tekken_file(dir.path(), &overlay)).unwrap();
        let enc = Encoder::for_tokenizer(&loaded, PromptFormatChoice::Auto).unwrap();
        assert_eq!(enc.prompt_format().name(), version, "auto picks the file's config.version");
        let cases = items(section.get("cases").unwrap());
        assert!(cases.len() >= 20, "{version}: {} cases", cases.len());
        for case in cases {
            let name = case.get("name").unwrap().as_str().unwrap();
            let conv = conversation(case).unwrap_or_else(|p| panic!("{version} {name}: {p}"));
            let e = enc.encode_conversation(&conv).unwrap_or_else(|p| panic!("{version} {name}: {p}"));
            let want_ids: Vec<u32> = ints(case.get("input_ids").unwrap()).into_iter().map(|i| i as u32).collect();
            let want_mask: Vec<bool> = ints(case.get("loss_mask").unwrap()).into_iter().map(|m| m == 1).collect();
            assert_eq!(e.input_ids, want_ids, "{version} {name}: token ids differ from mistral-common");
            assert_eq!(e.loss_mask, want_mask, "{version} {name}: trained positions differ");
        }
        for case in items(section.get("invalid").unwrap()) {
            let name = case.get("name").unwrap().as_str().unwrap();
            let result = conversation(case).and_then(|c| enc.encode_conversation(&c));
            assert!(
                result.is_err(),
                "{version} {name}: accepted, but mistral-common (or our stricter rule) rejects it"
            );
        }
    }
}

/// An edit that breaks a tekken file.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

/// A broken tekken file is an error naming the file and the field, never a panic.
#[test]
fn bad_tekken_files_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = read_json(&fixtures().join("tekken-base.json"));
    let cases: Vec<(&str, Edit)> = vec![
        ("config.version", Box::new(|v| v["config"]["version"] = "v9".into())),
        ("config.version", Box::new(|v| v["config"].as_object_mut().unwrap().remove("version").map(drop).unwrap())),
        ("config.pattern", Box::new(|v| v["config"]["pattern"] = "(".into())),
        ("config.default_vocab_size", Box::new(|v| v["config"]["default_vocab_size"] = 999999.into())),
        ("config.default_num_special_tokens", Box::new(|v| v["config"]["default_num_special_tokens"] = "x".into())),
        ("vocab[5].rank", Box::new(|v| v["vocab"][5]["rank"] = 6.into())),
        ("vocab[300].token_bytes", Box::new(|v| v["vocab"][300]["token_bytes"] = "@@".into())),
        ("vocab", Box::new(|v| v.as_object_mut().unwrap().remove("vocab").map(drop).unwrap())),
        ("special_tokens", Box::new(|v| v["config"]["version"] = "v11".into())),
        (
            "special_tokens[1].rank",
            Box::new(|v| {
                v["special_tokens"] = serde_json::json!([
            {"rank": 0, "token_str": "<unk>", "is_control": true}, {"rank": 5, "token_str": "<s>", "is_control": true}])
            }),
        ),
        (
            "model_settings_builder",
            Box::new(|v| {
                v["config"]["version"] = "v15".into();
                v["model_settings_builder"] =
                    serde_json::json!({"reasoning_effort": {"values": ["high"], "default": "high"}});
            }),
        ),
    ];
    for (field, edit) in cases {
        let mut v = good.clone();
        edit(&mut v);
        let path = dir.path().join("tekken.json");
        std::fs::write(&path, v.to_string()).unwrap();
        let err = load_tokenizer(&path).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{field}: the error names no file: {err}");
        assert!(err.contains(&format!("`{field}`")), "{field}: the error names no field: {err}");
    }
    let path = dir.path().join("tekken.json");
    std::fs::write(&path, "{not json").unwrap();
    assert!(load_tokenizer(&path).is_err());
}

/// An explicit prompt format that contradicts the tokenizer is an error naming both.
#[test]
fn explicit_format_contradicting_the_tokenizer_names_both() {
    let loaded = base();
    for choice in [PromptFormatChoice::V7, PromptFormatChoice::V1, PromptFormatChoice::V13] {
        let err = Encoder::for_tokenizer(&loaded, choice).unwrap_err().to_string();
        let chosen = choice.format().unwrap().name();
        assert!(
            err.contains(&format!("\"{chosen}\"")) && err.contains("v3") && err.contains("config.version"),
            "{err}"
        );
    }
    assert_eq!(Encoder::for_tokenizer(&loaded, PromptFormatChoice::V3).unwrap().prompt_format(), PromptFormat::V3);
}

/// A conversation the chosen version cannot express is an error naming the message and field.
#[test]
fn conversations_a_version_cannot_express_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let overlay = serde_json::json!({"config": {"version": "v13"}, "special_tokens": read_json(&fixtures().join("golden.json"))["versions"]["v13"]["overlay"]["special_tokens"]});
    let loaded = load_tokenizer(&tekken_file(dir.path(), &overlay)).unwrap();
    let enc = Encoder::for_tokenizer(&loaded, PromptFormatChoice::Auto).unwrap();
    let case = Json::parse(
        r#"{"messages": [{"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}]}], "tools": []}"#,
    )
    .unwrap();
    let err = enc.encode_conversation(&conversation(&case).unwrap()).unwrap_err().to_string();
    assert!(err.contains("message 1 tool_calls[0]") && err.contains("no id") && err.contains("v13"), "{err}");
    let v3 = Encoder::for_tokenizer(&base(), PromptFormatChoice::Auto).unwrap();
    let both = Json::parse(
        r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Sure.",
            "tool_calls": [{"id": "abcDEF123", "function": {"name": "add", "arguments": "{}"}}]}], "tools": []}"#,
    )
    .unwrap();
    let err = v3.encode_conversation(&conversation(&both).unwrap()).unwrap_err().to_string();
    assert!(err.contains("message 1") && err.contains("not both") && err.contains("v3"), "{err}");
}

/// What the encoder writes for an assistant's tool calls reads back as the same calls, in every version's layout
/// (what `serve` returns as OpenAI `tool_calls`).
#[test]
fn tool_calls_read_back_from_generated_ids() {
    let golden = Json::parse(&std::fs::read_to_string(fixtures().join("golden.json")).unwrap()).unwrap();
    let Some(Json::Object(versions)) = golden.get("versions") else { panic!("no versions") };
    for (version, section) in versions {
        let dir = tempfile::tempdir().unwrap();
        let overlay: serde_json::Value = serde_json::from_str(&section.get("overlay").unwrap().to_string()).unwrap();
        let loaded = load_tokenizer(&tekken_file(dir.path(), &overlay)).unwrap();
        let enc = Encoder::for_tokenizer(&loaded, PromptFormatChoice::Auto).unwrap();
        let case = Json::parse(
            r#"{"messages": [{"role": "user", "content": "Weather in Oslo and 2+2?"}, {"role": "assistant",
                "tool_calls": [{"id": "oslo00001", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
                               {"id": "addi00002", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}]}],
                "tools": []}"#,
        )
        .unwrap();
        let e = enc.encode_conversation(&conversation(&case).unwrap()).unwrap();
        // The answer: the trained tokens, without the closing </s>.
        let first = e.loss_mask.iter().position(|&m| m).unwrap();
        let answer = &e.input_ids[first..e.input_ids.len() - 1];
        let parsed = enc.parse_answer(answer).unwrap_or_else(|| panic!("{version}: no tool calls read back"));
        let got: Vec<(&str, &str)> =
            parsed.tool_calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect();
        assert_eq!(got, [("get_weather", r#"{"city":"Oslo"}"#), ("add", r#"{"a":2,"b":2}"#)], "{version}");
        let with_ids = matches!(version.as_str(), "v3" | "v7" | "v11");
        let ids: Vec<Option<&str>> = parsed.tool_calls.iter().map(|c| c.id.as_deref()).collect();
        assert_eq!(
            ids,
            if with_ids { vec![Some("oslo00001"), Some("addi00002")] } else { vec![None, None] },
            "{version}"
        );
        assert!(enc.parse_answer(&enc.encode_text("plain text").unwrap()).is_none());
    }
}
