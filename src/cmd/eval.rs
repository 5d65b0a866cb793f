//! `tramontane eval`: mean token loss and perplexity of a sequence or a whole dataset under a model, and
//! generation quality (exact match, contains, token F1) on a dataset; on preference pairs, the DPO/ORPO loss and
//! TRL's reward metrics; base and each adapter side by side.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use trainer::infer::{generate, GenerateRequest, SamplingParams};
use trainer::model::{Layout, Model, ModelTokenizer};
use trainer::recipe::Recipe;
use trainer::train::loss::{labelled_nll_sum, ShiftedTargets};
use trainer::train::{
    policy_metrics, sequence_logps, PreferenceMetrics, PreferenceObjective, PreferenceSettings, ReferenceKind,
};

use super::model_args::{parse_ids, ContextNeed, Demand, ModelArgs};

/// Arguments of `tramontane eval`.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  tramontane eval --model DIR --prompt-ids 1,415,2936,9060 --json\n  \
tramontane eval --model DIR --text \"The quick brown fox\"\n  \
tramontane eval --model DIR --adapter runs/a/adapter --adapter runs/b/adapter --data held_out.jsonl --format chat\n  \
tramontane eval --model DIR --adapter runs/quickstart/adapter --data datasets/samples/pirate-chat.parquet \
--held-out 0.1 --generate --json\n  \
tramontane eval --model DIR --quantize nf4 --adapter runs/quickstart-dpo/adapter --recipe recipes/quickstart-dpo.toml\n  \
tramontane eval --model DIR --adapter runs/dpo/adapter --data pairs.parquet --format preference --objective dpo --beta 0.1\n\n\
On preference data (--format preference, or a recipe with data.format = \"preference\") each adapter is scored as the \
policy against the reference (the base model; the recipe's lora.init_from adapter when its DPO reference is \
\"init_from\"), one pair at a time: loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, \
logps/chosen, logps/rejected, and for ORPO nll_loss, log_odds_ratio and log_odds_chosen (TRL's names; means over \
pairs).")]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The sequence as comma-separated token ids.
    #[arg(long, group = "input", value_name = "IDS")]
    prompt_ids: Option<String>,
    /// The sequence as text (tokenized with BOS).
    #[arg(long, group = "input")]
    text: Option<String>,
    /// Dataset file(s) in any format the trainer reads (repeatable). With --data every --adapter is evaluated on
    /// its own, side by side with the base model.
    #[arg(long = "data", group = "input", value_name = "FILE")]
    data: Vec<PathBuf>,
    /// Dataset format: text, instruct, chat, tools, tokens or preference.
    #[arg(long, default_value = "chat")]
    format: String,
    /// Take the data settings (format, columns, prompt format, max_seq_len, split seed) and, for preference data,
    /// the objective (train.objective, beta, loss_type, label_smoothing, reference) from this training recipe;
    /// without --data, evaluate its held-out split (data.eval_files, or the data.eval_fraction split with
    /// train.seed: the pairs or examples the run evaluates).
    #[arg(long, value_name = "RECIPE", conflicts_with_all = ["prompt_ids", "text"])]
    recipe: Option<PathBuf>,
    /// Preference data without --recipe: the objective, `dpo` or `orpo`.
    #[arg(long, default_value = "dpo")]
    objective: String,
    /// Preference data without --recipe: DPO's beta / ORPO's lambda.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Preference data without --recipe: DPO's loss, `sigmoid`, `ipo` or `robust`.
    #[arg(long, default_value = "sigmoid")]
    loss_type: String,
    /// Preference data without --recipe: robust DPO's label flip probability, in [0, 0.5).
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Evaluate only the held-out part the trainer would split off with this `data.eval_fraction` (and --seed).
    #[arg(long, value_name = "FRACTION")]
    held_out: Option<f64>,
    /// Seed of the held-out split (the recipe's `train.seed`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest example in tokens (longer ones are dropped, as in training).
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// Evaluate at most this many examples.
    #[arg(long)]
    limit: Option<usize>,
    /// Generate (greedy) for each example's prompt and score against its reference answer (the last trained
    /// span: the final assistant message, or the completion column) with exact match, contains and token F1.
    #[arg(long)]
    generate: bool,
    /// Token budget per generated answer [default: the reference's length + 8].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs `tramontane eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    if !args.data.is_empty() || args.recipe.is_some() {
        return run_dataset(&args);
    }
    let given = args.prompt_ids.as_deref().map(parse_ids).transpose()?;
    // The sequence's length before tokenizing: at most one token per byte, plus BOS.
    let tokens = match (&given, &args.text) {
        (Some(ids), _) => ids.len(),
        (_, Some(text)) => text.len() + 2,
        _ => bail!("give --prompt-ids, --text, --data or --recipe"),
    };
    let demand = Demand {
        context: ContextNeed::Fixed { context: tokens, prefill: tokens, logit_rows: tokens },
        extra_adapters: Vec::new(),
    };
    let loaded = args.model.load(args.text.is_some(), &demand)?;
    let ids = match (given, &args.text) {
        (Some(ids), _) => ids,
        (_, Some(text)) => loaded.tokenizer.as_ref().context("--text needs tokenizer.json")?.encode(text, true)?,
        _ => bail!("give --prompt-ids, --text or --data"),
    };
    if ids.len() < 2 {
        bail!("the sequence needs at least 2 tokens to score (got {})", ids.len());
    }
    let (nll, scored) =
        sequence_nll(&loaded.model, &ids.iter().map(|&i| i as i64).collect::<Vec<_>>())?.context("nothing to score")?;
    let loss = nll / scored as f64;
    let perplexity = loss.exp();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"tokens": ids.len(), "scored_tokens": scored, "loss": loss, "perplexity": perplexity})
        );
    } else {
        println!("tokens: {}  scored: {scored}  mean loss: {loss:.6}  perplexity: {perplexity:.4}", ids.len());
    }
    Ok(())
}

