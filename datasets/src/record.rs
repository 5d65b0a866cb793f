//! Records: what one row of a dataset means, independent of the file format it came from.
//!
//! A row is first read into [`Json`] values (one per needed column, by [`crate::source`]), then interpreted here
//! according to the recipe's [`Format`] and [`Columns`]. Every problem names the column and the element.

use serde::{Deserialize, Serialize};

use crate::config::{Columns, DataConfig, Format};
use crate::error::Problem;
use crate::json::Json;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the assistant (Mistral v1–v3 merge them into a user turn).
    System,
    /// The user.
    User,
    /// The model: its text and tool calls are what training teaches.
    Assistant,
    /// The result of a tool call.
    Tool,
}

impl Role {
    /// "a user", "an assistant", ...
    pub fn with_article(self) -> &'static str {
        match self {
            Role::System => "a system",
            Role::User => "a user",
            Role::Assistant => "an assistant",
            Role::Tool => "a tool",
        }
    }

    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A call of a tool by the assistant.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The call id that the tool result refers to (v3: 9 characters `[a-zA-Z0-9]`).
    pub id: Option<String>,
    /// The function name.
    pub name: String,
    /// The arguments: the parsed JSON value when the data held JSON text (as mistral-common does), the raw text as
    /// [`Json::Str`] when it was not valid JSON, `{}` when empty.
    pub arguments: Json,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// The text (text chunks joined with a blank line); empty when absent.
    pub content: String,
    /// Loss weight of an assistant message: `Some(0.0)` masks it; `None` or `Some(1.0)` trains it. Always `None`
    /// for other roles (they are never trained).
    pub weight: Option<f64>,
    /// The tool calls of an assistant message.
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the id of the call it answers.
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message with text only.
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message { role, content: content.into(), weight: None, tool_calls: Vec::new(), tool_call_id: None }
    }
}

/// A function the assistant may call, in the normalized form mistral-common writes into `[AVAILABLE_TOOLS]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// Function name.
    pub name: String,
    /// Description ("" when absent).
    pub description: String,
    /// JSON schema of the arguments (`{}` when absent).
    pub parameters: Json,
}

impl ToolSpec {
    /// The JSON mistral-common writes for this tool: `{"type": "function", "function": {"name": ..,
    /// "description": .., "parameters": ..}}`.
    pub fn to_json(&self) -> Json {
        Json::Object(vec![
            ("type".into(), Json::Str("function".into())),
            (
                "function".into(),
                Json::Object(vec![
                    ("name".into(), Json::Str(self.name.clone())),
                    ("description".into(), Json::Str(self.description.clone())),
                    ("parameters".into(), self.parameters.clone()),
                ]),
            ),
        ])
    }
}

/// A conversation: messages and the tools available to the assistant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    /// The messages, in order.
    pub messages: Vec<Message>,
    /// The available tools (empty for none).
    pub tools: Vec<ToolSpec>,
}

/// One training example before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Raw text; every token is trained.
    Text(String),
    /// A conversation (also what `instruct` rows become).
    Chat(Conversation),
    /// Pre-tokenized ids with an optional loss mask (`None`: every token after the first is trained).
    Tokens {
        /// Token ids.
        input_ids: Vec<u32>,
        /// Per-token loss mask.
        loss_mask: Option<Vec<bool>>,
    },
}

/// Which columns a format reads from a given file, and how to interpret them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// `text`.
    Text {
        /// Text column.
        text: String,
    },
    /// `instruct` with prompt/completion columns.
    PromptCompletion {
        /// Prompt column.
        prompt: String,
        /// Completion column.
        completion: String,
        /// Optional system column.
        system: Option<String>,
    },
    /// `instruct` with the Alpaca instruction/input/output triple.
    Alpaca {
        /// Instruction column.
        instruction: String,
        /// Optional input column.
        input: Option<String>,
        /// Output column.
        output: String,
        /// Optional system column.
        system: Option<String>,
    },
    /// `chat` / `tools`.
    Chat {
        /// Messages column.
        messages: String,
        /// Tools column (required for `tools`, used when present for `chat`).
        tools: Option<String>,
    },
    /// `preference`: a prompt and two completions.
    Preference {
        /// Prompt column (text or messages).
        prompt: String,
        /// Chosen completion column (text, a message, or messages).
        chosen: String,
        /// Rejected completion column (text, a message, or messages).
        rejected: String,
        /// Optional system column.
        system: Option<String>,
    },
    /// `tokens`.
    Tokens {
        /// Token ids column.
        input_ids: String,
        /// Optional labels column.
        labels: Option<String>,
        /// Optional loss-mask column.
        loss_mask: Option<String>,
    },
}

