//! What a person (or a script) sees during a run: a progress bar with the live numbers, quiet mode,
//! or JSON lines for scripts.

use std::io::Write;
use std::time::{Duration, Instant};

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
    /// `exp(loss)` (SFT only: `None` when the loss is a preference loss).
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
    /// After each micro-batch's forward/backward: `done` of the `of` micro-batches of optimizer
    /// step `step` (counted from 1: the step in progress) are done, the last of them processed
    /// `tokens` tokens. A step of many micro-batches can take minutes, so this is where a display
    /// shows that the run is alive. The default does nothing (for reporters that only follow
    /// steps).
    fn micro_batch(&mut self, step: u64, done: usize, of: usize, tokens: usize) {
        let _ = (step, done, of, tokens);
    }
    /// After each optimizer step; `report.step` counts the steps done (1 after the first).
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

/// How long a step must have been running, and how long since the last progress line, before a
/// log (stderr not a terminal) gets a line between logging steps, so a long run visibly lives.
const ALIVE_EVERY: Duration = Duration::from_secs(30);

/// `12s`, `4m05s`, `3h07m`.
fn duration_text(secs: f64) -> String {
    let s = if secs.is_finite() { secs.max(0.0).round() as u64 } else { 0 };
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// The numbers of the last optimizer step, for the progress line.
#[derive(Debug, Clone, Copy)]
struct LastStep {
    loss: f64,
    aux: Option<f64>,
    lr: f64,
    tokens_per_second: f64,
    /// Preference tuning: `rewards/accuracies` and `rewards/margins`.
    rewards: Option<(f64, f64)>,
}

/// The display for people: the header, then on a terminal an indicatif bar that advances per
/// micro-batch (steps done/total, the micro-batch within the step, loss, eval loss, lr, tokens/s,
/// elapsed time and an ETA measured from the micro-batches done, "estimating" until the first one
/// is), with evaluations and saves printed above it, and a summary.
///
/// When stderr is not a terminal (a log file), it prints one line every `log_every` optimizer
/// steps (and after the last) with the same numbers, and, while a step runs for longer than 30 s,
/// a line after a micro-batch at most every 30 s, so that a log of an hours-long run shows it is
/// alive.
pub struct ProgressReporter {
    bar: Option<ProgressBar>,
    interactive: bool,
    out: Box<dyn Write>,
    log_every: u64,
    alive_every: Duration,
    eval_loss: Option<f64>,
    last: Option<LastStep>,
    total_steps: u64,
    steps_done: u64,
    per_step: usize,
    done_in_step: usize,
    micro_batches_done: u64,
    train_secs: f64,
    mark: Instant,
    started: Instant,
    step_started: Instant,
    last_line: Instant,
}

impl ProgressReporter {
    /// A reporter on stderr: a bar on a terminal, otherwise a progress line every `log_every`
    /// optimizer steps (the recipe's `logging.every_steps`; 0 counts as 1).
    pub fn new(log_every: u64) -> Self {
        use std::io::IsTerminal;
        Self::with_output(log_every, std::io::stderr().is_terminal(), Box::new(std::io::stderr()))
    }

    fn with_output(log_every: u64, interactive: bool, out: Box<dyn Write>) -> Self {
        let now = Instant::now();
        ProgressReporter {
            bar: None,
            interactive,
            out,
            log_every: log_every.max(1),
            alive_every: ALIVE_EVERY,
            eval_loss: None,
            last: None,
            total_steps: 0,
            steps_done: 0,
            per_step: 1,
            done_in_step: 0,
            micro_batches_done: 0,
            train_secs: 0.0,
            mark: now,
            started: now,
            step_started: now,
            last_line: now,
        }
    }

    fn println(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => {
                let _ = writeln!(self.out, "{line}");
                let _ = self.out.flush();
            }
        }
    }

    /// Adds the time since the last mark to the measured training time.
    fn measure(&mut self) {
        let now = Instant::now();
        self.train_secs += now.duration_since(self.mark).as_secs_f64();
        self.mark = now;
    }

    /// Not training (evaluating, saving): the time until now is not measured, and the step
    /// running next starts now.
    fn pause(&mut self) {
        self.mark = Instant::now();
        self.step_started = self.mark;
    }

    fn eta(&self) -> String {
        if self.micro_batches_done == 0 || self.train_secs <= 0.0 {
            return "estimating".into();
        }
        let remaining = (self.total_steps.saturating_sub(self.steps_done) * self.per_step as u64)
            .saturating_sub(self.done_in_step as u64);
        duration_text(self.train_secs / self.micro_batches_done as f64 * remaining as f64)
    }

    fn status(&self) -> String {
        let mut text = format!("step {}/{}", self.steps_done, self.total_steps);
        if self.per_step > 1 && self.done_in_step > 0 && self.done_in_step < self.per_step {
            text += &format!(" (step {}: micro-batch {}/{})", self.steps_done + 1, self.done_in_step, self.per_step);
        }
        if let Some(l) = &self.last {
            text += &format!(
                " | loss {:.4}{}{} | eval {} | lr {:.2e} | {:.0} tok/s",
                l.loss,
                l.aux.map_or(String::new(), |a| format!(" (aux {a:.3})")),
                l.rewards.map_or(String::new(), |(a, m)| format!(" | reward acc {a:.2} margin {m:.3}")),
                self.eval_loss.map_or("-".into(), |e| format!("{e:.4}")),
                l.lr,
                l.tokens_per_second
            );
        }
        text + &format!(" | elapsed {} | eta {}", duration_text(self.started.elapsed().as_secs_f64()), self.eta())
    }

    fn refresh_bar(&self) {
        if let Some(bar) = &self.bar {
            let per = self.per_step as u64;
            bar.set_length(self.total_steps * per);
            bar.set_position(self.steps_done * per + self.done_in_step as u64);
            bar.set_message(self.status());
        }
    }

    /// A progress line in a log (not on a terminal).
    fn progress_line(&mut self) {
        let line = self.status();
        self.println(&line);
        self.last_line = Instant::now();
    }

    /// Whether the running step is long and no progress line was printed for a while.
    fn quiet_too_long(&self) -> bool {
        self.step_started.elapsed() >= self.alive_every && self.last_line.elapsed() >= self.alive_every
    }
}

