//! The training recipe: one TOML file, typed and validated, overridable from the command line.
//!
//! ```toml
//! [model]
//! path = "models/Mistral-7B-v0.3"    # config.json, *.safetensors, tokenizer.json
//!
//! [lora]
//! r = 16
//! targets = ["q", "k", "v", "o"]
//!
//! [data]
//! files = ["data/train.parquet"]
//! format = "chat"
//!
//! [train]
//! learning_rate = 2e-4
//! epochs = 1
//! ```
//!
//! Every section and key has a default except `model.path` and `data.files`. Unknown keys and wrong types are
//! errors that name the file, the line, the key and a likely correct spelling; relative paths resolve from the
//! recipe's directory; `--set section.key=value` overrides are typed by the field they set (relative paths in
//! them resolve from the current directory); [`Recipe::to_toml`] writes the resolved recipe back (the training
//! loop stores it in the run directory).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use datasets::DataConfig;

use crate::device::DeviceChoice;
use crate::lora::LoraSettings;

/// A complete training recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The base model.
    pub model: ModelSection,
    /// How the frozen base weights are stored.
    #[serde(default)]
    pub quantization: QuantizationSection,
    /// The LoRA adapter: the engine's own settings type, [`LoraSettings::recipe_defaults`] for what is left out.
    #[serde(default = "LoraSettings::recipe_defaults")]
    pub lora: LoraSettings,
    /// The data (see [`datasets::DataConfig`]).
    #[serde(default)]
    pub data: DataConfig,
    /// The optimization.
    #[serde(default)]
    pub train: TrainSection,
    /// Evaluation during training.
    #[serde(default)]
    pub eval: EvalSection,
    /// Where and how often to save.
    #[serde(default)]
    pub output: OutputSection,
    /// Metrics.
    #[serde(default)]
    pub logging: LoggingSection,
    /// The file the recipe was read from (not part of the TOML).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[model]`: the base model directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Directory with `config.json`, `*.safetensors` (sharded or not) and `tokenizer.json`. Required.
    pub path: PathBuf,
    /// The tokenizer file; default `<path>/tokenizer.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// A bundled model (`tiny-mixtral`) generated deterministically at `path` on first use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    /// Compute dtype of activations and of unquantized weights. Default `auto` (bf16 on a GPU, f32 on CPU).
    #[serde(default)]
    pub dtype: Dtype,
    /// Where the model is loaded and trained: `auto` (the best device this build supports: the CPU on this
    /// build), `cpu`, `cuda` or `cuda:N` (the N-th GPU; needs a build with `--features cuda`, refused here
    /// before anything is loaded). Default `auto`.
    #[serde(default)]
    pub device: DeviceChoice,
}

/// A floating-point dtype choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// bf16 on accelerators, f32 on CPU.
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl Dtype {
    /// The dtype a model is loaded in on `device`: `auto` is bf16 on a GPU, f32 on the CPU.
    pub fn resolve(self, device: &candle_core::Device) -> candle_core::DType {
        match self {
            Dtype::Auto if device.is_cuda() => candle_core::DType::BF16,
            Dtype::Auto | Dtype::F32 => candle_core::DType::F32,
            Dtype::Bf16 => candle_core::DType::BF16,
            Dtype::F16 => candle_core::DType::F16,
        }
    }
}

/// `[quantization]`: storage of the frozen base weights.
///
/// With `nf4`, the decoder's linear layers (attention, MLP, experts) are quantized as they load. The embeddings,
/// the norms, `lm_head` and Mixtral's router are never quantized: they always stay in `model.dtype`, whatever
/// `keep_unquantized` says (bitsandbytes' QLoRA also leaves `lm_head` alone; quantizing it or the router is not
/// supported).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantizationSection {
    /// `nf4` (QLoRA, as bitsandbytes) or `none` (the base stays in `model.dtype`). Default `nf4`.
    pub method: QuantMethod,
    /// Quantize the per-block scales too (bitsandbytes `compress_statistics`, ~0.37 bit/param saved). Default true.
    pub double_quant: bool,
    /// Elements per NF4 block: must be 64, bitsandbytes' QLoRA block and the only size the loader quantizes
    /// with. Default 64.
    pub block_size: usize,
    /// Decoder linear layers also kept in `model.dtype` instead of NF4, by LoRA target name or group (`q`, ...,
    /// `w3`, `attention`, `mlp`, `experts`, `all`). `lm_head` and `router` may be listed (as in bitsandbytes'
    /// `llm_int8_skip_modules`) but need not be: they are always kept. Default `[]`.
    pub keep_unquantized: Vec<String>,
}

/// Elements per NF4 block: the only block size the loader quantizes with (bitsandbytes' QLoRA default).
pub const NF4_BLOCK_SIZE: usize = crate::quant::nf4::NF4_BLOCKSIZE;

/// Names `keep_unquantized` accepts besides LoRA targets: modules that are never quantized anyway.
const ALWAYS_UNQUANTIZED: [&str; 2] = ["lm_head", "router"];

impl QuantizationSection {
    /// The decoder linears `keep_unquantized` keeps dense, by Hugging Face module name (`q_proj`, ..., `w3`),
    /// deduplicated in canonical order; `lm_head` and `router` (always kept) add nothing.
    pub fn keep_dense_modules(&self) -> Vec<&'static str> {
        let mut targets: Vec<Target> =
            self.keep_unquantized.iter().filter_map(|k| Target::parse_group(k)).flatten().collect();
        targets.sort();
        targets.dedup();
        targets.into_iter().map(Target::hf_name).collect()
    }
}

impl Default for QuantizationSection {
    fn default() -> Self {
        QuantizationSection {
            method: QuantMethod::Nf4,
            double_quant: true,
            block_size: NF4_BLOCK_SIZE,
            keep_unquantized: Vec::new(),
        }
    }
}

/// Quantization method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantMethod {
    /// 4-bit NormalFloat, blockwise absmax (QLoRA).
    Nf4,
    /// No quantization.
    None,
}

/// A linear layer kind that LoRA can target (the one list of target names, in `adapters::naming`).
pub use adapters::naming::Target;

/// Learning-rate schedule after warmup (`constant`, `linear`, `cosine`): the engine's own type.
pub use crate::kernels::MatmulPrecision;

/// The shape of the learning-rate schedule after warmup (`train.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant after warmup.
    Constant,
    /// Linear decay to `min_lr_ratio` at the last step.
    Linear,
    /// Half-cosine decay to `min_lr_ratio` at the last step (the default).
    #[default]
    Cosine,
}