/// Summed NLL and scored-token count of one sequence (`labels`: token ids, -100 where not scored).
fn sequence_nll(model: &Model, labels: &[i64]) -> Result<Option<(f64, usize)>> {
    let ids: Vec<u32> = labels.iter().map(|&l| l.max(0) as u32).collect();
    let targets = ShiftedTargets::new(labels, 1, model.config.vocab_size, None)?;
    if targets.is_empty() {
        return Ok(None);
    }
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &model.device)?;
    let out = model.forward(&input, Layout::default(), None)?;
    Ok(labelled_nll_sum(model, &out.hidden, &targets)?
        .map(|t| t.to_scalar::<f32>().map(|v| (v as f64, targets.len())))
        .transpose()?)
}

/// One example: its ids with the trainer's loss mask.
struct Item {
    labels: Vec<i64>,
    /// Prompt: everything before the last trained span.
    prompt: Vec<u32>,
    /// The last trained span (the reference answer), EOS dropped.
    reference: Vec<u32>,
}

/// Scores of one model over the dataset.
#[derive(Default)]
struct Scores {
    nll: f64,
    tokens: usize,
    exact: usize,
    contains: usize,
    f1: f64,
    generated: usize,
    samples: Vec<serde_json::Value>,
}

/// The data settings of `--data`/`--format` or `--recipe`, its split seed, and whether to take the held-out split.
fn data_config(args: &EvalArgs, recipe: Option<&Recipe>) -> Result<(datasets::DataConfig, u64, bool)> {
    if let Some(r) = recipe {
        let mut config = r.data.clone();
        if args.data.is_empty() {
            if config.eval_files.is_empty() && config.eval_fraction <= 0.0 {
                bail!(
                    "--recipe {}: the recipe has no held-out split (data.eval_fraction or data.eval_files); give --data",
                    args.recipe.as_deref().unwrap_or(Path::new("")).display()
                );
            }
            return Ok((config, r.train.seed, true));
        }
        config.files = args.data.clone();
        config.dir = None;
        config.eval_files = Vec::new();
        config.eval_fraction = args.held_out.unwrap_or(0.0);
        return Ok((config, r.train.seed, args.held_out.is_some()));
    }
    let format: datasets::Format = serde_json::from_value(serde_json::json!(args.format)).map_err(|_| {
        anyhow::anyhow!("--format `{}`: expected text, instruct, chat, tools, tokens or preference", args.format)
    })?;
    let config = datasets::DataConfig {
        files: args.data.clone(),
        format,
        max_seq_len: args.max_seq_len,
        eval_fraction: args.held_out.unwrap_or(0.0),
        ..datasets::DataConfig::default()
    };
    Ok((config, args.seed, args.held_out.is_some()))
}

