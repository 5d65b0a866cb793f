//! The training run behind `tramontane train`: load, train with accumulation/clipping/schedule,
//! evaluate, record, checkpoint, resume exactly, and handle faults (Ctrl-C, NaN/inf, unwritable
//! output) without losing more than the work since the last checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::evaluate::{eval_loss, micro_batch, sample_completions};
use super::memory::StepShape;
use super::metrics::{rewind_jsonl, JsonlSink, MetricRecord, MetricsSink, TensorBoardSink};
use super::optim::{AdamW, AdamWConfig};
use super::preference::{
    pair_metrics, preference_step, PairBatch, PreferenceMetrics, PreferenceObjective, Reference, ReferenceKind,
};
use super::report::{EvalReport, Reporter, RunHeader, RunSummary};
use super::run_checkpoint::{latest_checkpoint, recover_dir, replace_dir, save_checkpoint, sibling, RunCheckpoint};
use super::schedule::Schedule;
use super::step::MicroBatch;
use super::update::{optimizer_step, StepReport, StepSettings};
use crate::lora::{attach_lora, peft, LoraInit, LoraPlan, LoraSettings, TrainableParams};
use crate::model::{load_model, LoadOptions, Model, ModelConfig, ModelTokenizer, Nf4Options, ParameterCounts};
use crate::recipe::{AdapterLayout, Objective, QuantMethod, Recipe, TrainSection};
use crate::{Error, Result};

/// Consecutive non-finite steps after which training stops.
pub const MAX_BAD_STEPS: u32 = 5;

/// How a run is started.
pub struct RunOptions {
    /// Continue from the newest complete checkpoint of the run directory.
    pub resume: bool,
    /// Set (e.g. by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Arc<AtomicBool>,
}

/// The run's directory layout.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// Root.
    pub root: PathBuf,
}

impl RunDir {
    /// Checkpoints.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    /// The final adapter.
    pub fn adapter(&self) -> PathBuf {
        self.root.join("adapter")
    }
    /// The adapter with the best eval loss.
    pub fn best_adapter(&self) -> PathBuf {
        self.root.join("adapter-best")
    }
    /// Periodic adapters.
    pub fn step_adapter(&self, step: u64) -> PathBuf {
        self.root.join("adapters").join(format!("step-{step:08}"))
    }
    /// Metrics as JSON lines.
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// TensorBoard event files.
    pub fn tensorboard(&self) -> PathBuf {
        self.root.join("tensorboard")
    }
}

/// The engine's LoRA settings of a recipe: its `[lora]` section, which is the engine's type.
pub fn lora_settings(recipe: &Recipe) -> LoraSettings {
    recipe.lora.clone()
}

/// The preference objective of `[train]` (`None` for `sft`).
pub fn preference_settings(t: &TrainSection) -> Option<super::PreferenceSettings> {
    use super::PreferenceObjective as P;
    let objective = match t.objective {
        Objective::Sft => return None,
        Objective::Dpo => P::Dpo { loss_type: t.loss_type, label_smoothing: t.label_smoothing },
        Objective::Orpo => P::Orpo,
    };
    Some(super::PreferenceSettings { objective, beta: t.beta })
}

/// Refuses to start when the run directory cannot hold a checkpoint: creates it, then writes and
/// syncs a probe file the size of one checkpoint (trainable tensors, optimizer moments, adapter).
pub fn check_output_dir(dir: &Path, checkpoint_bytes: u64) -> Result<()> {
    let fail = |what: &str, e: std::io::Error| {
        Error::Invalid(format!(
            "output directory {} {what} ({e}); a checkpoint needs about {:.1} MiB: fix output.dir before training",
            dir.display(),
            checkpoint_bytes as f64 / (1u64 << 20) as f64
        ))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail("cannot be created", e))?;
    let probe = dir.join(".space-probe");
    let result = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&probe)?;
        let chunk = vec![0u8; 1 << 20];
        let mut left = checkpoint_bytes + (1 << 20);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    result.map_err(|e| fail("is not writable or has no room", e))
}

