//! `tramontane`: LoRA and QLoRA fine-tuning of Mistral-family models, in one binary.
//!
//! This file only parses the command line and dispatches; each subcommand lives in `src/cmd/`.

mod cmd;

use clap::{Parser, Subcommand};

/// An allocation that cannot be met ends the command with a message and status 1, not an abort.
#[global_allocator]
static ALLOCATOR: trainer::system::ExitOnOutOfMemory = trainer::system::ExitOnOutOfMemory;

/// LoRA and QLoRA fine-tuning of Mistral-family models (Mistral 7B, Mixtral 8x7B/8x22B).
#[derive(Parser)]
#[command(name = "tramontane", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a LoRA/QLoRA adapter as a TOML recipe describes (the main job).
    Train(cmd::train::TrainArgs),
    /// Generate text from a model (greedy or sampled, streamed to stdout).
    Generate(cmd::generate::GenerateArgs),
    /// Evaluate a model and its adapters: loss/perplexity over a dataset or a sequence, or generated answers.
    Eval(cmd::eval::EvalArgs),
    /// Describe a model directory (architecture, parameters, layout, memory) or an adapter directory.
    Inspect(cmd::inspect::InspectArgs),
    /// Show how a recipe's dataset is encoded: tokens, loss masks, packing, statistics.
    Data(cmd::data::DataArgs),
    /// Merge LoRA adapters into their base model: a Hugging Face model directory (and optionally GGUF).
    Merge(cmd::merge::MergeArgs),
    /// Serve the model and its adapters over an OpenAI-compatible HTTP API.
    Serve(cmd::serve::ServeArgs),
    /// Chat with the model in the terminal (streaming, multi-turn, /reset /system /adapter /params).
    Chat(cmd::chat::ChatArgs),
}

fn main() -> std::process::ExitCode {
    trainer::system::tune_process();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => cmd::train::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Data(args) => cmd::data::run(args),
        Command::Merge(args) => cmd::merge::run(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Chat(args) => cmd::chat::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