/// `[train]`: the optimization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Seed of everything random: LoRA init, dropout, data shuffling and the eval split. Default 0.
    pub seed: u64,
    /// Passes over the training data. Default 1 when `max_steps` is not set; exclusive with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    /// Optimizer steps to run; exclusive with `epochs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Sequences per forward/backward pass. Default 1.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step (gradients summed, normalized by the step's total target tokens).
    /// Default 1.
    pub grad_accum_steps: usize,
    /// Peak learning rate. Default 2e-4.
    pub learning_rate: f64,
    /// Schedule after warmup. Default `cosine`.
    pub schedule: Schedule,
    /// Linear warmup from 0, in optimizer steps. Default 0.
    pub warmup_steps: u64,
    /// Final learning rate as a fraction of the peak (linear and cosine). Default 0.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay. Default 0.
    pub weight_decay: f64,
    /// AdamW betas. Default [0.9, 0.999].
    pub betas: [f64; 2],
    /// AdamW epsilon. Default 1e-8.
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = no clipping). Default 1.0.
    pub max_grad_norm: f64,
    /// Recompute each layer's activations in the backward pass (saves memory). Default true.
    pub gradient_checkpointing: bool,
    /// With checkpointing: GiB of activations per micro-batch that may be kept instead of recomputed (as
    /// many of the last layers as fit, by an estimate of each layer's activations); 0 recomputes every
    /// layer. Unset (the default): half of what stays available once the model is loaded and the step's
    /// fixed needs are set aside (see the `memory` line `train` prints). Trades
    /// memory for the ~20% a full recompute costs; the gradients are the same either way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation_memory_gib: Option<f64>,
    /// Precision of the frozen base's matrix products: `highest` (f32) or `medium` (bf16 operands,
    /// f32 accumulation: several times faster on CPUs with AMX, up to ~1.7x with AVX-512 BF16 on AMD).
    /// Unset (the default): the model dtype's ([`MatmulPrecision::for_model_dtype`]): `medium` for bf16
    /// and f16 models, `highest` for f32 ones. See [`Recipe::matmul_precision`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matmul_precision: Option<MatmulPrecision>,
    /// Weight of the MoE load-balancing loss, added whenever the model has experts; default: the model
    /// config's `router_aux_loss_coef` (0.001 for Mixtral). 0 turns it off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_aux_coef: Option<f64>,
    /// What is optimized: `sft` (token cross-entropy, the default), `dpo` or `orpo` (preference tuning on
    /// `data.format = "preference"` pairs; the engine's `train::preference`).
    pub objective: Objective,
    /// DPO's temperature / ORPO's lambda. Default 0.1 (TRL's).
    pub beta: f64,
    /// DPO's loss on the log-ratios: `sigmoid` (the paper's, default), `ipo` or `robust`.
    pub loss_type: DpoLossType,
    /// Robust DPO's probability that a preference label is flipped, in [0, 0.5). Default 0. (TRL 1.16's
    /// `sigmoid` and `ipo` ignore label smoothing, so it must stay 0 with them.)
    pub label_smoothing: f64,
    /// DPO's reference model: `base` (the adapters switched off) or `init_from` (the base with the
    /// `lora.init_from` adapter, frozen: the SFT model DPO starts from, as TRL's `ref_adapter_name`). Default:
    /// `init_from` when `lora.init_from` is set, else `base`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceKind>,
    /// DPO: compute every training pair's reference log-probabilities in one pass before the first step and keep
    /// them (TRL's `precompute_ref_log_probs`; a resumed run computes them again), instead of a reference
    /// forward pass per micro-batch. Default false.
    pub precompute_reference: bool,
}

/// `train.objective`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Supervised fine-tuning: mean token cross-entropy of the trained tokens.
    #[default]
    Sft,
    /// Direct Preference Optimization against a reference model (`train.reference`: the base with the adapter
    /// switched off, or the `lora.init_from` adapter frozen).
    Dpo,
    /// Odds Ratio Preference Optimization (no reference model).
    Orpo,
}

/// DPO's loss on `delta = (chosen - ref_chosen) - (rejected - ref_rejected)` log-ratios (TRL's names):
/// `train.loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    /// The DPO paper's: `-log sigmoid(beta * delta)`.
    Sigmoid,
    /// IPO: `(delta_avg - 1 / (2 beta))^2`, each log-ratio divided by its completion's length first (TRL's form).
    Ipo,
    /// Robust DPO: `label_smoothing` is the probability that a preference label is flipped.
    Robust,
}

/// `[train] reference`: which model DPO's reference log-probabilities come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceKind {
    /// The base model: every LoRA adapter switched off (and a fully trained router back at the base's weights).
    Base,
    /// The base with the `lora.init_from` adapter applied and frozen (e.g. the SFT model DPO starts from; TRL's
    /// `ref_adapter_name`): the trained tensors' initial values are swapped in for the reference pass.
    InitFrom,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            seed: 0,
            epochs: None,
            max_steps: None,
            micro_batch_size: 1,
            grad_accum_steps: 1,
            learning_rate: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            max_grad_norm: 1.0,
            gradient_checkpointing: true,
            activation_memory_gib: None,
            matmul_precision: None,
            router_aux_coef: None,
            objective: Objective::Sft,
            beta: 0.1,
            loss_type: DpoLossType::Sigmoid,
            label_smoothing: 0.0,
            reference: None,
            precompute_reference: false,
        }
    }
}

/// How long training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duration {
    /// Whole passes over the data.
    Epochs(u64),
    /// Optimizer steps.
    Steps(u64),
}

impl TrainSection {
    /// `activation_memory_gib` in bytes, when the recipe sets it (otherwise the run computes the budget
    /// once the model is loaded: the engine's `train::StepShape::default_budget`).
    pub fn activation_memory_bytes(&self) -> Option<u64> {
        self.activation_memory_gib.map(|g| (g * (1u64 << 30) as f64) as u64)
    }

    /// DPO's reference model: `reference`, else `init_from` when the recipe has `lora.init_from`, else `base`.
    pub fn reference_kind(&self, init_from: bool) -> ReferenceKind {
        self.reference.unwrap_or(if init_from { ReferenceKind::InitFrom } else { ReferenceKind::Base })
    }

    /// `epochs` or `max_steps` (1 epoch when neither is set).
    pub fn duration(&self) -> Duration {
        match (self.epochs, self.max_steps) {
            (_, Some(s)) => Duration::Steps(s),
            (Some(e), None) => Duration::Epochs(e),
            (None, None) => Duration::Epochs(1),
        }
    }
}

/// `[eval]`: evaluation during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Evaluate every this many optimizer steps (0 = only at the end). Default 0.
    pub every_steps: u64,
    /// Evaluate on at most this many micro-batches (absent = the whole eval split).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batches: Option<usize>,
    /// User messages whose greedy completions are shown and logged at each evaluation.
    pub prompts: Vec<String>,
    /// Tokens generated per prompt. Default 64.
    pub max_new_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection { every_steps: 0, max_batches: None, prompts: Vec::new(), max_new_tokens: 64 }
    }
}

