//! The OpenAI wire format: errors, request bodies, chat messages and tools in, tool calls out.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// An OpenAI-style error response.
pub(super) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub(super) fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param,
        }
    }

    /// A 5xx `server_error`.
    pub(super) fn server(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, kind: "server_error", ..ApiError::invalid(message, None) }
    }

    /// 404 for a model or adapter that is not served.
    pub(super) fn model_not_found(message: String, param: &'static str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::invalid(message, Some(param))
        }
    }
}

impl ApiError {
    /// The OpenAI error object (the response body, or a streamed event's data).
    pub(super) fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The body's bytes (413 when over the size limit).
pub(super) fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is too large".to_string()
        } else {
            format!("cannot read the request body: {e}")
        };
        ApiError { status, ..ApiError::invalid(message, None) }
    })
}

/// The body as a JSON object (400 when not JSON or not an object).
pub(super) fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object", None));
    }
    Ok(value)
}

/// [`read_body`] then [`parse_object`].
pub(super) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    parse_object(&read_body(body)?)
}

/// The prompt ids of a chat request (`body`: the raw JSON with `messages` and optional `tools`), in the model's
/// Mistral format with the layout training uses (mistral-common's): a v3 tokenizer gets `[AVAILABLE_TOOLS]`,
/// `[TOOL_CALLS]` and `[TOOL_RESULTS]`; a v1 tokenizer refuses tools.
pub(super) fn chat_prompt_ids(encoder: &datasets::Encoder, body: &[u8]) -> Result<Vec<u32>, ApiError> {
    // Parsed again, order-preserving: tool schemas and arguments go into the prompt as JSON text, and their keys must
    // keep the client's order to give mistral-common's tokens.
    let text = std::str::from_utf8(body).map_err(|e| ApiError::invalid(format!("the body is not UTF-8: {e}"), None))?;
    let body = datasets::Json::parse(text)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    let conv = conversation(&body)?;
    encoder
        .encode_prompt(&conv)
        .map_err(|p| ApiError::invalid(format!("cannot encode the messages: {p}"), Some("messages")))
}

/// The conversation of a chat request body, read as training data is (`datasets`' parser of OpenAI-style
/// `messages` and `tools`), with OpenAI's `developer` role taken as `system`.
pub(super) fn conversation(body: &datasets::Json) -> Result<datasets::Conversation, ApiError> {
    let messages = match body.get("messages") {
        None | Some(datasets::Json::Null) => return Err(ApiError::invalid("`messages` is required", Some("messages"))),
        Some(datasets::Json::Array(list)) if list.is_empty() => {
            return Err(ApiError::invalid("`messages` must not be empty", Some("messages")))
        }
        Some(m @ datasets::Json::Array(_)) => m.clone(),
        Some(_) => return Err(ApiError::invalid("`messages` must be an array", Some("messages"))),
    };
    let mut config = datasets::DataConfig::default();
    config.roles.insert("developer".into(), datasets::Role::System);
    let messages = datasets::record::parse_messages(messages, "messages", &config)
        .map_err(|p| ApiError::invalid(p.to_string(), Some("messages")))?;
    let tools = match body.get("tools") {
        None | Some(datasets::Json::Null) => Vec::new(),
        Some(t @ datasets::Json::Array(_)) => datasets::record::parse_tools(t.clone(), "tools")
            .map_err(|p| ApiError::invalid(p.to_string(), Some("tools")))?,
        Some(_) => return Err(ApiError::invalid("`tools` must be an array", Some("tools"))),
    };
    Ok(datasets::Conversation { messages, tools })
}