/// What a column must hold (used to check Parquet schemas before reading).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// A string.
    Text,
    /// A list of message structs, or a JSON string of such a list.
    Messages,
    /// A JSON string, or a list of JSON strings or structs.
    Tools,
    /// A list of integers.
    Ids,
    /// A list of integers or booleans.
    Mask,
    /// A string, a message struct, or a list of message structs (or a JSON string of either).
    TextOrMessages,
}

impl ColumnKind {
    /// What the kind accepts, for error messages.
    pub fn expected(self) -> &'static str {
        match self {
            ColumnKind::Text => "a string column",
            ColumnKind::Messages => "a list of structs (role, content, ...) or a JSON string",
            ColumnKind::Tools => "a JSON string, or a list of JSON strings or structs",
            ColumnKind::Ids => "a list of integers",
            ColumnKind::Mask => "a list of integers or booleans",
            ColumnKind::TextOrMessages => "a string, a message struct or a list of message structs",
        }
    }
}

/// Why a layout could not be chosen: the first missing column and a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingColumn {
    /// The column name.
    pub column: String,
    /// The recipe key that sets its name, for the hint.
    pub key: &'static str,
}

impl Layout {
    /// Chooses the columns for `format` given a predicate telling which columns exist.
    pub fn resolve(format: Format, c: &Columns, has: impl Fn(&str) -> bool) -> Result<Layout, MissingColumn> {
        let need = |name: &str, key: &'static str| {
            if has(name) {
                Ok(name.to_string())
            } else {
                Err(MissingColumn { column: name.to_string(), key })
            }
        };
        let optional = |name: &str| has(name).then(|| name.to_string());
        match format {
            Format::Text => Ok(Layout::Text { text: need(&c.text, "data.columns.text")? }),
            Format::Instruct => {
                if has(&c.prompt) || !has(&c.instruction) {
                    Ok(Layout::PromptCompletion {
                        prompt: need(&c.prompt, "data.columns.prompt")?,
                        completion: need(&c.completion, "data.columns.completion")?,
                        system: optional(&c.system),
                    })
                } else {
                    Ok(Layout::Alpaca {
                        instruction: need(&c.instruction, "data.columns.instruction")?,
                        input: optional(&c.input),
                        output: need(&c.output, "data.columns.output")?,
                        system: optional(&c.system),
                    })
                }
            }
            Format::Chat => {
                Ok(Layout::Chat { messages: need(&c.messages, "data.columns.messages")?, tools: optional(&c.tools) })
            }
            Format::Tools => Ok(Layout::Chat {
                messages: need(&c.messages, "data.columns.messages")?,
                tools: Some(need(&c.tools, "data.columns.tools")?),
            }),
            Format::Preference => Ok(Layout::Preference {
                prompt: need(&c.prompt, "data.columns.prompt")?,
                chosen: need(&c.chosen, "data.columns.chosen")?,
                rejected: need(&c.rejected, "data.columns.rejected")?,
                system: optional(&c.system),
            }),
            Format::Tokens => Ok(Layout::Tokens {
                input_ids: need(&c.input_ids, "data.columns.input_ids")?,
                labels: optional(&c.labels),
                loss_mask: optional(&c.loss_mask),
            }),
        }
    }

    /// The columns to read, in the order [`parse_record`] expects their values, with their kinds.
    pub fn columns(&self) -> Vec<(&str, ColumnKind)> {
        let mut v: Vec<(&str, ColumnKind)> = Vec::new();
        match self {
            Layout::Text { text } => v.push((text, ColumnKind::Text)),
            Layout::PromptCompletion { prompt, completion, system } => {
                v.push((prompt, ColumnKind::Text));
                v.push((completion, ColumnKind::Text));
                v.extend(system.as_deref().map(|s| (s, ColumnKind::Text)));
            }
            Layout::Alpaca { instruction, input, output, system } => {
                v.push((instruction, ColumnKind::Text));
                v.extend(input.as_deref().map(|s| (s, ColumnKind::Text)));
                v.push((output, ColumnKind::Text));
                v.extend(system.as_deref().map(|s| (s, ColumnKind::Text)));
            }
            Layout::Chat { messages, tools } => {
                v.push((messages, ColumnKind::Messages));
                v.extend(tools.as_deref().map(|s| (s, ColumnKind::Tools)));
            }
            Layout::Preference { prompt, chosen, rejected, system } => {
                v.push((prompt, ColumnKind::TextOrMessages));
                v.push((chosen, ColumnKind::TextOrMessages));
                v.push((rejected, ColumnKind::TextOrMessages));
                v.extend(system.as_deref().map(|s| (s, ColumnKind::Text)));
            }
            Layout::Tokens { input_ids, labels, loss_mask } => {
                v.push((input_ids, ColumnKind::Ids));
                v.extend(labels.as_deref().map(|s| (s, ColumnKind::Ids)));
                v.extend(loss_mask.as_deref().map(|s| (s, ColumnKind::Mask)));
            }
        }
        v
    }
}

