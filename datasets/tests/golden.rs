//! Token-for-token equality with mistral-common and sentencepiece, from the committed golden fixtures.
//!
//! Fixtures: `tests/fixtures/tokenizers/` (converted tokenizers + sentencepiece ids, made by
//! `convert_sentencepiece.py`) and `tests/fixtures/datasets/` (mistral-common encodings and masks, made by
//! `generate.py`).

use std::path::PathBuf;

use datasets::record::{parse_messages, parse_tools};
use datasets::{load_files, Conversation, DataConfig, Encoder, Format, Json, PromptFormat, PromptFormatChoice};
use tokenizers::Tokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn tokenizer(version: &str) -> Tokenizer {
    let path = fixtures().join(format!("tokenizers/mistral-{version}.tokenizer.json"));
    Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn golden() -> Json {
    let text = std::fs::read_to_string(fixtures().join("datasets/mistral_golden.json")).unwrap();
    Json::parse(&text).unwrap()
}

fn items(j: &Json) -> &[Json] {
    match j {
        Json::Array(v) => v,
        other => panic!("expected a list, got {other}"),
    }
}

fn conversation(case: &Json) -> Conversation {
    let config = DataConfig::default();
    let messages = parse_messages(case.get("messages").unwrap().clone(), "messages", &config).unwrap();
    let tools = parse_tools(case.get("tools").unwrap().clone(), "tools").unwrap();
    Conversation { messages, tools }
}

fn ints(j: &Json) -> Vec<i64> {
    items(j).iter().map(|v| v.as_i64().unwrap()).collect()
}

#[test]
fn converted_tokenizers_match_sentencepiece_on_1000_texts() {
    let text = std::fs::read_to_string(fixtures().join("tokenizers/sentencepiece_parity.json")).unwrap();
    let parity = Json::parse(&text).unwrap();
    let texts: Vec<&str> = items(parity.get("texts").unwrap()).iter().map(|t| t.as_str().unwrap()).collect();
    assert!(texts.len() >= 1000);
    for version in ["v1", "v3"] {
        let mut tok = tokenizer(version);
        tok.set_encode_special_tokens(true);
        let want = items(parity.get(&format!("mistral-{version}.tokenizer.json")).unwrap());
        let mut bad = 0;
        for (text, ids) in texts.iter().zip(want) {
            let want: Vec<u32> = ids.as_str().unwrap().split_whitespace().map(|s| s.parse().unwrap()).collect();
            let got = tok.encode_fast(*text, false).unwrap().get_ids().to_vec();
            if got != want {
                bad += 1;
                eprintln!("{version} mismatch on {text:?}:\n want {want:?}\n  got {got:?}");
            }
        }
        assert_eq!(bad, 0, "{version}: {bad} of {} texts differ from sentencepiece", texts.len());
    }
}

fn check_version(version: &str, format: PromptFormat) {
    let g = golden();
    let section = g.get(version).unwrap();
    let tok = tokenizer(version);
    let enc = Encoder::new(&tok, PromptFormatChoice::Auto).unwrap();
    assert_eq!(enc.prompt_format(), format, "auto-detected prompt format");
    let cases = items(section.get("cases").unwrap());
    assert!(cases.len() >= 15);
    for case in cases {
        let name = case.get("name").unwrap().as_str().unwrap();
        let conv = conversation(case);
        let e = enc.encode_conversation(&conv).unwrap_or_else(|p| panic!("{version} {name}: {p}"));
        let want_ids: Vec<u32> = ints(case.get("input_ids").unwrap()).into_iter().map(|i| i as u32).collect();
        let want_mask: Vec<bool> = ints(case.get("loss_mask").unwrap()).into_iter().map(|m| m == 1).collect();
        assert_eq!(e.input_ids, want_ids, "{version} {name}: token ids differ from mistral-common");
        assert_eq!(e.loss_mask, want_mask, "{version} {name}: loss mask differs");
    }
    for case in items(section.get("invalid").unwrap()) {
        let name = case.get("name").unwrap().as_str().unwrap();
        let config = DataConfig::default();
        // Some invalid cases fail while parsing the record (e.g. weight 0.5), others while encoding.
        let parsed = parse_messages(case.get("messages").unwrap().clone(), "messages", &config);
        let result = parsed.and_then(|messages| {
            let tools = parse_tools(case.get("tools").unwrap().clone(), "tools")?;
            enc.encode_conversation(&Conversation { messages, tools })
        });
        assert!(result.is_err(), "{version} {name}: accepted, but mistral-common (or our stricter rule) rejects it");
    }
}

#[test]
fn v1_conversations_match_mistral_common() {
    check_version("v1", PromptFormat::V1);
}

#[test]
fn v3_conversations_with_tools_match_mistral_common() {
    check_version("v3", PromptFormat::V3);
}

/// The same conversations written as Parquet (list of structs, tools as JSON text) load to the same ids and masks.
#[test]
fn parquet_rows_encode_like_the_golden_conversations() {
    let g = golden();
    for version in ["v1", "v3"] {
        let tok = tokenizer(version);
        let enc = Encoder::new(&tok, PromptFormatChoice::Auto).unwrap();
        let config = DataConfig {
            format: Format::Chat,
            max_seq_len: 100_000,
            files: vec![fixtures().join(format!("datasets/chat_{version}.parquet"))],
            ..DataConfig::default()
        };
        let data = load_files(&config.files, &config, &enc, None).unwrap();
        let cases = items(g.get(version).unwrap().get("cases").unwrap());
        assert_eq!(data.len(), cases.len());
        for (i, case) in cases.iter().enumerate() {
            let e = data.example(i);
            let want: Vec<u32> = ints(case.get("input_ids").unwrap()).into_iter().map(|i| i as u32).collect();
            assert_eq!(e.input_ids, &want[..], "{version} row {i}");
            let mask: Vec<bool> = ints(case.get("loss_mask").unwrap()).into_iter().map(|m| m == 1).collect();
            assert_eq!(e.loss_mask, &mask[..], "{version} row {i}");
            assert_eq!(e.origin.row, i as u64);
        }
    }
}

/// Inference prompts use the same layout as training: the prompt is a prefix of the training encoding.
#[test]
fn prompt_encoding_is_the_training_prefix() {
    for version in ["v1", "v3"] {
        let enc = Encoder::new(&tokenizer(version), PromptFormatChoice::Auto).unwrap();
        let g = golden();
        for case in items(g.get(version).unwrap().get("cases").unwrap()) {
            let mut conv = conversation(case);
            let last = conv.messages.len() - 1;
            if conv.messages[last].role != datasets::Role::Assistant
                || conv.messages[..last].iter().all(|m| m.role != datasets::Role::User)
                || !matches!(conv.messages[last - 1].role, datasets::Role::User | datasets::Role::Tool)
            {
                continue;
            }
            let full = enc.encode_conversation(&conv).unwrap();
            conv.messages.pop();
            let prompt = enc.encode_prompt(&conv).unwrap();
            assert_eq!(&full.input_ids[..prompt.len()], &prompt[..], "{version}");
            // Everything after the prompt is the trained answer.
            assert!(!full.loss_mask[prompt.len() - 1]);
        }
    }
}

/// The sentencepiece shortcut (normalize in place, call the BPE model) and the general pipeline agree, including
/// on text holding a non-special added token (which makes the shortcut step aside).
#[test]
fn shortcut_and_general_pipeline_agree() {
    let text = std::fs::read_to_string(fixtures().join("tokenizers/sentencepiece_parity.json")).unwrap();
    let parity = Json::parse(&text).unwrap();
    let mut texts: Vec<String> =
        items(parity.get("texts").unwrap()).iter().map(|t| t.as_str().unwrap().to_string()).collect();
    texts.push("see [REFERENCE_DOC_3] here".into());
    texts.push("[INST] literal </s> <s>".into());
    for version in ["v1", "v3"] {
        let enc = Encoder::new(&tokenizer(version), PromptFormatChoice::Auto).unwrap();
        assert!(enc.uses_shortcut(), "{version}");
        for t in &texts {
            assert_eq!(enc.encode_text(t).unwrap(), enc.encode_text_general(t).unwrap(), "{version}: {t:?}");
        }
    }
}