/// The OpenAI `tool_calls` (arguments as JSON text, ids the model's own or `call_<request>_<i>`) and the text
/// before them, read from generated `ids` in the model's prompt format; `None` when the answer holds no tool call.
pub(super) fn tool_calls_of(
    encoder: &datasets::Encoder,
    ids: &[u32],
    request: u64,
) -> Option<(Option<String>, Vec<Value>)> {
    let answer = encoder.parse_answer(ids)?;
    let calls = answer
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let id = c.id.clone().unwrap_or_else(|| format!("call_{request}_{i}"));
            json!({"index": i, "id": id, "type": "function",
                "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect();
    Some(((!answer.content.is_empty()).then_some(answer.content), calls))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn tool_call_payloads_become_openai_tool_calls() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/mistral-v3.tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path).unwrap();
        let encoder = datasets::Encoder::new(&tokenizer, datasets::PromptFormatChoice::Auto).unwrap();
        let calls_id = tokenizer.token_to_id("[TOOL_CALLS]").unwrap();
        let ids =
            |text: &str| -> Vec<u32> { [calls_id].into_iter().chain(encoder.encode_text(text).unwrap()).collect() };
        let (content, calls) =
            tool_calls_of(&encoder, &ids(r#"[{"name": "get_weather", "arguments": {"city": "Paris"}}]"#), 7).unwrap();
        assert_eq!(content, None);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(calls[0]["id"], "call_7_0");
        assert!(tool_calls_of(&encoder, &encoder.encode_text("Arr, no tools here").unwrap(), 1).is_none());
        assert!(tool_calls_of(&encoder, &ids("[]"), 1).is_none());
        assert!(tool_calls_of(&encoder, &ids(r#"[{"arguments": {}}]"#), 1).is_none());
    }

    #[test]
    fn openai_messages_and_tools_become_a_conversation() {
        let body = json!({"messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "abcdefghi", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "abcdefghi", "content": "22C"}
        ], "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]});
        let parse = |v: &Value| conversation(&datasets::Json::parse(&v.to_string()).unwrap());
        let conv = parse(&body).unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(conv.messages.len(), 4);
        assert_eq!(conv.messages[0].role, datasets::Role::System);
        assert_eq!(conv.messages[1].content, "Weather in Paris?");
        assert_eq!(conv.messages[2].tool_calls[0].name, "get_weather");
        assert_eq!(conv.messages[3].tool_call_id.as_deref(), Some("abcdefghi"));
        assert_eq!(conv.tools[0].name, "get_weather");
        let error = |v: Value| parse(&v).err().map(|e| e.message).unwrap_or_default();
        assert!(error(json!({"messages": []})).contains("must not be empty"));
        assert!(error(json!({})).contains("required"));
        assert!(error(json!({"messages": body["messages"], "tools": {"not": "a list"}})).contains("must be an array"));
        assert!(error(json!({"messages": [{"role": "user", "content": 5}]})).contains("expected a string"));
        assert!(error(json!({"messages": [{"role": "wizard", "content": "x"}]})).contains("role"));
    }

    /// The OpenAI requests built from mistral-common's golden conversations (every message before the final
    /// assistant answer, with the conversation's tools) encode to mistral-common's ids up to that answer, on the
    /// real Mistral v3 (tools) and v1 tokenizers. Read order-preserving, as a client sends them.
    #[test]
    fn chat_requests_encode_like_mistral_common() {
        use datasets::Json;
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let golden =
            Json::parse(&std::fs::read_to_string(fixtures.join("datasets/mistral_golden.json")).unwrap()).unwrap();
        let list = |j: &Json| match j {
            Json::Array(items) => items.clone(),
            other => panic!("not a list: {other}"),
        };
        let ints = |j: &Json| list(j).iter().map(|v| v.as_i64().unwrap() as u32).collect::<Vec<u32>>();
        for version in ["v1", "v3"] {
            let path = fixtures.join(format!("tokenizers/mistral-{version}.tokenizer.json"));
            let tokenizer = tokenizers::Tokenizer::from_file(&path).unwrap();
            let encoder = datasets::Encoder::new(&tokenizer, datasets::PromptFormatChoice::Auto).unwrap();
            let mut checked = 0;
            let mut with_tools = 0;
            for case in list(golden.get(version).unwrap().get("cases").unwrap()) {
                let name = case.get("name").unwrap().to_string();
                let messages = list(case.get("messages").unwrap());
                let Some((last, before)) = messages.split_last() else { continue };
                let role = |m: &Json| m.get("role").and_then(Json::as_str).unwrap().to_string();
                if role(last) != "assistant"
                    || last.get("weight").and_then(Json::as_f64) == Some(0.0)
                    || !before.last().is_some_and(|m| ["user", "tool"].contains(&role(m).as_str()))
                    || !before.iter().any(|m| role(m) == "user")
                {
                    continue;
                }
                let ids = ints(case.get("input_ids").unwrap());
                // The prompt is everything before the final answer (whose tokens are the trained tail).
                let mask = ints(case.get("loss_mask").unwrap());
                let cut = mask.iter().rposition(|&m| m == 0).unwrap() + 1;
                if version == "v3" {
                    assert!([4, 9].contains(&ids[cut - 1]), "{name}: ends with `[/INST]` or `[/TOOL_RESULTS]`");
                }
                let mut fields = vec![("model".to_string(), Json::Str("m".into()))];
                fields.push(("messages".to_string(), Json::Array(before.to_vec())));
                let tools = case.get("tools").unwrap();
                if !list(tools).is_empty() {
                    fields.push(("tools".to_string(), tools.clone()));
                    with_tools += 1;
                }
                let body = Json::Object(fields).to_string();
                let got =
                    chat_prompt_ids(&encoder, body.as_bytes()).unwrap_or_else(|e| panic!("{name}: {}", e.message));
                assert_eq!(got, ids[..cut], "{version} {name}");
                checked += 1;
            }
            assert!(checked >= 10, "{version}: only {checked} cases");
            if version == "v3" {
                assert!(with_tools >= 5, "only {with_tools} cases with tools");
            }
        }
    }
}