/// Interprets one row. `values` holds one value per column of [`Layout::columns`], in that order.
pub fn parse_record(layout: &Layout, config: &DataConfig, values: &mut [Json]) -> Result<Record, Problem> {
    let mut take = |i: usize| std::mem::replace(&mut values[i], Json::Null);
    match layout {
        Layout::Text { text } => Ok(Record::Text(required_text(take(0), text)?)),
        Layout::PromptCompletion { prompt, completion, system } => {
            let p = required_text(take(0), prompt)?;
            let c = required_text(take(1), completion)?;
            let s = match system {
                Some(col) => optional_text(take(2), col)?,
                None => None,
            };
            Ok(Record::Chat(one_turn(s, p, c)))
        }
        Layout::Alpaca { instruction, input, output, system } => {
            let mut i = 0;
            let mut next = || {
                i += 1;
                i - 1
            };
            let mut prompt = required_text(take(next()), instruction)?;
            if let Some(col) = input {
                if let Some(inp) = optional_text(take(next()), col)? {
                    if !inp.is_empty() {
                        prompt.push_str("\n\n");
                        prompt.push_str(&inp);
                    }
                }
            }
            let out = required_text(take(next()), output)?;
            let s = match system {
                Some(col) => optional_text(take(next()), col)?,
                None => None,
            };
            Ok(Record::Chat(one_turn(s, prompt, out)))
        }
        Layout::Chat { messages, tools } => {
            let msgs = parse_messages(take(0), messages, config)?;
            let tools = match tools {
                Some(col) => parse_tools(take(1), col)?,
                None => Vec::new(),
            };
            Ok(Record::Chat(Conversation { messages: msgs, tools }))
        }
        Layout::Preference { .. } => {
            Err(Problem::invalid("preference rows are pairs: they train with train.objective = \"dpo\" or \"orpo\""))
        }
        Layout::Tokens { input_ids, labels, loss_mask } => {
            let ids = parse_ids(take(0), input_ids)?;
            let mut next = 1;
            let mut mask: Option<Vec<bool>> = None;
            if let Some(col) = labels {
                let v = take(next);
                next += 1;
                if !v.is_null() {
                    mask = Some(labels_to_mask(v, col, &ids)?);
                }
            }
            if let Some(col) = loss_mask {
                let v = take(next);
                if !v.is_null() {
                    let m = parse_mask(v, col, ids.len())?;
                    if let Some(prev) = &mask {
                        if *prev != m {
                            return Err(Problem::invalid(format!(
                                "columns `{}` and `{col}` disagree; give one of them",
                                labels.as_deref().unwrap_or("labels")
                            )));
                        }
                    }
                    mask = Some(m);
                }
            }
            Ok(Record::Tokens { input_ids: ids, loss_mask: mask })
        }
    }
}

fn one_turn(system: Option<String>, prompt: String, completion: String) -> Conversation {
    let mut messages = Vec::with_capacity(3);
    if let Some(s) = system.filter(|s| !s.is_empty()) {
        messages.push(Message::new(Role::System, s));
    }
    messages.push(Message::new(Role::User, prompt));
    messages.push(Message::new(Role::Assistant, completion));
    Conversation { messages, tools: Vec::new() }
}

/// A string value, or a null/type problem naming `column`.
pub fn required_text(v: Json, column: &str) -> Result<String, Problem> {
    match v {
        Json::Str(s) => Ok(s),
        Json::Null => Err(Problem::null(format!("column `{column}` is null"))),
        other => Err(Problem::invalid(format!("column `{column}`: expected a string, found {}", other.type_name()))),
    }
}

