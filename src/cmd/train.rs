//! `tramontane train`: run (or resume) the fine-tuning a recipe describes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use trainer::recipe::Recipe;
use trainer::train::{run_training, JsonReporter, ProgressReporter, QuietReporter, Reporter, RunOptions};

/// Arguments of `tramontane train`.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  tramontane train recipes/quickstart.toml\n  \
tramontane train recipes/mistral-7b-qlora.toml --set train.learning_rate=1e-4 --set output.dir=runs/try2\n  \
tramontane train recipes/quickstart.toml --resume      # continue from the newest checkpoint\n\n\
The run directory (output.dir) receives the resolved recipe, metrics.jsonl, TensorBoard event files\n\
(tensorboard/), samples.jsonl, checkpoints/ (atomic, the newest output.keep_last kept), adapters/step-N,\n\
adapter-best/ and adapter/ (PEFT format). Ctrl-C writes a checkpoint and exits cleanly.\n\n\
On a terminal a bar follows each micro-batch, with an ETA once the first is done; otherwise (a log file)\n\
a line is printed every logging.every_steps steps, and every 30 s while a long step runs.")]
pub struct TrainArgs {
    /// The recipe (TOML).
    recipe: PathBuf,
    /// Override a recipe value, e.g. `--set train.max_steps=100` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Continue from the newest complete checkpoint in the run directory.
    #[arg(long)]
    resume: bool,
    /// Print only warnings and the final summary.
    #[arg(long, conflicts_with = "json")]
    quiet: bool,
    /// Print one JSON object per event (header, micro_batch, step, eval, saved, summary) on stdout;
    /// `step` counts optimizer steps done (1 = the first; an eval at step 0 is the baseline), as in
    /// metrics.jsonl.
    #[arg(long)]
    json: bool,
}

/// Runs `tramontane train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let recipe = Recipe::load(&args.recipe, &args.set).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting now without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current step, then saving a checkpoint (Ctrl-C again to abort)");
    })
    .context("cannot install the Ctrl-C handler")?;
    let mut reporter: Box<dyn Reporter> = if args.json {
        Box::new(JsonReporter)
    } else if args.quiet {
        Box::new(QuietReporter)
    } else {
        Box::new(ProgressReporter::new(recipe.logging.every_steps))
    };
    let summary = run_training(&recipe, &RunOptions { resume: args.resume, stop }, reporter.as_mut())
        .with_context(|| format!("training {}", args.recipe.display()))?;
    if summary.interrupted {
        std::process::exit(130);
    }
    Ok(())
}
