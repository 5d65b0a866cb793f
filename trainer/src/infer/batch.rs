//! Continuous batching: several sequences of one model decoded together, one forward per step.
//!
//! A [`Sequence`] is one request in flight: its own KV cache, position, RNG, context (for the repetition penalty)
//! and text stream. [`Sequence::prefill`] runs its prompt alone and picks its first token; then [`decode_step`]
//! advances any number of prefilled sequences of the same model (the base, or the same adapter) by one token with
//! ONE forward pass: the embedding, the norms and every linear layer (q/k/v/o, the MLP or the experts, lm_head)
//! run over `[n, hidden]` rows (one matmul instead of `n` matrix-vector products), while attention runs per
//! sequence over its own cache, at its own position. Sequences can join (after their prefill) and leave (when
//! finished or cancelled) between any two steps.
//!
//! Each sequence samples with its own RNG seeded from its request, so greedy decoding and seeded sampling give the
//! tokens [`generate`](super::generate) gives for the request alone, whatever else shares the batch.

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::generate::{GenerateRequest, Generation, StopReason, TextStream};
use super::rng::Rng;
use super::sampler::sample;
use crate::model::attention::attend;
use crate::model::kv_cache::KvCache;
use crate::model::mask::MaskSpec;
use crate::model::rope::Rotary;
use crate::model::{Layout, Model, ModelTokenizer};
use crate::{Error, Result};

/// One generation in flight: the request, its KV cache, RNG, tokens and the text emitted so far.
#[derive(Debug, Clone)]
pub struct Sequence {
    request: GenerateRequest,
    cache: KvCache,
    rng: Rng,
    /// Prompt plus generated ids (what the repetition penalty looks at).
    context: Vec<u32>,
    /// Generated ids (the EOS that ended generation included).
    ids: Vec<u32>,
    /// Decoded text so far (cut before a stop string).
    text: String,
    /// What of `text` was already handed to `on_text`.
    stream: TextStream,
    stop_reason: Option<StopReason>,
    /// When the prefill began (`None` until then).
    started: Option<Instant>,
    prefill_seconds: f64,
}

impl Sequence {
    /// Checks `request` against `model` (and `tokenizer`, needed for stop strings) like [`generate`](super::generate)
    /// does, and makes an empty sequence for it.
    pub fn new(model: &Model, tokenizer: Option<&ModelTokenizer>, request: GenerateRequest) -> Result<Self> {
        request.check(model, tokenizer)?;
        Ok(Sequence {
            rng: Rng::new(request.seed),
            cache: KvCache::new(model.config.num_layers, model.config.sliding_window),
            context: request.prompt_ids.clone(),
            ids: Vec::new(),
            text: String::new(),
            stream: TextStream::default(),
            stop_reason: None,
            started: None,
            prefill_seconds: 0.0,
            request,
        })
    }

    /// The request being served.
    pub fn request(&self) -> &GenerateRequest {
        &self.request
    }

    /// The new ids so far (the EOS that ended generation included).
    pub fn generated(&self) -> &[u32] {
        &self.ids
    }