/// Writes an adapter directory atomically: into `DIR.tmp`, then put in the place of `dir` by
/// [`replace_dir`] (at every moment either the old or the new adapter is there).
fn save_adapter_atomic(
    params: &TrainableParams,
    settings: &LoraSettings,
    config: &ModelConfig,
    base: &str,
    dir: &Path,
    layout: AdapterLayout,
) -> Result<()> {
    let tmp = sibling(dir, ".tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let layout = match layout {
        AdapterLayout::Peft => adapters::ExpertLayout::Fused,
        AdapterLayout::PerExpert => adapters::ExpertLayout::PerExpert,
    };
    peft::save_adapter(params, settings, config, Some(base.to_string()), &tmp, layout)?;
    replace_dir(&tmp, dir)
}

/// The model, data and trainable state a run works on.
struct Session {
    model: Model,
    tokenizer: ModelTokenizer,
    encoder: datasets::Encoder,
    params: TrainableParams,
    settings: LoraSettings,
    stream: Stream,
    eval_batches: Vec<MicroBatch>,
    /// Preference tuning: the held-out pair batches.
    eval_pairs: Vec<PairBatch>,
    /// DPO's reference model (taken before any training or restored checkpoint changes the trained tensors).
    reference: Option<Reference>,
    header: RunHeader,
    /// With checkpointing, the activation bytes a micro-batch may keep (see [`memory_plan`]).
    activation_budget: Option<u64>,
}

fn open_session(recipe: &Recipe, run_dir: &RunDir) -> Result<Session> {
    let model_dir = &recipe.model.path;
    if let Some(name) = &recipe.model.builtin {
        crate::model::builtin::ensure(name, model_dir)?;
    }
    let config = ModelConfig::from_path(model_dir)?;
    let tokenizer = ModelTokenizer::load(model_dir, &config)?;
    let encoder = tokenizer.encoder(recipe.data.prompt_format)?;
    // The data first: a bad row is reported before the model is loaded.
    let data = match preference_settings(&recipe.train) {
        Some(_) => open_pairs(recipe, &encoder)?,
        None => open_sft(recipe, &encoder)?,
    };
    let device = recipe.model.device.resolve()?;
    let dtype = recipe.model.dtype.resolve(&device);
    crate::kernels::set_matmul_precision(recipe.matmul_precision(dtype));
    let nf4 = match recipe.quantization.method {
        QuantMethod::Nf4 => Some(nf4_options(recipe)?),
        QuantMethod::None => None,
    };
    let quantized = nf4.is_some();
    let mut model = load_model(model_dir, &LoadOptions { dtype, device, nf4, ..LoadOptions::default() })?.model;
    let settings = lora_settings(recipe);
    let plan = LoraPlan::new(settings.clone()).map_err(Error::Invalid)?;
    let init = match &recipe.lora.init_from {
        Some(dir) => LoraInit::Tensors(peft::load_adapter(dir, &config)?.internal_tensors().into_iter().collect()),
        None => LoraInit::Seed(recipe.train.seed),
    };
    let params = attach_lora(&mut model, &plan, &init)?;
    let reference = match preference_settings(&recipe.train).map(|p| p.objective) {
        Some(PreferenceObjective::Dpo { .. }) => {
            Some(match recipe.train.reference_kind(recipe.lora.init_from.is_some()) {
                ReferenceKind::Base => Reference::base(&params)?,
                ReferenceKind::InitFrom => Reference::initial(&params)?,
            })
        }
        _ => None,
    };
    let counts = ParameterCounts::from_config(&config);
    let model_bytes = model_memory_bytes(&model);
    let (activation_budget, memory_plan) = memory_plan(recipe, &model, params.count());
    let header = RunHeader {
        model: model_dir.display().to_string(),
        model_summary: format!(
            "{} {} layers, hidden {}{}, base {}",
            config.architecture.model_type(),
            config.num_layers,
            config.hidden_size,
            config
                .moe
                .as_ref()
                .map_or(String::new(), |m| format!(", {} experts top-{}", m.num_experts, m.experts_per_token)),
            if quantized { "NF4" } else { "dense" }
        ),
        trainable_parameters: params.count(),
        total_parameters: counts.total,
        model_bytes,
        data_summary: data.summary,
        total_steps: 0,
        start_step: 0,
        run_dir: run_dir.root.display().to_string(),
        memory_plan,
    };
    Ok(Session {
        model,
        tokenizer,
        encoder,
        params,
        settings,
        stream: data.stream,
        eval_batches: data.eval_batches,
        eval_pairs: data.eval_pairs,
        reference,
        header,
        activation_budget,
    })
}