/// Layout of saved expert adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AdapterLayout {
    /// What PEFT 0.21 writes (fused `target_parameters` keys for experts). Default.
    #[default]
    #[serde(rename = "peft")]
    Peft,
    /// The legacy per-expert `experts.E.w1` keys (transformers 4 / older PEFT).
    #[serde(rename = "per-expert")]
    PerExpert,
}

/// `[output]`: where and how often to save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSection {
    /// Run directory (adapters, checkpoints, logs, the resolved recipe). Default `runs/<recipe name>` in the
    /// current directory.
    pub dir: PathBuf,
    /// Save a checkpoint every this many optimizer steps (0 = only at the end). Default 0.
    pub save_every_steps: u64,
    /// Checkpoints kept (oldest deleted first). Default 3.
    pub keep_last: usize,
    /// Also keep the adapter with the best eval loss. Default true.
    pub save_best: bool,
    /// Expert adapter key layout: `peft` or `per-expert`. Default `peft`.
    pub adapter_layout: AdapterLayout,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            dir: PathBuf::new(),
            save_every_steps: 0,
            keep_last: 3,
            save_best: true,
            adapter_layout: AdapterLayout::Peft,
        }
    }
}

/// `[logging]`: metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingSection {
    /// Log every this many optimizer steps. Default 10.
    pub every_steps: u64,
    /// Write TensorBoard event files. Default true.
    pub tensorboard: bool,
    /// Write `metrics.jsonl`. Default true.
    pub jsonl: bool,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection { every_steps: 10, tensorboard: true, jsonl: true }
    }
}

/// Why a recipe was refused. Displays as `FILE:LINE: key `section.key`: what is wrong (did you mean ...?)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeError {
    /// The recipe file, or `--set key=value` for an override.
    pub origin: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// The key, `section.key`, when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
    /// A likely correct spelling.
    pub suggestion: Option<String>,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        f.write_str(": ")?;
        if let Some(k) = &self.key {
            write!(f, "`{k}`: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(s) = &self.suggestion {
            write!(f, " (did you mean `{s}`?)")?;
        }
        Ok(())
    }
}

impl std::error::Error for RecipeError {}

impl RecipeError {
    fn new(origin: &str, key: Option<String>, message: impl Into<String>) -> RecipeError {
        RecipeError { origin: origin.to_string(), line: None, key, message: message.into(), suggestion: None }
    }
}

/// The sections of a recipe.
const SECTIONS: [&str; 8] = ["model", "quantization", "lora", "data", "train", "eval", "output", "logging"];

/// Keys holding paths: relative values in the file resolve from the recipe's directory, in `--set` from the
/// current directory.
const PATH_KEYS: [&str; 7] =
    ["model.path", "model.tokenizer", "lora.init_from", "data.files", "data.dir", "data.eval_files", "output.dir"];

impl Recipe {
    /// The precision of the frozen base's products for a model loaded in `dtype`: `train.matmul_precision`,
    /// else the dtype's ([`MatmulPrecision::for_model_dtype`]).
    pub fn matmul_precision(&self, dtype: candle_core::DType) -> MatmulPrecision {
        self.train.matmul_precision.unwrap_or_else(|| MatmulPrecision::for_model_dtype(dtype))
    }

