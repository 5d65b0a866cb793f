//! `tramontane chat`: an interactive terminal chat in the model's Mistral prompt format, streaming tokens,
//! with multi-turn history and `/reset`, `/system`, `/adapter`, `/params` commands.
//!
//! Replies go to stdout (each followed by a newline); prompts and command feedback go to stderr, so piping
//! stdin in and stdout out gives just the conversation's answers.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use datasets::{Conversation, Message, Role};
use trainer::infer::{generate, GenerateRequest, GenerationDefaults, SamplingOverrides, SamplingParams};
use trainer::model::Model;

use super::model_args::{ContextNeed, Demand, ModelArgs};

/// The least context a chat starts with (the memory check fails below it).
const MIN_CONTEXT: usize = 512;

/// Arguments of `tramontane chat`.
#[derive(clap::Args)]
#[command(after_help = "Commands during the chat:\n  /reset                 forget the conversation\n  \
/system [TEXT]         set (or clear) the system prompt, and reset\n  \
/adapter [DIR[:W]|none] show, switch or drop the adapter, and reset\n  \
/params [KEY=VALUE...]  show or set temperature, top_p, top_k, repetition_penalty, max_tokens, seed\n  \
/quit                  leave (also Ctrl-D)\n\nExample:\n  tramontane chat --model runs/models/tiny-mixtral --adapter runs/quickstart/adapter")]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt to start with.
    #[arg(long)]
    system: Option<String>,
    /// Maximum new tokens per reply.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy [default: generation_config.json's, else greedy].
    #[arg(long)]
    temperature: Option<f64>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `tramontane chat`.
pub fn run(args: ChatArgs) -> Result<()> {
    let base_args = ModelArgs { model: args.model.model.clone(), adapter: Vec::new(), load: args.model.load.clone() };
    // The whole conversation is prefilled again each turn: use as much context as memory allows.
    let demand = Demand {
        context: ContextNeed::AsMuchAsFits { min: MIN_CONTEXT.max(args.max_new_tokens + 1) },
        extra_adapters: args.model.adapter.iter().map(std::path::PathBuf::from).collect(),
    };
    let loaded = base_args.load(true, &demand)?;
    let context = loaded.context;
    let tokenizer = loaded.tokenizer.context("chat needs tokenizer.json or tekken.json")?;
    let encoder = tokenizer.encoder(datasets::PromptFormatChoice::Auto)?;
    let base = loaded.model;
    let mut adapter_args = args.model.adapter.clone();
    let mut model = with_adapters(&base, &adapter_args)?;
    let defaults = GenerationDefaults::load(&args.model.model).unwrap_or_default();
    let mut sampling =
        defaults.sampling().overridden(SamplingOverrides { temperature: args.temperature, ..Default::default() });
    let mut max_tokens = args.max_new_tokens;
    let mut seed = args.seed;
    let eos_ids = if defaults.eos_token_ids.is_empty() { tokenizer.eos_ids.clone() } else { defaults.eos_token_ids };
    let mut system = args.system.clone().filter(|s| !s.is_empty());
    let mut history: Vec<Message> = Vec::new();

    eprintln!("chat with {} (/reset, /system, /adapter, /params, /quit)", args.model.model.display());
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read stdin")?;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(command) = line.strip_prefix('/') {
            let (name, rest) = command.split_once(' ').map_or((command, ""), |(a, b)| (a, b.trim()));
            match name {
                "quit" | "exit" => break,
                "reset" => {
                    history.clear();
                    eprintln!("[conversation reset]");
                }
                "system" => {
                    system = (!rest.is_empty()).then(|| rest.to_string());
                    history.clear();
                    eprintln!(
                        "[system prompt {}; conversation reset]",
                        if system.is_some() { "set" } else { "cleared" }
                    );
                }
                "adapter" => {
                    if rest.is_empty() {
                        eprintln!(
                            "[adapters: {}]",
                            if adapter_args.is_empty() { "none".into() } else { adapter_args.join(", ") }
                        );
                        continue;
                    }
                    let wanted: Vec<String> =
                        if rest == "none" { Vec::new() } else { rest.split_whitespace().map(str::to_string).collect() };
                    match with_adapters(&base, &wanted) {
                        Ok(m) => {
                            model = m;
                            adapter_args = wanted;
                            history.clear();
                            eprintln!("[adapter: {}; conversation reset]", if rest == "none" { "none" } else { rest });
                        }
                        Err(e) => eprintln!("[error: {e:#}]"),
                    }
                }
                "params" => {
                    for kv in rest.split_whitespace() {
                        if let Err(e) = set_param(kv, &mut sampling, &mut max_tokens, &mut seed) {
                            eprintln!("[error: {e}]");
                        }
                    }
                    eprintln!(
                        "[temperature={} top_p={} top_k={} repetition_penalty={} max_tokens={max_tokens} seed={seed}]",
                        sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty
                    );
                }
                other => eprintln!("[unknown command /{other}: /reset, /system, /adapter, /params, /quit]"),
            }
            continue;
        }
        let mut messages = Vec::with_capacity(history.len() + 2);
        if let Some(s) = &system {
            messages.push(Message::new(Role::System, s.clone()));
        }
        messages.extend(history.iter().cloned());
        messages.push(Message::new(Role::User, line));
        let conv = Conversation { messages, tools: Vec::new() };
        let prompt_ids = match encoder.encode_prompt(&conv) {
            Ok(ids) => ids,
            Err(p) => {
                eprintln!("[error: cannot encode the conversation: {p}]");
                continue;
            }
        };
        if prompt_ids.len() + max_tokens > context {
            eprintln!(
                "[the conversation is {} tokens, too long for the {context}-token context: /reset]",
                prompt_ids.len()
            );
            continue;
        }
        let request = GenerateRequest {
            prompt_ids,
            max_new_tokens: max_tokens,
            sampling: sampling.clone(),
            seed,
            eos_ids: eos_ids.clone(),
            stop_strings: Vec::new(),
        };
        let mut stdout = std::io::stdout().lock();
        let mut on_text = |piece: &str| {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        };
        match generate(&model, Some(&tokenizer), &request, &mut on_text) {
            Ok(g) => {
                let _ = writeln!(stdout);
                history.push(Message::new(Role::User, line));
                history.push(Message::new(Role::Assistant, g.text.trim().to_string()));
            }
            Err(e) => {
                let _ = writeln!(stdout);
                eprintln!("[error: {e}]");
            }
        }
    }
    Ok(())
}

