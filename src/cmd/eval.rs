//! `tramontane eval`: mean token loss and perplexity of a sequence under a model.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use trainer::model::Layout;
use trainer::train::loss::{labelled_nll_sum, ShiftedTargets};

use super::model_args::{parse_ids, ModelArgs};

/// Arguments of `tramontane eval`.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  tramontane eval --model DIR --prompt-ids 1,415,2936,9060 --json\n  \
tramontane eval --model DIR --text \"The quick brown fox\"")]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The sequence as comma-separated token ids.
    #[arg(long, group = "input", value_name = "IDS")]
    prompt_ids: Option<String>,
    /// The sequence as text (tokenized with BOS).
    #[arg(long, group = "input")]
    text: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs `tramontane eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let loaded = args.model.load(args.text.is_some())?;
    let ids = match (&args.prompt_ids, &args.text) {
        (Some(ids), _) => parse_ids(ids)?,
        (_, Some(text)) => loaded.tokenizer.as_ref().context("--text needs tokenizer.json")?.encode(text, true)?,
        _ => bail!("give --prompt-ids or --text"),
    };
    if ids.len() < 2 {
        bail!("the sequence needs at least 2 tokens to score (got {})", ids.len());
    }
    let model = &loaded.model;
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let targets = ShiftedTargets::new(&labels, 1, model.config.vocab_size, None)?;
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &model.device)?;
    let out = model.forward(&input, Layout::default(), None)?;
    let nll = labelled_nll_sum(model, &out.hidden, &targets)?.context("nothing to score")?;
    let loss = nll.to_scalar::<f32>()? as f64 / targets.len() as f64;
    let perplexity = loss.exp();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"tokens": ids.len(), "scored_tokens": targets.len(), "loss": loss, "perplexity": perplexity})
        );
    } else {
        println!("tokens: {}  scored: {}  mean loss: {loss:.6}  perplexity: {perplexity:.4}", ids.len(), targets.len());
    }
    Ok(())
}
