//! The generation worker: one thread that owns the models and runs continuous batching.
//!
//! Requests wait in a FIFO queue. Between two decode steps the worker admits waiting requests in arrival order
//! (each prompt is prefilled alone, within a per-step budget of prompt tokens, up to `max_batch` sequences in
//! flight), drops the sequences whose client went away, and runs ONE batched decode step for one group of
//! sequences that share a model (the base, or one adapter): the groups take turns round-robin, one step each, so
//! a busy adapter cannot starve another. Tokens go to each client through an unbounded channel, so a slow reader
//! never stalls the worker or other clients.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use trainer::infer::{decode_step, GenerateRequest, Sequence, StopReason};
use trainer::model::{Model, ModelTokenizer};

use super::metrics::Metrics;

/// Prompt tokens prefilled between two decode steps (at least one request is always admitted), so a burst of long
/// prompts delays the sequences already decoding by a bounded amount.
const PREFILL_BUDGET: usize = 2048;

/// One queued piece of work for the generation thread.
pub(super) enum Job {
    /// Generate with the named model.
    Generate(GenerateJob),
    /// Start serving `model` under `name`.
    Load { name: String, model: Box<Model> },
    /// Stop serving `name` (sequences already running on it finish).
    Unload { name: String },
}

/// A generation request as the worker receives it.
pub(super) struct GenerateJob {
    /// The model (base or adapter name) to generate with.
    pub model: String,
    /// What to generate.
    pub request: GenerateRequest,
    /// Where the text and the outcome go; dropping the receiver cancels the generation.
    pub events: mpsc::UnboundedSender<WorkerEvent>,
    /// When the HTTP request arrived (for the latency histograms).
    pub received: Instant,
}

/// What the worker reports about a job.
pub(super) enum WorkerEvent {
    /// Newly final text.
    Text(String),
    /// The generation ended, with its full text (equal to `generate --json`'s; the streamed pieces can
    /// differ from it where a byte-fallback sequence decodes differently once complete).
    Done { text: String, ids: Vec<u32>, stop: StopReason, tool_call: bool },
    /// The generation failed.
    Failed(String),
}

/// A served model; `id` tells a model apart from a later one loaded under the same name.
struct Served {
    id: u64,
    model: Arc<Model>,
}

/// A sequence in flight and where its events go.
struct Active {
    seq: Sequence,
    events: mpsc::UnboundedSender<WorkerEvent>,
    received: Instant,
}

/// The sequences decoding with one model.
struct Group {
    id: u64,
    model: Arc<Model>,
    active: Vec<Active>,
}

/// The worker's state.
pub(super) struct Worker {
    models: HashMap<String, Served>,
    next_model_id: u64,
    /// Groups in turn order: the front one steps next, then goes to the back.
    groups: VecDeque<Group>,
    waiting: VecDeque<GenerateJob>,
    tokenizer: Arc<ModelTokenizer>,
    tool_calls_id: Option<u32>,
    metrics: Arc<Metrics>,
    max_batch: usize,
}

impl Worker {
    /// A worker serving `models` (name to model), at most `max_batch` sequences in flight.
    pub(super) fn new(
        models: HashMap<String, Model>,
        tokenizer: Arc<ModelTokenizer>,
        metrics: Arc<Metrics>,
        max_batch: usize,
    ) -> Self {
        let mut worker = Worker {
            models: HashMap::new(),
            next_model_id: 0,
            groups: VecDeque::new(),
            waiting: VecDeque::new(),
            tool_calls_id: tokenizer.inner.token_to_id("[TOOL_CALLS]"),
            tokenizer,
            metrics,
            max_batch: max_batch.max(1),
        };
        for (name, model) in models {
            worker.load(name, model);
        }
        worker
    }

    fn load(&mut self, name: String, model: Model) {
        self.next_model_id += 1;
        self.models.insert(name, Served { id: self.next_model_id, model: Arc::new(model) });
    }

    fn active(&self) -> usize {
        self.groups.iter().map(|g| g.active.len()).sum()
    }

    /// Updates the batch-size gauge (before any client hears of the change).
    fn publish(&self) {
        self.metrics.batch_size.store(self.active() as u64, Ordering::Relaxed);
    }