/// A string value or null, or a type problem naming `column`.
pub fn optional_text(v: Json, column: &str) -> Result<Option<String>, Problem> {
    match v {
        Json::Null => Ok(None),
        v => required_text(v, column).map(Some),
    }
}

/// Accepts a list, or a string holding a JSON list.
fn list_or_json_text(v: Json, column: &str) -> Result<Vec<Json>, Problem> {
    match v {
        Json::Array(items) => Ok(items),
        Json::Str(s) => match Json::parse(&s) {
            Ok(Json::Array(items)) => Ok(items),
            Ok(other) => Err(Problem::invalid(format!(
                "column `{column}`: the JSON text holds {}, expected a list",
                other.type_name()
            ))),
            Err(e) => Err(Problem::invalid(format!("column `{column}`: invalid JSON: {e}"))),
        },
        Json::Null => Err(Problem::null(format!("column `{column}` is null"))),
        other => Err(Problem::invalid(format!("column `{column}`: expected a list, found {}", other.type_name()))),
    }
}

/// Parses the messages of one row.
pub fn parse_messages(v: Json, column: &str, config: &DataConfig) -> Result<Vec<Message>, Problem> {
    let items = list_or_json_text(v, column)?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let m = parse_message(item, config).map_err(|p| p.within(format!("column `{column}` element {i}")))?;
        out.push(m);
    }
    Ok(out)
}

/// Parses one message object.
pub fn parse_message(item: Json, config: &DataConfig) -> Result<Message, Problem> {
    let c = &config.columns;
    let Json::Object(fields) = item else {
        return Err(if item.is_null() {
            Problem::null("message is null")
        } else {
            Problem::invalid(format!("expected a message object, found {}", item.type_name()))
        });
    };
    let mut role_v = Json::Null;
    let mut content_v = Json::Null;
    let mut weight_v = Json::Null;
    let mut calls_v = Json::Null;
    let mut call_id_v = Json::Null;
    for (k, v) in fields {
        if k == c.role {
            role_v = v;
        } else if k == c.content {
            content_v = v;
        } else if k == c.weight {
            weight_v = v;
        } else if k == "tool_calls" {
            calls_v = v;
        } else if k == "tool_call_id" {
            call_id_v = v;
        }
    }
    let role = match role_v {
        Json::Str(s) => parse_role(&s, config)?,
        Json::Null => return Err(Problem::null(format!("field `{}` (the role) is missing or null", c.role))),
        other => {
            return Err(Problem::invalid(format!("field `{}`: expected a string, found {}", c.role, other.type_name())))
        }
    };
    let content = parse_content(content_v, &c.content)?;
    let weight = if role == Role::Assistant { parse_weight(weight_v, &c.weight)? } else { None };
    let tool_calls = match calls_v {
        Json::Null => Vec::new(),
        Json::Array(calls) if role == Role::Assistant => {
            let mut out = Vec::with_capacity(calls.len());
            for (j, call) in calls.into_iter().enumerate() {
                out.push(parse_tool_call(call).map_err(|p| p.within(format!("tool_calls[{j}]")))?);
            }
            out
        }
        Json::Array(calls) if calls.is_empty() => Vec::new(),
        Json::Array(_) => {
            return Err(Problem::invalid(format!("a {} message cannot have `tool_calls`", role.name())));
        }
        other => return Err(Problem::invalid(format!("`tool_calls`: expected a list, found {}", other.type_name()))),
    };
    let tool_call_id = match call_id_v {
        Json::Null => None,
        Json::Str(s) if s.is_empty() => None,
        Json::Str(s) => Some(s),
        other => {
            return Err(Problem::invalid(format!("`tool_call_id`: expected a string, found {}", other.type_name())))
        }
    };
    Ok(Message { role, content, weight, tool_calls, tool_call_id })
}

fn parse_role(s: &str, config: &DataConfig) -> Result<Role, Problem> {
    match s {
        "system" => return Ok(Role::System),
        "user" => return Ok(Role::User),
        "assistant" => return Ok(Role::Assistant),
        "tool" => return Ok(Role::Tool),
        _ => {}
    }
    if let Some(r) = config.roles.get(s) {
        return Ok(*r);
    }
    let mut known: Vec<&str> = vec!["system", "user", "assistant", "tool"];
    known.extend(config.roles.keys().map(|k| k.as_str()));
    let mut msg = format!("role `{s}` is not one of {}", known.join("/"));
    if let Some(best) = crate::suggest::closest(s, known.iter().copied()) {
        msg.push_str(&format!(" (did you mean `{best}`?)"));
    } else if matches!(s, "human" | "gpt" | "model" | "bot" | "function" | "observation") {
        msg.push_str(" (map it with data.roles, e.g. `[data.roles] human = \"user\"`)");
    }
    Err(Problem::invalid(msg))
}

