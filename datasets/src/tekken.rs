//! Mistral's `tekken.json` read natively, giving the ids of mistral-common's `Tekkenizer`.
//!
//! The file holds a tiktoken-style byte-level BPE: `vocab` (entries `{rank, token_bytes (base64), token_str}`,
//! entry i of rank i, the first 256 the single bytes), the pre-tokenizer `config.pattern`, `config.version` (the
//! instruct format, "v3", "v7", ...), `config.default_num_special_tokens` special ids at the front (`special_tokens`
//! when the file lists them, else mistral-common's built-in list of 20, the rest filled with `<SPECIAL_i>`) and
//! `config.default_vocab_size`: the number of ids actually used (the vocabulary is cut to its first
//! `default_vocab_size - num_special` entries; Nemo's file has 150000 entries and uses 130072).
//!
//! The vocabulary becomes a [`tokenizers::Tokenizer`] (the well-kept crate already in the tree), so decoding, id
//! lookups and the rest of the pipeline work as for `tokenizer.json`: a byte-level BPE whose merges are derived from
//! the ranks as transformers' `TikTokenConverter` does (every split of a token into two tokens, ordered by the
//! merged token's rank), the pattern as an isolating `Split` pre-tokenizer followed by the byte-to-unicode mapping,
//! whole pre-tokens looked up first (`ignore_merges`, tiktoken's shortcut), and a byte-level decoder. Inner token
//! `r` gets id `r + num_special`; special tokens keep their ranks as ids. `tests/fixtures/tekken/` proves the ids
//! equal mistral-common's on thousands of texts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// mistral-common's built-in special tokens (`Tekkenizer.DEPRECATED_SPECIAL_TOKENS`), used when a file of version
/// v7 or older has no `special_tokens` list.
pub const DEFAULT_SPECIAL_TOKENS: [&str; 20] = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
];

/// What a tekken file declares besides its vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TekkenInfo {
    /// Where it was read from.
    pub path: PathBuf,
    /// `config.version`: the instruct format ("v3", "v7", "v11", ...).
    pub version: String,
    /// Number of special ids (`config.default_num_special_tokens`).
    pub num_special: usize,
    /// Ids in use (`config.default_vocab_size`): special ids plus the inner vocabulary kept.
    pub vocab_size: usize,
    /// Entries in the file's `vocab` (may exceed what is used).
    pub vocab_entries: usize,
}

#[derive(Deserialize)]
struct RawFile {
    config: Option<serde_json::Value>,
    vocab: Option<Vec<RawToken>>,
    special_tokens: Option<Vec<RawSpecial>>,
    model_settings_builder: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    rank: usize,
    token_bytes: String,
    #[allow(dead_code)]
    token_str: Option<String>,
}

#[derive(Deserialize)]
struct RawSpecial {
    rank: usize,
    token_str: String,
}

/// Versions mistral-common 1.13.1 knows (`TokenizerVersion`).
const KNOWN_VERSIONS: [&str; 7] = ["v1", "v2", "v3", "v7", "v11", "v13", "v15"];

fn bad(path: &Path, field: &str, why: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: `{field}`: {why}", path.display()))
}

/// Reads a tekken file into a tokenizer and what it declares. Every missing or wrong field is an error naming the
/// file and the field.
pub fn load_tekken(path: &Path) -> Result<(Tokenizer, TekkenInfo)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    parse_tekken(&text, path)
}

/// [`load_tekken`] from the file's text (`path` only names it in errors).
pub fn parse_tekken(text: &str, path: &Path) -> Result<(Tokenizer, TekkenInfo)> {
    let raw: RawFile =
        serde_json::from_str(text).map_err(|e| bad(path, "(file)", format!("not a tekken file: {e}")))?;
    let config = raw.config.ok_or_else(|| bad(path, "config", "missing"))?;
    let field = |name: &str| config.get(name).filter(|v| !v.is_null());
    let number = |name: &str| -> Result<usize> {
        let v = field(name).ok_or_else(|| bad(path, &format!("config.{name}"), "missing"))?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad(path, &format!("config.{name}"), format!("expected a non-negative integer, found {v}")))
    };
    let version = match field("version") {
        Some(serde_json::Value::String(s)) if KNOWN_VERSIONS.contains(&s.as_str()) => s.clone(),
        Some(v) => {
            return Err(bad(
                path,
                "config.version",
                format!("unknown version {v}; mistral-common 1.13.1 knows {}", KNOWN_VERSIONS.join(", ")),
            ))
        }
        None => return Err(bad(path, "config.version", "missing")),
    };
    let pattern = match field("pattern") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => return Err(bad(path, "config.pattern", format!("expected a string, found {v}"))),
        None => return Err(bad(path, "config.pattern", "missing")),
    };
    let num_special = number("default_num_special_tokens")?;
    let vocab_size = number("default_vocab_size")?;
    let vocab = raw.vocab.ok_or_else(|| bad(path, "vocab", "missing"))?;
    if vocab_size < num_special || vocab_size - num_special > vocab.len() {
        return Err(bad(
            path,
            "config.default_vocab_size",
            format!(
                "{vocab_size} must lie between default_num_special_tokens ({num_special}) and that plus the {} \
                 vocab entries",
                vocab.len()
            ),
        ));
    }
    if let Some(msb) = raw.model_settings_builder.as_ref().filter(|v| !v.is_null()) {
        let empty = msb.as_object().is_some_and(|o| o.values().all(|v| v.is_null()));
        if !empty {
            return Err(bad(
                path,
                "model_settings_builder",
                "model settings (reasoning effort, ...) are not supported by tramontane's encoders",
            ));
        }
    }
    let specials = special_tokens(raw.special_tokens, &version, num_special, path)?;
    let inner = vocab_size - num_special;
    let mut bytes: Vec<Vec<u8>> = Vec::with_capacity(inner);
    for (i, t) in vocab.iter().take(inner).enumerate() {
        if t.rank != i {
            return Err(bad(path, &format!("vocab[{i}].rank"), format!("expected {i}, found {}", t.rank)));
        }
        let b = STANDARD
            .decode(&t.token_bytes)
            .map_err(|e| bad(path, &format!("vocab[{i}].token_bytes"), format!("not valid base64: {e}")))?;
        if i < 256 && b != [i as u8] {
            return Err(bad(
                path,
                &format!("vocab[{i}].token_bytes"),
                format!("entry {i} must be the single byte {i}"),
            ));
        }
        if b.is_empty() {
            return Err(bad(path, &format!("vocab[{i}].token_bytes"), "empty token"));
        }
        bytes.push(b);
    }
    if inner < 256 {
        return Err(bad(path, "config.default_vocab_size", "the vocabulary must keep at least the 256 byte tokens"));
    }
    let tokenizer = build(&bytes, &specials, &pattern, path)?;
    let info = TekkenInfo { path: path.to_path_buf(), version, num_special, vocab_size, vocab_entries: vocab.len() };
    Ok((tokenizer, info))
}

