//! What a person (or a script) sees during a run: a progress bar with the live numbers, quiet mode,
//! or JSON lines for scripts.

use std::io::Write;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::update::StepReport;

/// The facts shown before training starts.
#[derive(Debug, Clone, Serialize)]
pub struct RunHeader {
    /// Model directory.
    pub model: String,
    /// Architecture and size, in words.
    pub model_summary: String,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// All parameters of the model.
    pub total_parameters: u64,
    /// Bytes held by the loaded model (NF4 where quantized).
    pub model_bytes: u64,
    /// Training examples, tokens, trained tokens and packing.
    pub data_summary: String,
    /// Optimizer steps to run.
    pub total_steps: u64,
    /// First step (non-zero when resuming).
    pub start_step: u64,
    /// Run directory.
    pub run_dir: String,
    /// What the backward keeps and recomputes (checkpointing and its activation budget), in words.
    pub memory_plan: String,
}

/// An evaluation's results.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Optimizer step at which it ran.
    pub step: u64,
    /// Mean token loss on the held-out split (if there is one).
    pub loss: Option<f64>,
    /// `exp(loss)`.
    pub perplexity: Option<f64>,
    /// Labelled tokens scored.
    pub tokens: usize,
    /// `(prompt, greedy completion)` for each recipe prompt.
    pub samples: Vec<(String, String)>,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Optimizer steps completed.
    pub steps: u64,
    /// Whether the run stopped early (Ctrl-C) after saving a checkpoint.
    pub interrupted: bool,
    /// Tokens processed in this session.
    pub tokens: u64,
    /// Seconds spent in this session.
    pub seconds: f64,
    /// Loss of the first step of this session.
    pub first_loss: Option<f64>,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    /// Best eval loss seen (over the whole run, resumes included).
    pub best_eval_loss: Option<f64>,
    /// Final eval loss.
    pub final_eval_loss: Option<f64>,
    /// The final adapter's directory.
    pub adapter_dir: String,
    /// Peak resident memory of the process.
    pub peak_rss_bytes: Option<u64>,
}

/// Receives the run's events.
pub trait Reporter {
    /// Before the first step.
    fn header(&mut self, header: &RunHeader);
    /// After each optimizer step.
    fn step(&mut self, report: &StepReport, total_steps: u64, tokens_per_second: f64);
    /// After each evaluation.
    fn eval(&mut self, eval: &EvalReport);
    /// A warning (skipped step, ...).
    fn warn(&mut self, message: &str);
    /// Something was saved.
    fn saved(&mut self, what: &str, path: &str);
    /// At the end.
    fn finish(&mut self, summary: &RunSummary);
}

fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn header_lines(h: &RunHeader) -> Vec<String> {
    vec![
        format!("model     {} ({})", h.model, h.model_summary),
        format!(
            "trainable {} parameters ({:.3}% of {}), model in memory {}",
            h.trainable_parameters,
            100.0 * h.trainable_parameters as f64 / h.total_parameters.max(1) as f64,
            h.total_parameters,
            gib(h.model_bytes)
        ),
        format!("data      {}", h.data_summary),
        format!(
            "run       {} steps{}, writing to {}",
            h.total_steps,
            if h.start_step > 0 { format!(" (resuming at step {})", h.start_step) } else { String::new() },
            h.run_dir
        ),
        format!("memory    {}", h.memory_plan),
    ]
}

fn summary_line(s: &RunSummary) -> String {
    let fmt = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.4}"));
    format!(
        "{} after {} steps in {:.1}s ({} tokens); loss {} -> {}; eval loss best {} final {}; adapter: {}{}",
        if s.interrupted { "interrupted (checkpoint saved)" } else { "done" },
        s.steps,
        s.seconds,
        s.tokens,
        fmt(s.first_loss),
        fmt(s.last_loss),
        fmt(s.best_eval_loss),
        fmt(s.final_eval_loss),
        s.adapter_dir,
        s.peak_rss_bytes.map_or(String::new(), |b| format!("; peak RSS {}", gib(b)))
    )
}

