//! `tramontane generate`: greedy or sampled generation, streamed to stdout.

use std::io::Write;

use anyhow::{bail, Context, Result};
use trainer::infer::{generate, GenerateRequest, GenerationDefaults, SamplingOverrides, StopReason};

use super::model_args::{parse_ids, ContextNeed, Demand, ModelArgs};

/// Arguments of `tramontane generate`.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  tramontane generate --model runs/models/tiny-mixtral --prompt \"Once upon a time\"\n  \
tramontane generate --model DIR --chat \"What is the capital of France?\" --temperature 0.7 --top-p 0.9 --seed 1\n  \
tramontane generate --model DIR --prompt-ids 1,415,2936 --max-new-tokens 16 --json\n  \
tramontane generate --model BASE --adapter runs/qlora/adapter --quantize nf4 --chat \"Hi\" --temperature 0"
)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Raw prompt text (BOS added as the tokenizer's post-processor says).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// A user message, wrapped in the Mistral instruct format the tokenizer calls for.
    #[arg(long, group = "input")]
    chat: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long, group = "input", value_name = "IDS")]
    prompt_ids: Option<String>,
    /// Maximum number of new tokens [default: generation_config.json's, else 128].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 = greedy [default: generation_config.json's, else greedy].
    #[arg(long)]
    temperature: Option<f64>,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long)]
    top_p: Option<f64>,
    /// Penalty (> 0, 1 = off) on tokens already in the context.
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// Sampler seed [default: from the clock; printed with --json].
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this string appears (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (prompt ids, generated ids, text, speeds) instead of streaming.
    #[arg(long)]
    json: bool,
}

/// Runs `tramontane generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let need_tokenizer = args.prompt.is_some() || args.chat.is_some() || !args.stop.is_empty();
    let ids = args.prompt_ids.as_deref().map(parse_ids).transpose()?;
    // The prompt's length before tokenizing: at most one token per byte, plus the chat template's.
    let prompt_bound = match (&args.prompt, &args.chat, &ids) {
        (Some(text), _, _) | (_, Some(text), _) => text.len() + 64,
        (_, _, Some(ids)) => ids.len(),
        _ => bail!("give one of --prompt, --chat or --prompt-ids"),
    };
    let defaults = GenerationDefaults::load(&args.model.model)?;
    let max_new_tokens = args.max_new_tokens.or(defaults.max_new_tokens).unwrap_or(128);
    let demand = Demand {
        context: ContextNeed::Fixed {
            context: prompt_bound.saturating_add(max_new_tokens),
            prefill: prompt_bound,
            logit_rows: 1,
        },
        extra_adapters: Vec::new(),
    };
    let loaded = args.model.load(need_tokenizer, &demand)?;
    let tokenizer = loaded.tokenizer.as_ref();
    let prompt_ids = match (&args.prompt, &args.chat, ids) {
        (Some(text), _, _) => tokenizer.context("--prompt needs tokenizer.json")?.encode(text, true)?,
        (_, Some(text), _) => tokenizer.context("--chat needs tokenizer.json")?.encode_chat_prompt(text)?,
        (_, _, Some(ids)) => ids,
        _ => bail!("give one of --prompt, --chat or --prompt-ids"),
    };
    let sampling = defaults.sampling().overridden(SamplingOverrides {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
    });
    let eos_ids = if args.ignore_eos {
        Vec::new()
    } else if !defaults.eos_token_ids.is_empty() {
        defaults.eos_token_ids.clone()
    } else {
        tokenizer.map(|t| t.eos_ids.clone()).unwrap_or_else(|| loaded.model.config.eos_token_ids.clone())
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let request = GenerateRequest {
        prompt_ids: prompt_ids.clone(),
        max_new_tokens,
        sampling,
        seed,
        eos_ids,
        stop_strings: args.stop.clone(),
    };
    let mut stdout = std::io::stdout().lock();
    let stream = !args.json;
    let mut on_text = |piece: &str| {
        if stream {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    };
    let generation = generate(&loaded.model, tokenizer, &request, &mut on_text)?;
    if args.json {
        let value = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": generation.ids,
            "text": generation.text,
            "stop_reason": generation.stop_reason,
            "seed": seed,
            "prefill_tokens_per_second": generation.prefill_tokens_per_second(prompt_ids.len()),
            "decode_tokens_per_second": generation.decode_tokens_per_second(),
        });
        println!("{value}");
    } else {
        if tokenizer.is_none() {
            let ids: Vec<String> = generation.ids.iter().map(u32::to_string).collect();
            print!("{}", ids.join(","));
        }
        println!();
        eprintln!(
            "[{} prompt tokens, {:.1} tokens/s prefill; {} new tokens, {:.1} tokens/s decode; stop: {}]",
            prompt_ids.len(),
            generation.prefill_tokens_per_second(prompt_ids.len()),
            generation.ids.len(),
            generation.decode_tokens_per_second(),
            match generation.stop_reason {
                StopReason::Eos => "end of sequence",
                StopReason::StopString => "stop string",
                StopReason::Length => "token limit",
            }
        );
    }
    Ok(())
}
