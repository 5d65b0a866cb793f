//! Mistral prompt encoders (v1, v3) and loss masks, in code, matching mistral-common 1.13 token for token.
//!
//! What mistral-common does, and so what we do (proved by the golden fixtures in `tests/fixtures/datasets/`):
//!
//! * **Normalization** (v1–v3): all system messages are joined with a blank line into one system prompt and removed
//!   from the list; consecutive messages of the same role (and, for the assistant, the same weight) are merged (text
//!   joined with a blank line, tool calls concatenated); tool messages are never merged; if the first remaining
//!   message is not a user message, an empty user message is put first.
//! * **v1**: `<s>`, then per user turn the text `"[INST] " + content + " [/INST]"` encoded as one piece (with the
//!   system prompt and a blank line before the *first* user message's content), per assistant turn its text then
//!   `</s>`. `[INST]` is plain text; v1 has no tools.
//! * **v3**: `[INST]`, `[/INST]`, `[TOOL_CALLS]`, `[AVAILABLE_TOOLS]`, `[/AVAILABLE_TOOLS]`, `[TOOL_RESULTS]`,
//!   `[/TOOL_RESULTS]` are control tokens. The system prompt goes before the content of the *last* user message
//!   (not the first), and `[AVAILABLE_TOOLS] json [/AVAILABLE_TOOLS]` right before that message's `[INST]`.
//!   Assistant text is right-stripped of spaces; tool calls are `[TOOL_CALLS]` + `[{"name": .., "arguments": ..,
//!   "id": ..}]` then `</s>`; tool results are `[TOOL_RESULTS]` + `{"content": .., "call_id": ..}` +
//!   `[/TOOL_RESULTS]`. JSON is written as Python's `json.dumps(..., ensure_ascii=False)`.
//! * Every piece of text is encoded separately by the sentencepiece-style tokenizer (each gets its own dummy-prefix
//!   space), and text that looks like a control token ("[INST]" typed by a user) stays text.
//!
//! **Loss mask**: assistant text, tool-call payloads (with `[TOOL_CALLS]`) and the closing `</s>` of each assistant
//! turn are trained; `<s>`, user turns (with the system prompt and the tool list) and tool results are not; an
//! assistant message with `weight = 0` is not. This is mistral-finetune's rule. The first token of a document is
//! never trained (nothing predicts it), so `loss_mask[0]` is always `false`.

use tokenizers::Tokenizer;

use crate::config::PromptFormatChoice;
use crate::error::{Error, Problem, Result};
use crate::json::Json;
use crate::record::{normalize_json_text, Conversation, Message, Record, Role, ToolCall};

/// A Mistral instruct prompt format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// `[INST]` as text; system prompt before the first user message; no tools.
    V1,
    /// Control tokens; system prompt and tools before the last user message; tool calls and results with ids.
    V3,
}

impl PromptFormat {
    /// "v1" or "v3".
    pub fn name(self) -> &'static str {
        match self {
            PromptFormat::V1 => "v1",
            PromptFormat::V3 => "v3",
        }
    }

    /// Detects the format from a tokenizer: v3 when `[INST]` and `[TOOL_CALLS]` are single tokens, else v1.
    /// Refuses tokenizers of later formats (with `[SYSTEM_PROMPT]`), which this encoder does not reproduce.
    pub fn detect(tokenizer: &Tokenizer) -> Result<PromptFormat> {
        if tokenizer.token_to_id("[SYSTEM_PROMPT]").is_some() {
            return Err(Error::Tokenizer(
                "this tokenizer has a [SYSTEM_PROMPT] token (Mistral prompt format v7 or later), which tramontane \
                 does not encode; set data.prompt_format = \"v3\" to use the v3 layout anyway"
                    .into(),
            ));
        }
        let v3 = tokenizer.token_to_id("[INST]").is_some() && tokenizer.token_to_id("[TOOL_CALLS]").is_some();
        Ok(if v3 { PromptFormat::V3 } else { PromptFormat::V1 })
    }
}

/// Token ids and loss mask of one example (one document).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Encoded {
    /// Token ids, starting with `<s>` for chat and text records.
    pub input_ids: Vec<u32>,
    /// `true` where the token is a training target. Same length as `input_ids`; `loss_mask[0]` is `false`.
    pub loss_mask: Vec<bool>,
}