    /// Reads, overrides, resolves and validates a recipe file. `overrides` are `section.key=value` strings.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RecipeError::new(&path.display().to_string(), None, e.to_string()))?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let base = clean_path(&if base.is_relative() { cwd.join(base) } else { base });
        let mut r = Recipe::parse(&text, &path.display().to_string(), &base, &cwd, overrides)?;
        r.source = Some(path.to_path_buf());
        if r.output.dir.as_os_str().is_empty() {
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
            r.output.dir = cwd.join("runs").join(stem);
        }
        Ok(r)
    }

    /// Parses recipe text. `origin` names it in errors; relative paths in the text resolve from `base_dir`, those
    /// in overrides from `cwd`. Validates the result.
    pub fn parse(
        text: &str,
        origin: &str,
        base_dir: &Path,
        cwd: &Path,
        overrides: &[String],
    ) -> Result<Recipe, RecipeError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| toml_error(&e, text, origin))?;
        // The file alone: report its own mistakes with line numbers (a missing key may come from an override).
        let file_missing = match toml::from_str::<Recipe>(text) {
            Ok(_) => None,
            Err(e) if e.message().starts_with("missing field") => Some(toml_error(&e, text, origin)),
            Err(e) => return Err(toml_error(&e, text, origin)),
        };
        resolve_paths_in(&mut table, base_dir);
        let reference = toml::Value::try_from(Recipe::template()).ok();
        for o in overrides {
            let origin_o = format!("--set {o}");
            let (key, raw) = o.split_once('=').ok_or_else(|| {
                RecipeError::new(&origin_o, None, "expected `section.key=value`, e.g. `--set train.learning_rate=1e-4`")
            })?;
            let key = key.trim();
            let path: Vec<&str> = key.split('.').collect();
            if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
                return Err(RecipeError::new(&origin_o, None, format!("`{key}` is not `section.key`")));
            }
            let known = reference.as_ref().and_then(|r| lookup(r, &path));
            let mut value =
                typed_value(raw.trim(), known).map_err(|m| RecipeError::new(&origin_o, Some(key.into()), m))?;
            if PATH_KEYS.contains(&key) {
                absolutize(&mut value, cwd);
            }
            let mut candidate = table.clone();
            insert(&mut candidate, &path, value).map_err(|m| RecipeError::new(&origin_o, Some(key.into()), m))?;
            // The override alone must be a valid key with a valid value.
            let text2 = toml::to_string(&candidate).map_err(|e| RecipeError::new(&origin_o, None, e.to_string()))?;
            if let Err(e) = toml::from_str::<Recipe>(&text2) {
                if !e.message().starts_with("missing field") {
                    let mut err = toml_error(&e, &text2, &origin_o);
                    err.line = None;
                    return Err(err);
                }
            }
            table = candidate;
        }
        let text2 = toml::to_string(&table).map_err(|e| RecipeError::new(origin, None, e.to_string()))?;
        let recipe: Recipe = match toml::from_str(&text2) {
            Ok(r) => r,
            Err(e) => {
                return Err(file_missing.unwrap_or_else(|| {
                    let mut err = toml_error(&e, &text2, origin);
                    err.line = None;
                    err
                }))
            }
        };
        recipe.validate().map_err(|(key, message)| {
            let line = locate(text, &key);
            let overridden = overrides.iter().any(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == key));
            let origin = if overridden {
                overrides
                    .iter()
                    .find(|o| o.starts_with(&key))
                    .map(|o| format!("--set {o}"))
                    .unwrap_or(origin.to_string())
            } else {
                origin.to_string()
            };
            RecipeError {
                origin,
                line: if overridden { None } else { line },
                key: Some(key),
                message,
                suggestion: None,
            }
        })?;
        Ok(recipe)
    }

    /// A recipe with every default and a placeholder model path (used to type `--set` values).
    pub fn template() -> Recipe {
        Recipe {
            model: ModelSection {
                path: PathBuf::from("MODEL"),
                tokenizer: None,
                builtin: None,
                dtype: Dtype::Auto,
                device: DeviceChoice::Auto,
            },
            quantization: QuantizationSection::default(),
            lora: LoraSettings::recipe_defaults(),
            data: DataConfig { files: vec![PathBuf::from("DATA")], ..DataConfig::default() },
            train: TrainSection::default(),
            eval: EvalSection::default(),
            output: OutputSection::default(),
            logging: LoggingSection::default(),
            source: None,
        }
    }

    /// The resolved recipe as TOML (every default explicit, paths absolute), with a header comment.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string_pretty(self).unwrap_or_else(|e| format!("# could not serialize: {e}\n"));
        let from = self.source.as_ref().map(|p| format!(" from {}", p.display())).unwrap_or_default();
        format!("# Resolved tramontane recipe{from}: defaults filled in, paths absolute.\n\n{body}")
    }

    /// The tokenizer file: `model.tokenizer`, or the model directory's `tekken.json` when it has one, else its
    /// `tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.model.tokenizer.clone().unwrap_or_else(|| datasets::tokenizer_in_dir(&self.model.path))
    }

    /// Batch settings for the training stream.
    pub fn batch_config(&self, pad_id: u32) -> datasets::BatchConfig {
        datasets::BatchConfig::new(&self.data, self.train.micro_batch_size, self.train.seed, pad_id)
    }

    /// Checks values against each other and their ranges: every rule on the recipe's own values, in one
    /// place, run by [`Recipe::parse`] / [`Recipe::load`] (so `tramontane data` and `tramontane train` refuse
    /// the same recipes with the same message) and again by the training run before anything is loaded. The
    /// error is `(key, message)`, the message saying what was expected and what was found. (What depends on
    /// the model or the data, e.g. whether the data leaves examples to train on, is checked when they load.)
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn err<T>(key: &str, msg: impl Into<String>) -> Result<T, (String, String)> {
            Err((key.to_string(), msg.into()))
        }
        if let Some(name) = &self.model.builtin {
            use crate::model::builtin::BUILTIN;
            if !BUILTIN.contains(&name.as_str()) {
                let hint = datasets::suggest::closest(name, BUILTIN)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                return err("model.builtin", format!("expected one of {}, found `{name}`{hint}", BUILTIN.join(", ")));
            }
        }
        if let Err(e) = self.model.device.check() {
            return err("model.device", e.to_string());
        }
        let q = &self.quantization;
        if q.block_size != NF4_BLOCK_SIZE {
            return err(
                "quantization.block_size",
                format!(
                    "must be {NF4_BLOCK_SIZE}, bitsandbytes' NF4 block and the only size supported (got {})",
                    q.block_size
                ),
            );
        }
        for k in &q.keep_unquantized {
            if !ALWAYS_UNQUANTIZED.contains(&k.as_str()) && Target::parse_group(k).is_none() {
                let mut names: Vec<&str> = ALWAYS_UNQUANTIZED.to_vec();
                names.extend(Target::SPELLINGS);
                let hint =
                    datasets::suggest::closest(k, names).map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default();
                return err(
                    "quantization.keep_unquantized",
                    format!(
                        "unknown layer `{k}`{hint}; expected lm_head, router or a linear layer name (q, k, v, o, \
                         gate, up, down, w1, w2, w3, attention, mlp, experts, all)"
                    ),
                );
            }
        }
        let l = &self.lora;
        if l.r == 0 {
            return err("lora.r", "must be at least 1 (got 0)");
        }
        if !positive(l.alpha) {
            return err("lora.alpha", format!("must be positive (got {})", l.alpha));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return err("lora.dropout", format!("must be in [0, 1) (got {})", l.dropout));
        }
        if l.targets.is_empty() {
            return err("lora.targets", "name at least one layer kind, e.g. [\"q\", \"k\", \"v\", \"o\"]");
        }
        for t in &l.targets {
            if Target::parse_group(t).is_none() {
                let hint = datasets::suggest::closest(t, Target::SPELLINGS)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                return err("lora.targets", format!("unknown target `{t}`{hint}; expected q, k, v, o, gate, up, down, w1, w2, w3, attention, mlp, experts or all"));
            }
        }
        if let Some((k, r)) = l.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return err("lora.rank_pattern", format!("rank for `{k}` must be at least 1 (got {r})"));
        }
        if let Some((k, a)) = l.alpha_pattern.iter().find(|(_, &a)| !positive(a)) {
            return err("lora.alpha_pattern", format!("alpha for `{k}` must be positive (got {a})"));
        }
        let pattern_keys = l.rank_pattern.keys().map(|k| ("lora.rank_pattern", k));
        for (field, k) in pattern_keys.chain(l.alpha_pattern.keys().map(|k| ("lora.alpha_pattern", k))) {
            if let Err(e) = adapters::config::pattern_regex(k) {
                return err(field, format!("expected a regular expression as key, found `{k}`: {e}"));
            }
        }
        self.data.check().map_err(|(key, message)| (key.to_string(), message))?;
        let t = &self.train;
        if t.epochs.is_some() && t.max_steps.is_some() {
            return err("train.max_steps", "set train.epochs or train.max_steps, not both");
        }
        if t.epochs == Some(0) {
            return err("train.epochs", "must be at least 1 (got 0)");
        }
        if t.max_steps == Some(0) {
            return err("train.max_steps", "must be at least 1 (got 0)");
        }
        if t.micro_batch_size == 0 {
            return err("train.micro_batch_size", "must be at least 1 (got 0)");
        }
        if t.grad_accum_steps == 0 {
            return err("train.grad_accum_steps", "must be at least 1 (got 0)");
        }
        if !positive(t.learning_rate) {
            return err("train.learning_rate", format!("must be positive (got {})", t.learning_rate));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return err("train.min_lr_ratio", format!("must be in [0, 1] (got {})", t.min_lr_ratio));
        }
        if !non_negative(t.weight_decay) {
            return err("train.weight_decay", format!("must be at least 0 (got {})", t.weight_decay));
        }
        if t.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return err("train.betas", format!("each beta must be in [0, 1) (got {:?})", t.betas));
        }
        if !positive(t.eps) {
            return err("train.eps", format!("must be positive (got {})", t.eps));
        }
        if !non_negative(t.max_grad_norm) {
            return err(
                "train.max_grad_norm",
                format!("must be at least 0; 0 turns clipping off (got {})", t.max_grad_norm),
            );
        }
        if let Some(g) = t.activation_memory_gib {
            if !non_negative(g) {
                return err("train.activation_memory_gib", format!("must be at least 0 GiB (got {g})"));
            }
            if !t.gradient_checkpointing {
                return err(
                    "train.activation_memory_gib",
                    "applies to gradient checkpointing; set train.gradient_checkpointing = true or remove it",
                );
            }
        }
        if t.router_aux_coef.is_some_and(|c| !non_negative(c)) {
            return err("train.router_aux_coef", "must be at least 0 (0 turns the load-balancing loss off)");
        }
        let preference_data = self.data.format == datasets::Format::Preference;
        match t.objective {
            Objective::Sft if preference_data => {
                return err(
                    "train.objective",
                    "data.format = \"preference\" holds chosen/rejected pairs: set train.objective = \"dpo\" or \"orpo\"",
                )
            }
            Objective::Dpo | Objective::Orpo if !preference_data => {
                return err(
                    "data.format",
                    format!(
                        "train.objective = \"{}\" trains on chosen/rejected pairs: set data.format = \"preference\" (found \"{}\")",
                        if t.objective == Objective::Dpo { "dpo" } else { "orpo" },
                        self.data.format.name()
                    ),
                )
            }
            _ => {}
        }
        if !positive(t.beta) {
            return err("train.beta", format!("must be positive (got {})", t.beta));
        }
        if !(0.0..0.5).contains(&t.label_smoothing) {
            return err("train.label_smoothing", format!("must be in [0, 0.5) (got {})", t.label_smoothing));
        }
        if t.objective != Objective::Dpo && t.loss_type != DpoLossType::Sigmoid {
            return err("train.loss_type", "applies to train.objective = \"dpo\" only");
        }
        if t.label_smoothing > 0.0 && !(t.objective == Objective::Dpo && t.loss_type == DpoLossType::Robust) {
            return err(
                "train.label_smoothing",
                "is used by train.loss_type = \"robust\" only (TRL's sigmoid and ipo losses ignore it); set loss_type = \"robust\" or remove it",
            );
        }
        if t.objective != Objective::Dpo {
            if t.reference.is_some() {
                return err(
                    "train.reference",
                    "applies to train.objective = \"dpo\" only (ORPO has no reference model)",
                );
            }
            if t.precompute_reference {
                return err(
                    "train.precompute_reference",
                    "applies to train.objective = \"dpo\" only (ORPO has no reference model)",
                );
            }
        }
        if t.reference == Some(ReferenceKind::InitFrom) && l.init_from.is_none() {
            return err(
                "train.reference",
                "\"init_from\" takes the lora.init_from adapter as the reference: set lora.init_from, or use \"base\"",
            );
        }
        if self.eval.max_batches == Some(0) {
            return err("eval.max_batches", "must be at least 1 (or absent for the whole eval split)");
        }
        if self.eval.max_new_tokens == 0 && !self.eval.prompts.is_empty() {
            return err("eval.max_new_tokens", "must be at least 1 when eval.prompts are given");
        }
        if self.output.keep_last == 0 {
            return err("output.keep_last", "must be at least 1 (got 0)");
        }
        if self.logging.every_steps == 0 {
            return err("logging.every_steps", "must be at least 1 (got 0)");
        }
        Ok(())
    }
}

