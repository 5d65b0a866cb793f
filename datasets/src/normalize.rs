//! mistral-common's request normalization (`InstructRequestNormalizer` and its v7/v13 variants), before encoding.
//!
//! * Consecutive messages of the same role (and, for the assistant, the same weight) merge: text joined with a
//!   blank line (empty parts skipped), tool calls concatenated. Tool messages never merge.
//! * v1–v3: every system message is removed and their texts (joined with a blank line) become the one system
//!   prompt; if the first remaining message is not a user message, an empty user message goes first. Consecutive
//!   assistant messages that merge into text *and* tool calls are refused (these formats cannot say both).
//! * v7 and later: system messages stay where they are, each its own block; nothing is put first.
//! * v11 and later: a run of tool results is sorted into the order of the calls it answers.

use crate::error::Problem;
use crate::prompt_format::PromptFormat;
use crate::record::{Conversation, Message, Role, ToolCall};

/// A conversation after normalization.
#[derive(Debug, Clone)]
pub struct Normalized {
    /// The system prompt of v1–v3 (`None` when there is none, or for v7+ whose system messages stay in place).
    pub system: Option<String>,
    /// The messages to encode, in order.
    pub messages: Vec<Message>,
}

fn join_nonempty<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for p in parts.filter(|p| !p.is_empty()) {
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(p);
    }
    out
}

/// Normalizes `conv` as mistral-common does for `format`.
pub fn normalize(conv: &Conversation, format: PromptFormat) -> Result<Normalized, Problem> {
    let in_place = format >= PromptFormat::V7;
    let msgs = &conv.messages;
    let system = if in_place {
        None
    } else {
        let parts: Vec<&str> = msgs
            .iter()
            .filter(|m| m.role == Role::System && !m.content.is_empty())
            .map(|m| m.content.as_str())
            .collect();
        (!parts.is_empty()).then(|| parts.join("\n\n"))
    };
    let mut out: Vec<Message> = Vec::with_capacity(msgs.len());
    // Call ids of the assistant messages since the last run of tool results (v11+ sorts results by them).
    let mut latest_calls: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < msgs.len() {
        let role = msgs[i].role;
        let weight = msgs[i].weight;
        let mut j = i + 1;
        while j < msgs.len() && msgs[j].role == role && msgs[j].weight == weight {
            j += 1;
        }
        let group = &msgs[i..j];
        match role {
            Role::System if in_place => out.extend(group.iter().map(|m| Message::new(Role::System, m.content.clone()))),
            Role::System => {}
            Role::Tool => {
                let start = out.len();
                out.extend(group.iter().cloned());
                if format >= PromptFormat::V11 {
                    let pos = |m: &Message| {
                        let id = m.tool_call_id.as_deref().unwrap_or("null");
                        latest_calls.iter().rposition(|c| *c == id).unwrap_or(usize::MAX)
                    };
                    // A stable sort keeps the results' own order among equal keys, as mistral-common's key does.
                    out[start..].sort_by_key(pos);
                }
                latest_calls.clear();
            }
            Role::User => {
                out.push(Message::new(Role::User, join_nonempty(group.iter().map(|m| m.content.as_str()))));
            }
            Role::Assistant => {
                let content = join_nonempty(group.iter().map(|m| m.content.as_str()));
                let tool_calls: Vec<ToolCall> = group.iter().flat_map(|m| m.tool_calls.iter().cloned()).collect();
                if !in_place && !content.is_empty() && !tool_calls.is_empty() {
                    return Err(Problem::invalid(format!(
                        "messages {i} to {}: consecutive assistant messages merge into one with both text and tool \
                         calls, which prompt format {} cannot encode",
                        j - 1,
                        format.name()
                    )));
                }
                latest_calls
                    .extend(group.iter().flat_map(|m| m.tool_calls.iter()).map(|c| c.id.as_deref().unwrap_or("null")));
                out.push(Message { role, content, weight, tool_calls, tool_call_id: None });
            }
        }
        i = j;
    }
    if out.is_empty() || (!in_place && out[0].role != Role::User) {
        out.insert(0, Message::new(Role::User, ""));
    }
    Ok(Normalized { system, messages: out })
}