    /// Runs until the job queue closes and no work is left.
    pub(super) fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        let mut open = true;
        loop {
            if self.waiting.is_empty() && self.groups.is_empty() {
                if !open {
                    return;
                }
                match jobs.blocking_recv() {
                    Some(job) => self.take(job),
                    None => return,
                }
            }
            while open {
                match jobs.try_recv() {
                    Ok(job) => self.take(job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            self.admit();
            self.drop_cancelled();
            self.step();
        }
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Generate(job) => self.waiting.push_back(job),
            Job::Load { name, model } => self.load(name, *model),
            Job::Unload { name } => {
                self.models.remove(&name);
            }
        }
    }

    /// Starts waiting requests in arrival order: prefill, first token, then into their model's group.
    fn admit(&mut self) {
        let mut budget = PREFILL_BUDGET;
        let mut admitted = 0;
        while self.active() < self.max_batch {
            let Some(job) = self.waiting.front() else { break };
            let prompt = job.request.prompt_ids.len();
            if admitted > 0 && prompt > budget {
                break;
            }
            let Some(job) = self.waiting.pop_front() else { break };
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            admitted += 1;
            budget = budget.saturating_sub(prompt);
            let Some(served) = self.models.get(&job.model) else {
                let _ = job.events.send(WorkerEvent::Failed(format!("model `{}` is not loaded", job.model)));
                continue;
            };
            let (id, model) = (served.id, Arc::clone(&served.model));
            let events = job.events.clone();
            let mut on_text = |piece: &str| {
                if !piece.is_empty() {
                    let _ = events.send(WorkerEvent::Text(piece.to_string()));
                }
            };
            let tokenizer = Some(self.tokenizer.as_ref());
            let started = Sequence::new(&model, tokenizer, job.request)
                .and_then(|mut seq| seq.prefill(&model, tokenizer, &mut on_text).map(|()| seq));
            let seq = match started {
                Ok(seq) => seq,
                Err(e) => {
                    let _ = job.events.send(WorkerEvent::Failed(e.to_string()));
                    continue;
                }
            };
            self.metrics.generated_tokens.fetch_add(seq.generated().len() as u64, Ordering::Relaxed);
            if !seq.generated().is_empty() {
                self.metrics.time_to_first_token.observe(job.received.elapsed());
            }
            let active = Active { seq, events: job.events, received: job.received };
            if active.seq.is_finished() {
                self.complete(active);
                continue;
            }
            match self.groups.iter_mut().find(|g| g.id == id) {
                Some(group) => group.active.push(active),
                None => self.groups.push_back(Group { id, model, active: vec![active] }),
            }
            self.publish();
        }
    }

    /// Removes the sequences whose client disconnected: they generate nothing more.
    fn drop_cancelled(&mut self) {
        let mut cancelled = 0;
        for group in &mut self.groups {
            group.active.retain(|a| {
                let closed = a.events.is_closed();
                cancelled += u64::from(closed);
                !closed
            });
        }
        self.groups.retain(|g| !g.active.is_empty());
        self.publish();
        self.metrics.cancelled.fetch_add(cancelled, Ordering::Relaxed);
    }

    /// One batched decode step for the group whose turn it is; finished sequences leave.
    fn step(&mut self) {
        let Some(mut group) = self.groups.pop_front() else { return };
        let n = group.active.len();
        let result = {
            let (senders, mut seqs): (Vec<_>, Vec<&mut Sequence>) =
                group.active.iter_mut().map(|a| (&a.events, &mut a.seq)).unzip();
            decode_step(&group.model, Some(self.tokenizer.as_ref()), &mut seqs, &mut |i, piece| {
                if !piece.is_empty() {
                    let _ = senders[i].send(WorkerEvent::Text(piece.to_string()));
                }
            })
        };
        self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.metrics.decode_sequences.fetch_add(n as u64, Ordering::Relaxed);
        self.metrics.generated_tokens.fetch_add(n as u64, Ordering::Relaxed);
        if let Err(e) = result {
            self.publish();
            for active in group.active {
                let _ = active.events.send(WorkerEvent::Failed(e.to_string()));
            }
            return;
        }
        let (finished, running): (Vec<Active>, Vec<Active>) =
            group.active.into_iter().partition(|a| a.seq.is_finished());
        if !running.is_empty() {
            group.active = running;
            self.groups.push_back(group);
        }
        self.publish();
        for active in finished {
            self.complete(active);
        }
    }

    /// Reports a finished sequence.
    fn complete(&self, active: Active) {
        let generation = active.seq.into_generation();
        // v7 and later may write text before the calls.
        let tool_call = self.tool_calls_id.is_some_and(|t| generation.ids.contains(&t));
        self.metrics.request_latency.observe(active.received.elapsed());
        self.metrics.completion_tokens.fetch_add(generation.ids.len() as u64, Ordering::Relaxed);
        let _ = active.events.send(WorkerEvent::Done {
            text: generation.text,
            ids: generation.ids,
            stop: generation.stop_reason,
            tool_call,
        });
    }
}
