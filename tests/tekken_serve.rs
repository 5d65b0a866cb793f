//! `tramontane serve` on the 131k-vocabulary tekken path (the bundled `tiny-nemo`: Nemo's shape, a natively read
//! `tekken.json` of format v3), with tools:
//!
//! - the prompt the server sends the model for an OpenAI chat request with `tools` and a tool-call / tool-result
//!   history is, token for token, what `tramontane data` (the training encoding) makes of the same conversation on
//!   the same tokenizer, read back through vLLM's `return_token_ids` extension;
//! - the same weights with only the `tokenizer.json` transformers' converter makes of a Nemo tekken file
//!   (`tests/fixtures/tekken/converted/`) serve v3 (`auto`), with mistral-common's own ids (`golden.json`);
//! - a generated `[TOOL_CALLS]` answer comes back as OpenAI `tool_calls`. Random weights never emit one, so that
//!   test rewrites tiny-nemo's weights (same config, same `tekken.json`) into a bigram model that greedily emits a
//!   scripted call: attention and MLP outputs zeroed (`o_proj`, `down_proj`), so the last hidden state is the
//!   current token's embedding, a one-hot slot per scripted token, and `lm_head` maps each slot to its successor.
//!   The call's text is spelled with pieces that are all distinct (`"` , ` "`, `":`, `"\n`), which a bigram needs.

mod serve_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use datasets::Json;
use serde_json::{json, Value};
use serve_common::{http, sse_events, start};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tekken")
}

fn tmp() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("tekken_serve")
}

/// The bundled tiny-nemo, generated once for this test binary.
fn tiny_nemo() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tmp().join("tiny-nemo");
        trainer::model::builtin::ensure("tiny-nemo", &dir).unwrap();
        assert!(dir.join("tekken.json").is_file() && !dir.join("tokenizer.json").exists());
        dir
    })
}

fn list(j: &Json) -> Vec<Json> {
    match j {
        Json::Array(items) => items.clone(),
        other => panic!("not a list: {other}"),
    }
}

fn role(m: &Json) -> &str {
    m.get("role").and_then(Json::as_str).unwrap()
}

fn ints(v: &Value) -> Vec<u64> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(|x| x.as_u64().unwrap()).collect()
}

/// The v3 golden conversations (mistral-common's ids on `tekken-base.json`) a chat request can ask the last answer
/// of: a trained final assistant message after a user or tool turn.
fn v3_cases() -> Vec<Json> {
    let golden = Json::parse(&std::fs::read_to_string(fixtures().join("golden.json")).unwrap()).unwrap();
    let cases = golden.get("versions").and_then(|v| v.get("v3")).and_then(|v| v.get("cases")).unwrap();
    list(cases)
        .into_iter()
        .filter(|case| {
            let messages = list(case.get("messages").unwrap());
            let (last, before) = messages.split_last().unwrap();
            role(last) == "assistant"
                && last.get("weight").and_then(Json::as_f64) != Some(0.0)
                && before.last().is_some_and(|m| ["user", "tool"].contains(&role(m)))
                && before.iter().any(|m| role(m) == "user")
        })
        .collect()
}

/// A chat request for everything before the last message, keys in order (tool schemas must keep theirs).
fn chat_request(model: &str, messages: &[Json], tools: &Json, extra: &[(&str, Json)]) -> String {
    let mut fields = vec![("model".to_string(), Json::Str(model.into()))];
    fields.push(("messages".to_string(), Json::Array(messages.to_vec())));
    if !list(tools).is_empty() {
        fields.push(("tools".to_string(), tools.clone()));
    }
    fields.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    Json::Object(fields).to_string()
}

fn chat(port: u16, body: &str) -> serve_common::Reply {
    http(port, "POST", "/v1/chat/completions", &[], body.as_bytes())
}

/// The prompt the server builds for the conversation before `case`'s last answer.
fn served_prompt(port: u16, model: &str, case: &Json) -> Vec<u64> {
    let messages = list(case.get("messages").unwrap());
    let extra = [("max_tokens", Json::Int(1)), ("temperature", Json::Int(0)), ("return_token_ids", Json::Bool(true))];
    let reply = chat(port, &chat_request(model, &messages[..messages.len() - 1], case.get("tools").unwrap(), &extra));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = reply.json();
    let prompt = ints(&v["prompt_token_ids"]);
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    prompt
}

/// The ids of `ids` up to the first trained token of the last answer: the prompt that answer follows.
fn before_last_answer(ids: &[u64], mask: &[u64]) -> Vec<u64> {
    let cut = mask.iter().rposition(|&m| m == 0).unwrap() + 1;
    ids[..cut].to_vec()
}