/// The preference objective of `--recipe`, else of `--objective`, `--beta`, `--loss-type`, `--label-smoothing`.
fn preference_settings(args: &EvalArgs, recipe: Option<&Recipe>) -> Result<PreferenceSettings> {
    if let Some(r) = recipe {
        return trainer::train::run::preference_settings(&r.train)
            .context("--recipe: data.format = \"preference\" needs train.objective = \"dpo\" or \"orpo\"");
    }
    if !(args.beta.is_finite() && args.beta > 0.0) {
        bail!("--beta must be positive (got {})", args.beta);
    }
    if !(0.0..0.5).contains(&args.label_smoothing) {
        bail!("--label-smoothing must be in [0, 0.5) (got {})", args.label_smoothing);
    }
    let objective = match args.objective.as_str() {
        "dpo" => PreferenceObjective::Dpo {
            loss_type: serde_json::from_value(serde_json::json!(args.loss_type))
                .map_err(|_| anyhow::anyhow!("--loss-type `{}`: expected sigmoid, ipo or robust", args.loss_type))?,
            label_smoothing: args.label_smoothing,
        },
        "orpo" => PreferenceObjective::Orpo,
        other => bail!("--objective `{other}`: expected dpo or orpo"),
    };
    Ok(PreferenceSettings { objective, beta: args.beta })
}