/// Finite and > 0 (false for NaN).
fn positive(x: f64) -> bool {
    x > 0.0 && x.is_finite()
}

/// Finite and >= 0 (false for NaN).
fn non_negative(x: f64) -> bool {
    x >= 0.0 && x.is_finite()
}

/// Turns a TOML/serde error into a [`RecipeError`] with line, key and suggestion.
fn toml_error(e: &toml::de::Error, text: &str, origin: &str) -> RecipeError {
    let msg = e.message().trim().to_string();
    let span = e.span();
    let line = span.as_ref().map(|s| text.get(..s.start).unwrap_or(text).matches('\n').count() + 1);
    let section = span.as_ref().and_then(|s| section_at(text, s.start));
    let key_on_line = span.as_ref().and_then(|s| key_at(text, s.start));
    let join = |k: &str| match &section {
        Some(s) if !s.is_empty() => format!("{s}.{k}"),
        _ => k.to_string(),
    };
    let mut err = RecipeError { origin: origin.to_string(), line, key: None, message: msg.clone(), suggestion: None };
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = backticked(tail);
        let top_level = expected.iter().any(|e| e == "model") && expected.iter().any(|e| e == "train");
        err.key = Some(if top_level { name.to_string() } else { join(name) });
        let place = match &section {
            Some(s) if !s.is_empty() => format!("[{s}]"),
            _ => "the top level".to_string(),
        };
        err.message = if expected.is_empty() {
            format!("unknown key in {place}")
        } else {
            format!("unknown key; {place} accepts {}", expected.join(", "))
        };
        err.suggestion = datasets::suggest::closest(name, expected.iter().map(|s| s.as_str())).map(str::to_string);
        if top_level {
            err.message = format!("unknown section; a recipe has {}", expected.join(", "));
        }
    } else if let Some(rest) = msg.strip_prefix("unknown variant `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = backticked(tail);
        err.key = key_on_line.as_deref().map(join);
        err.message = format!("unknown value `{name}`; expected one of {}", expected.join(", "));
        err.suggestion = datasets::suggest::closest(name, expected.iter().map(|s| s.as_str())).map(str::to_string);
    } else if let Some(rest) = msg.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or(rest);
        let key = match &section {
            _ if SECTIONS.contains(&name) => name.to_string(),
            Some(s) if !s.is_empty() => format!("{s}.{name}"),
            _ => name.to_string(),
        };
        err.message = if key.contains('.') { "missing required key".into() } else { "missing required section".into() };
        err.key = Some(key);
        err.line = None;
    } else if msg.starts_with("invalid type") || msg.starts_with("invalid value") || msg.starts_with("invalid length") {
        err.key = key_on_line.as_deref().map(join);
        err.message = humanize_type_error(&msg);
    }
    err
}

/// Names between backticks, e.g. from "expected one of `a`, `b`".
fn backticked(s: &str) -> Vec<String> {
    s.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// "invalid type: string \"x\", expected f64" -> "expected a number, found string \"x\"".
fn humanize_type_error(msg: &str) -> String {
    let Some((found, expected)) = msg.split_once(", expected ") else { return msg.to_string() };
    let found = found
        .trim_start_matches("invalid type: ")
        .trim_start_matches("invalid value: ")
        .trim_start_matches("invalid length ");
    let expected = match expected.trim() {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a non-negative integer",
        "isize" | "i64" | "i32" => "an integer",
        "f64" | "f32" => "a number",
        "a boolean" | "bool" => "true or false",
        "a string" | "path string" | "a path" => "a string",
        "a sequence" => "a list",
        other if other.starts_with("an array of length") => other,
        other if other.starts_with("struct ") => "a table",
        other => other,
    };
    format!("expected {expected}, found {found}")
}

/// The `[section]` (dotted) in effect at byte `pos`.
fn section_at(text: &str, pos: usize) -> Option<String> {
    let mut current = Some(String::new());
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if offset > pos {
            break;
        }
        let t = line.trim();
        if t.starts_with('[') && !t.starts_with("[[") && offset <= pos {
            if let Some(end) = t.find(']') {
                current = Some(t[1..end].trim().replace(['"', ' '], ""));
            }
        }
        offset += line.len();
    }
    current
}

