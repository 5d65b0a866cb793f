//! Tool calls through `tramontane serve` on a model with the real Mistral v3 tokenizer (mistral-common's
//! `[AVAILABLE_TOOLS]`/`[TOOL_CALLS]`/`[TOOL_RESULTS]` control tokens):
//!
//! - the prompt the server builds for an OpenAI chat request with `tools` is, token for token, mistral-common's
//!   encoding of the same conversation (tests/fixtures/datasets/mistral_golden.json), read back through vLLM's
//!   `return_token_ids` extension;
//! - a model whose greedy output is `[TOOL_CALLS][{"name": .., "arguments": {..}}]</s>` gets an OpenAI `tool_calls`
//!   answer with `finish_reason: "tool_calls"`, streamed or not; after a tool result it answers in plain text.
//!
//! The model is tiny and hand-made so that greedy decoding emits those outputs: one layer whose attention has a
//! sliding window of 2 and uniform scores (it averages the previous and the current token's values), so the last
//! hidden state encodes (previous token, current token), and an lm_head that maps each such pair of the two
//! scripted answers to the next token. Everything else is the real serving path: prefill of the full v3 prompt,
//! batched decoding, detokenization, `[TOOL_CALLS]` detection and parsing.

mod serve_common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use datasets::Json;
use serde_json::{json, Value};
use serve_common::{http, post, sse_events, start};

/// The tool call the model makes after `[/INST]` (compact JSON: its tokens, in context, determine their successor).
const CALL: &str = r#"[{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}]"#;
/// What the model says after `[/TOOL_RESULTS]`.
const ANSWER: &str = "It is 21 degrees and sunny in Paris.";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The two scripted continuations, as token ids from the trigger token to `</s>`.
struct Script {
    call: Vec<u32>,
    answer: Vec<u32>,
}

fn script(tok: &tokenizers::Tokenizer) -> Script {
    let id = |t: &str| tok.token_to_id(t).unwrap_or_else(|| panic!("no `{t}` in the v3 tokenizer"));
    let encode = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    let mut call = vec![id("[/INST]"), id("[TOOL_CALLS]")];
    call.extend(encode(CALL));
    call.push(id("</s>"));
    let mut answer = vec![id("[/TOOL_RESULTS]")];
    answer.extend(encode(ANSWER));
    answer.push(id("</s>"));
    Script { call, answer }
}