fn run_dataset(args: &EvalArgs) -> Result<()> {
    let recipe = args.recipe.as_ref().map(|p| Recipe::load(p, &[])).transpose()?;
    let (config, seed, held_out) = data_config(args, recipe.as_ref())?;
    let preference = config.format == datasets::Format::Preference;
    if preference && args.generate {
        bail!("--generate scores answers against a reference answer; preference pairs have two (leave it out)");
    }
    let base_args = ModelArgs { model: args.model.model.clone(), adapter: Vec::new(), load: args.model.load.clone() };
    // Each example is scored in one forward pass, then (with --generate) answered after its prompt: the answer
    // is at most the reference's length + 8 tokens, and prompt + reference fit in --max-seq-len. A pair is two
    // rows (prompt + chosen, prompt + rejected) in one pass.
    let max_seq_len = config.max_seq_len;
    let generated = if args.generate { args.max_new_tokens.unwrap_or(8) } else { 0 };
    let rows = if preference { 2 } else { 1 };
    let mut extra_adapters: Vec<PathBuf> = args.model.adapter.iter().map(PathBuf::from).collect();
    let reference_adapter = recipe.as_ref().and_then(|r| {
        let dpo = r.train.objective == trainer::recipe::Objective::Dpo;
        let init_from = r.lora.init_from.clone();
        (dpo && r.train.reference_kind(init_from.is_some()) == ReferenceKind::InitFrom).then_some(init_from).flatten()
    });
    extra_adapters.extend(reference_adapter.clone());
    let demand = Demand {
        context: ContextNeed::Fixed {
            context: max_seq_len.saturating_add(generated),
            prefill: rows * max_seq_len,
            logit_rows: rows * max_seq_len,
        },
        extra_adapters,
    };
    let loaded = base_args.load(true, &demand)?;
    let tokenizer = loaded.tokenizer.context("--data needs tokenizer.json or tekken.json")?;
    let encoder = tokenizer.encoder(config.prompt_format)?;
    if preference {
        let settings = preference_settings(args, recipe.as_ref())?;
        let data = datasets::load_pairs(&config, &encoder, seed).map_err(|e| anyhow::anyhow!("{e}"))?;
        let pairs = if held_out { data.eval.context("no held-out pairs")? } else { data.train };
        let models = with_adapters(loaded.model, &args.model.adapter)?;
        let reference = match &reference_adapter {
            Some(dir) => {
                let base = &models[0].1;
                let dir_arg = dir.display().to_string();
                with_adapters(base.clone(), std::slice::from_ref(&dir_arg))?.pop().map(|(_, m)| m)
            }
            None => None,
        };
        return run_pairs(args, &pairs, &settings, &models, reference.as_ref(), encoder.eos_id());
    }
    let data = datasets::load(&config, &encoder, seed).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dataset = if held_out { data.eval.context("no held-out examples")? } else { data.train };
    let eos = tokenizer.eos_ids.clone();
    let items: Vec<Item> = dataset
        .iter()
        .take(args.limit.unwrap_or(usize::MAX))
        .filter_map(|e| {
            let labels = e.labels();
            let last_end = e.loss_mask.iter().rposition(|&m| m)? + 1;
            let last_start = e.loss_mask[..last_end].iter().rposition(|&m| !m)? + 1;
            let mut reference = e.input_ids[last_start..last_end].to_vec();
            while reference.last().is_some_and(|id| eos.contains(id)) {
                reference.pop();
            }
            Some(Item { labels, prompt: e.input_ids[..last_start].to_vec(), reference })
        })
        .collect();
    if items.is_empty() {
        bail!("no example has trained tokens to score");
    }

    let models = with_adapters(loaded.model, &args.model.adapter)?;

    let total = models.len() * items.len();
    let bar = (!args.json && total > 20).then(|| indicatif_bar(total as u64));
    let mut results = Vec::new();
    for (name, model) in &models {
        let mut s = Scores::default();
        for item in &items {
            if let Some((nll, n)) = sequence_nll(model, &item.labels)? {
                s.nll += nll;
                s.tokens += n;
            }
            if args.generate {
                score_generation(model, &tokenizer, item, args.max_new_tokens, &mut s)?;
            }
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
        results.push((name.clone(), s));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    report(args, &items, &results)
}

/// The base model (named `base`) and, for each `--adapter DIR[:WEIGHT]`, a clone of it with that adapter.
fn with_adapters(base: Model, adapter_args: &[String]) -> Result<Vec<(String, Model)>> {
    let mut models: Vec<(String, Model)> = Vec::new();
    for arg in adapter_args {
        let (dir, weight) = trainer::lora::peft::parse_adapter_arg(arg)?;
        let adapter = trainer::lora::peft::load_adapter(&dir, &base.config)
            .with_context(|| format!("--adapter {}", dir.display()))?;
        let mut model = base.clone();
        trainer::lora::peft::apply_adapters(&mut model, &[(adapter, weight)])?;
        models.push((arg.clone(), model));
    }
    models.insert(0, ("base".to_string(), base));
    Ok(models)
}

/// Preference metrics of every model on `pairs`, one pair per forward pass (so the means are over pairs,
/// whatever their lengths), each model the policy against `reference` (default: the base, `models[0]`).
fn run_pairs(
    args: &EvalArgs,
    pairs: &datasets::PairDataset,
    settings: &PreferenceSettings,
    models: &[(String, Model)],
    reference: Option<&Model>,
    pad_id: u32,
) -> Result<()> {
    let n = pairs.len().min(args.limit.unwrap_or(usize::MAX));
    if n == 0 {
        bail!("no preference pairs to evaluate");
    }
    let dpo = matches!(settings.objective, PreferenceObjective::Dpo { .. });
    let reference = reference.unwrap_or(&models[0].1);
    let bar = (!args.json && n * models.len() > 20).then(|| indicatif_bar((n * models.len()) as u64));
    let mut per_model: Vec<Vec<PreferenceMetrics>> = vec![Vec::with_capacity(n); models.len()];
    for pair in pairs.pairs.iter().take(n) {
        let pb = datasets::PairBatch::new(&[pair], pad_id, 1);
        let ref_logps = if dpo { Some(sequence_logps(reference, &pb)?) } else { None };
        for ((_, model), all) in models.iter().zip(per_model.iter_mut()) {
            all.push(policy_metrics(model, &pb, settings, ref_logps.as_deref())?);
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let objective = match settings.objective {
        PreferenceObjective::Dpo { .. } => "dpo",
        PreferenceObjective::Orpo => "orpo",
    };
    let rows: Vec<(String, PreferenceMetrics)> =
        models.iter().zip(&per_model).map(|((name, _), all)| (name.clone(), PreferenceMetrics::mean(all))).collect();
    if args.json {
        let results: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, m)| {
                let mut v = serde_json::json!({"model": name, "pairs": n, "loss": m.loss});
                for (k, x) in m.scalars() {
                    v[k] = serde_json::json!(x);
                }
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"pairs": n, "objective": objective, "beta": settings.beta, "results": results})
        );
        return Ok(());
    }
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(4).max(5);
    let names: Vec<&str> = rows[0].1.scalars().iter().map(|(k, _)| *k).collect();
    print!("{:width$}  {:>9}", "model", "loss");
    for k in &names {
        print!("  {:>k_width$}", k, k_width = k.len().max(9));
    }
    println!();
    for (name, m) in &rows {
        print!("{name:width$}  {:>9.4}", m.loss);
        for ((k, x), _) in m.scalars().iter().zip(&names) {
            print!("  {:>k_width$.4}", x, k_width = k.len().max(9));
        }
        println!();
    }
    println!("({n} pairs, {objective}, beta {})", settings.beta);
    Ok(())
}

fn indicatif_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template("eval {bar:30} {pos}/{len} examples {eta}") {
        bar.set_style(style);
    }
    bar
}