/// The training data stream: packed sequences (SFT) or pairs (DPO/ORPO).
enum Stream {
    Sft(datasets::Batches),
    Pairs(datasets::PairBatches),
}

impl Stream {
    fn position(&self) -> datasets::DataPosition {
        match self {
            Stream::Sft(b) => b.position(),
            Stream::Pairs(b) => b.position(),
        }
    }

    fn total_batches(&self, epochs: u64) -> u64 {
        match self {
            Stream::Sft(b) => b.total_batches(epochs),
            Stream::Pairs(b) => epochs * b.batches_per_epoch() as u64,
        }
    }
}

/// A run's data: the training stream, the held-out batches and the header's line about them.
struct RunData {
    stream: Stream,
    eval_batches: Vec<MicroBatch>,
    eval_pairs: Vec<PairBatch>,
    summary: String,
}

/// SFT data: encoded examples, packed.
fn open_sft(recipe: &Recipe, encoder: &datasets::Encoder) -> Result<RunData> {
    let data = datasets::load(&recipe.data, encoder, recipe.train.seed).map_err(|e| Error::Invalid(e.to_string()))?;
    let pad = encoder.eos_id();
    let batches = datasets::Batches::new(data.train.clone(), recipe.batch_config(pad))
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let eval_batches = match &data.eval {
        Some(eval) if !eval.is_empty() => {
            let cfg = recipe.batch_config(pad).unshuffled();
            let mut b = datasets::Batches::new(eval.clone(), cfg).map_err(|e| Error::Invalid(e.to_string()))?;
            let mut all: Vec<MicroBatch> = b.rest_of_epoch().iter().map(micro_batch).collect();
            if let Some(max) = recipe.eval.max_batches {
                all.truncate(max);
            }
            all
        }
        _ => Vec::new(),
    };
    let stats = &data.train.stats;
    let packing = batches.packing_stats();
    let summary = format!(
        "{} examples, {} tokens ({:.1}% trained), {} held out; {} truncated, {} dropped; packing {:.1}% full",
        stats.examples,
        stats.tokens,
        100.0 * stats.trained_fraction(),
        data.eval.as_ref().map_or(0, |e| e.len()),
        stats.truncated,
        stats.dropped_too_long,
        100.0 * packing.efficiency
    );
    Ok(RunData { stream: Stream::Sft(batches), eval_batches, eval_pairs: Vec::new(), summary })
}

/// Preference data (`data.format = "preference"`): pairs, never packed.
fn open_pairs(recipe: &Recipe, encoder: &datasets::Encoder) -> Result<RunData> {
    let data =
        datasets::load_pairs(&recipe.data, encoder, recipe.train.seed).map_err(|e| Error::Invalid(e.to_string()))?;
    let pad = encoder.eos_id();
    let multiple = recipe.data.pad_to_multiple_of;
    let mbs = recipe.train.micro_batch_size;
    let batches =
        datasets::PairBatches::new(data.train.clone(), mbs, recipe.data.shuffle, recipe.train.seed, pad, multiple)
            .map_err(|e| Error::Invalid(e.to_string()))?;
    let mut eval_pairs = Vec::new();
    if let Some(eval) = data.eval.as_ref().filter(|e| !e.is_empty()) {
        let mut b = datasets::PairBatches::new(eval.clone(), mbs, false, 0, pad, multiple)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        eval_pairs = b.rest_of_epoch();
        if let Some(max) = recipe.eval.max_batches {
            eval_pairs.truncate(max);
        }
    }
    let st = &data.train.stats;
    let summary = format!(
        "{} preference pairs ({} prompt, {} chosen, {} rejected tokens), {} held out; {} too long dropped, {} prompts \
         and {} completions truncated, {} invalid and {} null skipped; pairs are never packed",
        st.pairs,
        st.prompt_tokens,
        st.chosen_tokens,
        st.rejected_tokens,
        data.eval.as_ref().map_or(0, |e| e.len()),
        st.dropped_too_long,
        st.truncated_prompts,
        st.truncated_completions,
        st.skipped_invalid,
        st.skipped_null
    );
    Ok(RunData { stream: Stream::Pairs(batches), eval_batches: Vec::new(), eval_pairs, summary })
}

