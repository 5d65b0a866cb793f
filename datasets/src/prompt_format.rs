//! The Mistral instruct formats (mistral-common's `TokenizerVersion`) and how a tokenizer declares its own.
//!
//! What picks the format, strongest first (so that `prompt_format = "auto"` picks what
//! `MistralTokenizer.from_file` picks):
//!
//! 1. a `tekken.json`'s `config.version` (mistral-common reads nothing else);
//! 2. for a `tokenizer.json`, the control tokens it has: no `[INST]` control token is v1; `[ARGS]` and `[CALL_ID]`
//!    mean v11 or later; `[SYSTEM_PROMPT]` in a sentencepiece-style vocabulary means v7 — but every tekken
//!    vocabulary has `[SYSTEM_PROMPT]` (mistral-common's built-in list puts it at id 17 even for Nemo's v3), so in a
//!    byte-level vocabulary it tells nothing;
//! 3. the chat template beside it (`chat_template.jinja`, where transformers 5 writes it, else
//!    `tokenizer_config.json`'s `chat_template`, else a processor's `chat_template.json`; see
//!    [`crate::tokenizer_file::read_tokenizer_config`]), where the tokens leave a choice: a template that writes
//!    `[SYSTEM_PROMPT]` is v7 or later, one that writes `[CALL_ID]` is v11, `[ARGS]` without `[CALL_ID]` v13;
//!    otherwise the oldest format the tokens allow.
//!
//! What a `tokenizer.json` cannot say: transformers' converter of a tekken file
//! (`transformers.integrations.mistral.convert_tekken_tokenizer`) writes the same `tokenizer.json` and
//! `tokenizer_config.json` for a v3 and a v7 file (mistral-common's built-in special tokens, `[SYSTEM_PROMPT]`
//! included; no version anywhere); only the chat template it attaches differs (`tests/fixtures/tekken/converted/`).
//! Such a `tokenizer.json` alone therefore allows v3 and v7, and `auto` picks v3 (Nemo's format, the oldest a tekken
//! vocabulary has shipped with); with a chat template it is v7 when the template writes `[SYSTEM_PROMPT]`, else v3
//! alone.
//!
//! An explicit `prompt_format` outside what the tokenizer allows is an error naming both.

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// A Mistral instruct prompt format (mistral-common's tokenizer version).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// `[INST]` as text; system prompt before the first user message; no tools.
    V1,
    /// Control tokens; tools before the last user message; tool calls without ids, results with the tool name.
    V2,
    /// v2 with call ids: calls `[{"name", "arguments", "id"}]`, results `{"content", "call_id"}`.
    V3,
    /// System prompts in place (`[SYSTEM_PROMPT]`), text and tool calls in one answer, results
    /// `[TOOL_RESULTS] id [TOOL_CONTENT] content`.
    V7,
    /// v7 with calls `[TOOL_CALLS] name [CALL_ID] id [ARGS] arguments`, results in call order.
    V11,
    /// v11 without call ids in the text (`[TOOL_CALLS] name [ARGS] arguments`, `[TOOL_RESULTS] content`), tools
    /// before the first user message.
    V13,
    /// v13 plus model settings; without settings (the only case tramontane encodes) the same layout.
    V15,
}

impl PromptFormat {
    /// Every format, oldest first.
    pub const ALL: [PromptFormat; 7] = [
        PromptFormat::V1,
        PromptFormat::V2,
        PromptFormat::V3,
        PromptFormat::V7,
        PromptFormat::V11,
        PromptFormat::V13,
        PromptFormat::V15,
    ];

    /// "v1", "v2", ...
    pub fn name(self) -> &'static str {
        match self {
            PromptFormat::V1 => "v1",
            PromptFormat::V2 => "v2",
            PromptFormat::V3 => "v3",
            PromptFormat::V7 => "v7",
            PromptFormat::V11 => "v11",
            PromptFormat::V13 => "v13",
            PromptFormat::V15 => "v15",
        }
    }

    /// The format named `s` ("v7"), if any.
    pub fn parse(s: &str) -> Option<PromptFormat> {
        PromptFormat::ALL.into_iter().find(|f| f.name() == s)
    }

    /// Whether the format has tools (v2 and later).
    pub fn has_tools(self) -> bool {
        self >= PromptFormat::V2
    }

    /// Detects the format from a tokenizer's tokens alone (see [`Declared::from_tokenizer_json`]).
    pub fn detect(tokenizer: &Tokenizer) -> Result<PromptFormat> {
        Declared::from_tokenizer_json(tokenizer, None).pick()
    }
}