fn score_generation(
    model: &Model,
    tokenizer: &ModelTokenizer,
    item: &Item,
    max_new_tokens: Option<usize>,
    s: &mut Scores,
) -> Result<()> {
    let reference = tokenizer.decode(&item.reference)?.trim().to_string();
    let request = GenerateRequest {
        prompt_ids: item.prompt.clone(),
        max_new_tokens: max_new_tokens.unwrap_or(item.reference.len() + 8),
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        seed: 0,
        eos_ids: tokenizer.eos_ids.clone(),
        stop_strings: Vec::new(),
    };
    let generation = generate(model, Some(tokenizer), &request, &mut |_| {})?;
    let output = generation.text.trim().to_string();
    let exact = normalize(&output) == normalize(&reference);
    let contains = !reference.is_empty() && normalize(&output).contains(&normalize(&reference));
    let f1 = token_f1(&output, &reference);
    s.exact += usize::from(exact);
    s.contains += usize::from(contains);
    s.f1 += f1;
    s.generated += 1;
    if s.samples.len() < 5 {
        s.samples.push(serde_json::json!({"prompt": tokenizer.decode(&item.prompt)?, "reference": reference,
            "output": output, "f1": f1}));
    }
    Ok(())
}

/// Lower-cased words with punctuation stripped (SQuAD-style normalization).
fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.chars().filter(|c| c.is_alphanumeric()).collect::<String>().to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

fn normalize(text: &str) -> String {
    words(text).join(" ")
}

/// Token-level F1 between `output` and `reference` words (bag of words, as SQuAD scores it).
fn token_f1(output: &str, reference: &str) -> f64 {
    let (o, r) = (words(output), words(reference));
    if o.is_empty() || r.is_empty() {
        return f64::from(u8::from(o.is_empty() && r.is_empty()));
    }
    let mut remaining = r.clone();
    let mut common = 0usize;
    for w in &o {
        if let Some(i) = remaining.iter().position(|x| x == w) {
            remaining.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / o.len() as f64;
    let recall = common as f64 / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

fn report(args: &EvalArgs, items: &[Item], results: &[(String, Scores)]) -> Result<()> {
    let rows: Vec<serde_json::Value> = results
        .iter()
        .map(|(name, s)| {
            let loss = s.nll / s.tokens.max(1) as f64;
            let mut v = serde_json::json!({"model": name, "examples": items.len(), "scored_tokens": s.tokens,
                "loss": loss, "perplexity": loss.exp()});
            if args.generate {
                let n = s.generated.max(1) as f64;
                v["exact_match"] = serde_json::json!(s.exact as f64 / n);
                v["contains"] = serde_json::json!(s.contains as f64 / n);
                v["token_f1"] = serde_json::json!(s.f1 / n);
                v["samples"] = serde_json::json!(s.samples);
            }
            v
        })
        .collect();
    if args.json {
        println!("{}", serde_json::json!({"examples": items.len(), "generate": args.generate, "results": rows}));
        return Ok(());
    }
    let width = results.iter().map(|(n, _)| n.len()).max().unwrap_or(4).max(5);
    print!("{:width$}  {:>9}  {:>11}", "model", "loss", "perplexity");
    if args.generate {
        print!("  {:>7}  {:>8}  {:>8}", "exact", "contains", "token_f1");
    }
    println!();
    for row in &rows {
        print!(
            "{:width$}  {:>9.4}  {:>11.3}",
            row["model"].as_str().unwrap_or(""),
            row["loss"].as_f64().unwrap_or(f64::NAN),
            row["perplexity"].as_f64().unwrap_or(f64::NAN)
        );
        if args.generate {
            print!(
                "  {:>7.3}  {:>8.3}  {:>8.3}",
                row["exact_match"].as_f64().unwrap_or(0.0),
                row["contains"].as_f64().unwrap_or(0.0),
                row["token_f1"].as_f64().unwrap_or(0.0)
            );
        }
        println!();
    }
    println!("({} examples)", items.len());
    Ok(())
}