/// The step's memory plan, once the model is loaded: the activation budget (the recipe's, else what stays
/// free after loading, see [`StepShape::default_budget`]; `None` without checkpointing) and the header's
/// account of it: what a step keeps and recomputes, and its predicted peak part by part.
fn memory_plan(recipe: &Recipe, model: &Model, trainable_parameters: usize) -> (Option<u64>, String) {
    let t = &recipe.train;
    let shape = StepShape::for_model(
        model,
        // A pair micro-batch has two rows per pair.
        t.micro_batch_size * recipe.data.max_seq_len * if preference_settings(t).is_some() { 2 } else { 1 },
        trainable_parameters,
        t.gradient_checkpointing,
    );
    let loaded = crate::system::rss_bytes().unwrap_or_else(|| model_memory_bytes(model));
    let available = crate::system::memory_available_to_process().map(|a| a.bytes);
    let budget = t
        .gradient_checkpointing
        .then(|| t.activation_memory_bytes().unwrap_or_else(|| available.map_or(0, |a| shape.default_budget(a))));
    let kept = budget.map_or(model.config.num_layers, |b| shape.layers_within(b));
    let m = shape.memory(loaded, kept);
    let gib = |b: u64| format!("{:.2}", b as f64 / (1u64 << 30) as f64);
    let layers = m.layers;
    let kept_words = match budget {
        None => format!("no gradient checkpointing: the activations of all {layers} layers are kept"),
        Some(b) => format!(
            "gradient checkpointing: keeps the activations of the last {kept} of {layers} layers, recomputes {} \
             (budget {} GiB per micro-batch of {} tokens{}, ~{} GiB per layer in {})",
            layers - kept,
            gib(b),
            shape.tokens,
            match (t.activation_memory_gib, available) {
                (Some(_), _) => " from train.activation_memory_gib".to_string(),
                (None, Some(a)) => format!(": half of what stays free of the {} GiB available after loading", gib(a)),
                (None, None) => ": the OS does not say what is free".to_string(),
            },
            gib(m.per_layer),
            shape.dtype.as_str()
        ),
    };
    let peak = format!(
        "; step peak ~{} GiB = loaded {} + LoRA/AdamW {} + layer inputs {} ({}) + kept activations {} + working {}",
        gib(m.total()),
        gib(m.loaded),
        gib(m.trainable),
        gib(m.layer_inputs),
        shape.dtype.as_str(),
        gib(m.kept_activations),
        gib(m.working)
    );
    (budget, kept_words + &peak)
}

/// The loader's NF4 settings from `[quantization]`, already checked by [`Recipe::validate`] (block
/// size, layer names): this only converts. Embeddings, norms, routers and lm_head always stay at the
/// compute dtype; `keep_unquantized` may add decoder linears to them.
fn nf4_options(recipe: &Recipe) -> Result<Nf4Options> {
    let q = &recipe.quantization;
    let keep_dense = q.keep_dense_modules().into_iter().map(String::from).collect();
    Ok(Nf4Options { double_quant: q.double_quant, keep_dense })
}