/// A clone of `base` (sharing its weights) with the adapters `specs` (`DIR[:WEIGHT]`) applied.
fn with_adapters(base: &Model, specs: &[String]) -> Result<Model> {
    let mut model = base.clone();
    let mut adapters = Vec::with_capacity(specs.len());
    for spec in specs {
        let (dir, weight) = trainer::lora::peft::parse_adapter_arg(spec)?;
        let adapter = trainer::lora::peft::load_adapter(&dir, &base.config)
            .with_context(|| format!("adapter {}", dir.display()))?;
        adapters.push((adapter, weight));
    }
    if !adapters.is_empty() {
        trainer::lora::peft::apply_adapters(&mut model, &adapters)?;
    }
    Ok(model)
}

/// Applies one `KEY=VALUE` of `/params`.
fn set_param(kv: &str, sampling: &mut SamplingParams, max_tokens: &mut usize, seed: &mut u64) -> Result<()> {
    let (key, value) = kv.split_once('=').with_context(|| format!("`{kv}`: expected KEY=VALUE"))?;
    let float = || value.parse::<f64>().with_context(|| format!("{key}: `{value}` is not a number"));
    let int = || value.parse::<u64>().with_context(|| format!("{key}: `{value}` is not a whole number"));
    let mut next = sampling.clone();
    match key {
        "temperature" => next.temperature = float()?,
        "top_p" => next.top_p = float()?,
        "top_k" => next.top_k = int()? as usize,
        "repetition_penalty" => next.repetition_penalty = float()?,
        "max_tokens" | "max_new_tokens" => {
            let n = int()? as usize;
            anyhow::ensure!(n > 0, "max_tokens must be at least 1");
            *max_tokens = n;
        }
        "seed" => *seed = int()?,
        other => anyhow::bail!("unknown parameter `{other}`"),
    }
    next.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    *sampling = next;
    Ok(())
}
