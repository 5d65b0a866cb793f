//! `tramontane data`: how a recipe's dataset is encoded — examples with trained tokens marked, packed sequences
//! with their document boundaries, and statistics; for preference data (DPO/ORPO), each pair's prompt, chosen and
//! rejected completions with the tokens that count, and how pairs are batched.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use datasets::{BatchConfig, Batches, Dataset, DatasetStats, Encoder, PackingStats};
use serde_json::{json, Value};
use trainer::recipe::Recipe;

/// Arguments of `tramontane data`.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  tramontane data recipes/quickstart.toml\n  \
tramontane data recipes/quickstart.toml --limit 1 --tokens\n  \
tramontane data recipes/mistral-7b-qlora.toml --set data.max_seq_len=1024 --json > encoded.json\n\n\
Trained tokens are shown in green on a terminal and between « » otherwise; everything else is masked. For
preference data (data.format = \"preference\") each pair shows its chosen and rejected rows (the shared prompt,
then the completion, whose tokens are the ones that count).")]
pub struct DataArgs {
    /// The recipe (TOML).
    recipe: PathBuf,
    /// How many examples (and packed sequences) to show.
    #[arg(long, default_value_t = 3, value_name = "N")]
    limit: usize,
    /// Print one JSON object (statistics, examples with input_ids / labels / loss_mask, packed sequences with
    /// document boundaries) instead of text.
    #[arg(long)]
    json: bool,
    /// Override a recipe key, e.g. `--set data.max_seq_len=1024` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Show the held-out eval split instead of the training split.
    #[arg(long)]
    eval: bool,
    /// Also list every token: position, id, piece, trained or not.
    #[arg(long)]
    tokens: bool,
}

/// Runs `tramontane data`.
pub fn run(args: DataArgs) -> Result<()> {
    match run_inner(args) {
        // `tramontane data ... | head` closes the pipe early: not an error.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => {
            Ok(())
        }
        other => other,
    }
}