fn special_tokens(
    listed: Option<Vec<RawSpecial>>,
    version: &str,
    num_special: usize,
    path: &Path,
) -> Result<Vec<String>> {
    let mut out: Vec<String> = match listed {
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, t) in list.into_iter().enumerate() {
                if t.rank != i {
                    return Err(bad(
                        path,
                        &format!("special_tokens[{i}].rank"),
                        format!("expected {i}, found {}", t.rank),
                    ));
                }
                if out.contains(&t.token_str) {
                    return Err(bad(
                        path,
                        &format!("special_tokens[{i}].token_str"),
                        format!("`{}` twice", t.token_str),
                    ));
                }
                out.push(t.token_str);
            }
            out
        }
        None if matches!(version, "v1" | "v2" | "v3" | "v7") => DEFAULT_SPECIAL_TOKENS.map(String::from).to_vec(),
        None => return Err(bad(path, "special_tokens", format!("missing (required for version {version})"))),
    };
    if out.len() > num_special {
        return Err(bad(
            path,
            "special_tokens",
            format!("{} tokens but config.default_num_special_tokens is {num_special}", out.len()),
        ));
    }
    for i in out.len()..num_special {
        out.push(format!("<SPECIAL_{i}>"));
    }
    Ok(out)
}

fn build(bytes: &[Vec<u8>], specials: &[String], pattern: &str, path: &Path) -> Result<Tokenizer> {
    let table = crate::shortcut::byte_chars();
    let as_str = |b: &[u8]| b.iter().map(|&x| table[x as usize]).collect::<String>();
    let offset = specials.len() as u32;
    let ranks: HashMap<&[u8], u32> = bytes.iter().enumerate().map(|(r, b)| (b.as_slice(), r as u32)).collect();
    if ranks.len() != bytes.len() {
        return Err(bad(path, "vocab", "two entries hold the same bytes"));
    }
    let mut vocab = Vocab::default();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.clone(), i as u32);
    }
    for (r, b) in bytes.iter().enumerate() {
        if vocab.insert(as_str(b), r as u32 + offset).is_some() {
            return Err(bad(path, &format!("vocab[{r}]"), "its text equals a special token's"));
        }
    }
    // (merged rank, left rank, right rank, left, right), sorted as transformers' converter sorts them.
    let mut merges: Vec<(u32, u32, u32, usize, usize)> = Vec::new();
    for (r, b) in bytes.iter().enumerate().skip(256) {
        for cut in 1..b.len() {
            if let (Some(&l), Some(&rr)) = (ranks.get(&b[..cut]), ranks.get(&b[cut..])) {
                merges.push((r as u32, l, rr, r, cut));
            }
        }
    }
    merges.sort_unstable();
    let merges: Vec<(String, String)> =
        merges.into_iter().map(|(_, _, _, r, cut)| (as_str(&bytes[r][..cut]), as_str(&bytes[r][cut..]))).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(true)
        .fuse_unk(false)
        .build()
        .map_err(|e| bad(path, "vocab", format!("cannot build the BPE: {e}")))?;
    let split = Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| bad(path, "config.pattern", format!("not a valid pattern: {e}")))?;
    let pre: Vec<PreTokenizerWrapper> = vec![split.into(), ByteLevel::new(false, false, false).into()];
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(pre)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    let added: Vec<AddedToken> = specials.iter().map(|s| AddedToken::from(s.clone(), true)).collect();
    tokenizer.add_special_tokens(added).map_err(|e| bad(path, "special_tokens", e))?;
    Ok(tokenizer)
}