    /// The text so far (final once the sequence is finished).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Why generation ended, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop_reason
    }

    /// Whether generation has ended.
    pub fn is_finished(&self) -> bool {
        self.stop_reason.is_some()
    }

    /// Whether the sequence can take part in a [`decode_step`]: prefilled and not finished.
    pub fn is_decoding(&self) -> bool {
        self.started.is_some() && self.stop_reason.is_none()
    }

    /// Runs the prompt through `model` (alone) and picks the first token; `on_text` gets the text that became
    /// final. A request for zero tokens finishes here without a forward pass.
    pub fn prefill(
        &mut self,
        model: &Model,
        tokenizer: Option<&ModelTokenizer>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<()> {
        if self.started.is_some() {
            return Err(Error::Invalid("the sequence is already prefilled".into()));
        }
        let start = Instant::now();
        self.started = Some(start);
        if self.request.max_new_tokens == 0 {
            return self.finish(StopReason::Length, tokenizer, on_text);
        }
        let prompt = &self.request.prompt_ids;
        let input = Tensor::from_vec(prompt.clone(), (1, prompt.len()), &model.device)?;
        let out = model.forward(&input, Layout::default(), Some(&mut self.cache))?;
        let mut logits: Vec<f32> = model.last_logits(&out.hidden)?.to_dtype(DType::F32)?.squeeze(0)?.to_vec1()?;
        let id = sample(&mut logits, &self.context, &self.request.sampling, &mut self.rng);
        self.prefill_seconds = start.elapsed().as_secs_f64();
        self.accept(id, tokenizer, on_text)
    }

    /// Records a chosen token: stops on EOS, a stop string or the budget, and streams the text that became final.
    fn accept(&mut self, id: u32, tokenizer: Option<&ModelTokenizer>, on_text: &mut dyn FnMut(&str)) -> Result<()> {
        self.ids.push(id);
        self.context.push(id);
        if self.request.eos_ids.contains(&id) {
            return self.finish(StopReason::Eos, tokenizer, on_text);
        }
        if let Some(tokenizer) = tokenizer {
            let stopped = self.update_text(tokenizer, false, on_text)?;
            if stopped {
                self.stop_reason = Some(StopReason::StopString);
                return Ok(());
            }
        }
        if self.ids.len() >= self.request.max_new_tokens {
            return self.finish(StopReason::Length, tokenizer, on_text);
        }
        Ok(())
    }

    /// Ends generation for `reason`, flushing the held-back text (EOS itself is not part of it).
    fn finish(
        &mut self,
        reason: StopReason,
        tokenizer: Option<&ModelTokenizer>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<()> {
        self.stop_reason = Some(reason);
        if let Some(tokenizer) = tokenizer {
            self.update_text(tokenizer, true, on_text)?;
        }
        Ok(())
    }

    /// Decodes the visible ids, hands the part that can no longer change to `on_text` (whole characters, nothing
    /// that might still become a stop string) and returns whether a stop string appeared (the text is cut before
    /// it), through the same [`TextStream`] as `generate`.
    fn update_text(
        &mut self,
        tokenizer: &ModelTokenizer,
        finished: bool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<bool> {
        let visible =
            if self.stop_reason == Some(StopReason::Eos) { &self.ids[..self.ids.len() - 1] } else { &self.ids };
        let (text, stopped) = self.stream.update(tokenizer, &self.request.stop_strings, visible, finished, on_text)?;
        self.text = text;
        Ok(stopped)
    }

    /// The result, as [`generate`](super::generate) reports it.
    pub fn into_generation(self) -> Generation {
        let total = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        Generation {
            ids: self.ids,
            text: self.text,
            stop_reason: self.stop_reason.unwrap_or(StopReason::Length),
            prefill_seconds: self.prefill_seconds,
            decode_seconds: (total - self.prefill_seconds).max(0.0),
        }
    }
}

/// Advances every sequence of `seqs` (prefilled, unfinished, all of `model`) by one token with one forward pass;
/// `on_text(i, piece)` receives the text that became final for `seqs[i]`.
pub fn decode_step(
    model: &Model,
    tokenizer: Option<&ModelTokenizer>,
    seqs: &mut [&mut Sequence],
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<()> {
    if seqs.is_empty() {
        return Ok(());
    }
    if let Some(i) = seqs.iter().position(|s| !s.is_decoding()) {
        return Err(Error::Invalid(format!("sequence {i} of the batch is not prefilled or already finished")));
    }
    let tokens: Vec<u32> = seqs.iter().map(|s| s.ids[s.ids.len() - 1]).collect();
    let logits = {
        let mut caches: Vec<&mut KvCache> = seqs.iter_mut().map(|s| &mut s.cache).collect();
        forward_step(model, &tokens, &mut caches)?
    };
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    for (i, (seq, mut row)) in seqs.iter_mut().zip(rows).enumerate() {
        let id = sample(&mut row, &seq.context, &seq.request.sampling, &mut seq.rng);
        seq.accept(id, tokenizer, &mut |piece| on_text(i, piece))?;
    }
    Ok(())
}

/// One decode forward for `n` sequences: `tokens[i]` continues the sequence cached in `caches[i]` (at position
/// `caches[i].seen()`). Returns the last-position logits `[n, vocab]` and advances every cache by one token.
///
/// Embedding, norms, linears, experts and lm_head run once over all rows; attention runs per sequence, over its own
/// cache and at its own position, through the model's own [`attend`].
pub fn forward_step(model: &Model, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
    let n = tokens.len();
    if n == 0 {
        return Err(Error::Invalid("a decode step needs at least one sequence".into()));
    }
    if caches.len() != n {
        return Err(Error::Invalid(format!("{n} tokens but {} caches", caches.len())));
    }
    let c = &model.config;
    if let Some(cache) = caches.iter().find(|cache| cache.layers.len() != c.num_layers) {
        return Err(Error::Invalid(format!("a cache has {} layers, the model {}", cache.layers.len(), c.num_layers)));
    }
    let device = &model.device;
    let ids = Tensor::from_vec(tokens.to_vec(), (n, 1), device)?;
    let positions: Vec<u32> = caches.iter().map(|cache| cache.seen() as u32).collect();
    let rotary = Rotary::new(&positions, n, c.head_dim, c.rope_theta, device)?;
    // Each sequence's mask over its own cache (none is needed unless the cache holds keys out of the window).
    let masks = caches
        .iter()
        .map(|cache| MaskSpec::after_cache(1, 1, Some(cache), c.sliding_window).build(device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut h = model.embed(&ids)?;
    for (l, layer) in model.layers.iter().enumerate() {
        // The layer's own projections and feed-forward half; only the attention runs per sequence, each
        // over its own cache.
        let attn = &layer.self_attn;
        let x = h;
        let (q, k, v) = attn.project(&layer.input_layernorm.forward(&x)?, &rotary)?;
        let mut outs = Vec::with_capacity(n);
        for (i, cache) in caches.iter_mut().enumerate() {
            let (ks, vs) =
                cache.layers[l].append(k.narrow(0, i, 1)?.contiguous()?, v.narrow(0, i, 1)?.contiguous()?)?;
            outs.push(attend(&q.narrow(0, i, 1)?, &ks, &vs, masks[i].as_ref())?);
        }
        let attn_out = attn.o_proj.forward(&Tensor::cat(&outs, 0)?)?;
        h = layer.feed_forward_residual(&(x + attn_out)?)?.0;
    }
    for cache in caches.iter_mut() {
        cache.advance(1)?;
    }
    let hidden = model.final_norm(&h)?;
    Ok(model.last_logits(&hidden)?)
}

/// Generates all `requests` together on `model`: each prompt is prefilled alone, then the unfinished sequences
/// decode in one batch until all are done. `on_text(i, piece)` streams the text of `requests[i]`. Gives the
/// results [`generate`](super::generate) gives for each request alone.
pub fn generate_batch(
    model: &Model,
    tokenizer: Option<&ModelTokenizer>,
    requests: &[GenerateRequest],
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    let mut seqs = requests.iter().map(|r| Sequence::new(model, tokenizer, r.clone())).collect::<Result<Vec<_>>>()?;
    for (i, seq) in seqs.iter_mut().enumerate() {
        seq.prefill(model, tokenizer, &mut |piece| on_text(i, piece))?;
    }
    loop {
        let (index, mut active): (Vec<usize>, Vec<&mut Sequence>) =
            seqs.iter_mut().enumerate().filter(|(_, s)| s.is_decoding()).unzip();
        if active.is_empty() {
            break;
        }
        decode_step(model, tokenizer, &mut active, &mut |i, piece| on_text(index[i], piece))?;
    }
    Ok(seqs.into_iter().map(Sequence::into_generation).collect())
}