impl Encoded {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// `true` when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of trained tokens.
    pub fn trained(&self) -> usize {
        self.loss_mask.iter().filter(|m| **m).count()
    }

    /// Labels in the Hugging Face convention: the input id where trained, `-100` elsewhere (not shifted).
    pub fn labels(&self) -> Vec<i64> {
        self.input_ids
            .iter()
            .zip(&self.loss_mask)
            .map(|(&id, &m)| if m { i64::from(id) } else { crate::IGNORE_INDEX })
            .collect()
    }

    fn push(&mut self, ids: &[u32], trained: bool) {
        self.input_ids.extend_from_slice(ids);
        self.loss_mask.extend(std::iter::repeat_n(trained, ids.len()));
    }
}

#[derive(Debug, Clone, Copy)]
struct V3Tokens {
    inst: u32,
    end_inst: u32,
    tool_calls: u32,
    tools: u32,
    end_tools: u32,
    results: u32,
    end_results: u32,
}

/// A shortcut for sentencepiece-style tokenizers (normalizer `Prepend("▁")` + `Replace(" ", "▁")`, no
/// pre-tokenizer, BPE without dropout): normalize in place and call the BPE model directly, skipping the
/// alignment tracking of the general pipeline — three times faster, same ids by construction. Not taken when the
/// text contains a character that starts a non-special added token (those must be split out first).
#[derive(Debug, Clone)]
struct FastPath {
    space: String,
    guard: Vec<char>,
}

impl FastPath {
    fn detect(tokenizer: &Tokenizer) -> Option<FastPath> {
        use tokenizers::models::ModelWrapper;
        if tokenizer.get_pre_tokenizer().is_some() {
            return None;
        }
        match tokenizer.get_model() {
            ModelWrapper::BPE(bpe) if bpe.dropout.is_none() => {}
            _ => return None,
        }
        let norm = serde_json::to_value(tokenizer.get_normalizer()?).ok()?;
        let space = "\u{2581}";
        let want = serde_json::json!({
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": space},
                {"type": "Replace", "pattern": {"String": " "}, "content": space},
            ]
        });
        if norm != want {
            return None;
        }
        let mut guard: Vec<char> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| !t.special)
            .filter_map(|t| t.content.chars().next())
            .collect();
        guard.sort_unstable();
        guard.dedup();
        Some(FastPath { space: space.to_string(), guard })
    }
}

/// Encodes records into token ids and loss masks with a Mistral prompt format.
///
/// Holds its own copy of the tokenizer, configured so that special-token text inside user data is encoded as
/// text (as sentencepiece does), never as control tokens.
#[derive(Clone)]
pub struct Encoder {
    tokenizer: Tokenizer,
    format: PromptFormat,
    bos: u32,
    eos: u32,
    v3: Option<V3Tokens>,
    vocab_size: usize,
    fast: Option<FastPath>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("format", &self.format)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("vocab_size", &self.vocab_size)
            .field("sentencepiece_shortcut", &self.fast.is_some())
            .finish()
    }
}

/// Whether a conversation is encoded for training (ends with the assistant) or as a prompt (ends with the user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Train,
    Prompt,
}