/// Text content: a string, null (empty), or a list of text chunks (`{"type": "text", "text": ..}` or strings),
/// joined with a blank line as mistral-common joins chunks.
fn parse_content(v: Json, field: &str) -> Result<String, Problem> {
    match v {
        Json::Null => Ok(String::new()),
        Json::Str(s) => Ok(s),
        Json::Array(chunks) => {
            let mut parts: Vec<String> = Vec::new();
            for (i, chunk) in chunks.into_iter().enumerate() {
                let text = match chunk {
                    Json::Str(s) => s,
                    Json::Object(_) => {
                        let kind = chunk.get("type").and_then(Json::as_str).unwrap_or("text");
                        if kind != "text" {
                            return Err(Problem::invalid(format!(
                                "field `{field}` chunk {i}: only text chunks are supported, found type `{kind}`"
                            )));
                        }
                        chunk.get("text").and_then(Json::as_str).unwrap_or("").to_string()
                    }
                    other => {
                        return Err(Problem::invalid(format!(
                            "field `{field}` chunk {i}: expected text, found {}",
                            other.type_name()
                        )))
                    }
                };
                if !text.is_empty() {
                    parts.push(text);
                }
            }
            Ok(parts.join("\n\n"))
        }
        other => Err(Problem::invalid(format!("field `{field}`: expected a string, found {}", other.type_name()))),
    }
}

fn parse_weight(v: Json, field: &str) -> Result<Option<f64>, Problem> {
    let w = match v {
        Json::Null => return Ok(None),
        Json::Bool(b) => f64::from(u8::from(b)),
        v => match v.as_f64() {
            Some(w) => w,
            None => return Err(Problem::invalid(format!("field `{field}`: expected 0 or 1, found {}", v.type_name()))),
        },
    };
    if w != 0.0 && w != 1.0 {
        return Err(Problem::invalid(format!("field `{field}`: the weight must be 0 or 1, got {w}")));
    }
    Ok(Some(w))
}

/// JSON text is parsed as mistral-common's normalizer does: empty text is `{}`, valid JSON becomes its value, other
/// text stays a string.
pub fn normalize_json_text(s: &str) -> Json {
    if s.is_empty() {
        return Json::Object(Vec::new());
    }
    Json::parse(s).unwrap_or_else(|_| Json::Str(s.to_string()))
}

fn parse_tool_call(call: Json) -> Result<ToolCall, Problem> {
    if !matches!(call, Json::Object(_)) {
        return Err(Problem::invalid(format!("expected an object, found {}", call.type_name())));
    }
    let id = match call.get("id") {
        None | Some(Json::Null) => None,
        Some(Json::Str(s)) => Some(s.clone()),
        Some(other) => return Err(Problem::invalid(format!("`id`: expected a string, found {}", other.type_name()))),
    };
    // OpenAI style {"id", "type": "function", "function": {"name", "arguments"}} or flat {"id", "name", "arguments"}.
    let func = match call.get("function") {
        Some(f @ Json::Object(_)) => f,
        Some(Json::Null) | None => &call,
        Some(other) => {
            return Err(Problem::invalid(format!("`function`: expected an object, found {}", other.type_name())))
        }
    };
    let name = match func.get("name") {
        Some(Json::Str(s)) if !s.is_empty() => s.clone(),
        Some(Json::Str(_)) | Some(Json::Null) | None => return Err(Problem::invalid("the function `name` is missing")),
        Some(other) => return Err(Problem::invalid(format!("`name`: expected a string, found {}", other.type_name()))),
    };
    let arguments = match func.get("arguments") {
        None | Some(Json::Null) => Json::Object(Vec::new()),
        Some(Json::Str(s)) => normalize_json_text(s),
        Some(v) => v.clone(),
    };
    Ok(ToolCall { id, name, arguments })
}