/// What a tokenizer allows as its prompt format, and where that comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// The formats the tokenizer allows, the one `auto` picks first. Empty: it allows none tramontane encodes.
    pub formats: Vec<PromptFormat>,
    /// Where the answer comes from, for messages ("tekken.json config.version", ...).
    pub source: String,
}

impl Declared {
    /// A single format declared by `source`.
    pub fn exactly(format: PromptFormat, source: impl Into<String>) -> Declared {
        Declared { formats: vec![format], source: source.into() }
    }

    /// From a `tokenizer.json`'s control tokens and, where they leave a choice, the chat template of its
    /// `tokenizer_config.json` (`config`, as [`crate::tokenizer_file::read_tokenizer_config`] reads it: with a
    /// `chat_template.jinja` beside it as its `chat_template`).
    pub fn from_tokenizer_json(tokenizer: &Tokenizer, config: Option<&serde_json::Value>) -> Declared {
        use PromptFormat::*;
        let has = |t: &str| tokenizer.token_to_id(t).is_some();
        let template = config.and_then(chat_template).unwrap_or_default();
        let in_template = |t: &str| template.contains(t);
        let byte_level = tokenizer
            .get_pre_tokenizer()
            .and_then(|p| serde_json::to_string(p).ok())
            .is_some_and(|p| p.contains("ByteLevel"));
        let from_template = if template.is_empty() { "" } else { " and its chat template" };
        if !(has("[INST]") && has("[TOOL_CALLS]")) {
            return Declared::exactly(V1, "the tokenizer's tokens ([INST] is not a control token)");
        }
        let (formats, why) = if has("[ARGS]") && has("[CALL_ID]") {
            if in_template("[ARGS]") && !in_template("[CALL_ID]") {
                (vec![V13, V15, V11], "[ARGS]/[CALL_ID] tokens, a template without [CALL_ID]")
            } else {
                (vec![V11, V13, V15], "[ARGS]/[CALL_ID] tokens")
            }
        } else if has("[SYSTEM_PROMPT]") && (!byte_level || in_template("[SYSTEM_PROMPT]")) {
            (vec![V7], "a [SYSTEM_PROMPT] token")
        } else if has("[SYSTEM_PROMPT]") && template.is_empty() {
            // A tekken vocabulary: [SYSTEM_PROMPT] is in mistral-common's built-in list for every version, and
            // transformers' converter writes the same tokenizer.json for a v3 and a v7 file. Nothing else tells.
            (vec![V3, V7], "a tekken vocabulary, which has [SYSTEM_PROMPT] in every version, and no chat template")
        } else if has("[SYSTEM_PROMPT]") {
            // A v7 template writes [SYSTEM_PROMPT] (mistral-common's generated one does); one that does not is v3.
            (vec![V3], "a tekken vocabulary whose chat template writes no [SYSTEM_PROMPT]")
        } else {
            (vec![V3, V2], "[INST]/[TOOL_CALLS] control tokens")
        };
        Declared { formats, source: format!("the tokenizer's tokens{from_template} ({why})") }
    }

    /// The format `auto` picks.
    pub fn pick(&self) -> Result<PromptFormat> {
        self.formats
            .first()
            .copied()
            .ok_or_else(|| Error::Tokenizer(format!("{} declares no prompt format tramontane encodes", self.source)))
    }

    /// Checks an explicit choice against what the tokenizer allows.
    pub fn check(&self, chosen: PromptFormat) -> Result<PromptFormat> {
        if self.formats.contains(&chosen) {
            return Ok(chosen);
        }
        let allowed: Vec<&str> = self.formats.iter().map(|f| f.name()).collect();
        Err(Error::Tokenizer(format!(
            "data.prompt_format = \"{}\" contradicts the tokenizer: {} says {} (set prompt_format = \"auto\" or \
             \"{}\")",
            chosen.name(),
            self.source,
            allowed.join(" or "),
            allowed.first().copied().unwrap_or("auto"),
        )))
    }
}

fn chat_template(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        // A list of named templates: all of them count.
        serde_json::Value::Array(items) => {
            Some(items.iter().filter_map(|t| t.get("template").and_then(|s| s.as_str())).collect::<Vec<_>>().join("\n"))
        }
        _ => None,
    }
}
