//! Mistral prompt encoders (v1, v2, v3, v7, v11, v13, v15) and loss masks, in code, matching mistral-common 1.13
//! token for token (proved by the golden fixtures in `tests/fixtures/datasets/` and `tests/fixtures/tekken/`).
//!
//! A conversation is validated ([`crate::validate`]) and normalized ([`crate::normalize`]) as mistral-common does,
//! then each message is encoded as its version's instruct tokenizer encodes it:
//!
//! * **v1**: `<s>`, per user turn the text `"[INST] " + content + " [/INST]"` as one piece (the system prompt and a
//!   blank line before the *first* user message's content), per assistant turn its text then `</s>`. No tools.
//! * **v2/v3**: `[INST]`, `[/INST]`, `[TOOL_CALLS]`, `[AVAILABLE_TOOLS]`, ... are control tokens. The system
//!   prompt goes before the content of the *last* user message, `[AVAILABLE_TOOLS] json [/AVAILABLE_TOOLS]` right
//!   before that message's `[INST]`. Assistant text is right-stripped of spaces. Tool calls are `[TOOL_CALLS]` +
//!   `[{"name": .., "arguments": .., "id": ..}]` (v2: no id) then `</s>`; results are `[TOOL_RESULTS]` +
//!   `{"content": .., "call_id": ..}` (v2: `[{"name": .., "content": ..}]`) + `[/TOOL_RESULTS]`. v2 drops tool
//!   calls and results before the last user message.
//! * **v7**: system messages stay in place as `[SYSTEM_PROMPT] text [/SYSTEM_PROMPT]`; an answer may hold text
//!   then tool calls (v3's JSON list); results are `[TOOL_RESULTS] id [TOOL_CONTENT] content [/TOOL_RESULTS]`
//!   with the content as given.
//! * **v11**: each call is `[TOOL_CALLS] name [CALL_ID] id [ARGS] arguments-json`.
//! * **v13/v15**: each call is `[TOOL_CALLS] name [ARGS] arguments-json`, results `[TOOL_RESULTS] content
//!   [/TOOL_RESULTS]`, and the tool list goes before the *first* user message.
//!
//! JSON is written as Python's `json.dumps(..., ensure_ascii=False)`. Every piece of text is encoded separately
//! (a sentencepiece tokenizer gives each its dummy-prefix space; tekken adds nothing), and text that looks like a
//! control token ("[INST]" typed by a user) stays text.
//!
//! **Loss mask**: assistant text, tool-call payloads (with their control tokens) and the closing `</s>` of each
//! assistant turn are trained; `<s>`, system, user turns (with the tool list) and tool results are not; an
//! assistant message with `weight = 0` is not. This is mistral-finetune's rule. The first token of a document is
//! never trained (nothing predicts it), so `loss_mask[0]` is always `false`.

use tokenizers::Tokenizer;

use crate::config::PromptFormatChoice;
use crate::error::{Error, Problem, Result};
use crate::json::Json;
use crate::normalize::normalize;
use crate::prompt_format::{Declared, PromptFormat};
use crate::record::{normalize_json_text, Conversation, Message, Record, Role, ToolCall};
use crate::shortcut::Shortcut;
use crate::tokenizer_file::LoadedTokenizer;
use crate::validate::{validate, Mode};

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

/// The control tokens of a format (`None` where the format has no such token).
#[derive(Debug, Clone, Copy, Default)]
struct Controls {
    inst: u32,
    end_inst: u32,
    tool_calls: u32,
    tools: u32,
    end_tools: u32,
    results: u32,
    end_results: u32,
    system: u32,
    end_system: u32,
    tool_content: u32,
    args: u32,
    call_id: u32,
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
    controls: Controls,
    vocab_size: usize,
    fast: Option<Shortcut>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("format", &self.format)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("vocab_size", &self.vocab_size)
            .field("shortcut", &self.fast.as_ref().map(Shortcut::name))
            .finish()
    }
}

impl Encoder {
    /// Builds an encoder for `tokenizer` with the chosen prompt format, or the one its tokens suggest (`auto`; see
    /// [`Declared::from_tokenizer_json`]). Prefer [`Encoder::for_tokenizer`], which knows what the file declares.
    pub fn new(tokenizer: &Tokenizer, choice: PromptFormatChoice) -> Result<Encoder> {
        let declared = Declared::from_tokenizer_json(tokenizer, None);
        let format = match choice.format() {
            None => declared.pick()?,
            Some(f) => f,
        };
        Encoder::with_format(tokenizer, format)
    }

