//! mistral-common's request validation per prompt format (finetuning mode for training, test mode for prompts),
//! plus one stricter rule: from v3 on, a tool result must answer a call of the preceding assistant message by id.
//!
//! Call ids: v2 has none (a tool result answers the turn's single call); v3, v7 and v11 want 9 characters
//! `[a-zA-Z0-9]`, and a training conversation's final message may leave them out; v13 and later want any id other
//! than "null", always.

use crate::error::Problem;
use crate::prompt_format::PromptFormat;
use crate::record::{Conversation, Role};

/// Whether a conversation is encoded for training (ends with the assistant) or as a prompt (ends with the user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A training example: ends with an assistant message.
    Train,
    /// A prompt the model continues: ends with a user or tool message.
    Prompt,
}

fn is_function_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `id` is a valid call id in `format` (`None` for "no id given").
fn id_problem(id: &str, format: PromptFormat) -> Option<String> {
    if format >= PromptFormat::V13 {
        return (id.is_empty() || id == "null")
            .then(|| format!("id `{id}` must be a non-empty string other than null"));
    }
    let ok = id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    (!ok).then(|| format!("id `{id}` must be 9 characters a-z, A-Z, 0-9"))
}

fn needs(format: PromptFormat, what: &str) -> Problem {
    Problem::invalid(format!(
        "prompt format {} has no {what}; use a tokenizer of format v2 or later (data.prompt_format)",
        format.name()
    ))
}