/// The key written at the start of the line holding byte `pos` (`key = ...`).
fn key_at(text: &str, pos: usize) -> Option<String> {
    let start = text.get(..pos).unwrap_or(text).rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(start..)?.lines().next()?;
    let (k, _) = line.split_once('=')?;
    let k = k.trim().trim_matches('"');
    (!k.is_empty() && !k.starts_with('[')).then(|| k.to_string())
}

/// The 1-based line where `section.key` is written, if it can be found.
fn locate(text: &str, key: &str) -> Option<usize> {
    let (section, name) = key.rsplit_once('.')?;
    let mut in_section = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = t.trim_matches(['[', ']']).trim() == section;
            continue;
        }
        if in_section {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim().trim_matches('"') == name {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

fn lookup<'a>(v: &'a toml::Value, path: &[&str]) -> Option<&'a toml::Value> {
    let mut cur = v;
    for p in path {
        cur = cur.as_table()?.get(*p)?;
    }
    Some(cur)
}

fn insert(table: &mut toml::Table, path: &[&str], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = table;
    for p in parents {
        let entry = cur.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| format!("`{p}` is not a table"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

/// Parses a `--set` value as the type of the field it sets (`known`: the field's default value).
fn typed_value(raw: &str, known: Option<&toml::Value>) -> Result<toml::Value, String> {
    use toml::Value as V;
    let literal = |s: &str| -> Option<V> {
        toml::from_str::<toml::Table>(&format!("v = {s}")).ok().and_then(|mut t| t.remove("v"))
    };
    let unquote = |s: &str| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s).to_string();
    Ok(match known {
        Some(V::String(_)) => V::String(unquote(raw)),
        Some(V::Integer(_)) => V::Integer(raw.parse().map_err(|_| format!("expected an integer, found `{raw}`"))?),
        Some(V::Float(_)) => V::Float(raw.parse().map_err(|_| format!("expected a number, found `{raw}`"))?),
        Some(V::Boolean(_)) => V::Boolean(match raw {
            "true" | "yes" | "on" | "1" => true,
            "false" | "no" | "off" | "0" => false,
            _ => return Err(format!("expected true or false, found `{raw}`")),
        }),
        Some(V::Array(items)) => {
            if raw.starts_with('[') {
                literal(raw).ok_or_else(|| format!("`{raw}` is not a TOML list"))?
            } else {
                let first = items.first();
                let parts: Result<Vec<V>, String> = raw
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| match first {
                        Some(f) => typed_value(p, Some(f)),
                        None => Ok(literal(p).unwrap_or_else(|| V::String(unquote(p)))),
                    })
                    .collect();
                V::Array(parts?)
            }
        }
        Some(V::Table(_)) => {
            literal(raw).ok_or_else(|| format!("expected an inline table like {{ key = 1 }}, found `{raw}`"))?
        }
        _ => literal(raw).unwrap_or_else(|| V::String(unquote(raw))),
    })
}

fn absolutize(v: &mut toml::Value, base: &Path) {
    match v {
        toml::Value::String(s) => {
            let p = Path::new(s.as_str());
            if !s.is_empty() && p.is_relative() {
                *s = clean_path(&base.join(p)).display().to_string();
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|i| absolutize(i, base)),
        _ => {}
    }
}

/// Removes `.` and `..` components lexically ("/a/b/../c" -> "/a/c"), so resolved paths read well.
fn clean_path(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn resolve_paths_in(table: &mut toml::Table, base: &Path) {
    for key in PATH_KEYS {
        let path: Vec<&str> = key.split('.').collect();
        let mut cur: Option<&mut toml::Value> = None;
        for (i, p) in path.iter().enumerate() {
            cur =
                if i == 0 { table.get_mut(*p) } else { cur.and_then(|c| c.as_table_mut()).and_then(|t| t.get_mut(*p)) };
        }
        if let Some(v) = cur {
            absolutize(v, base);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
path = "models/tiny"

[lora]
r = 8
targets = ["attention", "w1", "w2", "w3"]

[data]
files = ["data/train.parquet"]
max_seq_len = 512

[train]
learning_rate = 3e-4
max_steps = 100
"#;

    fn parse(text: &str, overrides: &[&str]) -> Result<Recipe, RecipeError> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Recipe::parse(text, "recipe.toml", Path::new("/base"), Path::new("/cwd"), &o)
    }

    #[test]
    fn defaults_paths_and_round_trip() {
        let r = parse(GOOD, &[]).unwrap();
        assert_eq!(r.model.path, PathBuf::from("/base/models/tiny"));
        assert_eq!(r.data.files, vec![PathBuf::from("/base/data/train.parquet")]);
        assert_eq!(r.tokenizer_path(), PathBuf::from("/base/models/tiny/tokenizer.json"));
        assert_eq!(r.train.duration(), Duration::Steps(100));
        assert_eq!(
            r.lora.target_set(),
            vec![Target::Q, Target::K, Target::V, Target::O, Target::W1, Target::W2, Target::W3]
        );
        assert_eq!(r.quantization.block_size, 64);
        // The resolved recipe written back parses to the same recipe.
        let back = parse(&r.to_toml(), &[]).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn unknown_key_names_line_and_suggests() {
        let text = GOOD.replace("learning_rate = 3e-4", "lerning_rate = 3e-4");
        let e = parse(&text, &[]).unwrap_err();
        assert_eq!(e.line, Some(14));
        assert_eq!(e.key.as_deref(), Some("train.lerning_rate"));
        assert_eq!(e.suggestion.as_deref(), Some("learning_rate"));
        assert!(
            e.to_string()
                .starts_with("recipe.toml:14: `train.lerning_rate`: unknown key; [train] accepts seed, epochs"),
            "{e}"
        );
        let e = parse(&format!("{GOOD}\n[trian]\nseed = 1\n"), &[]).unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("train"), "{e}");
        let e = parse(&GOOD.replace("max_seq_len = 512", "max_seq_len = 512\n[data.columns]\nmesages = \"m\""), &[])
            .unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.suggestion.as_deref()),
            (Some("data.columns.mesages"), Some("messages")),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_name_key_line_and_expectation() {
        let e = parse(&GOOD.replace("max_seq_len = 512", "max_seq_len = \"long\""), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "recipe.toml:11: `data.max_seq_len`: expected a non-negative integer, found string \"long\""
        );
        let e = parse(&GOOD.replace("r = 8", "r = -8"), &[]).unwrap_err();
        assert_eq!(e.to_string(), "recipe.toml:6: `lora.r`: expected a non-negative integer, found integer `-8`");
        let e = parse(&GOOD.replace("max_steps = 100", "max_steps = 100\nschedule = \"cosin\""), &[]).unwrap_err();
        assert_eq!(e.to_string(), "recipe.toml:16: `train.schedule`: unknown value `cosin`; expected one of constant, linear, cosine (did you mean `cosine`?)");
        let e =
            parse(&GOOD.replace("max_steps = 100", "max_steps = 100\nmatmul_precision = \"low\""), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "recipe.toml:16: `train.matmul_precision`: unknown value `low`; expected one of highest, medium"
        );
        let r = parse(&GOOD.replace("max_steps = 100", "max_steps = 100\nmatmul_precision = \"medium\""), &[]).unwrap();
        assert_eq!(r.train.matmul_precision, Some(MatmulPrecision::Medium));
        assert_eq!(r.matmul_precision(candle_core::DType::F32), MatmulPrecision::Medium);
        let r = parse(&GOOD.replace("max_steps = 100", "max_steps = 100\nactivation_memory_gib = 1.5"), &[]).unwrap();
        assert_eq!(r.train.activation_memory_gib, Some(1.5));
        assert_eq!(r.train.activation_memory_bytes(), Some(3 << 29));
        let zero = TrainSection { activation_memory_gib: Some(0.0), ..TrainSection::default() };
        assert_eq!(zero.activation_memory_bytes(), Some(0));
        let unset = TrainSection::default();
        assert!(unset.gradient_checkpointing && unset.activation_memory_bytes().is_none());
        let e =
            parse(&GOOD.replace("max_steps = 100", "max_steps = 100\nactivation_memory_gib = -1.0"), &[]).unwrap_err();
        assert!(e.to_string().contains("`train.activation_memory_gib`: must be at least 0 GiB"), "{e}");
    }

    #[test]
    fn zero_sizes_and_exclusive_settings_name_the_key() {
        let e = parse(&GOOD.replace("r = 8", "r = 0"), &[]).unwrap_err();
        assert_eq!(e.to_string(), "recipe.toml:6: `lora.r`: must be at least 1 (got 0)");
        let e = parse(&GOOD.replace("max_seq_len = 512", "max_seq_len = 0"), &[]).unwrap_err();
        assert_eq!(e.to_string(), "recipe.toml:11: `data.max_seq_len`: must be at least 1 (got 0)");
        let e = parse(&GOOD.replace("max_steps = 100", "max_steps = 100\nepochs = 2"), &[]).unwrap_err();
        assert!(e.to_string().contains("`train.max_steps`: set train.epochs or train.max_steps, not both"), "{e}");
        let e = parse(&GOOD.replace("\"w3\"]", "\"w4\"]"), &[]).unwrap_err();
        assert!(e.to_string().contains("unknown target `w4` (did you mean `w1`?)"), "{e}");
    }

    #[test]
    fn overrides_are_typed_by_the_field() {
        let r = parse(
            GOOD,
            &[
                "train.learning_rate=1e-5",
                "lora.r=4",
                "data.packing=false",
                "train.schedule=linear",
                "data.files=a.parquet,b.parquet",
                "train.betas=0.9,0.95",
                "train.max_steps=7",
                "model.path=other",
            ],
        )
        .unwrap();
        assert_eq!(r.train.learning_rate, 1e-5);
        assert_eq!(r.lora.r, 4);
        assert!(!r.data.packing);
        assert_eq!(r.train.schedule, Schedule::Linear);
        assert_eq!(r.data.files, vec![PathBuf::from("/cwd/a.parquet"), PathBuf::from("/cwd/b.parquet")]);
        assert_eq!(r.train.betas, [0.9, 0.95]);
        assert_eq!(r.train.max_steps, Some(7));
        assert_eq!(r.model.path, PathBuf::from("/cwd/other"));
        // An override can supply a key the file lacks.
        let r = parse(&GOOD.replace("path = \"models/tiny\"", ""), &["model.path=/m"]).unwrap();
        assert_eq!(r.model.path, PathBuf::from("/m"));
    }

    #[test]
    fn bad_overrides_are_refused_with_the_override_named() {
        let e = parse(GOOD, &["train.lerning_rate=1"]).unwrap_err();
        assert_eq!(e.origin, "--set train.lerning_rate=1");
        assert_eq!(e.suggestion.as_deref(), Some("learning_rate"));
        let e = parse(GOOD, &["lora.r=big"]).unwrap_err();
        assert_eq!(e.to_string(), "--set lora.r=big: `lora.r`: expected an integer, found `big`");
        let e = parse(GOOD, &["learning_rate"]).unwrap_err();
        assert!(e.to_string().contains("expected `section.key=value`"), "{e}");
        let e = parse(GOOD, &["lora.r=0"]).unwrap_err();
        assert_eq!(e.to_string(), "--set lora.r=0: `lora.r`: must be at least 1 (got 0)");
        let e = parse(GOOD, &["data.truncation=chop"]).unwrap_err();
        assert!(e.to_string().contains("unknown value `chop`; expected one of drop, truncate, error"), "{e}");
    }

    #[test]
    fn missing_required_keys() {
        let e = parse("[data]\nfiles = [\"x\"]\n", &[]).unwrap_err();
        assert_eq!(e.to_string(), "recipe.toml: `model`: missing required section");
        let e = parse("[model]\ndtype = \"f32\"\n[data]\nfiles = [\"x\"]\n", &[]).unwrap_err();
        assert_eq!(e.to_string(), "recipe.toml: `model.path`: missing required key");
        let e = parse("[model]\npath = \"m\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("data.files"), "{e}");
        let e = parse("[model\npath = 1", &[]).unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn quantization_rules_are_checked_here_and_name_the_key() {
        // The loader quantizes with 64-element blocks only: anything else is refused while parsing,
        // before a model or data is loaded.
        let e = parse(&format!("{GOOD}\n[quantization]\nblock_size = 128\n"), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "recipe.toml:18: `quantization.block_size`: must be 64, bitsandbytes' NF4 block and the only size \
             supported (got 128)"
        );
        let e = parse(GOOD, &["quantization.block_size=256"]).unwrap_err();
        assert!(e.to_string().starts_with("--set quantization.block_size=256: `quantization.block_size`"), "{e}");
        // lm_head and the router are always kept in model.dtype: listing them is allowed, not required.
        for keep in ["[]", "[\"lm_head\"]", "[\"router\"]", "[\"lm_head\", \"router\"]"] {
            let r = parse(&format!("{GOOD}\n[quantization]\nkeep_unquantized = {keep}\n"), &[]).unwrap();
            assert!(r.quantization.keep_dense_modules().is_empty(), "{keep}");
        }
        let r = parse(&format!("{GOOD}\n[quantization]\nkeep_unquantized = [\"router\", \"attention\", \"q\"]\n"), &[])
            .unwrap();
        assert_eq!(r.quantization.keep_dense_modules(), vec!["q_proj", "k_proj", "v_proj", "o_proj"]);
        let e = parse(&format!("{GOOD}\n[quantization]\nkeep_unquantized = [\"lm_haed\"]\n"), &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("quantization.keep_unquantized"));
        assert!(e.to_string().contains("unknown layer `lm_haed` (did you mean `lm_head`?); expected lm_head"), "{e}");
        assert!(QuantizationSection::default().keep_unquantized.is_empty());
    }

    #[test]
    fn the_shipped_recipes_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
        for name in ["mistral-7b-qlora.toml", "mixtral-8x7b-qlora.toml", "quickstart.toml"] {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            let r = Recipe::parse(&text, name, &dir, &dir, &[]).unwrap_or_else(|e| panic!("{e}"));
            assert!(r.quantization.keep_dense_modules().is_empty(), "{name}");
        }
    }

    #[test]
    fn other_rules_checked_before_loading_name_the_key() {
        let e = parse(&GOOD.replace("path = \"models/tiny\"", "path = \"m\"\nbuiltin = \"tiny-mistral\""), &[])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "recipe.toml:4: `model.builtin`: expected one of tiny-mixtral, tiny-nemo, found `tiny-mistral` (did you mean \
             `tiny-mixtral`?)"
        );
        let e = parse(&format!("{GOOD}\n[lora.rank_pattern]\n'q_proj(' = 4\n"), &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("lora.rank_pattern"));
        assert!(e.message.starts_with("expected a regular expression as key, found `q_proj(`"), "{e}");
        let e = parse(&format!("{GOOD}\n[lora.alpha_pattern]\n'[' = 4.0\n"), &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("lora.alpha_pattern"), "{e}");
    }

    #[test]
    fn the_device_is_validated_before_loading() {
        // Default `auto`; `cpu` and `auto` are accepted and written back as given.
        assert_eq!(parse(GOOD, &[]).unwrap().model.device, DeviceChoice::Auto);
        let with = |device: &str| {
            GOOD.replace("path = \"models/tiny\"", &format!("path = \"models/tiny\"\ndevice = \"{device}\""))
        };
        let r = parse(&with("cpu"), &[]).unwrap();
        assert_eq!(r.model.device, DeviceChoice::Cpu);
        assert_eq!(parse(&r.to_toml(), &[]).unwrap(), r);
        // A CUDA device on this build: refused by validation, naming the key and its line.
        for cuda in ["cuda", "cuda:1"] {
            let e = parse(&with(cuda), &[]).unwrap_err();
            assert_eq!(
                e.to_string(),
                "recipe.toml:4: `model.device`: this build has no CUDA support: build with --features cuda",
                "{cuda}"
            );
        }
        let e = parse(GOOD, &["model.device=cuda"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--set model.device=cuda: `model.device`: this build has no CUDA support: build with --features cuda"
        );
        // An unknown device lists the accepted values.
        let e = parse(&with("tpu"), &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("model.device"), "{e}");
        assert!(e.message.contains("unknown value `tpu`; expected one of auto, cpu, cuda, cuda:N"), "{e}");
    }

    /// PEFT takes the first key, in the order written, whose regex matches the module name: with
    /// `q_proj` first every q_proj gets rank 4; sorted, `layers\.0\...` would come first and give 2.
    #[test]
    fn rank_pattern_keeps_the_order_written() {
        let text = format!(
            "{GOOD}\n[lora.rank_pattern]\nq_proj = 4\n'layers\\.0\\.self_attn\\.q_proj' = 2\n\n\
             [lora.alpha_pattern]\nv_proj = 8.0\n'layers\\.0\\.self_attn\\.v_proj' = 64.0\n"
        );
        let r = parse(&text, &[]).unwrap();
        let keys: Vec<&str> = r.lora.rank_pattern.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["q_proj", r"layers\.0\.self_attn\.q_proj"]);
        let keys: Vec<&str> = r.lora.alpha_pattern.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["v_proj", r"layers\.0\.self_attn\.v_proj"]);
        let plan = crate::lora::LoraPlan::new(crate::train::run::lora_settings(&r)).unwrap();
        assert_eq!(plan.module("model.layers.0.self_attn.q_proj").r, 4);
        assert_eq!(plan.module("model.layers.0.self_attn.v_proj").alpha, 8.0);
        // The resolved recipe the run stores keeps the order too.
        let back = parse(&r.to_toml(), &[]).unwrap();
        let keys: Vec<&str> = back.lora.rank_pattern.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["q_proj", r"layers\.0\.self_attn\.q_proj"]);
        // And so does an override.
        let r = parse(GOOD, &[r#"lora.rank_pattern={ w2 = 3, 'layers\.1\.block_sparse_moe\.experts\.0\.w2' = 1 }"#])
            .unwrap();
        let keys: Vec<&str> = r.lora.rank_pattern.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["w2", r"layers\.1\.block_sparse_moe\.experts\.0\.w2"]);
    }

    #[test]
    fn dpo_reference_choices_and_their_checks() {
        let dpo = ["data.format=preference", "train.objective=dpo"];
        let r = parse(GOOD, &dpo).unwrap();
        assert_eq!(r.train.reference_kind(r.lora.init_from.is_some()), ReferenceKind::Base);
        // A fully trained router is no longer refused: the reference pass puts the base's router back.
        parse(GOOD, &[dpo[0], dpo[1], "lora.router=full"]).unwrap();
        // From an init_from adapter the reference defaults to that adapter (frozen); `base` is a choice.
        let r = parse(GOOD, &[dpo[0], dpo[1], "lora.init_from=sft-adapter"]).unwrap();
        assert_eq!(r.train.reference_kind(true), ReferenceKind::InitFrom);
        let r = parse(GOOD, &[dpo[0], dpo[1], "lora.init_from=sft-adapter", "train.reference=base"]).unwrap();
        assert_eq!(r.train.reference_kind(true), ReferenceKind::Base);
        let e = parse(GOOD, &[dpo[0], dpo[1], "train.reference=init_from"]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("train.reference"), "{e}");
        assert!(e.to_string().contains("set lora.init_from"), "{e}");
        let orpo = ["data.format=preference", "train.objective=orpo"];
        let e = parse(GOOD, &[orpo[0], orpo[1], "train.precompute_reference=true"]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("train.precompute_reference"), "{e}");
        let e = parse(GOOD, &[orpo[0], orpo[1], "train.reference=base"]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("train.reference"), "{e}");
        parse(GOOD, &[dpo[0], dpo[1], "train.precompute_reference=true"]).unwrap();
    }
}
