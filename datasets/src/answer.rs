//! Reading a model's answer back in its prompt format: the text, then the tool calls the format writes after
//! `[TOOL_CALLS]` (v2–v7: one JSON list `[{"name", "arguments", "id"}]`; v11: `name [CALL_ID] id [ARGS] json` per
//! call; v13+: `name [ARGS] json` per call). What `serve` turns into OpenAI `tool_calls`.

use crate::encode::Encoder;
use crate::prompt_format::PromptFormat;

/// One tool call read from an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerCall {
    /// The function name.
    pub name: String,
    /// The arguments as JSON text (`{}` when absent).
    pub arguments: String,
    /// The call id, when the format writes one.
    pub id: Option<String>,
}

/// An answer split into its text and its tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The text before the first `[TOOL_CALLS]` (empty when there is none).
    pub content: String,
    /// The tool calls.
    pub tool_calls: Vec<AnswerCall>,
}

impl Encoder {
    /// Splits generated `ids` into text and tool calls; `None` when there is no `[TOOL_CALLS]` token or the calls
    /// do not parse (the answer is then plain text).
    pub fn parse_answer(&self, ids: &[u32]) -> Option<Answer> {
        let tok = self.tokenizer();
        let id = |t: &str| tok.token_to_id(t);
        let calls_tok = id("[TOOL_CALLS]").filter(|_| self.prompt_format().has_tools())?;
        let start = ids.iter().position(|&t| t == calls_tok)?;
        let text = |part: &[u32]| tok.decode(part, true).ok();
        let content = text(&ids[..start])?;
        let mut tool_calls = Vec::new();
        if self.prompt_format() < PromptFormat::V11 {
            let value: serde_json::Value = serde_json::from_str(text(&ids[start + 1..])?.trim()).ok()?;
            let list = match value {
                serde_json::Value::Array(list) => list,
                one @ serde_json::Value::Object(_) => vec![one],
                _ => return None,
            };
            for call in list {
                let name = call.get("name")?.as_str()?.to_string();
                let arguments = match call.get("arguments") {
                    None | Some(serde_json::Value::Null) => "{}".to_string(),
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                };
                let id = call.get("id").and_then(|v| v.as_str()).map(String::from);
                tool_calls.push(AnswerCall { name, arguments, id });
            }
        } else {
            let (args_tok, id_tok) = (id("[ARGS]")?, id("[CALL_ID]"));
            for segment in ids[start..].split(|&t| t == calls_tok).skip(1) {
                let args_at = segment.iter().position(|&t| t == args_tok)?;
                let head = &segment[..args_at];
                let (name, call_id) = match head.iter().position(|&t| Some(t) == id_tok) {
                    Some(c) => (text(&head[..c])?, Some(text(&head[c + 1..])?)),
                    None => (text(head)?, None),
                };
                let arguments = text(&segment[args_at + 1..])?.trim().to_string();
                let arguments = match serde_json::from_str::<serde_json::Value>(&arguments) {
                    Ok(v) => v.to_string(),
                    Err(_) if arguments.is_empty() => "{}".to_string(),
                    Err(_) => return None,
                };
                tool_calls.push(AnswerCall { name: name.trim().to_string(), arguments, id: call_id });
            }
        }
        (!tool_calls.is_empty()).then_some(Answer { content, tool_calls })
    }
}