/// The interactive display: header, an indicatif bar (step/total, loss, eval loss, lr, tokens/s,
/// ETA), evaluations and saves printed above it, a summary.
pub struct ProgressReporter {
    bar: Option<ProgressBar>,
    eval_loss: Option<f64>,
}

impl ProgressReporter {
    /// A reporter drawing on stderr (hidden when stderr is not a terminal: then lines are printed).
    pub fn new() -> Self {
        ProgressReporter { bar: None, eval_loss: None }
    }

    fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }
}

impl Default for ProgressReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter for ProgressReporter {
    fn header(&mut self, h: &RunHeader) {
        for line in header_lines(h) {
            eprintln!("{line}");
        }
        let bar = ProgressBar::with_draw_target(Some(h.total_steps), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_position(h.start_step);
        self.bar = Some(bar);
    }

    fn step(&mut self, r: &StepReport, _total: u64, tps: f64) {
        let msg = format!(
            "loss {:.4}{} eval {} lr {:.2e} {:.0} tok/s",
            r.loss,
            r.aux.map_or(String::new(), |a| format!(" (aux {a:.3})")),
            self.eval_loss.map_or("-".into(), |e| format!("{e:.4}")),
            r.lr,
            tps
        );
        if let Some(bar) = &self.bar {
            bar.set_position(r.step + 1);
            if bar.is_hidden() && (r.step + 1).is_multiple_of(10) {
                eprintln!("step {}/{} {msg}", r.step + 1, bar.length().unwrap_or(0));
            }
            bar.set_message(msg);
        }
    }

    fn eval(&mut self, e: &EvalReport) {
        self.eval_loss = e.loss.or(self.eval_loss);
        if let Some(loss) = e.loss {
            self.println(&format!("eval @ step {}: loss {loss:.4}, perplexity {:.3}", e.step, loss.exp()));
        }
        for (prompt, answer) in &e.samples {
            self.println(&format!("  {prompt} -> {answer}"));
        }
    }

    fn warn(&mut self, message: &str) {
        self.println(&format!("warning: {message}"));
    }

    fn saved(&mut self, what: &str, path: &str) {
        self.println(&format!("saved {what}: {path}"));
    }

    fn finish(&mut self, s: &RunSummary) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!("{}", summary_line(s));
    }
}

/// Prints warnings and the final summary only.
#[derive(Debug, Default)]
pub struct QuietReporter;

impl Reporter for QuietReporter {
    fn header(&mut self, _: &RunHeader) {}
    fn step(&mut self, _: &StepReport, _: u64, _: f64) {}
    fn eval(&mut self, _: &EvalReport) {}
    fn warn(&mut self, message: &str) {
        eprintln!("warning: {message}");
    }
    fn saved(&mut self, _: &str, _: &str) {}
    fn finish(&mut self, s: &RunSummary) {
        eprintln!("{}", summary_line(s));
    }
}

/// One JSON object per event on stdout (`{"event": "step", ...}`), for scripts.
#[derive(Debug, Default)]
pub struct JsonReporter;

impl JsonReporter {
    fn emit(&self, event: &str, value: impl Serialize) {
        let mut v = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        if let Some(obj) = v.as_object_mut() {
            obj.insert("event".into(), event.into());
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }
}

impl Reporter for JsonReporter {
    fn header(&mut self, h: &RunHeader) {
        self.emit("header", h);
    }
    fn step(&mut self, r: &StepReport, _: u64, tps: f64) {
        let mut v = serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
        if let Some(obj) = v.as_object_mut() {
            obj.insert("tokens_per_second".into(), tps.into());
        }
        self.emit("step", v);
    }
    fn eval(&mut self, e: &EvalReport) {
        self.emit("eval", e);
    }
    fn warn(&mut self, message: &str) {
        self.emit("warning", serde_json::json!({ "message": message }));
    }
    fn saved(&mut self, what: &str, path: &str) {
        self.emit("saved", serde_json::json!({ "what": what, "path": path }));
    }
    fn finish(&mut self, s: &RunSummary) {
        self.emit("summary", s);
    }
}