    /// Builds an encoder for a loaded tokenizer: `auto` takes the format it declares, an explicit choice must be one
    /// it allows (else the error names both).
    pub fn for_tokenizer(loaded: &LoadedTokenizer, choice: PromptFormatChoice) -> Result<Encoder> {
        let format = match choice.format() {
            None => loaded.declared.pick()?,
            Some(f) => loaded.declared.check(f)?,
        };
        Encoder::with_format(&loaded.tokenizer, format)
    }

    /// Builds an encoder for `tokenizer` in `format`, whatever the tokenizer declares.
    pub fn with_format(tokenizer: &Tokenizer, format: PromptFormat) -> Result<Encoder> {
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
        let opt = |t: &str, needed: bool| if needed { id(t) } else { Ok(0) };
        let bos = id("<s>")?;
        let eos = id("</s>")?;
        let (v2, v7, v11) = (format >= PromptFormat::V2, format >= PromptFormat::V7, format >= PromptFormat::V11);
        let controls = Controls {
            inst: opt("[INST]", v2)?,
            end_inst: opt("[/INST]", v2)?,
            tool_calls: opt("[TOOL_CALLS]", v2)?,
            tools: opt("[AVAILABLE_TOOLS]", v2)?,
            end_tools: opt("[/AVAILABLE_TOOLS]", v2)?,
            results: opt("[TOOL_RESULTS]", v2)?,
            end_results: opt("[/TOOL_RESULTS]", v2)?,
            system: opt("[SYSTEM_PROMPT]", v7)?,
            end_system: opt("[/SYSTEM_PROMPT]", v7)?,
            tool_content: opt("[TOOL_CONTENT]", v7)?,
            args: opt("[ARGS]", v11)?,
            call_id: opt("[CALL_ID]", v11)?,
        };
        let vocab_size = tokenizer.get_vocab_size(true);
        let fast = Shortcut::detect(&tokenizer);
        Ok(Encoder { tokenizer, format, bos, eos, controls, vocab_size, fast })
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

    /// `true` when a shortcut past the general tokenizer pipeline is used (see [`crate::shortcut`]).
    pub fn uses_shortcut(&self) -> bool {
        self.fast.is_some()
    }

    /// The tokenizer (with special-token extraction disabled).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Encodes one piece of text as mistral-common does (sentencepiece: with its dummy-prefix space; tekken: as
    /// is), control-token look-alikes as text.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, Problem> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(ids) = self.fast.as_ref().and_then(|f| f.encode(&self.tokenizer, text)) {
            return ids.map_err(|e| Problem::invalid(format!("the tokenizer failed: {e}")));
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
        use PromptFormat::*;
        let f = self.format;
        let t = self.controls;
        validate(conv, f, mode)?;
        let norm = normalize(conv, f)?;
        let first_user = norm.messages.iter().position(|m| m.role == Role::User);
        let last_user = norm.messages.iter().rposition(|m| m.role == Role::User);
        let system = norm.system.as_deref().filter(|s| !s.is_empty());
        let mut out = Encoded::default();
        out.input_ids.reserve(64);
        out.loss_mask.reserve(64);
        out.push(&[self.bos], false);
        // v2 names a tool result after the call it answers (ids of the latest calls -> names).
        let mut call_names: Vec<(Option<&str>, &str)> = Vec::new();
        for (i, m) in norm.messages.iter().enumerate() {
            let before_last_user = last_user.is_some_and(|l| i < l);
            match m.role {
                Role::User if f == V1 => {
                    let text = match system {
                        Some(s) if Some(i) == first_user => format!("[INST] {s}\n\n{} [/INST]", m.content),
                        _ => format!("[INST] {} [/INST]", m.content),
                    };
                    out.push(&self.encode_text(&text)?, false);
                }
                Role::User => {
                    let tools_here = if f >= V13 { Some(i) == first_user } else { Some(i) == last_user };
                    if tools_here && !conv.tools.is_empty() {
                        let tools = Json::Array(conv.tools.iter().map(|t| t.to_json()).collect());
                        out.push(&[t.tools], false);
                        out.push(&self.encode_text(&tools.to_python_string())?, false);
                        out.push(&[t.end_tools], false);
                    }
                    out.push(&[t.inst], false);
                    let ids = match system {
                        Some(s) if Some(i) == last_user => self.encode_text(&format!("{s}\n\n{}", m.content))?,
                        _ => self.encode_text(&m.content)?,
                    };
                    out.push(&ids, false);
                    out.push(&[t.end_inst], false);
                }
                Role::System => {
                    out.push(&[t.system], false);
                    out.push(&self.encode_text(&m.content)?, false);
                    out.push(&[t.end_system], false);
                }
                Role::Assistant => {
                    let trained = m.weight != Some(0.0);
                    if f == V2 && !m.tool_calls.is_empty() {
                        call_names = m.tool_calls.iter().map(|c| (c.id.as_deref(), c.name.as_str())).collect();
                        if before_last_user {
                            continue;
                        }
                    }
                    if !m.content.is_empty() {
                        let text = if f == V1 { m.content.as_str() } else { m.content.trim_end_matches(' ') };
                        out.push(&self.encode_text(text)?, trained);
                    }
                    if !m.tool_calls.is_empty() {
                        self.push_calls(&mut out, &m.tool_calls, trained)?;
                    }
                    out.push(&[self.eos], trained);
                }
                Role::Tool if f == V2 => {
                    if before_last_user {
                        continue;
                    }
                    let id = m.tool_call_id.as_deref();
                    let name = call_names
                        .iter()
                        .find(|(cid, _)| id.is_some() && *cid == id)
                        .or(if call_names.len() == 1 { call_names.first() } else { None })
                        .map_or(Json::Null, |(_, n)| Json::Str(n.to_string()));
                    let result = Json::Array(vec![Json::Object(vec![
                        ("name".into(), name),
                        ("content".into(), normalize_json_text(&m.content)),
                    ])]);
                    out.push(&[t.results], false);
                    out.push(&self.encode_text(&result.to_python_string())?, false);
                    out.push(&[t.end_results], false);
                }
                Role::Tool if f == V3 => {
                    let result = Json::Object(vec![
                        ("content".into(), normalize_json_text(&m.content)),
                        ("call_id".into(), Json::Str(m.tool_call_id.clone().unwrap_or_default())),
                    ]);
                    out.push(&[t.results], false);
                    out.push(&self.encode_text(&result.to_python_string())?, false);
                    out.push(&[t.end_results], false);
                }
                Role::Tool => {
                    out.push(&[t.results], false);
                    if f < V13 {
                        out.push(&self.encode_text(m.tool_call_id.as_deref().unwrap_or_default())?, false);
                        out.push(&[t.tool_content], false);
                    }
                    out.push(&self.encode_text(&m.content)?, false);
                    out.push(&[t.end_results], false);
                }
            }
        }
        Ok(out)
    }