/// Parses the tools of one row: null (no tools), a JSON string of a list, or a list of JSON strings / objects.
/// Each tool is `{"type": "function", "function": {...}}` or the function object itself.
pub fn parse_tools(v: Json, column: &str) -> Result<Vec<ToolSpec>, Problem> {
    if v.is_null() {
        return Ok(Vec::new());
    }
    if let Json::Str(s) = &v {
        if s.trim().is_empty() {
            return Ok(Vec::new());
        }
    }
    let items = list_or_json_text(v, column)?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let item = match item {
            Json::Str(s) => Json::parse(&s)
                .map_err(|e| Problem::invalid(format!("column `{column}` element {i}: invalid JSON: {e}")))?,
            other => other,
        };
        out.push(parse_tool_spec(&item).map_err(|p| p.within(format!("column `{column}` element {i}")))?);
    }
    Ok(out)
}

fn parse_tool_spec(item: &Json) -> Result<ToolSpec, Problem> {
    if !matches!(item, Json::Object(_)) {
        return Err(Problem::invalid(format!("expected a tool object, found {}", item.type_name())));
    }
    if let Some(t) = item.get("type").and_then(Json::as_str) {
        if t != "function" {
            return Err(Problem::invalid(format!("tool type `{t}` is not supported (only `function`)")));
        }
    }
    let func = match item.get("function") {
        Some(f @ Json::Object(_)) => f,
        _ => item,
    };
    let name = match func.get("name") {
        Some(Json::Str(s)) if !s.is_empty() => s.clone(),
        _ => return Err(Problem::invalid("the function `name` is missing")),
    };
    let description = match func.get("description") {
        Some(Json::Str(s)) => s.clone(),
        None | Some(Json::Null) => String::new(),
        Some(other) => {
            return Err(Problem::invalid(format!("`description`: expected a string, found {}", other.type_name())))
        }
    };
    let parameters = match func.get("parameters") {
        None | Some(Json::Null) => Json::Object(Vec::new()),
        Some(Json::Str(s)) => normalize_json_text(s),
        Some(v) => v.clone(),
    };
    Ok(ToolSpec { name, description, parameters })
}

fn int_list(v: Json, column: &str) -> Result<Vec<Json>, Problem> {
    match v {
        Json::Array(items) => Ok(items),
        Json::Null => Err(Problem::null(format!("column `{column}` is null"))),
        other => Err(Problem::invalid(format!("column `{column}`: expected a list, found {}", other.type_name()))),
    }
}

fn parse_ids(v: Json, column: &str) -> Result<Vec<u32>, Problem> {
    let items = int_list(v, column)?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item.as_i64().and_then(|x| u32::try_from(x).ok()) {
            Some(id) => out.push(id),
            None => {
                return Err(Problem::invalid(format!(
                    "column `{column}` element {i}: expected a token id (a non-negative integer), found {item}"
                )))
            }
        }
    }
    Ok(out)
}

fn labels_to_mask(v: Json, column: &str, ids: &[u32]) -> Result<Vec<bool>, Problem> {
    let items = int_list(v, column)?;
    if items.len() != ids.len() {
        return Err(Problem::invalid(format!(
            "column `{column}` has {} labels for {} input ids",
            items.len(),
            ids.len()
        )));
    }
    let mut mask = Vec::with_capacity(items.len());
    for (i, (item, &id)) in items.iter().zip(ids).enumerate() {
        match item.as_i64() {
            Some(-100) => mask.push(false),
            Some(l) if l == i64::from(id) => mask.push(true),
            Some(l) => {
                return Err(Problem::invalid(format!(
                    "column `{column}` element {i}: label {l} is neither -100 nor the input id {id} (labels are \
                     unshifted, Hugging Face style)"
                )))
            }
            None => {
                return Err(Problem::invalid(format!(
                    "column `{column}` element {i}: expected an integer, found {}",
                    item.type_name()
                )))
            }
        }
    }
    Ok(mask)
}

fn parse_mask(v: Json, column: &str, len: usize) -> Result<Vec<bool>, Problem> {
    let items = int_list(v, column)?;
    if items.len() != len {
        return Err(Problem::invalid(format!("column `{column}` has {} values for {len} input ids", items.len())));
    }
    let mut mask = Vec::with_capacity(len);
    for (i, item) in items.iter().enumerate() {
        match item {
            Json::Bool(b) => mask.push(*b),
            v => match v.as_i64() {
                Some(0) => mask.push(false),
                Some(1) => mask.push(true),
                _ => {
                    return Err(Problem::invalid(format!(
                        "column `{column}` element {i}: expected 0/1 or a boolean, found {v}"
                    )))
                }
            },
        }
    }
    Ok(mask)
}
