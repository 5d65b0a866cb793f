//! The bug issue #14 started from: a Nemo `tokenizer.json` made from mistral-common's tekken file by transformers'
//! own converter has a `[SYSTEM_PROMPT]` token (mistral-common's built-in tekken list has it in every version), and
//! `prompt_format = "auto"` refused it as v7 although Nemo's format is v3.
//!
//! Fixtures: `tests/fixtures/tekken/converted/` (made by `tests/fixtures/tekken/generate.py` with transformers 5.23's
//! `convert_tekken_tokenizer` + `save_pretrained`, from `tekken-base.json` with `config.version` "v3" and "v7"):
//! `tokenizer.json` and `tokenizer_config.json` (the same for both versions: neither carries the version) and each
//! version's `chat_template.jinja`. The conversations and their ids are the v3/v7 goldens of `golden.json`, from
//! mistral-common on the tekken file itself.

use std::path::{Path, PathBuf};

use datasets::record::{parse_messages, parse_tools};
use datasets::{load_tokenizer, Conversation, DataConfig, Encoder, Json, PromptFormat, PromptFormatChoice};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tekken")
}

/// A model directory holding the converted `tokenizer.json` and the given files of `converted/` (`(from, to)`).
fn model_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let converted = fixtures().join("converted");
    std::fs::copy(converted.join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    for (from, to) in files {
        std::fs::copy(converted.join(from), dir.path().join(to)).unwrap();
    }
    dir
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

fn golden(version: &str) -> Json {
    let golden = Json::parse(&std::fs::read_to_string(fixtures().join("golden.json")).unwrap()).unwrap();
    golden.get("versions").and_then(|v| v.get(version)).unwrap_or_else(|| panic!("no {version} goldens")).clone()
}

fn conversation(case: &Json) -> Result<Conversation, datasets::Problem> {
    let config = DataConfig::default();
    let messages = parse_messages(case.get("messages").unwrap().clone(), "messages", &config)?;
    let tools = parse_tools(case.get("tools").unwrap().clone(), "tools")?;
    Ok(Conversation { messages, tools })
}

/// Every golden conversation of `version` encodes to mistral-common's ids and trained positions; every invalid one
/// is refused. Returns how many were compared.
fn matches_goldens(enc: &Encoder, version: &str) -> usize {
    let section = golden(version);
    let cases = items(section.get("cases").unwrap());
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
        assert!(conversation(case).and_then(|c| enc.encode_conversation(&c)).is_err(), "{version} {name}: accepted");
    }
    cases.len()
}

fn load(dir: &Path) -> datasets::LoadedTokenizer {
    let loaded = load_tokenizer(&datasets::tokenizer_in_dir(dir)).unwrap();
    assert!(loaded.path.ends_with("tokenizer.json") && loaded.tekken.is_none(), "{loaded:?}");
    loaded
}

#[test]
fn transformers_converted_nemo_tokenizer_json_alone_is_v3_with_mistral_commons_ids() {
    // Only tokenizer.json: no tekken.json, no tokenizer_config.json, no chat template.
    let dir = model_dir(&[]);
    let loaded = load(dir.path());
    assert!(loaded.tokenizer.token_to_id("[SYSTEM_PROMPT]").is_some(), "the token that made it look like v7");
    assert_eq!(loaded.declared.pick().unwrap(), PromptFormat::V3, "{:?}", loaded.declared);
    let enc = Encoder::for_tokenizer(&loaded, PromptFormatChoice::Auto).unwrap();
    assert_eq!(enc.prompt_format(), PromptFormat::V3, "mistral-common reads the source tekken file as v3");
    assert_eq!(enc.vocab_size(), 11000);
    assert!(matches_goldens(&enc, "v3") >= 20);
    // The same bytes are what the converter writes for a v7 file (the generator checks it), so the file alone
    // cannot refuse v7: an explicit v7 is allowed and gives mistral-common's v7 ids. What only Nemo's format allows
    // is refused, naming both; with transformers' chat template beside it v7 is refused too (next test).
    assert_eq!(loaded.declared.formats, [PromptFormat::V3, PromptFormat::V7]);
    assert_eq!(Encoder::for_tokenizer(&loaded, PromptFormatChoice::V3).unwrap().prompt_format(), PromptFormat::V3);
    assert!(matches_goldens(&Encoder::for_tokenizer(&loaded, PromptFormatChoice::V7).unwrap(), "v7") >= 20);
    let err = Encoder::for_tokenizer(&loaded, PromptFormatChoice::V11).unwrap_err().to_string();
    assert!(err.contains("\"v11\"") && err.contains("v3 or v7") && err.contains("tekken vocabulary"), "{err}");

    // The plain texts too: converted tokenizer.json, tramontane's encoder, mistral-common's Tekkenizer ids.
    let fixture = Json::parse(&std::fs::read_to_string(fixtures().join("texts.json")).unwrap()).unwrap();
    let rows = items(fixture.get("texts").unwrap());
    let mut bad = 0;
    for row in rows {
        let text = row.get("text").unwrap().as_str().unwrap();
        let want: Vec<u32> = ints(row.get("ids").unwrap()).into_iter().map(|i| i as u32).collect();
        let got = enc.encode_text(text).unwrap();
        let decoded = loaded.tokenizer.decode(&want, true).unwrap();
        let want_text = row.get("decoded").and_then(Json::as_str).unwrap_or(text);
        if got != want || decoded != want_text {
            bad += 1;
            eprintln!("{text:?}: ids {got:?} (want {want:?}), decoded {decoded:?}");
        }
    }
    assert_eq!(bad, 0, "texts whose ids or decoding differ from mistral-common's on the converted tokenizer.json");
}