impl Encoder {
    /// Builds an encoder for `tokenizer` with the chosen (or detected) prompt format.
    pub fn new(tokenizer: &Tokenizer, choice: PromptFormatChoice) -> Result<Encoder> {
        let format = match choice {
            PromptFormatChoice::Auto => PromptFormat::detect(tokenizer)?,
            PromptFormatChoice::V1 => PromptFormat::V1,
            PromptFormatChoice::V3 => PromptFormat::V3,
        };
        let mut tokenizer = tokenizer.clone();
        tokenizer.set_encode_special_tokens(true);
        // Pieces are encoded one by one: a truncation or padding setting in tokenizer.json must not cut them.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let id = |t: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "no `{t}` token in the vocabulary (needed by prompt format {})",
                    format.name()
                ))
            })
        };
        let bos = id("<s>")?;
        let eos = id("</s>")?;
        let v3 = match format {
            PromptFormat::V1 => None,
            PromptFormat::V3 => Some(V3Tokens {
                inst: id("[INST]")?,
                end_inst: id("[/INST]")?,
                tool_calls: id("[TOOL_CALLS]")?,
                tools: id("[AVAILABLE_TOOLS]")?,
                end_tools: id("[/AVAILABLE_TOOLS]")?,
                results: id("[TOOL_RESULTS]")?,
                end_results: id("[/TOOL_RESULTS]")?,
            }),
        };
        let vocab_size = tokenizer.get_vocab_size(true);
        let fast = FastPath::detect(&tokenizer);
        Ok(Encoder { tokenizer, format, bos, eos, v3, vocab_size, fast })
    }

    /// The prompt format in use.
    pub fn prompt_format(&self) -> PromptFormat {
        self.format
    }

    /// Id of `<s>`.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// Id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `true` when the sentencepiece shortcut is used (see [`Encoder::encode_text`]).
    pub fn uses_shortcut(&self) -> bool {
        self.fast.is_some()
    }

    /// The tokenizer (with special-token extraction disabled).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Encodes one piece of text as sentencepiece would (dummy-prefix space, no special tokens).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, Problem> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(fast) = &self.fast {
            if !text.chars().any(|c| fast.guard.binary_search(&c).is_ok()) {
                use tokenizers::Model;
                let mut norm = String::with_capacity(text.len() + 8);
                norm.push_str(&fast.space);
                for c in text.chars() {
                    if c == ' ' {
                        norm.push_str(&fast.space);
                    } else {
                        norm.push(c);
                    }
                }
                return self
                    .tokenizer
                    .get_model()
                    .tokenize(&norm)
                    .map(|toks| toks.into_iter().map(|t| t.id).collect())
                    .map_err(|e| Problem::invalid(format!("the tokenizer failed: {e}")));
            }
        }
        self.encode_text_general(text)
    }

    /// [`Encoder::encode_text`] through the tokenizer's general pipeline (no shortcut).
    pub fn encode_text_general(&self, text: &str) -> Result<Vec<u32>, Problem> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Problem::invalid(format!("the tokenizer failed: {e}")))
    }

    /// Encodes a record for training. `text_eos`: append `</s>` to `text` records.
    pub fn encode_record(&self, record: &Record, text_eos: bool) -> Result<Encoded, Problem> {
        match record {
            Record::Text(text) => {
                let ids = self.encode_text(text)?;
                let mut e = Encoded::default();
                e.push(&[self.bos], false);
                e.push(&ids, true);
                if text_eos {
                    e.push(&[self.eos], true);
                }
                Ok(e)
            }
            Record::Chat(conv) => self.encode_conversation(conv),
            Record::Tokens { input_ids, loss_mask } => {
                if let Some(pos) = input_ids.iter().position(|&id| id as usize >= self.vocab_size) {
                    return Err(Problem::invalid(format!(
                        "token id {} at position {pos} is outside the vocabulary (size {})",
                        input_ids[pos], self.vocab_size
                    )));
                }
                let mut mask = loss_mask.clone().unwrap_or_else(|| vec![true; input_ids.len()]);
                if let Some(first) = mask.first_mut() {
                    *first = false;
                }
                Ok(Encoded { input_ids: input_ids.clone(), loss_mask: mask })
            }
        }
    }

    /// Encodes a training conversation (it must end with an assistant message) with its loss mask.
    pub fn encode_conversation(&self, conv: &Conversation) -> Result<Encoded, Problem> {
        self.encode_conv(conv, Mode::Train)
    }

    /// Encodes a conversation that ends with a user (or tool) message into the prompt the model continues from —
    /// the same layout as training, so inference matches it exactly.
    pub fn encode_prompt(&self, conv: &Conversation) -> Result<Vec<u32>, Problem> {
        self.encode_conv(conv, Mode::Prompt).map(|e| e.input_ids)
    }

    /// [`Encoder::encode_prompt`] for a single user message.
    pub fn encode_user_prompt(&self, text: &str) -> Result<Vec<u32>, Problem> {
        self.encode_prompt(&Conversation { messages: vec![Message::new(Role::User, text)], tools: Vec::new() })
    }

    fn encode_conv(&self, conv: &Conversation, mode: Mode) -> Result<Encoded, Problem> {
        validate(conv, self.format, mode)?;
        let norm = normalize(conv)?;
        let first_user = norm.messages.iter().position(|m| m.role == Role::User);
        let last_user = norm.messages.iter().rposition(|m| m.role == Role::User);
        let system = norm.system.as_deref().filter(|s| !s.is_empty());
        let mut out = Encoded::default();
        out.input_ids.reserve(64);
        out.loss_mask.reserve(64);
        out.push(&[self.bos], false);
        for (i, m) in norm.messages.iter().enumerate() {
            match (m.role, self.v3) {
                (Role::User, None) => {
                    let text = match system {
                        Some(s) if Some(i) == first_user => format!("[INST] {s}\n\n{} [/INST]", m.content),
                        _ => format!("[INST] {} [/INST]", m.content),
                    };
                    out.push(&self.encode_text(&text)?, false);
                }
                (Role::User, Some(t)) => {
                    let is_last = Some(i) == last_user;
                    if is_last && !conv.tools.is_empty() {
                        let tools = Json::Array(conv.tools.iter().map(|t| t.to_json()).collect());
                        out.push(&[t.tools], false);
                        out.push(&self.encode_text(&tools.to_python_string())?, false);
                        out.push(&[t.end_tools], false);
                    }
                    out.push(&[t.inst], false);
                    let ids = match system {
                        Some(s) if is_last => self.encode_text(&format!("{s}\n\n{}", m.content))?,
                        _ => self.encode_text(&m.content)?,
                    };
                    out.push(&ids, false);
                    out.push(&[t.end_inst], false);
                }
                (Role::Assistant, v3) => {
                    let trained = m.weight != Some(0.0);
                    match v3 {
                        Some(t) if !m.tool_calls.is_empty() => {
                            let calls = Json::Array(m.tool_calls.iter().map(call_json).collect());
                            out.push(&[t.tool_calls], trained);
                            out.push(&self.encode_text(&calls.to_python_string())?, trained);
                        }
                        Some(_) => out.push(&self.encode_text(m.content.trim_end_matches(' '))?, trained),
                        None => out.push(&self.encode_text(&m.content)?, trained),
                    }
                    out.push(&[self.eos], trained);
                }
                (Role::Tool, Some(t)) => {
                    let result = Json::Object(vec![
                        ("content".into(), normalize_json_text(&m.content)),
                        ("call_id".into(), Json::Str(m.tool_call_id.clone().unwrap_or_default())),
                    ]);
                    out.push(&[t.results], false);
                    out.push(&self.encode_text(&result.to_python_string())?, false);
                    out.push(&[t.end_results], false);
                }
                // Rejected by `validate`.
                (Role::Tool, None) | (Role::System, _) => {}
            }
        }
        Ok(out)
    }
}