/// Checks `conv` as mistral-common's validator for `format` does, in `mode`.
pub fn validate(conv: &Conversation, format: PromptFormat, mode: Mode) -> Result<(), Problem> {
    let msgs = &conv.messages;
    let at = |i: usize| format!("message {i}");
    let Some(last) = msgs.last() else {
        return Err(Problem::invalid("the conversation has no messages"));
    };
    match mode {
        Mode::Train if last.role != Role::Assistant => {
            return Err(Problem::invalid(format!(
                "the conversation ends with a {} message; a training conversation must end with an assistant message",
                last.role.name()
            )))
        }
        Mode::Prompt if !matches!(last.role, Role::User | Role::Tool) => {
            return Err(Problem::invalid(format!(
                "a prompt must end with a user or tool message, not {}",
                last.role.name()
            )))
        }
        _ => {}
    }
    if !format.has_tools() && !conv.tools.is_empty() {
        return Err(needs(format, "tools"));
    }
    for t in &conv.tools {
        if !is_function_name(&t.name) {
            return Err(Problem::invalid(format!(
                "tool name `{}` must be 1 to 64 characters a-z, A-Z, 0-9, _ or -",
                t.name
            )));
        }
    }
    let with_ids = format >= PromptFormat::V3;
    let last_user = msgs.iter().rposition(|m| m.role == Role::User).unwrap_or(0);
    let mut prev: Option<Role> = None;
    // Ids of the latest assistant tool calls, and the results seen since.
    let mut pending: Vec<&str> = Vec::new();
    let mut answered: Vec<&str> = Vec::new();
    let mut expected_results = 0usize;
    for (i, m) in msgs.iter().enumerate() {
        if let Some(p) = prev {
            let ok = match p {
                Role::System => matches!(m.role, Role::User | Role::Assistant | Role::System),
                Role::User => matches!(m.role, Role::Assistant | Role::System | Role::User),
                Role::Assistant => matches!(m.role, Role::Assistant | Role::User | Role::Tool),
                Role::Tool => matches!(m.role, Role::Assistant | Role::Tool | Role::User),
            };
            if !ok {
                let why =
                    if m.role == Role::Tool { " (a tool result must follow the assistant's tool call)" } else { "" };
                return Err(Problem::invalid(format!(
                    "{}: {} message cannot follow {} message{why}",
                    at(i),
                    m.role.with_article(),
                    p.with_article()
                )));
            }
        } else if msgs.len() == 1 && !matches!(m.role, Role::User | Role::System) {
            return Err(Problem::invalid("a one-message conversation must be a user or system message"));
        }
        match m.role {
            Role::Assistant => {
                if answered.len() < expected_results && i > 0 {
                    return Err(Problem::invalid(format!(
                        "{}: the assistant speaks before all {} tool calls got a result ({} did)",
                        at(i),
                        expected_results,
                        answered.len()
                    )));
                }
                let has_text = !m.content.is_empty();
                let has_calls = !m.tool_calls.is_empty();
                if has_calls && !format.has_tools() {
                    return Err(needs(format, "tool calls"));
                }
                if !has_text && !has_calls {
                    return Err(Problem::invalid(format!(
                        "{}: an assistant message needs either content or tool_calls (it has neither)",
                        at(i)
                    )));
                }
                if has_text && has_calls && format < PromptFormat::V7 {
                    return Err(Problem::invalid(format!(
                        "{}: an assistant message needs either content or tool_calls, not both, in prompt format {} \
                         (v7 and later take both)",
                        at(i),
                        format.name()
                    )));
                }
                pending.clear();
                answered.clear();
                expected_results = m.tool_calls.len();
                let is_last = i + 1 == msgs.len();
                for (j, c) in m.tool_calls.iter().enumerate() {
                    let call = format!("{} tool_calls[{j}]", at(i));
                    if !is_function_name(&c.name) {
                        return Err(Problem::invalid(format!(
                            "{call}: function name `{}` must be 1 to 64 characters a-z, A-Z, 0-9, _ or -",
                            c.name
                        )));
                    }
                    if !with_ids {
                        continue;
                    }
                    match c.id.as_deref() {
                        None | Some("null") if is_last && mode == Mode::Train && format < PromptFormat::V13 => {}
                        None | Some("null") if format >= PromptFormat::V13 => {
                            return Err(Problem::invalid(format!(
                                "{call}: the call has no id (prompt format {} needs one on every call)",
                                format.name()
                            )))
                        }
                        None | Some("null") => {
                            return Err(Problem::invalid(format!(
                                "{call}: the call has no id (only a training conversation's final message may omit it)"
                            )))
                        }
                        Some(id) => {
                            if let Some(why) = id_problem(id, format) {
                                return Err(Problem::invalid(format!("{call}: {why}")));
                            }
                            if pending.contains(&id) {
                                return Err(Problem::invalid(format!("{call}: duplicate id `{id}`")));
                            }
                            pending.push(id);
                        }
                    }
                }
            }
            Role::Tool => {
                if !format.has_tools() {
                    return Err(needs(format, "tool messages"));
                }
                if !with_ids {
                    // v2: one result per call turn after the last user message, matched to the turn's call.
                    if i > last_user && !answered.is_empty() {
                        return Err(Problem::invalid(format!(
                            "{}: prompt format v2 takes one tool result per assistant turn",
                            at(i)
                        )));
                    }
                    answered.push("");
                    prev = Some(m.role);
                    continue;
                }
                let Some(id) = m.tool_call_id.as_deref() else {
                    return Err(Problem::invalid(format!("{}: a tool result needs a `tool_call_id`", at(i))));
                };
                if let Some(why) = id_problem(id, format) {
                    return Err(Problem::invalid(format!("{}: tool_call_id: {why}", at(i))));
                }
                if answered.contains(&id) {
                    return Err(Problem::invalid(format!("{}: a second result for tool call `{id}`", at(i))));
                }
                if !pending.contains(&id) {
                    let known = if pending.is_empty() { "none".to_string() } else { pending.join(", ") };
                    return Err(Problem::invalid(format!(
                        "{}: tool result for id `{id}` matches no call of the preceding assistant message (call ids: \
                         {known})",
                        at(i)
                    )));
                }
                answered.push(id);
            }
            // Unanswered calls are tolerated until the next assistant message (mistral-common's rule).
            Role::User | Role::System => {}
        }
        prev = Some(m.role);
    }
    Ok(())
}