/// Bytes held by the model's weights.
fn model_memory_bytes(model: &Model) -> u64 {
    use crate::model::decoder::FeedForward;
    let mut bytes = (model.embed_tokens.elem_count() * model.dtype.size_in_bytes()) as u64;
    bytes += model.lm_head.memory_bytes() as u64;
    for layer in &model.layers {
        let a = &layer.self_attn;
        for l in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
            bytes += l.memory_bytes() as u64;
        }
        match &layer.feed_forward {
            FeedForward::Dense(m) => {
                bytes += [&m.gate_proj, &m.up_proj, &m.down_proj].iter().map(|l| l.memory_bytes() as u64).sum::<u64>()
            }
            FeedForward::Sparse(moe) => {
                bytes += moe.router.memory_bytes() as u64;
                for e in &moe.experts {
                    bytes +=
                        [&e.gate_proj, &e.up_proj, &e.down_proj].iter().map(|l| l.memory_bytes() as u64).sum::<u64>();
                }
            }
        }
    }
    bytes
}

/// Optimizer steps the recipe asks for.
fn total_steps(recipe: &Recipe, stream: &Stream) -> u64 {
    match recipe.train.duration() {
        crate::recipe::Duration::Steps(s) => s,
        crate::recipe::Duration::Epochs(e) => stream.total_batches(e).div_ceil(recipe.train.grad_accum_steps as u64),
    }
}

/// State saved alongside the tensors of a checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LoopState {
    step: u64,
    data: datasets::DataPosition,
    best_eval_loss: Option<f64>,
    last_eval_loss: Option<f64>,
    tokens: u64,
}

