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

use candle_core::{DType, Tensor, D};

use super::generate::{GenerateRequest, Generation, StopReason};
use super::kv_cache::KvCache;
use super::rng::Rng;
use super::sampler::sample;
use crate::model::decoder::FeedForward;
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
    /// Bytes of `text` already handed to `on_text`.
    emitted: usize,
    stop_reason: Option<StopReason>,
    prefilled: bool,
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
            emitted: 0,
            stop_reason: None,
            prefilled: false,
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
        self.prefilled && self.stop_reason.is_none()
    }

    /// Runs the prompt through `model` (alone) and picks the first token; `on_text` gets the text that became
    /// final. A request for zero tokens finishes here without a forward pass.
    pub fn prefill(
        &mut self,
        model: &Model,
        tokenizer: Option<&ModelTokenizer>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<()> {
        if self.prefilled {
            return Err(Error::Invalid("the sequence is already prefilled".into()));
        }
        self.prefilled = true;
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
    /// it). The same rules as `generate`'s text stream.
    fn update_text(
        &mut self,
        tokenizer: &ModelTokenizer,
        finished: bool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<bool> {
        let visible =
            if self.stop_reason == Some(StopReason::Eos) { &self.ids[..self.ids.len() - 1] } else { &self.ids };
        let mut text = tokenizer.decode(visible)?;
        let stops = &self.request.stop_strings;
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
        // Decoding is not always prefix-stable (a byte-fallback sequence completing a character): resume at the
        // first character boundary at or after what was already emitted.
        if let Some(from) = (self.emitted..stable).find(|&i| text.is_char_boundary(i)) {
            on_text(&text[from..stable]);
            self.emitted = stable;
        }
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
/// cache and at its own position, with the steps of the model's attention for one sequence.
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
    let rotary = Rotary::new(&positions, n, c.head_dim, c.rope_theta, model.dtype, device)?;
    // Each sequence's mask over its own cache (none is needed unless the cache holds keys out of the window).
    let masks = caches
        .iter()
        .map(|cache| {
            MaskSpec {
                batch: 1,
                q_len: 1,
                q_start: cache.seen(),
                kv_len: cache.seen() + 1 - cache.start(),
                k_start: cache.start(),
                window: c.sliding_window,
                documents: None,
                key_valid: None,
            }
            .build(device)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let mut h = model.embed(&ids)?;
    for (l, layer) in model.layers.iter().enumerate() {
        let x = layer.input_layernorm.forward(&h)?;
        let attn = &layer.self_attn;
        let q = attn.q_proj.forward(&x)?.reshape((n, 1, nh, hd))?.transpose(1, 2)?;
        let k = attn.k_proj.forward(&x)?.reshape((n, 1, nkv, hd))?.transpose(1, 2)?;
        let v = attn.v_proj.forward(&x)?.reshape((n, 1, nkv, hd))?.transpose(1, 2)?;
        let q = rotary.apply(&q)?;
        let k = rotary.apply(&k)?;
        let mut outs = Vec::with_capacity(n);
        for (i, cache) in caches.iter_mut().enumerate() {
            let (ks, vs) =
                cache.layers[l].append(k.narrow(0, i, 1)?.contiguous()?, v.narrow(0, i, 1)?.contiguous()?)?;
            outs.push(attend(&q.narrow(0, i, 1)?, &ks, &vs, masks[i].as_ref())?);
        }
        let attn_out = attn.o_proj.forward(&Tensor::cat(&outs, 0)?)?;
        let h2 = (h + attn_out)?;
        let normed = layer.post_attention_layernorm.forward(&h2)?;
        let ff = match &layer.feed_forward {
            FeedForward::Dense(mlp) => mlp.forward(&normed)?,
            FeedForward::Sparse(moe) => moe.forward(&normed)?.0,
        };
        h = (h2 + ff)?;
    }
    for cache in caches.iter_mut() {
        cache.advance(1)?;
    }
    let hidden = model.norm.forward(&h)?;
    Ok(model.last_logits(&hidden)?)
}

/// One sequence's attention for its one new token: `q` `[1, heads, 1, head_dim]` (after RoPE) over its cached keys
/// and values `[1, kv_heads, keys, head_dim]`, giving `[1, 1, heads * head_dim]` for `o_proj`. The same steps as
/// [`Attention::forward`](crate::model::attention::Attention::forward) takes after its projections for a batch of
/// one: scores per key/value group, softmax in f32.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (_, nh, _, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let groups = nh / nkv;
    // Heads g*groups..(g+1)*groups share kv head g, as in HF's repeat_kv.
    let q = q.contiguous()?.reshape((1, nkv, groups, hd))?;
    let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?.reshape((1, nkv, groups, 1, s))?;
    let scores = scores.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(q.dtype())?;
    let out = probs.reshape((1, nkv, groups, s))?.matmul(v)?;
    out.reshape((1, nh, 1, hd))?.transpose(1, 2)?.reshape((1, 1, nh * hd))
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