/// `tramontane data --json` on `cases` (one JSON line each, `tools` format, `prompt_format = "auto"`) with the
/// tokenizer of `model` (a bundled model when `builtin`), `--set` overrides in `set`.
fn data_json(tmp: &Path, model: &Path, builtin: Option<&str>, cases: &[Json], set: &[&str]) -> std::process::Output {
    let data = tmp.join("tools.jsonl");
    let lines: Vec<String> = cases
        .iter()
        .map(|c| {
            Json::Object(vec![
                ("messages".into(), c.get("messages").unwrap().clone()),
                ("tools".into(), c.get("tools").unwrap().clone()),
            ])
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let builtin = builtin.map(|b| format!("builtin = \"{b}\"\n")).unwrap_or_default();
    let recipe = tmp.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = \"{}\"\n{builtin}\n[lora]\nr = 4\nalpha = 8.0\ntargets = [\"q\"]\n\n\
             [data]\nfiles = [\"{}\"]\nformat = \"tools\"\nprompt_format = \"auto\"\nmax_seq_len = 1024\n\n\
             [train]\nmax_steps = 1\n\n[output]\ndir = \"{}\"\n",
            model.display(),
            data.display(),
            tmp.join("run").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(serve_common::bin());
    cmd.args(["data", recipe.to_str().unwrap(), "--json", "--limit", "1000"]);
    for s in set {
        cmd.args(["--set", s]);
    }
    cmd.output().unwrap()
}

#[test]
fn tiny_nemo_serves_tool_conversations_in_the_training_encoding() {
    let model = tiny_nemo();
    let cases = v3_cases();
    let with_history = cases.iter().filter(|c| list(c.get("messages").unwrap()).iter().any(|m| role(m) == "tool"));
    assert!(with_history.count() >= 5, "conversations with a tool call and its result");

    // The training encoding: `tramontane data` on the same conversations.
    let dir = tempfile::tempdir().unwrap();
    let out = data_json(dir.path(), model, Some("tiny-nemo"), &cases, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let encoded: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(encoded["prompt_format"], "v3", "auto picks tiny-nemo's tekken.json config.version");
    assert!(encoded["tokenizer"].as_str().unwrap().ends_with("tekken.json"));
    let examples = encoded["examples"].as_array().unwrap();
    assert_eq!(examples.len(), cases.len(), "every conversation is a training example");

    let server = start(model, &["--base-name".into(), "nemo".into()]);
    let mut with_tools = 0;
    for example in examples {
        // `row` is the JSON-lines file's 1-based line number.
        let case = &cases[example["row"].as_u64().unwrap() as usize - 1];
        let name = case.get("name").unwrap().to_string();
        let want = before_last_answer(&ints(&example["input_ids"]), &ints(&example["loss_mask"]));
        assert_eq!(served_prompt(server.port, "nemo", case), want, "{name}: the served prompt is not the training one");
        with_tools += usize::from(!list(case.get("tools").unwrap()).is_empty());
    }
    assert!(examples.len() >= 15 && with_tools >= 5, "{} conversations, {with_tools} with tools", examples.len());
}

#[test]
fn converted_nemo_tokenizer_json_serves_mistral_commons_prompts() {
    // tiny-nemo's weights with only transformers' conversion of the (cut) Nemo tekken file: no tekken.json.
    let dir = tmp().join("converted-nemo");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_nemo().join(file), dir.join(file)).unwrap();
    }
    std::fs::copy(fixtures().join("converted/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    // The issue's bug, through a recipe: `prompt_format = "auto"` took this file's [SYSTEM_PROMPT] for v7 and
    // refused it. Now auto is v3, and what the file cannot be (v11) is refused naming both.
    let work = tempfile::tempdir().unwrap();
    let out = data_json(work.path(), &dir, None, &v3_cases(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let encoded: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(encoded["prompt_format"], "v3");
    assert!(encoded["tokenizer"].as_str().unwrap().ends_with("tokenizer.json"));
    let (cases, examples) = (v3_cases(), encoded["examples"].as_array().unwrap());
    assert_eq!(examples.len(), cases.len());
    for example in examples {
        let case = &cases[example["row"].as_u64().unwrap() as usize - 1];
        let golden = |key: &str| -> Vec<u64> {
            list(case.get(key).unwrap()).iter().map(|v| v.as_i64().unwrap() as u64).collect()
        };
        let name = case.get("name").unwrap().to_string();
        assert_eq!(ints(&example["input_ids"]), golden("input_ids"), "{name}: training ids are not mistral-common's");
        assert_eq!(ints(&example["loss_mask"]), golden("loss_mask"), "{name}: trained positions differ");
    }
    let out = data_json(work.path(), &dir, None, &v3_cases(), &["data.prompt_format=v11"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("\"v11\"") && err.contains("v3 or v7"), "{err}");
    let server = start(&dir, &["--base-name".into(), "nemo".into()]);
    let mut checked = 0;
    for case in v3_cases() {
        let name = case.get("name").unwrap().to_string();
        let ids: Vec<u64> = list(case.get("input_ids").unwrap()).iter().map(|v| v.as_i64().unwrap() as u64).collect();
        let mask: Vec<u64> = list(case.get("loss_mask").unwrap()).iter().map(|v| v.as_i64().unwrap() as u64).collect();
        let want = before_last_answer(&ids, &mask);
        assert_eq!(
            served_prompt(server.port, "nemo", &case),
            want,
            "{name}: the served prompt is not mistral-common's"
        );
        checked += 1;
    }
    assert!(checked >= 15, "{checked}");
}

/// The scripted answer after `[/INST]`: `[TOOL_CALLS]`, a call spelled in distinct pieces, `</s>`.
const CALL_PIECES: [&str; 13] = ["[", "{", "\"", "name", "\":", " \"", "get", "_", "we", "ather", "\"\n", "}", "]"];

/// tiny-nemo rewritten into a bigram model that answers a v3 prompt with `[TOOL_CALLS]` and the scripted call.
/// Returns the directory and the scripted ids from `[TOOL_CALLS]` to `</s>`.
fn scripted_nemo() -> (PathBuf, Vec<u32>) {
    let dir = tmp().join("scripted-nemo");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "tekken.json"] {
        std::fs::copy(tiny_nemo().join(file), dir.join(file)).unwrap();
    }
    let loaded = datasets::load_tokenizer(&dir.join("tekken.json")).unwrap();
    let enc = datasets::Encoder::for_tokenizer(&loaded, datasets::PromptFormatChoice::Auto).unwrap();
    let id = |t: &str| loaded.tokenizer.token_to_id(t).unwrap();
    let mut chain = vec![id("[/INST]"), id("[TOOL_CALLS]")];
    for piece in CALL_PIECES {
        let ids = enc.encode_text(piece).unwrap();
        assert_eq!(ids.len(), 1, "{piece:?} is one token");
        chain.push(ids[0]);
    }
    chain.push(enc.eos_id());
    // A bigram model needs every token but the last to have one successor.
    let slot: HashMap<u32, usize> = chain[..chain.len() - 1].iter().enumerate().map(|(i, &t)| (t, i)).collect();
    assert_eq!(slot.len(), chain.len() - 1, "scripted tokens repeat");

    let mut tensors = candle_core::safetensors::load(tiny_nemo().join("model.safetensors"), &Device::Cpu).unwrap();
    let (vocab, hidden) = tensors["model.embed_tokens.weight"].dims2().unwrap();
    assert!(slot.len() <= hidden);
    let mut embed = vec![0f32; vocab * hidden];
    let mut lm_head = vec![0f32; vocab * hidden];
    for w in chain.windows(2) {
        let s = slot[&w[0]];
        embed[w[0] as usize * hidden + s] = 1.0;
        lm_head[w[1] as usize * hidden + s] = 1.0;
    }
    let t = |data: Vec<f32>| Tensor::from_vec(data, (vocab, hidden), &Device::Cpu).unwrap();
    tensors.insert("model.embed_tokens.weight".into(), t(embed));
    tensors.insert("lm_head.weight".into(), t(lm_head));
    for (name, tensor) in tensors.iter_mut() {
        if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            *tensor = tensor.zeros_like().unwrap();
        } else if name == "model.norm.weight" {
            *tensor = tensor.ones_like().unwrap();
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    (dir, chain[1..].to_vec())
}

#[test]
fn tiny_nemo_tool_call_comes_back_as_openai_tool_calls() {
    let (dir, script) = scripted_nemo();
    let server = start(&dir, &["--base-name".into(), "nemo".into()]);
    let tools = Json::parse(
        r#"[{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]"#,
    )
    .unwrap();
    let question = [Json::parse(r#"{"role": "user", "content": "Weather in Paris?"}"#).unwrap()];
    let greedy = [("temperature", Json::Int(0)), ("max_tokens", Json::Int(32))];
    let mut with_ids = greedy.to_vec();
    with_ids.push(("return_token_ids", Json::Bool(true)));

    let reply = chat(server.port, &chat_request("nemo", &question, &tools, &with_ids));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = reply.json();
    let choice = &v["choices"][0];
    // The model generated exactly the scripted ids: [TOOL_CALLS], the call, </s>.
    let generated: Vec<u32> = ints(&choice["token_ids"]).into_iter().map(|x| x as u32).collect();
    assert_eq!(generated, script, "{v}");
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["type"], "function");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"), "v3 calls carry no id in the answer: {v}");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[0]["function"]["arguments"], "{}", "a call without arguments gets `{{}}`");

    // Streamed: the call arrives whole in one chunk, then the finish reason.
    let mut streamed = greedy.to_vec();
    streamed.push(("stream", Json::Bool(true)));
    let reply = chat(server.port, &chat_request("nemo", &question, &tools, &streamed));
    assert_eq!(reply.status, 200);
    let events = sse_events(&reply.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let with_calls: Vec<&Value> = chunks.iter().filter(|c| c["choices"][0]["delta"]["tool_calls"].is_array()).collect();
    assert_eq!(with_calls.len(), 1, "{events:?}");
    assert_eq!(with_calls[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");

    // Without `tools` in the request nothing is parsed: the payload is the text.
    let v = chat(server.port, &chat_request("nemo", &question, &Json::Array(Vec::new()), &greedy)).json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(text).unwrap(), json!([{"name": "get_weather"}]), "{text:?}");
}
