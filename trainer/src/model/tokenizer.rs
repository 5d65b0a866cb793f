//! The model's tokenizer — `tekken.json` (read natively by `datasets::tekken`) or `tokenizer.json` (via the
//! `tokenizers` crate) — checked against the model config, with the prompt format it declares.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::config::ModelConfig;
use crate::{Error, Result};

/// A tokenizer together with the special ids the engine needs.
#[derive(Clone)]
pub struct ModelTokenizer {
    /// The loaded tokenizer.
    pub inner: Tokenizer,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Beginning-of-sequence id.
    pub bos_id: Option<u32>,
    /// End-of-sequence ids (config / generation config, else the tokenizer's `</s>`).
    pub eos_ids: Vec<u32>,
    /// The prompt formats the tokenizer declares (a tekken file's `config.version`, else its tokens and
    /// `tokenizer_config.json`).
    pub declared: datasets::Declared,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer").field("path", &self.path).field("vocab", &self.vocab_size()).finish()
    }
}

impl ModelTokenizer {
    /// Loads the model directory's tokenizer (`tekken.json` when there is one, else `tokenizer.json`) and checks
    /// it fits the model: every token id must have an embedding row, and the config's BOS/EOS ids must exist in the
    /// vocabulary.
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let path = datasets::tokenizer_in_dir(dir);
        if !path.exists() {
            return Err(Error::format(&path, "not found (the model directory needs a tokenizer.json or tekken.json)"));
        }
        let loaded =
            datasets::load_tokenizer(&path).map_err(|e| Error::format(&path, format!("cannot load tokenizer: {e}")))?;
        let (inner, declared) = (loaded.tokenizer, loaded.declared);
        let vocab = inner.get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(Error::format(
                &path,
                format!(
                    "tokenizer has {vocab} tokens but the model's config.json has vocab_size {}: \
                     the tokenizer does not belong to this model",
                    config.vocab_size
                ),
            ));
        }
        let bos_id = config.bos_token_id.or_else(|| inner.token_to_id("<s>"));
        let mut eos_ids = config.eos_token_ids.clone();
        if eos_ids.is_empty() {
            eos_ids.extend(inner.token_to_id("</s>"));
        }
        for (what, id) in
            bos_id.iter().map(|&i| ("bos_token_id", i)).chain(eos_ids.iter().map(|&i| ("eos_token_id", i)))
        {
            if inner.id_to_token(id).is_none() {
                return Err(Error::format(
                    &path,
                    format!("config.json's {what} {id} is not in this tokenizer's vocabulary"),
                ));
            }
        }
        Ok(ModelTokenizer { inner, path, bos_id, eos_ids, declared })
    }

    /// Number of tokens, special ones included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The Mistral instruct format `prompt_format = "auto"` picks for this tokenizer.
    pub fn prompt_format(&self) -> std::result::Result<datasets::PromptFormat, String> {
        self.declared.pick().map_err(|e| e.to_string())
    }

    /// The prompt encoder for `choice` (`auto`: the format the tokenizer declares; an explicit choice must be one
    /// it allows) — the one training, evaluation, chat and serving all use.
    pub fn encoder(&self, choice: datasets::PromptFormatChoice) -> Result<datasets::Encoder> {
        let format = match choice.format() {
            None => self.declared.pick(),
            Some(f) => self.declared.check(f),
        }
        .map_err(|e| Error::format(&self.path, e.to_string()))?;
        datasets::Encoder::with_format(&self.inner, format).map_err(|e| Error::format(&self.path, e.to_string()))
    }

    /// The ids of a single-turn chat prompt (`user`), ready for the assistant's answer, encoded
    /// exactly as training encodes a conversation's prompt.
    pub fn encode_chat_prompt(&self, user: &str) -> Result<Vec<u32>> {
        let encoder = self.encoder(datasets::PromptFormatChoice::Auto)?;
        encoder.encode_user_prompt(user).map_err(|p| Error::Invalid(format!("cannot encode the chat prompt: {p}")))
    }

    /// Encodes text, adding the special tokens the tokenizer's post-processor adds (BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::format(&self.path, format!("cannot encode text: {e}")))
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::format(&self.path, format!("cannot decode ids: {e}")))
    }
}