/// Writes the hand-made model (config, safetensors, the v3 tokenizer) into `dir`.
fn write_model(dir: &Path) -> Script {
    let tokenizer_path = fixtures().join("tokenizers/mistral-v3.tokenizer.json");
    let tok = tokenizers::Tokenizer::from_file(&tokenizer_path).unwrap();
    let s = script(&tok);
    let vocab = tok.get_vocab_size(true);
    // Feature slots: one per scripted token, one shared by every other token; even, for RoPE's halves.
    let tokens: BTreeSet<u32> = s.call.iter().chain(&s.answer).copied().collect();
    let slot: HashMap<u32, usize> = tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let junk = tokens.len();
    let d = (junk + 2) & !1;
    let h = 2 * d;
    let slot_of = |t: u32| slot.get(&t).copied().unwrap_or(junk);
    // Each (previous, current) pair of a script must determine the next token.
    let mut next: HashMap<(u32, u32), u32> = HashMap::new();
    for chain in [&s.call, &s.answer] {
        for w in chain.windows(3) {
            assert_eq!(*next.entry((w[0], w[1])).or_insert(w[2]), w[2], "ambiguous context {:?}", &w[..2]);
        }
    }
    // Embedding: the one-hot of the token's slot in the first half of the hidden state.
    let mut embed = vec![0f32; vocab * h];
    for t in 0..vocab {
        embed[t * h + slot_of(t as u32)] = 1.0;
    }
    // Attention: q = k = 0 (uniform over the window of 2), v copies the normed one-hot (x = e * sqrt(h)) into the
    // head, o writes it into the second half: h = [e_cur ; (e_prev + e_cur) / 2].
    let mut v_proj = vec![0f32; d * h];
    let mut o_proj = vec![0f32; h * d];
    for i in 0..d {
        v_proj[i * h + i] = 1.0 / (h as f32).sqrt();
        o_proj[(d + i) * d + i] = 1.0;
    }
    // lm_head: the first token of each script follows its trigger whatever came before; every later token scores
    // 1 for its current token and 10 for its previous one (the halves' e_cur cancelled in the first half).
    let mut lm_head = vec![0f32; vocab * h];
    for chain in [&s.call, &s.answer] {
        lm_head[chain[1] as usize * h + slot_of(chain[0])] += 20.0;
        for w in chain.windows(3) {
            let (prev, cur, y) = (slot_of(w[0]), slot_of(w[1]), w[2] as usize);
            lm_head[y * h + cur] += 1.0;
            lm_head[y * h + d + prev] += 20.0;
            lm_head[y * h + prev] -= 10.0;
        }
    }
    let t = |data: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    let inter = 8;
    let tensors: HashMap<String, Tensor> = [
        ("model.embed_tokens.weight", t(embed, (vocab, h))),
        ("model.layers.0.input_layernorm.weight", ones(h)),
        ("model.layers.0.post_attention_layernorm.weight", ones(h)),
        ("model.layers.0.self_attn.q_proj.weight", t(vec![0.0; d * h], (d, h))),
        ("model.layers.0.self_attn.k_proj.weight", t(vec![0.0; d * h], (d, h))),
        ("model.layers.0.self_attn.v_proj.weight", t(v_proj, (d, h))),
        ("model.layers.0.self_attn.o_proj.weight", t(o_proj, (h, d))),
        ("model.layers.0.mlp.gate_proj.weight", t(vec![0.0; inter * h], (inter, h))),
        ("model.layers.0.mlp.up_proj.weight", t(vec![0.0; inter * h], (inter, h))),
        ("model.layers.0.mlp.down_proj.weight", t(vec![0.0; h * inter], (h, inter))),
        ("model.norm.weight", ones(h)),
        ("lm_head.weight", t(lm_head, (vocab, h))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let config = json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
        "head_dim": d, "hidden_act": "silu", "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": 2,
        "max_position_embeddings": 1024, "tie_word_embeddings": false, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(&tokenizer_path, dir.join("tokenizer.json")).unwrap();
    s
}

struct Fixture {
    model: PathBuf,
    script: Script,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let model = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve_tools/v3-tools");
        let script = write_model(&model);
        Fixture { model, script }
    })
}

