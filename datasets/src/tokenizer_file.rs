//! Loading the tokenizer a checkpoint ships: `tekken.json` (read natively, see [`crate::tekken`]) or
//! `tokenizer.json` (Hugging Face), with what it declares about its prompt format.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::prompt_format::{Declared, PromptFormat};
use crate::tekken::{load_tekken, TekkenInfo};

/// A tokenizer and what it declares.
#[derive(Clone)]
pub struct LoadedTokenizer {
    /// The tokenizer (a tekken vocabulary is held as a byte-level BPE).
    pub tokenizer: Tokenizer,
    /// The prompt formats it allows.
    pub declared: Declared,
    /// The file it was read from.
    pub path: PathBuf,
    /// What the tekken file declares, when it is one.
    pub tekken: Option<TekkenInfo>,
}

impl std::fmt::Debug for LoadedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedTokenizer").field("path", &self.path).field("declared", &self.declared).finish()
    }
}

/// Whether `path` names a tekken file (mistral-common's rule: a `.json` file with "tekken" in its name).
pub fn is_tekken(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.contains("tekken") && name.ends_with(".json")
}

/// The tokenizer file of a model directory: `tekken.json` when there is one (mistral-common's own file), else
/// `tokenizer.json`.
pub fn tokenizer_in_dir(dir: &Path) -> PathBuf {
    let tekken = dir.join("tekken.json");
    if tekken.is_file() {
        tekken
    } else {
        dir.join("tokenizer.json")
    }
}

/// Loads a tokenizer file: tekken (see [`is_tekken`]) or `tokenizer.json`, whose `tokenizer_config.json` beside
/// it (if any) helps tell its prompt format.
pub fn load_tokenizer(path: &Path) -> Result<LoadedTokenizer> {
    if is_tekken(path) {
        let (tokenizer, info) = load_tekken(path)?;
        let declared = declared_by_tekken(&info);
        return Ok(LoadedTokenizer { tokenizer, declared, path: path.to_path_buf(), tekken: Some(info) });
    }
    let tokenizer = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let config = read_tokenizer_config(path)?;
    let declared = Declared::from_tokenizer_json(&tokenizer, config.as_ref());
    Ok(LoadedTokenizer { tokenizer, declared, path: path.to_path_buf(), tekken: None })
}

/// What a tekken file's `config.version` declares.
pub fn declared_by_tekken(info: &TekkenInfo) -> Declared {
    let source = format!("{} config.version", info.path.display());
    match PromptFormat::parse(&info.version) {
        Some(f) => Declared::exactly(f, source),
        None => Declared { formats: Vec::new(), source },
    }
}

/// `tokenizer_config.json` beside a tokenizer file, if there is one, with the chat template transformers reads
/// for that directory as its `chat_template`: `chat_template.jinja` when there is one (transformers 5's
/// `save_pretrained` writes the template there, not into `tokenizer_config.json`; the file wins over the config's
/// key, as in transformers' loader), else the config's own `chat_template`, else the `chat_template` of a
/// processor's `chat_template.json`. `None` when there is none of these files.
pub fn read_tokenizer_config(tokenizer_path: &Path) -> Result<Option<serde_json::Value>> {
    let Some(dir) = tokenizer_path.parent() else { return Ok(None) };
    let read = |name: &str| -> Result<Option<String>> {
        let path = dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        std::fs::read_to_string(&path).map(Some).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    };
    let json = |name: &str| -> Result<Option<serde_json::Value>> {
        let Some(text) = read(name)? else { return Ok(None) };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Tokenizer(format!("{}: not JSON: {e}", dir.join(name).display())))
    };
    let mut config = json("tokenizer_config.json")?;
    let has_template = config.as_ref().is_some_and(|c| c.get("chat_template").is_some());
    let template = match read("chat_template.jinja")? {
        Some(text) => Some(serde_json::Value::String(text)),
        None if has_template => None,
        None => json("chat_template.json")?.and_then(|v| v.get("chat_template").cloned()),
    };
    if let Some(template) = template {
        match config.as_mut().and_then(serde_json::Value::as_object_mut) {
            Some(map) => {
                map.insert("chat_template".into(), template);
            }
            None => config = Some(serde_json::json!({ "chat_template": template })),
        }
    }
    Ok(config)
}
