//! `tramontane data` on preference data (`data.format = "preference"`): statistics, each pair's chosen and
//! rejected rows with the tokens that count, and the first micro-batch's layout.

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, Result};
use datasets::{EncodedPair, Encoder, PairBatches, PairDataset, PairStats};
use serde_json::{json, Value};
use trainer::recipe::{Objective, Recipe};

use super::{shorten, DataArgs, View};

/// Shows a preference dataset as `data` shows an SFT one.
pub(super) fn run(args: &DataArgs, recipe: &Recipe, tok_path: &Path, encoder: &Encoder) -> Result<()> {
    let data = datasets::load_pairs(&recipe.data, encoder, recipe.train.seed)?;
    let shown = if args.eval {
        data.eval.clone().context("the recipe has no eval split (set data.eval_fraction or data.eval_files)")?
    } else {
        data.train.clone()
    };
    let mbs = recipe.train.micro_batch_size;
    let (pad, multiple) = (encoder.eos_id(), recipe.data.pad_to_multiple_of);
    let mut batches = if args.eval {
        PairBatches::new(shown.clone(), mbs, false, 0, pad, multiple)?
    } else {
        PairBatches::new(shown.clone(), mbs, recipe.data.shuffle, recipe.train.seed, pad, multiple)?
    };
    let first_batch = batches.next_batch();
    let view = View { recipe, tok_path, encoder };
    let orpo = recipe.train.objective == Objective::Orpo;
    let n = shown.len().min(args.limit);
    if args.json {
        let stats = |s: &PairStats, d: &PairDataset| pair_stats_json(s, d, mbs);
        let out = json!({
            "recipe": args.recipe.display().to_string(),
            "tokenizer": tok_path.display().to_string(),
            "format": recipe.data.format.name(),
            "prompt_format": encoder.prompt_format().name(),
            "max_seq_len": recipe.data.max_seq_len,
            "packing": false,
            "objective": objective_name(recipe.train.objective),
            "train": stats(&data.train.stats, &data.train),
            "eval": data.eval.as_ref().map(|d| stats(&d.stats, d)),
            "split": if args.eval { "eval" } else { "train" },
            "pairs": (0..n).map(|i| pair_json(&view, &shown.pairs[i], i, orpo)).collect::<Vec<_>>(),
            "batch": batch_json(&first_batch),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut out = std::io::stdout().lock();
    let r = recipe;
    let detected = if r.data.prompt_format == datasets::PromptFormatChoice::Auto { ", detected" } else { "" };
    writeln!(out, "recipe     {}", args.recipe.display())?;
    writeln!(
        out,
        "tokenizer  {} (vocab {}, prompt format {}{detected})",
        shorten(tok_path),
        encoder.vocab_size(),
        encoder.prompt_format().name()
    )?;
    let files = &data.train.stats.files;
    let names: Vec<String> = files.iter().map(|f| shorten(f)).collect();
    writeln!(
        out,
        "data       {} file{}: {} (format preference, objective {}, max_seq_len {}, pairs never packed)",
        files.len(),
        if files.len() == 1 { "" } else { "s" },
        names.join(", "),
        objective_name(r.train.objective),
        r.data.max_seq_len
    )?;
    writeln!(out)?;
    stats_text(&mut out, "train", &data.train, mbs)?;
    if let Some(eval) = &data.eval {
        stats_text(&mut out, "eval", eval, mbs)?;
    }
    let counted = if orpo {
        "completion tokens count; ORPO's NLL term also covers the chosen row's prompt"
    } else {
        "completion tokens count, prompt tokens do not"
    };
    writeln!(out, "           {counted}")?;
    for (i, pair) in shown.pairs.iter().take(n).enumerate() {
        let o = &pair.origin;
        let what = if o.is_line { "line" } else { "row" };
        writeln!(
            out,
            "\npair {i}  {} {what} {} · prompt {} tokens, chosen {}, rejected {}",
            o.file_name(),
            o.row,
            pair.prompt.len(),
            pair.chosen.len(),
            pair.rejected.len()
        )?;
        for (side, completion) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
            let (ids, mask) = row(pair, completion);
            writeln!(out, "  {side:<9} {}", view.render(&ids, &mask, color))?;
            if args.tokens {
                writeln!(out, "    {:>5} {:>7}  {:<7}  piece", "pos", "id", "counts")?;
                for (k, (&id, &m)) in ids.iter().zip(&mask).enumerate() {
                    let piece = encoder.tokenizer().id_to_token(id).unwrap_or_default();
                    writeln!(out, "    {k:>5} {id:>7}  {:<7}  {piece:?}", if m { "yes" } else { "-" })?;
                }
            }
        }
    }
    let b = &first_batch;
    writeln!(
        out,
        "\nbatch 0 · {} pairs as {} rows of {} tokens (rows 0..{} chosen, {}..{} rejected), {} tokens + {} padding",
        b.pairs,
        b.rows(),
        b.seq_len,
        b.pairs,
        b.pairs,
        b.rows(),
        b.tokens(),
        b.rows() * b.seq_len - b.tokens()
    )?;
    if shown.len() > args.limit {
        writeln!(out, "\n({} more pairs; --limit N shows more)", shown.len() - args.limit)?;
    }
    Ok(())
}

fn objective_name(o: Objective) -> &'static str {
    match o {
        Objective::Sft => "sft",
        Objective::Dpo => "dpo",
        Objective::Orpo => "orpo",
    }
}

/// One side of a pair as the trainer lays it out: prompt + completion ids, and which count (the completion).
fn row(pair: &EncodedPair, completion: &[u32]) -> (Vec<u32>, Vec<bool>) {
    let mut ids = pair.prompt.clone();
    ids.extend_from_slice(completion);
    let mask = (0..ids.len()).map(|k| k >= pair.prompt.len()).collect();
    (ids, mask)
}

fn stats_text(out: &mut impl Write, name: &str, d: &PairDataset, mbs: usize) -> Result<()> {
    let s = &d.stats;
    let held = if s.held_out > 0 { format!(" ({} held out for eval)", s.held_out) } else { String::new() };
    writeln!(out, "{name:<10} {} pairs from {} rows{held}", s.pairs, s.rows)?;
    writeln!(
        out,
        "           {} prompt, {} chosen, {} rejected tokens; longest pair {} tokens",
        s.prompt_tokens,
        s.chosen_tokens,
        s.rejected_tokens,
        longest(d)
    )?;
    let skipped =
        s.skipped_invalid + s.skipped_null + s.dropped_too_long + s.truncated_prompts + s.truncated_completions;
    if skipped == 0 {
        writeln!(out, "           skipped: none (no invalid, null, too long or truncated pairs)")?;
    } else {
        writeln!(
            out,
            "           skipped: {} invalid, {} null, {} too long (dropped); truncated: {} prompts, {} completions",
            s.skipped_invalid, s.skipped_null, s.dropped_too_long, s.truncated_prompts, s.truncated_completions
        )?;
        for e in &s.skip_examples {
            writeln!(out, "             - {e}")?;
        }
    }
    writeln!(
        out,
        "           batches: {} pairs -> {} micro-batches of {mbs} pairs ({} rows each, right-padded)",
        s.pairs,
        s.pairs.div_ceil(mbs.max(1)),
        2 * mbs
    )?;
    Ok(())
}

/// The longest prompt + completion of the pairs.
fn longest(d: &PairDataset) -> usize {
    d.pairs.iter().map(|p| p.prompt.len() + p.chosen.len().max(p.rejected.len())).max().unwrap_or(0)
}

fn pair_stats_json(s: &PairStats, d: &PairDataset, mbs: usize) -> Value {
    json!({
        "files": s.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "rows": s.rows,
        "pairs": s.pairs,
        "prompt_tokens": s.prompt_tokens,
        "chosen_tokens": s.chosen_tokens,
        "rejected_tokens": s.rejected_tokens,
        "longest_pair_tokens": longest(d),
        "skipped_invalid": s.skipped_invalid,
        "skipped_null": s.skipped_null,
        "dropped_too_long": s.dropped_too_long,
        "truncated_prompts": s.truncated_prompts,
        "truncated_completions": s.truncated_completions,
        "held_out": s.held_out,
        "skip_examples": s.skip_examples,
        "batches": s.pairs.div_ceil(mbs.max(1)),
    })
}

fn pair_json(view: &View, pair: &EncodedPair, index: usize, orpo: bool) -> Value {
    let side = |completion: &[u32], chosen: bool| {
        let (ids, mask) = row(pair, completion);
        let runs = view.runs(&ids, &mask);
        let mut v = json!({
            "input_ids": ids,
            "loss_mask": mask.iter().map(|&m| u8::from(m)).collect::<Vec<_>>(),
            "num_tokens": ids.len(),
            "num_trained": completion.len(),
            "text": runs.iter().map(|(_, t)| t.as_str()).collect::<String>(),
            "trained_text": runs.iter().filter(|(m, _)| *m).map(|(_, t)| t.clone()).collect::<Vec<_>>(),
        });
        if orpo && chosen {
            // ORPO's NLL term: every token of the chosen row (its first token is never a target).
            v["nll_mask"] = json!((0..ids.len()).map(|k| u8::from(k > 0)).collect::<Vec<_>>());
        }
        v
    };
    json!({
        "index": index,
        "file": pair.origin.file.display().to_string(),
        "row": pair.origin.row,
        "prompt_ids": pair.prompt,
        "chosen_ids": pair.chosen,
        "rejected_ids": pair.rejected,
        "chosen": side(&pair.chosen, true),
        "rejected": side(&pair.rejected, false),
    })
}

fn batch_json(b: &datasets::PairBatch) -> Value {
    let t = b.seq_len;
    json!({
        "pairs": b.pairs,
        "rows": b.rows(),
        "seq_len": t,
        "pair_indices": b.indices,
        "row_tokens": (0..b.rows()).map(|r| b.valid[r * t..(r + 1) * t].iter().filter(|v| **v).count()).collect::<Vec<_>>(),
        "row_completion_tokens": (0..b.rows())
            .map(|r| b.completion[r * t..(r + 1) * t].iter().filter(|v| **v).count())
            .collect::<Vec<_>>(),
        "padding": b.rows() * t - b.tokens(),
    })
}