    /// The tool calls of one assistant message, in the format's layout.
    fn push_calls(&self, out: &mut Encoded, calls: &[ToolCall], trained: bool) -> Result<(), Problem> {
        let t = self.controls;
        if self.format < PromptFormat::V11 {
            let with_id = self.format >= PromptFormat::V3;
            let calls = Json::Array(calls.iter().map(|c| call_json(c, with_id)).collect());
            out.push(&[t.tool_calls], trained);
            out.push(&self.encode_text(&calls.to_python_string())?, trained);
            return Ok(());
        }
        for c in calls {
            out.push(&[t.tool_calls], trained);
            out.push(&self.encode_text(&c.name)?, trained);
            if self.format == PromptFormat::V11 {
                if let Some(id) = c.id.as_deref().filter(|id| !id.is_empty() && *id != "null") {
                    out.push(&[t.call_id], trained);
                    out.push(&self.encode_text(id)?, trained);
                }
            }
            out.push(&[t.args], trained);
            out.push(&self.encode_text(&c.arguments.to_python_string())?, trained);
        }
        Ok(())
    }
}

/// `{"name": .., "arguments": .., "id": ..}`; the id is left out when absent or "null" (mistral-common's rule), and
/// always in v2.
fn call_json(c: &ToolCall, with_id: bool) -> Json {
    let mut fields =
        vec![("name".to_string(), Json::Str(c.name.clone())), ("arguments".to_string(), c.arguments.clone())];
    if let Some(id) = c.id.as_deref().filter(|id| with_id && !id.is_empty() && *id != "null") {
        fields.push(("id".to_string(), Json::Str(id.to_string())));
    }
    Json::Object(fields)
}