fn run_inner(args: DataArgs) -> Result<()> {
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    if let Some(name) = &recipe.model.builtin {
        trainer::model::builtin::ensure(name, &recipe.model.path)?;
    }
    let tok_path = recipe.tokenizer_path();
    let tokenizer = datasets::load_tokenizer(&tok_path).with_context(|| {
        format!("reading the tokenizer {} (from model.path; set model.tokenizer to use another)", tok_path.display())
    })?;
    let encoder = Encoder::for_tokenizer(&tokenizer, recipe.data.prompt_format)?;
    if recipe.data.format == datasets::Format::Preference {
        return pairs::run(&args, &recipe, &tok_path, &encoder);
    }
    let data = datasets::load(&recipe.data, &encoder, recipe.train.seed)?;
    let shown = if args.eval {
        data.eval.clone().context("the recipe has no eval split (set data.eval_fraction or data.eval_files)")?
    } else {
        data.train.clone()
    };
    let cfg = recipe.batch_config(encoder.eos_id());
    let split_cfg = if args.eval { cfg.unshuffled() } else { cfg.clone() };
    let packing =
        |d: &std::sync::Arc<Dataset>, c: &BatchConfig| Batches::new(d.clone(), c.clone()).map(|b| b.packing_stats());
    let train_packing = packing(&data.train, &cfg)?;
    let eval_packing = data.eval.as_ref().map(|d| packing(d, &cfg.unshuffled())).transpose()?;
    let mut batches = Batches::new(shown.clone(), split_cfg)?;
    let mut sequences = Vec::new();
    while sequences.len() < args.limit {
        let epoch = batches.position().epoch;
        if epoch > 0 {
            break;
        }
        let b = batches.next_batch();
        for r in 0..b.batch_size {
            if sequences.len() < args.limit {
                sequences.push((b.clone(), r));
            }
        }
    }
    let view = View { recipe: &recipe, tok_path: &tok_path, encoder: &encoder };
    if args.json {
        let out = json!({
            "recipe": args.recipe.display().to_string(),
            "tokenizer": tok_path.display().to_string(),
            "format": recipe.data.format.name(),
            "prompt_format": encoder.prompt_format().name(),
            "max_seq_len": recipe.data.max_seq_len,
            "packing": recipe.data.packing,
            "train": stats_json(&data.train.stats, &train_packing),
            "eval": data.eval.as_ref().zip(eval_packing.as_ref()).map(|(d, p)| stats_json(&d.stats, p)),
            "split": if args.eval { "eval" } else { "train" },
            "examples": (0..shown.len().min(args.limit)).map(|i| view.example_json(&shown, i)).collect::<Vec<_>>(),
            "sequences": sequences.iter().map(|(b, r)| view.sequence_json(&shown, b, *r)).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut out = std::io::stdout().lock();
    view.header(&mut out, &args.recipe, &data, &train_packing, eval_packing.as_ref())?;
    for i in 0..shown.len().min(args.limit) {
        view.example_text(&mut out, &shown, i, color, args.tokens)?;
    }
    for (b, r) in &sequences {
        view.sequence_text(&mut out, &shown, b, *r)?;
    }
    if shown.len() > args.limit {
        writeln!(out, "\n({} more examples; --limit N shows more)", shown.len() - args.limit)?;
    }
    Ok(())
}

mod pairs;

/// The path relative to the current directory when it is inside it.
fn shorten(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(|r| r.display().to_string()))
        .unwrap_or_else(|| p.display().to_string())
}

fn stats_json(s: &DatasetStats, p: &PackingStats) -> Value {
    json!({
        "files": s.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "rows": s.rows,
        "examples": s.examples,
        "tokens": s.tokens,
        "trained_tokens": s.trained_tokens,
        "trained_fraction": s.trained_fraction(),
        "min_tokens": s.min_tokens,
        "mean_tokens": s.mean_tokens(),
        "max_tokens": s.max_tokens,
        "skipped_invalid": s.skipped_invalid,
        "skipped_null": s.skipped_null,
        "dropped_too_long": s.dropped_too_long,
        "truncated": s.truncated,
        "dropped_untrained": s.dropped_untrained,
        "held_out": s.held_out,
        "skip_examples": s.skip_examples,
        "sequences": p.rows,
        "batches": p.batches,
        "packing_efficiency": p.efficiency,
        "examples_per_sequence": p.examples_per_row,
    })
}

struct View<'a> {
    recipe: &'a Recipe,
    tok_path: &'a Path,
    encoder: &'a Encoder,
}

/// One token as displayed: its piece with `▁` as a space, byte-fallback pieces (`<0x0A>`) as their byte.
enum Piece {
    Text(String),
    Byte(u8),
}

const GREEN: &str = "\x1b[1;32m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl View<'_> {
    fn piece(&self, id: u32) -> Piece {
        let p = self.encoder.tokenizer().id_to_token(id).unwrap_or_else(|| format!("<id {id}>"));
        if p.len() == 6 && p.starts_with("<0x") && p.ends_with('>') {
            if let Ok(b) = u8::from_str_radix(&p[3..5], 16) {
                return Piece::Byte(b);
            }
        }
        Piece::Text(p.replace('\u{2581}', " "))
    }

    /// Renders tokens as text, one run per mask value: `(trained, text)`.
    fn runs(&self, ids: &[u32], mask: &[bool]) -> Vec<(bool, String)> {
        let mut runs: Vec<(bool, String)> = Vec::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut cur: Option<bool> = None;
        let flush_bytes = |bytes: &mut Vec<u8>, s: &mut String| {
            if !bytes.is_empty() {
                s.push_str(&String::from_utf8_lossy(bytes));
                bytes.clear();
            }
        };
        let mut text = String::new();
        for (&id, &m) in ids.iter().zip(mask) {
            if cur != Some(m) {
                flush_bytes(&mut bytes, &mut text);
                if let Some(c) = cur {
                    runs.push((c, std::mem::take(&mut text)));
                }
                cur = Some(m);
            }
            match self.piece(id) {
                Piece::Byte(b) => bytes.push(b),
                Piece::Text(t) => {
                    flush_bytes(&mut bytes, &mut text);
                    text.push_str(&t);
                }
            }
        }
        flush_bytes(&mut bytes, &mut text);
        if let Some(c) = cur {
            runs.push((c, text));
        }
        runs
    }

    fn render(&self, ids: &[u32], mask: &[bool], color: bool) -> String {
        let mut s = String::new();
        for (trained, text) in self.runs(ids, mask) {
            let text = text.replace('\n', "\u{21b5}\n    ");
            match (color, trained) {
                (true, true) => s.push_str(&format!("{GREEN}{text}{RESET}")),
                (true, false) => s.push_str(&format!("{DIM}{text}{RESET}")),
                (false, true) => s.push_str(&format!("\u{ab}{text}\u{bb}")),
                (false, false) => s.push_str(&text),
            }
        }
        s
    }

    fn header(
        &self,
        out: &mut impl Write,
        recipe_path: &Path,
        data: &datasets::LoadedData,
        train_packing: &PackingStats,
        eval_packing: Option<&PackingStats>,
    ) -> Result<()> {
        let r = self.recipe;
        let detected = if r.data.prompt_format == datasets::PromptFormatChoice::Auto { ", detected" } else { "" };
        writeln!(out, "recipe     {}", recipe_path.display())?;
        writeln!(
            out,
            "tokenizer  {} (vocab {}, prompt format {}{detected})",
            shorten(self.tok_path),
            self.encoder.vocab_size(),
            self.encoder.prompt_format().name()
        )?;
        let files = &data.train.stats.files;
        let names: Vec<String> = files.iter().map(|f| shorten(f)).collect();
        writeln!(
            out,
            "data       {} file{}: {} (format {}, max_seq_len {}, {})",
            files.len(),
            if files.len() == 1 { "" } else { "s" },
            names.join(", "),
            r.data.format.name(),
            r.data.max_seq_len,
            if r.data.packing { "packed" } else { "padded" }
        )?;
        writeln!(out)?;
        self.stats_text(out, "train", &data.train.stats, train_packing)?;
        if let (Some(d), Some(p)) = (&data.eval, eval_packing) {
            self.stats_text(out, "eval", &d.stats, p)?;
        }
        Ok(())
    }

    fn stats_text(&self, out: &mut impl Write, name: &str, s: &DatasetStats, p: &PackingStats) -> Result<()> {
        let held = if s.held_out > 0 { format!(" ({} held out for eval)", s.held_out) } else { String::new() };
        writeln!(out, "{name:<10} {} examples from {} rows{held}", s.examples, s.rows)?;
        writeln!(
            out,
            "           {} tokens, {} trained ({:.1}%); length min {} / mean {:.1} / max {}",
            s.tokens,
            s.trained_tokens,
            100.0 * s.trained_fraction(),
            s.min_tokens,
            s.mean_tokens(),
            s.max_tokens
        )?;
        let skipped = s.skipped_invalid + s.skipped_null + s.dropped_too_long + s.truncated + s.dropped_untrained;
        if skipped == 0 {
            writeln!(out, "           skipped: none (no invalid, null, too long or untrained examples)")?;
        } else {
            writeln!(
                out,
                "           skipped: {} invalid, {} null, {} too long (dropped), {} truncated, {} without trained tokens",
                s.skipped_invalid, s.skipped_null, s.dropped_too_long, s.truncated, s.dropped_untrained
            )?;
            for e in &s.skip_examples {
                writeln!(out, "             - {e}")?;
            }
        }
        let mbs = self.recipe.train.micro_batch_size;
        writeln!(
            out,
            "           {}: {} examples -> {} sequences of <= {} tokens ({:.1} per sequence) in {} batches of {mbs}; \
             efficiency {:.1}%",
            if self.recipe.data.packing { "packing" } else { "padding" },
            s.examples,
            p.rows,
            self.recipe.data.max_seq_len,
            p.examples_per_row,
            p.batches,
            100.0 * p.efficiency
        )?;
        Ok(())
    }

    fn example_text(&self, out: &mut impl Write, d: &Dataset, i: usize, color: bool, tokens: bool) -> Result<()> {
        let e = d.example(i);
        let trained = e.loss_mask.iter().filter(|m| **m).count();
        let what = if e.origin.is_line { "line" } else { "row" };
        writeln!(
            out,
            "\nexample {i}  {} {what} {} · {} tokens, {trained} trained",
            e.origin.file_name(),
            e.origin.row,
            e.input_ids.len()
        )?;
        writeln!(out, "    {}", self.render(e.input_ids, e.loss_mask, color))?;
        if tokens {
            writeln!(out, "    {:>5} {:>7}  {:<7}  piece", "pos", "id", "trained")?;
            for (k, (&id, &m)) in e.input_ids.iter().zip(e.loss_mask).enumerate() {
                let piece = self.encoder.tokenizer().id_to_token(id).unwrap_or_default();
                writeln!(out, "    {k:>5} {id:>7}  {:<7}  {piece:?}", if m { "yes" } else { "-" })?;
            }
        }
        Ok(())
    }

    fn sequence_text(&self, out: &mut impl Write, d: &Dataset, b: &datasets::Batch, r: usize) -> Result<()> {
        let docs = &b.docs[r];
        let spans: Vec<String> = docs
            .iter()
            .map(|s| {
                let o = d.example(s.example).origin;
                format!("[{}..{}) example {} ({} row {})", s.start, s.start + s.len, s.example, o.file_name(), o.row)
            })
            .collect();
        let pad = b.seq_len - b.row_lengths[r];
        writeln!(
            out,
            "\nsequence {} of batch {} · {} documents, {} tokens + {pad} padding",
            r,
            b.index,
            docs.len(),
            b.row_lengths[r]
        )?;
        for s in spans {
            writeln!(out, "    {s}")?;
        }
        Ok(())
    }

    fn example_json(&self, d: &Dataset, i: usize) -> Value {
        let e = d.example(i);
        let runs = self.runs(e.input_ids, e.loss_mask);
        json!({
            "index": i,
            "file": e.origin.file.display().to_string(),
            "row": e.origin.row,
            "num_tokens": e.input_ids.len(),
            "num_trained": e.loss_mask.iter().filter(|m| **m).count(),
            "input_ids": e.input_ids,
            "labels": e.labels(),
            "loss_mask": e.loss_mask.iter().map(|&m| u8::from(m)).collect::<Vec<_>>(),
            "text": runs.iter().map(|(_, t)| t.as_str()).collect::<String>(),
            "trained_text": runs.iter().filter(|(m, _)| *m).map(|(_, t)| t.clone()).collect::<Vec<_>>(),
        })
    }

    fn sequence_json(&self, d: &Dataset, b: &datasets::Batch, r: usize) -> Value {
        let t = b.seq_len;
        let range = r * t..(r + 1) * t;
        json!({
            "batch": b.index,
            "row": r,
            "seq_len": t,
            "num_tokens": b.row_lengths[r],
            "padding": t - b.row_lengths[r],
            "input_ids": &b.input_ids[range.clone()],
            "labels": &b.labels[range.clone()],
            "positions": &b.positions[range.clone()],
            "doc_ids": &b.doc_ids[range],
            "documents": b.docs[r].iter().map(|s| {
                let o = d.example(s.example).origin;
                json!({"start": s.start, "len": s.len, "example": s.example, "file": o.file.display().to_string(), "row": o.row})
            }).collect::<Vec<_>>(),
        })
    }
}