/// The golden v3 conversations of mistral-common (order-preserving).
fn golden_cases() -> Vec<Json> {
    let text = std::fs::read_to_string(fixtures().join("datasets/mistral_golden.json")).unwrap();
    let golden = Json::parse(&text).unwrap();
    match golden.get("v3").and_then(|v| v.get("cases")) {
        Some(Json::Array(cases)) => cases.clone(),
        _ => panic!("no v3 cases"),
    }
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

/// A chat request body, keys in the given order (tool schemas must keep theirs).
fn chat_request(messages: &[Json], tools: Option<&Json>, extra: &[(&str, Json)]) -> String {
    let mut fields = vec![("model".to_string(), Json::Str("v3".into()))];
    fields.push(("messages".to_string(), Json::Array(messages.to_vec())));
    if let Some(tools) = tools {
        fields.push(("tools".to_string(), tools.clone()));
    }
    fields.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    Json::Object(fields).to_string()
}

fn chat(port: u16, body: &str) -> serve_common::Reply {
    http(port, "POST", "/v1/chat/completions", &[], body.as_bytes())
}

#[test]
fn the_prompt_is_mistral_commons_encoding() {
    let fx = fixture();
    let server = start(&fx.model, &["--base-name".into(), "v3".into()]);
    let mut checked = 0;
    let mut with_tools = 0;
    for case in golden_cases() {
        let name = case.get("name").unwrap().to_string();
        let messages = list(case.get("messages").unwrap());
        let Some((last, before)) = messages.split_last() else { continue };
        // Requests the golden can answer: everything before a trained final answer, after a user or tool turn.
        if role(last) != "assistant"
            || last.get("weight").and_then(Json::as_f64) == Some(0.0)
            || !before.last().is_some_and(|m| ["user", "tool"].contains(&role(m)))
            || !before.iter().any(|m| role(m) == "user")
        {
            continue;
        }
        let ids: Vec<u64> = list(case.get("input_ids").unwrap()).iter().map(|v| v.as_i64().unwrap() as u64).collect();
        let mask = list(case.get("loss_mask").unwrap());
        let cut = mask.iter().rposition(|m| m.as_i64() == Some(0)).unwrap() + 1;
        let tools = case.get("tools").filter(|t| !list(t).is_empty());
        with_tools += usize::from(tools.is_some());
        let extra =
            [("max_tokens", Json::Int(1)), ("temperature", Json::Int(0)), ("return_token_ids", Json::Bool(true))];
        let reply = chat(server.port, &chat_request(before, tools, &extra));
        assert_eq!(reply.status, 200, "{name}: {}", reply.body);
        let v = reply.json();
        let prompt: Vec<u64> = v["prompt_token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert_eq!(prompt, ids[..cut], "{name}: the server's prompt differs from mistral-common's");
        assert_eq!(v["usage"]["prompt_tokens"], cut, "{name}");
        checked += 1;
    }
    assert!(checked >= 15 && with_tools >= 5, "{checked} cases checked, {with_tools} with tools");
}

/// The golden `tool_call_and_result` conversation: a user question, the assistant's call, the tool's result.
fn tool_conversation() -> (Vec<Json>, Json) {
    let case =
        golden_cases().into_iter().find(|c| c.get("name").and_then(Json::as_str) == Some("tool_call_and_result"));
    let case = case.unwrap();
    (list(case.get("messages").unwrap()), case.get("tools").unwrap().clone())
}

#[test]
fn tool_calls_come_back_in_openais_shape() {
    let fx = fixture();
    let server = start(&fx.model, &["--base-name".into(), "v3".into()]);
    let port = server.port;
    let (messages, tools) = tool_conversation();
    let question = &messages[..1];
    assert_eq!(role(&question[0]), "user");
    let greedy = [("temperature", Json::Int(0)), ("max_tokens", Json::Int(64))];
    let mut with_ids = greedy.to_vec();
    with_ids.push(("return_token_ids", Json::Bool(true)));

    // Not streamed.
    let reply = chat(port, &chat_request(question, Some(&tools), &with_ids));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = reply.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_null(), "{v}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["type"], "function");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let arguments: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Paris", "unit": "celsius"}));
    // The model produced exactly the scripted tokens: `[TOOL_CALLS]`, the payload, `</s>`.
    let ids: Vec<u32> = choice["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, fx.script.call[1..]);
    assert_eq!(v["usage"]["completion_tokens"], ids.len());

    // Streamed: the calls arrive whole, then the finish reason.
    let mut streamed = greedy.to_vec();
    streamed.push(("stream", Json::Bool(true)));
    let reply = chat(port, &chat_request(question, Some(&tools), &streamed));
    assert_eq!(reply.status, 200);
    let events = sse_events(&reply.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let with_calls: Vec<&Value> = chunks.iter().filter(|c| c["choices"][0]["delta"]["tool_calls"].is_array()).collect();
    assert_eq!(with_calls.len(), 1, "{events:?}");
    let call = &with_calls[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(call["index"], 0);
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Paris", "unit": "celsius"}));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");

    // After the tool's result the model answers in text: a plain message, finish "stop".
    let after_result = &messages[..3];
    assert_eq!(role(&after_result[2]), "tool");
    let v = chat(port, &chat_request(after_result, Some(&tools), &greedy)).json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], ANSWER);
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    let reply = chat(port, &chat_request(after_result, Some(&tools), &streamed));
    assert_eq!(serve_common::streamed_text(&reply.body), ANSWER);

    // Without `tools` in the request nothing is parsed: the payload is the text.
    let v = chat(port, &chat_request(question, None, &greedy)).json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(text).unwrap(), serde_json::from_str::<Value>(CALL).unwrap());
}

#[test]
fn tools_need_a_v3_tokenizer() {
    let v1 = fixtures().join("models/tiny-mistral");
    let server = start(&v1, &["--base-name".into(), "v1".into()]);
    let (messages, tools) = tool_conversation();
    let mut body: Value = serde_json::from_str(&chat_request(&messages[..1], Some(&tools), &[])).unwrap();
    body["model"] = json!("v1");
    let reply = post(server.port, "/v1/chat/completions", &body);
    assert_eq!(reply.status, 400, "{}", reply.body);
    let v = reply.json();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("tool"), "{v}");
}