/// `{"name": .., "arguments": .., "id": ..}`; the id is left out when absent or "null" (mistral-common's rule).
fn call_json(c: &ToolCall) -> Json {
    let mut fields =
        vec![("name".to_string(), Json::Str(c.name.clone())), ("arguments".to_string(), c.arguments.clone())];
    if let Some(id) = c.id.as_deref().filter(|id| !id.is_empty() && *id != "null") {
        fields.push(("id".to_string(), Json::Str(id.to_string())));
    }
    Json::Object(fields)
}

fn is_function_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_call_id(s: &str) -> bool {
    s.len() == 9 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// mistral-common's request validation (finetuning mode for training, test mode for prompts), plus one stricter
/// rule: a tool result must answer a call of the preceding assistant message by id.
fn validate(conv: &Conversation, format: PromptFormat, mode: Mode) -> Result<(), Problem> {
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
    if format == PromptFormat::V1 && !conv.tools.is_empty() {
        return Err(Problem::invalid(
            "prompt format v1 has no tools; use a v3 tokenizer / data.prompt_format = \"v3\"",
        ));
    }
    for t in &conv.tools {
        if !is_function_name(&t.name) {
            return Err(Problem::invalid(format!(
                "tool name `{}` must be 1 to 64 characters a-z, A-Z, 0-9, _ or -",
                t.name
            )));
        }
    }
    let mut prev: Option<Role> = None;
    // Ids of the latest assistant tool calls not yet answered, and answered.
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
                if has_calls && format == PromptFormat::V1 {
                    return Err(Problem::invalid(format!(
                        "{}: prompt format v1 has no tool calls; use a v3 tokenizer / data.prompt_format = \"v3\"",
                        at(i)
                    )));
                }
                if has_text == has_calls {
                    return Err(Problem::invalid(format!(
                        "{}: an assistant message needs either content or tool_calls{}",
                        at(i),
                        if has_text { ", not both" } else { " (it has neither)" }
                    )));
                }
                pending.clear();
                answered.clear();
                expected_results = m.tool_calls.len();
                let is_last = i + 1 == msgs.len();
                for (j, c) in m.tool_calls.iter().enumerate() {
                    if !is_function_name(&c.name) {
                        return Err(Problem::invalid(format!(
                            "{} tool_calls[{j}]: function name `{}` must be 1 to 64 characters a-z, A-Z, 0-9, _ or -",
                            at(i),
                            c.name
                        )));
                    }
                    match c.id.as_deref() {
                        Some(id) if is_call_id(id) => {
                            if pending.contains(&id) {
                                return Err(Problem::invalid(format!(
                                    "{} tool_calls[{j}]: duplicate id `{id}`",
                                    at(i)
                                )));
                            }
                            pending.push(id);
                        }
                        None | Some("null") if is_last && mode == Mode::Train => {}
                        None | Some("null") => {
                            return Err(Problem::invalid(format!(
                                "{} tool_calls[{j}]: the call has no id (only the final message may omit it)",
                                at(i)
                            )))
                        }
                        Some(id) => {
                            return Err(Problem::invalid(format!(
                                "{} tool_calls[{j}]: id `{id}` must be 9 characters a-z, A-Z, 0-9",
                                at(i)
                            )))
                        }
                    }
                }
            }
            Role::Tool => {
                if format == PromptFormat::V1 {
                    return Err(Problem::invalid(format!(
                        "{}: prompt format v1 has no tool messages; use a v3 tokenizer / data.prompt_format = \"v3\"",
                        at(i)
                    )));
                }
                let Some(id) = m.tool_call_id.as_deref() else {
                    return Err(Problem::invalid(format!("{}: a tool result needs a `tool_call_id`", at(i))));
                };
                if !is_call_id(id) {
                    return Err(Problem::invalid(format!(
                        "{}: tool_call_id `{id}` must be 9 characters a-z, A-Z, 0-9",
                        at(i)
                    )));
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

/// A conversation after mistral-common's v1–v3 normalization.
struct Normalized {
    system: Option<String>,
    messages: Vec<Message>,
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

fn normalize(conv: &Conversation) -> Result<Normalized, Problem> {
    let msgs = &conv.messages;
    let system_parts: Vec<&str> =
        msgs.iter().filter(|m| m.role == Role::System && !m.content.is_empty()).map(|m| m.content.as_str()).collect();
    let system = if system_parts.is_empty() { None } else { Some(system_parts.join("\n\n")) };
    let mut out: Vec<Message> = Vec::with_capacity(msgs.len());
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
            Role::System => {}
            Role::Tool => out.extend(group.iter().cloned()),
            Role::User => {
                out.push(Message::new(Role::User, join_nonempty(group.iter().map(|m| m.content.as_str()))));
            }
            Role::Assistant => {
                let content = join_nonempty(group.iter().map(|m| m.content.as_str()));
                let tool_calls: Vec<ToolCall> = group.iter().flat_map(|m| m.tool_calls.iter().cloned()).collect();
                if !content.is_empty() && !tool_calls.is_empty() {
                    return Err(Problem::invalid(format!(
                        "messages {i} to {}: consecutive assistant messages merge into one with both text and tool \
                         calls, which this prompt format cannot encode",
                        j - 1
                    )));
                }
                out.push(Message { role, content, weight, tool_calls, tool_call_id: None });
            }
        }
        i = j;
    }
    if out.first().is_none_or(|m| m.role != Role::User) {
        out.insert(0, Message::new(Role::User, ""));
    }
    Ok(Normalized { system, messages: out })
}
