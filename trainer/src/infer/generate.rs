//! The generation loop: prefill the prompt into the KV cache, then decode one token at a time
//! until EOS, a stop string or the token budget, streaming the text as it forms.

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::rng::Rng;
use super::sampler::{sample, SamplingParams};
use crate::model::kv_cache::KvCache;
use crate::model::{Layout, Model, ModelTokenizer};
use crate::{Error, Result};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt's token ids (BOS included if wanted).
    pub prompt_ids: Vec<u32>,
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// Decoding settings.
    pub sampling: SamplingParams,
    /// Seed of the sampler.
    pub seed: u64,
    /// Token ids that end generation (not included in the text).
    pub eos_ids: Vec<u32>,
    /// Strings that end generation (the text is cut before them); needs a tokenizer.
    pub stop_strings: Vec<String>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence token was produced.
    Eos,
    /// A stop string appeared.
    StopString,
    /// The token budget ran out.
    Length,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids (the EOS that ended generation included).
    pub ids: Vec<u32>,
    /// Decoded new text (without EOS or stop string), when a tokenizer was given.
    pub text: String,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Seconds spent on the prompt (prefill), including the first token's choice.
    pub prefill_seconds: f64,
    /// Seconds spent decoding the remaining tokens.
    pub decode_seconds: f64,
}

impl Generation {
    /// Prompt tokens processed per second.
    pub fn prefill_tokens_per_second(&self, prompt_len: usize) -> f64 {
        prompt_len as f64 / self.prefill_seconds.max(1e-9)
    }

    /// New tokens decoded per second after the first.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.ids.len().saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Tracks decoded text, emitting only what can no longer change (whole characters, and nothing
/// that might still turn into a stop string).
/// Used by [`generate`] and by each sequence of a batch.
#[derive(Debug, Clone, Default)]
pub(crate) struct TextStream {
    /// Bytes of the text already handed out.
    emitted: usize,
}

impl TextStream {
    /// Decodes `ids`, hands the newly stable text to `on_text`, and returns the whole text and whether a
    /// stop string was hit (the text is cut before it).
    pub(crate) fn update(
        &mut self,
        tokenizer: &ModelTokenizer,
        stops: &[String],
        ids: &[u32],
        finished: bool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(String, bool)> {
        let mut text = tokenizer.decode(ids)?;
        let mut stopped = false;
        if let Some(cut) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
            stopped = true;
        }
        let mut stable = text.len();
        if !finished && !stopped {
            if text.ends_with('\u{FFFD}') {
                stable = text.trim_end_matches('\u{FFFD}').len();
            }
            let hold = stops.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
            stable = stable.saturating_sub(hold);
            while !text.is_char_boundary(stable) {
                stable -= 1;
            }
        }
        // Decoding is not always prefix-stable (a byte-fallback sequence completing a character):
        // resume at the first character boundary at or after what was already emitted.
        if let Some(from) = (self.emitted..stable).find(|&i| text.is_char_boundary(i)) {
            on_text(&text[from..stable]);
            self.emitted = stable;
        }
        Ok((text, stopped))
    }
}

impl GenerateRequest {
    /// Checks the request against `model` (and `tokenizer`, needed for stop strings): valid sampling
    /// settings, a non-empty prompt of in-vocabulary ids.
    pub fn check(&self, model: &Model, tokenizer: Option<&ModelTokenizer>) -> Result<()> {
        self.sampling.validate().map_err(Error::Invalid)?;
        if self.prompt_ids.is_empty() {
            return Err(Error::Invalid("the prompt is empty".into()));
        }
        if !self.stop_strings.is_empty() && tokenizer.is_none() {
            return Err(Error::Invalid("stop strings need a tokenizer".into()));
        }
        let vocab = model.config.vocab_size;
        if let Some(bad) = self.prompt_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!("prompt token id {bad} is outside the vocabulary (0..{vocab})")));
        }
        Ok(())
    }
}

/// Generates from `model`; `on_text` receives the text as it becomes final (needs `tokenizer`).
pub fn generate(
    model: &Model,
    tokenizer: Option<&ModelTokenizer>,
    request: &GenerateRequest,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    request.check(model, tokenizer)?;
    let mut rng = Rng::new(request.seed);
    let mut cache = KvCache::new(model.config.num_layers, model.config.sliding_window);
    let mut context = request.prompt_ids.clone();
    let mut ids = Vec::new();
    let mut stream = tokenizer.map(|t| (t, TextStream::default()));
    let mut text = String::new();
    let mut stop_reason = StopReason::Length;
    let start = Instant::now();
    let mut prefill_seconds = 0.0;
    let mut next_input = request.prompt_ids.clone();
    while ids.len() < request.max_new_tokens {
        let input = Tensor::from_vec(next_input.clone(), (1, next_input.len()), &model.device)?;
        let out = model.forward(&input, Layout::default(), Some(&mut cache))?;
        let mut logits: Vec<f32> = model.last_logits(&out.hidden)?.to_dtype(DType::F32)?.squeeze(0)?.to_vec1()?;
        let id = sample(&mut logits, &context, &request.sampling, &mut rng);
        if ids.is_empty() {
            prefill_seconds = start.elapsed().as_secs_f64();
        }
        ids.push(id);
        context.push(id);
        if request.eos_ids.contains(&id) {
            stop_reason = StopReason::Eos;
            break;
        }
        if let Some((tok, stream)) = stream.as_mut() {
            let (t, stopped) = stream.update(tok, &request.stop_strings, &ids, false, on_text)?;
            text = t;
            if stopped {
                stop_reason = StopReason::StopString;
                break;
            }
        }
        next_input = vec![id];
    }
    if let Some((tok, stream)) = stream.as_mut() {
        let visible = if stop_reason == StopReason::Eos { &ids[..ids.len() - 1] } else { &ids[..] };
        if stop_reason != StopReason::StopString {
            text = stream.update(tok, &request.stop_strings, visible, true, on_text)?.0;
        }
    }
    let total = start.elapsed().as_secs_f64();
    Ok(Generation { ids, text, stop_reason, prefill_seconds, decode_seconds: total - prefill_seconds })
}