/// Runs (or resumes) the training a recipe describes.
pub fn run_training(recipe: &Recipe, opts: &RunOptions, reporter: &mut dyn Reporter) -> Result<RunSummary> {
    recipe.validate().map_err(|(key, msg)| Error::Invalid(format!("recipe: `{key}`: {msg}")))?;
    let run_dir = RunDir { root: recipe.output.dir.clone() };
    let mut s = open_session(recipe, &run_dir)?;
    let preference = preference_settings(&recipe.train);
    let total = total_steps(recipe, &s.stream);
    let trainable_bytes = (s.params.count() * 4) as u64;
    check_output_dir(&run_dir.root, trainable_bytes * 4)?;
    std::fs::write(run_dir.root.join("recipe.toml"), recipe.to_toml())
        .map_err(|e| Error::io(run_dir.root.join("recipe.toml"), e))?;

    let t = &recipe.train;
    let adamw = AdamWConfig { beta1: t.betas[0], beta2: t.betas[1], eps: t.eps, weight_decay: t.weight_decay };
    let sizes: Vec<usize> = s.params.named.iter().map(|(_, v)| v.elem_count()).collect();
    let mut optimizer = AdamW::new(adamw, &sizes);
    let schedule = Schedule {
        kind: t.schedule,
        base_lr: t.learning_rate,
        warmup_steps: t.warmup_steps,
        total_steps: total,
        min_lr_ratio: t.min_lr_ratio,
    };
    let aux_coef =
        t.router_aux_coef.unwrap_or_else(|| s.model.config.moe.as_ref().map_or(0.0, |m| m.router_aux_loss_coef));
    let step_settings = StepSettings {
        aux_coef,
        max_grad_norm: t.max_grad_norm,
        checkpointing: t.gradient_checkpointing,
        activation_budget: s.activation_budget,
    };

    let mut state =
        LoopState { step: 0, data: s.stream.position(), best_eval_loss: None, last_eval_loss: None, tokens: 0 };
    let resumed = if opts.resume { latest_checkpoint(&run_dir.checkpoints())? } else { None };
    if let Some(ckpt) = &resumed {
        restore(&mut s, &mut optimizer, ckpt, recipe)?;
        state = serde_json::from_value(ckpt.state.clone())
            .map_err(|e| Error::Invalid(format!("checkpoint step {}: bad state.json: {e}", ckpt.step)))?;
    } else if opts.resume {
        reporter
            .warn(&format!("--resume: no checkpoint in {}, starting from scratch", run_dir.checkpoints().display()));
    }
    if t.precompute_reference {
        if let (Some(reference), Stream::Pairs(pairs)) = (&mut s.reference, &s.stream) {
            let started = Instant::now();
            let pad = s.encoder.eos_id();
            let n = reference.precompute(
                &s.model,
                &s.params,
                pairs.data(),
                t.micro_batch_size,
                pad,
                recipe.data.pad_to_multiple_of,
            )?;
            s.header.data_summary.push_str(&format!(
                "; reference log-probs of {n} pairs precomputed in {:.1} s",
                started.elapsed().as_secs_f64()
            ));
        }
    }
    let resume_step = resumed.as_ref().map(|c| c.step);
    // An adapter a crash left moved aside (as `<dir>.tramontane-replaced`, a name only
    // `replace_dir` writes; a user's `adapter.old` is left alone) is put back; samples.jsonl is cut
    // back like metrics.jsonl (the resumed run evaluates those steps again).
    for dir in [run_dir.adapter(), run_dir.best_adapter()] {
        recover_dir(&dir)?;
    }
    rewind_jsonl(&run_dir.root.join("samples.jsonl"), resume_step)?;
    let mut sinks: Vec<Box<dyn MetricsSink>> = Vec::new();
    if recipe.logging.jsonl {
        sinks.push(Box::new(JsonlSink::open(&run_dir.metrics(), resume_step)?));
    }
    if recipe.logging.tensorboard {
        sinks.push(Box::new(TensorBoardSink::open(&run_dir.tensorboard())?));
    }
    s.header.total_steps = total;
    s.header.start_step = state.step;
    reporter.header(&s.header);

    let started = Instant::now();
    let session_start_tokens = state.tokens;
    let (mut first_loss, mut last_loss) = (None, None);
    let mut bad_steps = 0u32;
    let mut interrupted = false;
    let base_name = recipe.model.path.display().to_string();
    let save_ckpt = |s: &Session, optimizer: &AdamW, state: &LoopState, reporter: &mut dyn Reporter| -> Result<()> {
        let trainable: HashMap<String, candle_core::Tensor> =
            s.params.named.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let ckpt = RunCheckpoint {
            step: state.step,
            trainable,
            optimizer: optimizer.state_tensors()?,
            state: serde_json::to_value(state).map_err(|e| Error::Invalid(e.to_string()))?,
        };
        let path = save_checkpoint(&run_dir.checkpoints(), &ckpt, recipe.output.keep_last)?;
        reporter.saved("checkpoint", &path.display().to_string());
        Ok(())
    };

    if resumed.is_none() && recipe.eval.every_steps > 0 {
        // The baseline, so the first periodic evaluation has something to be compared with.
        evaluate(&mut s, recipe, &mut state, &mut sinks, reporter, &run_dir, &base_name)?;
    }
    while state.step < total {
        if opts.stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let step_start = Instant::now();
        let dropout_seed = t.seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(state.step);
        // `report.step` counts steps done (1 = the first), like metrics, checkpoints and evaluations.
        let step_number = state.step + 1;
        let mut progress = |p: super::update::StepProgress| reporter.micro_batch(step_number, p.done, p.of, p.tokens);
        let report = match (&mut s.stream, &preference) {
            (Stream::Pairs(pairs), Some(pref)) => {
                let mbs: Vec<PairBatch> = (0..t.grad_accum_steps).map(|_| pairs.next_batch()).collect();
                preference_step(
                    state.step,
                    &s.model,
                    &s.params,
                    &mut optimizer,
                    &schedule,
                    &mbs,
                    pref,
                    s.reference.as_ref(),
                    &step_settings,
                    dropout_seed,
                    &mut progress,
                )?
            }
            (Stream::Sft(batches), _) => {
                let mbs: Vec<MicroBatch> =
                    (0..t.grad_accum_steps).map(|_| micro_batch(&batches.next_batch())).collect();
                optimizer_step(
                    state.step,
                    &s.model,
                    &s.params,
                    &mut optimizer,
                    &schedule,
                    &mbs,
                    &step_settings,
                    dropout_seed,
                    &mut progress,
                )?
            }
            (Stream::Pairs(_), None) => return Err(Error::Invalid("pair data without a preference objective".into())),
        };
        if !report.applied {
            bad_steps += 1;
            reporter.warn(&format!(
                "step {}: loss {} / gradient norm {} is not finite; step skipped ({bad_steps} in a row)",
                report.step, report.loss, report.grad_norm
            ));
            if bad_steps >= MAX_BAD_STEPS {
                state.data = s.stream.position();
                save_ckpt(&s, &optimizer, &state, reporter)?;
                for sink in &mut sinks {
                    sink.flush()?;
                }
                return Err(Error::Invalid(format!(
                    "{MAX_BAD_STEPS} steps in a row had a NaN/inf loss or gradient (last at step {}); the last good \
                     state is saved in {}. Lower train.learning_rate or check the data, then --resume.",
                    report.step,
                    run_dir.checkpoints().display()
                )));
            }
        } else {
            bad_steps = 0;
            first_loss.get_or_insert(report.loss);
            last_loss = Some(report.loss);
        }
        state.step += 1;
        state.tokens += report.tokens as u64;
        state.data = s.stream.position();
        let tps = report.tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9);
        reporter.step(&report, total, tps);
        let every = recipe.logging.every_steps.max(1);
        if state.step.is_multiple_of(every) || state.step == total {
            let record = train_record(&report, tps, report.step);
            for sink in &mut sinks {
                sink.record(&record)?;
            }
        }
        let eval_now =
            recipe.eval.every_steps > 0 && state.step.is_multiple_of(recipe.eval.every_steps) && state.step < total;
        if eval_now {
            evaluate(&mut s, recipe, &mut state, &mut sinks, reporter, &run_dir, &base_name)?;
        }
        let save_now = recipe.output.save_every_steps > 0 && state.step.is_multiple_of(recipe.output.save_every_steps);
        if save_now && state.step < total {
            for sink in &mut sinks {
                sink.flush()?;
            }
            save_ckpt(&s, &optimizer, &state, reporter)?;
            let dir = run_dir.step_adapter(state.step);
            save_adapter_atomic(
                &s.params,
                &s.settings,
                &s.model.config,
                &base_name,
                &dir,
                recipe.output.adapter_layout,
            )?;
        }
    }
    if !interrupted {
        evaluate(&mut s, recipe, &mut state, &mut sinks, reporter, &run_dir, &base_name)?;
    }
    for sink in &mut sinks {
        sink.flush()?;
    }
    save_ckpt(&s, &optimizer, &state, reporter)?;
    let adapter = run_dir.adapter();
    save_adapter_atomic(&s.params, &s.settings, &s.model.config, &base_name, &adapter, recipe.output.adapter_layout)?;
    reporter.saved("adapter", &adapter.display().to_string());
    let summary = RunSummary {
        steps: state.step,
        interrupted,
        tokens: state.tokens - session_start_tokens,
        seconds: started.elapsed().as_secs_f64(),
        first_loss,
        last_loss,
        best_eval_loss: state.best_eval_loss,
        final_eval_loss: state.last_eval_loss,
        adapter_dir: adapter.display().to_string(),
        peak_rss_bytes: crate::system::peak_rss_bytes(),
    };
    reporter.finish(&summary);
    Ok(summary)
}

