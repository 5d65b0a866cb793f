//! Evaluation during training: mean token loss on the held-out split, and greedy completions of
//! the recipe's prompts in the same prompt format as training.

use candle_core::Tensor;

use super::loss::{labelled_nll_sum, ShiftedTargets};
use super::step::MicroBatch;
use crate::infer::{generate, GenerateRequest, SamplingParams};
use crate::model::{Layout, Model, ModelTokenizer};
use crate::{Error, Result};

/// A dataset batch as the engine's micro-batch (padding marked invalid, documents kept apart).
pub fn micro_batch(b: &datasets::Batch) -> MicroBatch {
    let valid = (0..b.batch_size)
        .flat_map(|r| (0..b.seq_len).map(move |p| (r, p)))
        .map(|(r, p)| p < b.row_lengths[r])
        .collect::<Vec<bool>>();
    let padded = valid.iter().any(|v| !v);
    MicroBatch {
        batch: b.batch_size,
        seq_len: b.seq_len,
        input_ids: b.input_ids.clone(),
        labels: b.labels.clone(),
        positions: Some(b.positions.clone()),
        documents: Some(b.doc_ids.clone()),
        valid: padded.then_some(valid),
    }
}

/// Mean token loss over `batches` (no gradients kept); `None` when nothing is labelled.
pub fn eval_loss(model: &Model, batches: &[MicroBatch]) -> Result<(Option<f64>, usize)> {
    let (mut nll, mut tokens) = (0.0, 0usize);
    for mb in batches {
        let ids = Tensor::from_vec(mb.input_ids.clone(), (mb.batch, mb.seq_len), &model.device)?;
        let targets = ShiftedTargets::new(&mb.labels, mb.batch, model.config.vocab_size, mb.documents.as_deref())?;
        let layout = Layout {
            positions: mb.positions.as_deref(),
            documents: mb.documents.as_deref(),
            key_valid: mb.valid.as_deref(),
        };
        let out = model.forward(&ids, layout, None)?;
        if let Some(sum) = labelled_nll_sum(model, &out.hidden.detach(), &targets)? {
            nll += sum.to_scalar::<f32>()? as f64;
            tokens += targets.len();
        }
    }
    Ok(((tokens > 0).then(|| nll / tokens as f64), tokens))
}

/// Greedy completions of `prompts` (user messages, wrapped by `encoder` as in training).
pub fn sample_completions(
    model: &Model,
    tokenizer: &ModelTokenizer,
    encoder: &datasets::Encoder,
    prompts: &[String],
    max_new_tokens: usize,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let prompt_ids = encoder
            .encode_user_prompt(prompt)
            .map_err(|p| Error::Invalid(format!("eval.prompts: cannot encode `{prompt}`: {p}")))?;
        let request = GenerateRequest {
            prompt_ids,
            max_new_tokens,
            sampling: SamplingParams::default(),
            seed: 0,
            eos_ids: tokenizer.eos_ids.clone(),
            stop_strings: Vec::new(),
        };
        let generation = generate(model, Some(tokenizer), &request, &mut |_| {})?;
        out.push((prompt.clone(), generation.text.trim().to_string()));
    }
    Ok(out)
}