#[test]
fn converted_tokenizer_with_transformers_files_follows_its_chat_template() {
    // What save_pretrained writes for the v3 (Nemo) file: auto is v3, and the goldens hold.
    let v3 = model_dir(&[
        ("tokenizer_config.json", "tokenizer_config.json"),
        ("v3.chat_template.jinja", "chat_template.jinja"),
    ]);
    let loaded = load(v3.path());
    let enc = Encoder::for_tokenizer(&loaded, PromptFormatChoice::Auto).unwrap();
    assert_eq!(enc.prompt_format(), PromptFormat::V3, "{:?}", loaded.declared);
    matches_goldens(&enc, "v3");
    assert_eq!(loaded.declared.formats, [PromptFormat::V3]);
    let err = Encoder::for_tokenizer(&loaded, PromptFormatChoice::V7).unwrap_err().to_string();
    assert!(err.contains("\"v7\"") && err.contains("says v3") && err.contains("chat template"), "{err}");

    // The same tokenizer.json converted from a v7 file: only the template tells, and it writes [SYSTEM_PROMPT].
    let v7 = model_dir(&[
        ("tokenizer_config.json", "tokenizer_config.json"),
        ("v7.chat_template.jinja", "chat_template.jinja"),
    ]);
    let loaded = load(v7.path());
    let enc = Encoder::for_tokenizer(&loaded, PromptFormatChoice::Auto).unwrap();
    assert_eq!(enc.prompt_format(), PromptFormat::V7, "{:?}", loaded.declared);
    assert!(matches_goldens(&enc, "v7") >= 20);
    let err = Encoder::for_tokenizer(&loaded, PromptFormatChoice::V3).unwrap_err().to_string();
    assert!(err.contains("\"v3\"") && err.contains("v7") && err.contains("chat template"), "{err}");

    // Older layouts: the template inside tokenizer_config.json, or in a processor's chat_template.json; a
    // chat_template.jinja wins over both, as in transformers' loader.
    let template = std::fs::read_to_string(fixtures().join("converted/v7.chat_template.jinja")).unwrap();
    let inline = model_dir(&[]);
    let config = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template});
    std::fs::write(inline.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    assert_eq!(load(inline.path()).declared.pick().unwrap(), PromptFormat::V7);
    let processor = model_dir(&[]);
    std::fs::write(
        processor.path().join("chat_template.json"),
        serde_json::json!({"chat_template": template}).to_string(),
    )
    .unwrap();
    assert_eq!(load(processor.path()).declared.pick().unwrap(), PromptFormat::V7);
    std::fs::copy(fixtures().join("converted/v3.chat_template.jinja"), inline.path().join("chat_template.jinja"))
        .unwrap();
    assert_eq!(load(inline.path()).declared.pick().unwrap(), PromptFormat::V3);
    // A broken tokenizer_config.json is an error naming it, not a guess.
    std::fs::write(processor.path().join("tokenizer_config.json"), "{not json").unwrap();
    let err = load_tokenizer(&processor.path().join("tokenizer.json")).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("not JSON"), "{err}");
}