impl Default for ProgressReporter {
    /// [`ProgressReporter::new`] with the recipe's default `logging.every_steps` (10).
    fn default() -> Self {
        Self::new(10)
    }
}

impl Reporter for ProgressReporter {
    fn header(&mut self, h: &RunHeader) {
        for line in header_lines(h) {
            self.println(&line);
        }
        self.total_steps = h.total_steps;
        self.steps_done = h.start_step;
        self.started = Instant::now();
        self.pause();
        self.last_line = self.started;
        if self.interactive {
            let bar = ProgressBar::with_draw_target(Some(h.total_steps), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{bar:30} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            self.bar = Some(bar);
            self.refresh_bar();
        }
    }

    fn micro_batch(&mut self, step: u64, done: usize, of: usize, _tokens: usize) {
        self.measure();
        self.per_step = of.max(1);
        self.steps_done = step.saturating_sub(1);
        self.done_in_step = done;
        self.micro_batches_done += 1;
        self.refresh_bar();
        if !self.interactive && done < of && self.quiet_too_long() {
            self.progress_line();
        }
    }

    fn step(&mut self, r: &StepReport, total: u64, tps: f64) {
        self.measure();
        if self.done_in_step == 0 {
            // No micro-batch events for this step: count the step's micro-batches here.
            self.micro_batches_done += self.per_step as u64;
        }
        self.done_in_step = 0;
        self.total_steps = total;
        self.steps_done = r.step;
        let rewards = r.preference.as_ref().map(|m| (m.rewards_accuracies, m.rewards_margins));
        self.last = Some(LastStep { loss: r.loss, aux: r.aux, lr: r.lr, tokens_per_second: tps, rewards });
        self.refresh_bar();
        if !self.interactive && (r.step.is_multiple_of(self.log_every) || r.step == total || self.quiet_too_long()) {
            self.progress_line();
        }
        self.step_started = Instant::now();
    }

    fn eval(&mut self, e: &EvalReport) {
        self.eval_loss = e.loss.or(self.eval_loss);
        if let Some(loss) = e.loss {
            match e.perplexity {
                Some(p) => self.println(&format!("eval @ step {}: loss {loss:.4}, perplexity {p:.3}", e.step)),
                None => self.println(&format!("eval @ step {}: loss {loss:.4}", e.step)),
            }
        }
        for (prompt, answer) in &e.samples {
            self.println(&format!("  {prompt} -> {answer}"));
        }
        self.refresh_bar();
        self.pause();
    }

    fn warn(&mut self, message: &str) {
        self.println(&format!("warning: {message}"));
    }

    fn saved(&mut self, what: &str, path: &str) {
        self.println(&format!("saved {what}: {path}"));
        self.pause();
    }

    fn finish(&mut self, s: &RunSummary) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.println(&summary_line(s));
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

/// One JSON object per event on stdout (`{"event": "step", ...}`), for scripts. Step numbers count
/// the optimizer steps done (the `step` event of the first step has `"step": 1`; an `eval` at
/// `"step": 0` is the baseline before training), as in metrics.jsonl; `micro_batch` events
/// (`{"event": "micro_batch", "step": 3, "micro_batch": 2, "of": 4}`) follow each micro-batch of
/// the step in progress.
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
    fn micro_batch(&mut self, step: u64, done: usize, of: usize, _tokens: usize) {
        self.emit("micro_batch", serde_json::json!({ "step": step, "micro_batch": done, "of": of }));
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A `Write` whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn lines(&self) -> Vec<String> {
            String::from_utf8_lossy(&self.0.lock().expect("lock")).lines().map(String::from).collect()
        }
    }

    fn header(total_steps: u64) -> RunHeader {
        RunHeader {
            model: "m".into(),
            model_summary: "tiny".into(),
            trainable_parameters: 1,
            total_parameters: 2,
            model_bytes: 3,
            data_summary: "d".into(),
            total_steps,
            start_step: 0,
            run_dir: "r".into(),
            memory_plan: "p".into(),
        }
    }

    fn report(step: u64) -> StepReport {
        StepReport {
            step,
            loss: 1.5,
            ce: 1.5,
            aux: None,
            label_tokens: 8,
            tokens: 10,
            grad_norm: 1.0,
            lr: 1e-4,
            expert_load: Vec::new(),
            applied: true,
            preference: None,
        }
    }

    fn log_reporter(every: u64) -> (ProgressReporter, Shared) {
        let out = Shared::default();
        (ProgressReporter::with_output(every, false, Box::new(out.clone())), out)
    }

    fn progress_lines(out: &Shared) -> Vec<String> {
        out.lines().into_iter().filter(|l| l.starts_with("step ")).collect()
    }

    #[test]
    fn durations_read_as_time() {
        assert_eq!(duration_text(0.4), "0s");
        assert_eq!(duration_text(59.0), "59s");
        assert_eq!(duration_text(245.0), "4m05s");
        assert_eq!(duration_text(3.0 * 3600.0 + 7.0 * 60.0 + 12.0), "3h07m");
        assert_eq!(duration_text(f64::INFINITY), "0s");
    }

    #[test]
    fn a_log_gets_a_line_every_logging_step_with_an_eta() {
        let (mut r, out) = log_reporter(2);
        r.header(&header(5));
        for step in 1..=5 {
            r.micro_batch(step, 1, 2, 5);
            r.micro_batch(step, 2, 2, 5);
            // Pretend every micro-batch took 5 s (the clock may not have advanced at all).
            r.train_secs = (step * 2) as f64 * 5.0;
            r.step(&report(step), 5, 100.0);
        }
        let lines = progress_lines(&out);
        let steps: Vec<&str> = lines.iter().map(|l| l.split(' ').nth(1).unwrap_or("")).collect();
        assert_eq!(steps, ["2/5", "4/5", "5/5"], "{lines:?}");
        for l in &lines {
            assert!(l.contains("loss 1.5000") && l.contains("lr 1.00e-4") && l.contains("100 tok/s"), "{l}");
            assert!(l.contains("| elapsed "), "{l}");
        }
        let etas: Vec<&str> = lines.iter().map(|l| l.rsplit_once("| eta ").map_or("", |(_, eta)| eta)).collect();
        // 6 and 2 micro-batches of 5 s remain after steps 2 and 4, none after the last.
        assert_eq!(etas, ["30s", "10s", "0s"], "{lines:?}");
    }

    #[test]
    fn the_eta_is_estimating_until_a_micro_batch_is_done_then_measured() {
        let (mut r, _) = log_reporter(1);
        r.header(&header(4));
        assert!(r.status().ends_with("eta estimating"), "{}", r.status());
        r.micro_batch(1, 1, 2, 5);
        // Pretend the first micro-batch took 10 s: 7 of 8 micro-batches remain.
        r.train_secs = 10.0;
        assert_eq!(r.eta(), "1m10s");
        assert!(r.status().starts_with("step 0/4 (step 1: micro-batch 1/2)"), "{}", r.status());
        r.micro_batch(1, 2, 2, 5);
        r.step(&report(1), 4, 1.0);
        r.train_secs = 20.0;
        assert_eq!(r.eta(), "1m00s", "6 micro-batches at 10 s");
    }

    #[test]
    fn a_long_step_prints_micro_batch_lines_between_logging_steps() {
        let (mut r, out) = log_reporter(100);
        r.header(&header(300));
        r.micro_batch(1, 1, 4, 5);
        assert!(progress_lines(&out).is_empty(), "a short step prints nothing between logging steps");
        r.alive_every = Duration::ZERO; // every step now counts as long
        r.micro_batch(1, 2, 4, 5);
        r.micro_batch(1, 3, 4, 5);
        r.micro_batch(1, 4, 4, 5);
        r.step(&report(1), 300, 1.0);
        let lines = progress_lines(&out);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("step 0/300 (step 1: micro-batch 2/4)"), "{lines:?}");
        assert!(lines[1].starts_with("step 0/300 (step 1: micro-batch 3/4)"), "{lines:?}");
        assert!(lines[2].starts_with("step 1/300 | loss"), "{lines:?}");
    }

    #[test]
    fn a_step_without_micro_batch_events_still_advances_the_eta() {
        let (mut r, _) = log_reporter(1);
        r.header(&header(3));
        r.step(&report(1), 3, 1.0);
        r.train_secs = 5.0;
        assert_eq!(r.eta(), "10s");
    }
}