fn train_record(r: &StepReport, tps: f64, step: u64) -> MetricRecord {
    let mut scalars = vec![
        ("loss".to_string(), r.loss),
        ("ce".to_string(), r.ce),
        ("lr".to_string(), r.lr),
        ("grad_norm".to_string(), r.grad_norm),
        ("tokens_per_second".to_string(), tps),
    ];
    if let Some(aux) = r.aux {
        scalars.push(("aux_loss".to_string(), aux));
    }
    if let Some(m) = &r.preference {
        scalars.extend(m.scalars().into_iter().map(|(k, v)| (k.to_string(), v)));
    }
    for (l, load) in r.expert_load.iter().enumerate() {
        for (e, x) in load.iter().enumerate() {
            scalars.push((format!("expert_load/layer{l}/expert{e}"), *x as f64));
        }
    }
    MetricRecord { kind: "train".into(), step, scalars }
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    s: &mut Session,
    recipe: &Recipe,
    state: &mut LoopState,
    sinks: &mut [Box<dyn MetricsSink>],
    reporter: &mut dyn Reporter,
    run_dir: &RunDir,
    base_name: &str,
) -> Result<()> {
    let (mut loss, tokens) = eval_loss(&s.model, &s.eval_batches)?;
    let mut pair_scalars = Vec::new();
    if let (Some(pref), false) = (preference_settings(&recipe.train), s.eval_pairs.is_empty()) {
        let all = s
            .eval_pairs
            .iter()
            .map(|pb| pair_metrics(&s.model, &s.params, pb, &pref, s.reference.as_ref()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let m = PreferenceMetrics::mean(&all);
        loss = Some(m.loss);
        pair_scalars = m.scalars().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    }
    let samples =
        sample_completions(&s.model, &s.tokenizer, &s.encoder, &recipe.eval.prompts, recipe.eval.max_new_tokens)?;
    let perplexity = if pair_scalars.is_empty() { loss.map(f64::exp) } else { None };
    let report = EvalReport { step: state.step, loss, perplexity, tokens, samples };
    if let Some(loss) = loss {
        let mut scalars = vec![("loss".into(), loss)];
        if pair_scalars.is_empty() {
            scalars.push(("perplexity".into(), loss.exp()));
        }
        scalars.extend(pair_scalars);
        let record = MetricRecord { kind: "eval".into(), step: state.step, scalars };
        for sink in sinks.iter_mut() {
            sink.record(&record)?;
        }
        state.last_eval_loss = Some(loss);
        if state.best_eval_loss.is_none_or(|b| loss < b) {
            state.best_eval_loss = Some(loss);
            if recipe.output.save_best {
                let dir = run_dir.best_adapter();
                save_adapter_atomic(
                    &s.params,
                    &s.settings,
                    &s.model.config,
                    base_name,
                    &dir,
                    recipe.output.adapter_layout,
                )?;
            }
        }
    }
    if !report.samples.is_empty() {
        let samples_path = run_dir.root.join("samples.jsonl");
        let line = serde_json::json!({"step": state.step, "samples": report.samples}).to_string();
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&samples_path)
            .map_err(|e| Error::io(&samples_path, e))?;
        writeln!(f, "{line}").map_err(|e| Error::io(&samples_path, e))?;
    }
    reporter.eval(&report);
    Ok(())
}

fn restore(s: &mut Session, optimizer: &mut AdamW, ckpt: &RunCheckpoint, recipe: &Recipe) -> Result<()> {
    for (name, var) in &s.params.named {
        let t = ckpt.trainable.get(name).ok_or_else(|| {
            Error::Invalid(format!(
                "checkpoint step {} has no tensor `{name}`: was the recipe's [lora] changed?",
                ckpt.step
            ))
        })?;
        if t.dims() != var.dims() {
            return Err(Error::Invalid(format!(
                "checkpoint step {}: `{name}` has shape {:?}, the recipe makes {:?}",
                ckpt.step,
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    optimizer.load_state(&ckpt.optimizer)?;
    let pos: datasets::DataPosition = serde_json::from_value(ckpt.state["data"].clone())
        .map_err(|e| Error::Invalid(format!("checkpoint step {}: bad data position: {e}", ckpt.step)))?;
    let pad = s.encoder.eos_id();
    let resumed = |e: datasets::Error| Error::Invalid(format!("cannot resume the data stream: {e}"));
    s.stream = match &s.stream {
        Stream::Sft(b) => {
            Stream::Sft(datasets::Batches::resume(b.data().clone(), recipe.batch_config(pad), pos).map_err(resumed)?)
        }
        Stream::Pairs(b) => Stream::Pairs(b.clone().resume(pos).map_err(resumed)?),
    };
    Ok(())
}
