//! Arguments and loading shared by the commands that run a model, with the memory check before loading:
//! the memory the command needs (weights at the chosen dtype or in NF4, adapters, the KV cache of the context it
//! may use, the buffers of its largest forward pass) is estimated from config.json and compared with what this
//! process can really allocate (MemAvailable, the cgroup limit, `ulimit -v`); a model that does not fit is
//! refused with the flag that would make it fit, instead of dying halfway through loading.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use trainer::device::DeviceChoice;
use trainer::model::memory::{
    estimate_inference, format_bytes, largest_fitting_context, WeightPlan, WeightSource, Workload,
};
use trainer::model::{load_model, LoadOptions, Model, ModelConfig, ModelTokenizer, Nf4Options};

/// How the base weights are loaded (shared by every command that runs a model, `serve` included).
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Dtype of the weights: f32, bf16 or f16 [default: the checkpoint's own: config.json's torch_dtype, else its
    /// tensors' dtype; f32 for a quantized GGUF file]. bf16 and f16 models multiply their frozen weights with
    /// bf16 operands and f32 accumulation, as training does for them.
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
    /// Quantize the base's decoder linears (attention, MLP, experts; all of them but --keep-unquantized) while
    /// loading, as QLoRA training does; lm_head, embeddings, norms and routers stay at --dtype. Use it to run an
    /// adapter trained with `quantization.method = "nf4"` on the weights it was trained against (with the
    /// run's --double-quant and --keep-unquantized), or to fit a model in ~1/4 of the memory.
    #[arg(long, value_name = "METHOD")]
    pub quantize: Option<Quantize>,
    /// With --quantize nf4: also quantize the block scales (bitsandbytes' QLoRA default, and the recipes'
    /// `quantization.double_quant`); pass the value training used.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
    /// With --quantize nf4: decoder linears kept at --dtype instead of NF4, named as the recipe's
    /// `quantization.keep_unquantized` names them (q, k, v, o, gate, up, down, w1, w2, w3, attention, mlp,
    /// experts, all; lm_head and router are always kept). It must match the recipe's `keep_unquantized` for
    /// the answers to match the run's.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',', requires = "quantize")]
    pub keep_unquantized: Vec<String>,
    /// Device to load the model onto and run it on: auto (the best this build supports: the CPU on this build),
    /// cpu, cuda or cuda:N (the N-th GPU; needs a build with --features cuda).
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// Skip the memory check before loading (the estimate of what the command needs against what this process
    /// can allocate). The estimate is an upper bound; without the check a model too large for the machine makes
    /// the command fail with an out-of-memory error while loading or running.
    #[arg(long)]
    pub no_memory_check: bool,
}

/// A quantization applied while loading.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// 4-bit NormalFloat in blocks of 64 (bitsandbytes' NF4).
    Nf4,
}

/// Where the model is and how to load it.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or a GGUF file.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory to apply (unmerged), optionally weighted as `DIR:WEIGHT`; repeat to combine
    /// several (their weighted updates are summed).
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]")]
    pub adapter: Vec<String>,
    /// Dtype, quantization and memory check.
    #[command(flatten)]
    pub load: LoadArgs,
}

/// How much context a command will use, for the memory check.
#[derive(Debug, Clone, Copy)]
pub enum ContextNeed {
    /// A known workload: tokens one sequence may hold, tokens of its longest forward pass, rows through lm_head.
    Fixed {
        /// Tokens in the KV cache at most.
        context: usize,
        /// Tokens of the longest forward pass.
        prefill: usize,
        /// Rows through lm_head at once.
        logit_rows: usize,
    },
    /// As much context as fits for one sequence, from `min` tokens up to the model's maximum (chat, which
    /// prefills the whole conversation); the command then refuses longer conversations.
    AsMuchAsFits {
        /// The least context worth starting with (capped at the model's maximum).
        min: usize,
    },
    /// As much context per sequence as fits while `sequences` sequences hold a KV cache at once, each able to
    /// fill it (serve's continuous batching: each prompt is prefilled alone, then one decode step runs a token
    /// of every sequence). Messages name serve's `--max-batch-size`, and suggest a smaller one when it helps.
    Batch {
        /// The least context per sequence worth starting with (capped at the model's maximum).
        min: usize,
        /// Sequences held at once (`--max-batch-size`).
        sequences: usize,
    },
}

/// What a command will do with the model, for the memory check.
#[derive(Debug, Clone)]
pub struct Demand {
    /// The context it may use.
    pub context: ContextNeed,
    /// Adapters it will load itself besides `--adapter` (eval, chat and serve apply them to clones of the base).
    pub extra_adapters: Vec<PathBuf>,
}

/// A loaded model with its tokenizer (when the directory has one).
pub struct Loaded {
    /// The model.
    pub model: Model,
    /// Its tokenizer, if `tokenizer.json` exists.
    pub tokenizer: Option<ModelTokenizer>,
    /// Longest context (prompt plus generated tokens) the command may use: the model's maximum, or less where
    /// the memory check chose less for [`ContextNeed::AsMuchAsFits`].
    pub context: usize,
}

/// Parses a dtype name: `f32`, `bf16` or `f16`, or the torch spellings (`float32`, ...).
pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("unknown dtype `{other}`: expected f32, bf16 or f16"),
    })
}

/// The decoder linears `--keep-unquantized` names (`q`, ..., `w3`, `attention`, `mlp`, `experts`, `all`, or the
/// module names; `lm_head` and `router`, never quantized, add nothing), as the module names
/// [`Nf4Options::keep_dense`] takes, in canonical order; as the recipe's `quantization.keep_unquantized` maps
/// them. Fails on an unknown name.
pub fn keep_dense_modules(names: &[String]) -> Result<Vec<String>> {
    let mut targets = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if matches!(name, "lm_head" | "router") {
            continue;
        }
        match trainer::recipe::Target::parse_group(name) {
            Some(group) => targets.extend(group),
            None => bail!(
                "--keep-unquantized: unknown layer `{name}`; expected lm_head, router or a linear layer name (q, k, \
                 v, o, gate, up, down, w1, w2, w3, attention, mlp, experts, all)"
            ),
        }
    }
    targets.sort();
    targets.dedup();
    Ok(targets.into_iter().map(|t| t.hf_name().to_string()).collect())
}

/// The device a command's `--device` names; fails, naming the flag, when this build does not support it (checked
/// before anything is read).
pub fn resolve_device(choice: DeviceChoice) -> Result<Device> {
    choice.resolve().map_err(|e| anyhow::anyhow!("--device {choice}: {e}"))
}

/// The name `--dtype` takes for a dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// Bytes the adapters in `dirs` (`DIR` or `DIR:WEIGHT`) take once loaded: their safetensors files, counted at
/// 4 bytes per parameter stored in 2.
pub fn adapter_bytes(dirs: &[PathBuf]) -> u64 {
    dirs.iter()
        .map(|d| {
            let dir =
                trainer::lora::peft::parse_adapter_arg(&d.to_string_lossy()).map_or_else(|_| d.clone(), |(p, _)| p);
            std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                        .map(|e| e.metadata().map_or(0, |m| m.len()))
                        .sum::<u64>()
                })
                .unwrap_or(0)
                * 2
        })
        .sum()
}

/// What the memory check needs to know about the model before loading it.
struct Facts {
    config: ModelConfig,
    native: DType,
    source: WeightSource,
    /// The checkpoint stores its decoder linears in bitsandbytes' NF4 already.
    stored_nf4: bool,
    gguf: bool,
}

impl Facts {
    fn read(path: &Path) -> Result<Self> {
        if trainer::model::gguf::is_gguf(path) {
            let g = trainer::model::memory::gguf_facts(path)?;
            return Ok(Facts {
                config: g.config,
                native: g.float_dtype.unwrap_or(DType::F32),
                source: WeightSource::Gguf { largest_tensor: g.largest_tensor },
                stored_nf4: false,
                gguf: true,
            });
        }
        if !path.is_dir() {
            bail!("{}: not a model directory", path.display());
        }
        let config = ModelConfig::from_path(path)?;
        let ckpt = trainer::model::Checkpoint::open(path)?;
        let native = trainer::model::loader::checkpoint_dtype(&config, &ckpt);
        let suffix = trainer::quant::bnb_format::QUANT_STATE_SUFFIX;
        let stored_nf4 = ckpt.tensors().any(|(n, _)| n.ends_with(suffix));
        // The disk width of the float tensors (the largest ones are the embedding and the linears).
        let stored = ckpt
            .tensors()
            .filter(|(_, i)| !matches!(i.dtype, trainer::model::checkpoint::DiskDType::U8))
            .map(|(_, i)| i.dtype.size() as u64)
            .max()
            .unwrap_or(4);
        Ok(Facts {
            config,
            native,
            source: WeightSource::Safetensors { stored_bytes_per_param: stored },
            stored_nf4,
            gguf: false,
        })
    }

    fn plan(&self, dtype: DType, nf4: Option<Nf4Options>) -> WeightPlan {
        WeightPlan { dtype, nf4, source: self.source }
    }
}

impl LoadArgs {
    /// The NF4 options of `--quantize nf4`: training's (`--double-quant`, the linears `--keep-unquantized` keeps
    /// dense, every other decoder linear quantized).
    pub fn nf4(&self) -> Result<Option<Nf4Options>> {
        let keep_dense = keep_dense_modules(&self.keep_unquantized)?;
        if self.quantize.is_none() && !keep_dense.is_empty() {
            bail!("--keep-unquantized needs --quantize nf4");
        }
        Ok(self.quantize.map(|Quantize::Nf4| Nf4Options { double_quant: self.double_quant, keep_dense }))
    }

    /// The dtype to load in: `--dtype`, else the checkpoint's own.
    fn dtype(&self, native: DType) -> Result<DType> {
        self.dtype.as_deref().map_or(Ok(native), parse_dtype)
    }

    /// The device of `--device`; fails (naming the flag) when this build does not support it.
    pub fn device(&self) -> Result<Device> {
        resolve_device(self.device)
    }
}

impl ModelArgs {
    /// Checks that the command fits in memory (unless `--no-memory-check`), then loads the model (and its
    /// tokenizer when `need_tokenizer` or when present) and applies `--adapter`.
    pub fn load(&self, need_tokenizer: bool, demand: &Demand) -> Result<Loaded> {
        let dir = &self.model;
        let device = self.load.device()?;
        let facts = Facts::read(dir)?;
        let dtype = self.load.dtype(facts.native)?;
        // The frozen products at the precision training used for this dtype (bf16 operands for 16-bit
        // models), so that answers match the run's sample generations.
        trainer::kernels::set_matmul_precision(trainer::kernels::MatmulPrecision::for_model_dtype(dtype));
        let nf4 = self.load.nf4()?;
        if facts.gguf && nf4.is_some() {
            bail!(
                "{}: --quantize nf4 needs a Hugging Face model directory (safetensors), not a GGUF file",
                dir.display()
            );
        }
        let mut adapters: Vec<PathBuf> = self.adapter.iter().map(PathBuf::from).collect();
        adapters.extend(demand.extra_adapters.iter().cloned());
        let context = self.check_memory(&facts, dtype, nf4.clone(), &demand.context, adapter_bytes(&adapters))?;
        if facts.gguf {
            let g = trainer::model::gguf::load_gguf(dir, dtype, &device)?;
            if need_tokenizer && g.tokenizer.is_none() {
                bail!("{}: the GGUF file has no tokenizer.huggingface.json; pass token ids instead", dir.display());
            }
            let mut model = g.model;
            self.apply_adapters(&mut model)?;
            return Ok(Loaded { model, tokenizer: g.tokenizer, context });
        }
        let config = &facts.config;
        let tokenizer = if need_tokenizer || dir.join("tokenizer.json").exists() {
            Some(ModelTokenizer::load(dir, config)?)
        } else {
            None
        };
        let opts = LoadOptions { dtype, device, nf4, ..LoadOptions::default() };
        let mut loaded = load_model(dir, &opts)?;
        self.apply_adapters(&mut loaded.model)?;
        Ok(Loaded { model: loaded.model, tokenizer, context })
    }

    /// Compares the estimate with the memory available and returns the context to use; fails with what
    /// would fit when nothing does.
    fn check_memory(
        &self,
        facts: &Facts,
        dtype: DType,
        nf4: Option<Nf4Options>,
        need: &ContextNeed,
        adapter_bytes: u64,
    ) -> Result<usize> {
        let c = &facts.config;
        let max_context = c.max_position_embeddings;
        // A checkpoint stored in NF4 is held in NF4 whatever the flags (bitsandbytes' usual double quantization).
        let nf4 = nf4.or_else(|| facts.stored_nf4.then(Nf4Options::qlora));
        // The contexts that may be chosen (per sequence), and the sequences holding a KV cache at once.
        let (first, last, sequences) = match *need {
            ContextNeed::Fixed { context, .. } => (context.min(max_context), context.min(max_context), 1),
            ContextNeed::AsMuchAsFits { min } => (min.min(max_context), max_context, 1),
            ContextNeed::Batch { min, sequences } => (min.min(max_context), max_context, sequences.max(1)),
        };
        let workload = |context: usize, sequences: usize| match *need {
            ContextNeed::Fixed { context, prefill, logit_rows } => {
                Workload { context_tokens: context, prefill_tokens: prefill, logit_rows, sequences, adapter_bytes }
            }
            // Each prompt is prefilled alone (up to the whole context); a decode step has one row per sequence.
            ContextNeed::AsMuchAsFits { .. } | ContextNeed::Batch { .. } => Workload {
                context_tokens: context,
                prefill_tokens: context,
                logit_rows: sequences,
                sequences,
                adapter_bytes,
            },
        };
        if self.load.no_memory_check {
            return Ok(last);
        }
        let Some(available) = trainer::system::memory_available_to_process() else {
            return Ok(last);
        };
        let estimate = |plan: &WeightPlan, context: usize, sequences: usize| {
            estimate_inference(c, plan, &workload(context, sequences))
        };
        let batch = |n: usize| format!("--max-batch-size {n}");
        let plan = facts.plan(dtype, nf4.clone());
        if let Some(context) = largest_fitting_context(first, last, available.bytes, |n| estimate(&plan, n, sequences))
        {
            if context < last {
                let full = estimate(&plan, last, sequences);
                let (per, each) = if sequences > 1 {
                    (format!(" per sequence, for {sequences} sequences at once ({})", batch(sequences)), " in each")
                } else {
                    (String::new(), "")
                };
                eprintln!(
                    "note: memory, not the model, limits the context to {context} of the model's {last} \
                     tokens{per}: the full context{each} needs {} ({}), {} is available ({})",
                    format_bytes(full.total()),
                    full.describe(),
                    format_bytes(available.bytes),
                    available.limited_by.describe()
                );
            }
            return Ok(context);
        }
        let needed = estimate(&plan, first, sequences);
        // The flags that shrink the model, from the one that costs least quality.
        let mut options: Vec<(&str, WeightPlan)> = Vec::new();
        if dtype == DType::F32 {
            options.push(("--dtype bf16", facts.plan(DType::BF16, nf4.clone())));
        }
        if nf4.is_none() && !facts.gguf {
            let q = Some(Nf4Options { double_quant: self.load.double_quant, keep_dense: Vec::new() });
            options.push(("--quantize nf4", facts.plan(dtype, q.clone())));
            if dtype == DType::F32 {
                options.push(("--dtype bf16 --quantize nf4", facts.plan(DType::BF16, q)));
            }
        }
        let fits = |p: &WeightPlan, n: usize| estimate(p, first, n).total() <= available.bytes;
        // The largest batch below the requested one that fits with `p`.
        let smaller_batch = |p: &WeightPlan| {
            (sequences > 1)
                .then(|| largest_fitting_context(1, sequences - 1, available.bytes, |n| estimate(p, first, n)))
                .flatten()
        };
        let fitting = |flags: &str, p: &WeightPlan, n: usize| {
            format!(
                "with {flags} it would need {}, which fits: pass {flags}",
                format_bytes(estimate(p, first, n).total())
            )
        };
        let mut advice: Vec<String> = Vec::new();
        if let Some((flags, p)) = options.iter().find(|(_, p)| fits(p, sequences)) {
            advice.push(fitting(flags, p, sequences));
        }
        if let Some(n) = smaller_batch(&plan) {
            advice.push(fitting(&batch(n), &plan, n));
        }
        if advice.is_empty() {
            let with_batch = options.iter().find_map(|(flags, p)| smaller_batch(p).map(|n| (flags, p, n)));
            let smallest = if sequences > 1 { format!(" and {}", batch(1)) } else { String::new() };
            advice.push(match (with_batch, options.last()) {
                (Some((flags, p, n)), _) => fitting(&format!("{flags} {}", batch(n)), p, n),
                (None, Some((flags, p))) => format!(
                    "it does not fit this machine: even with {flags}{smallest} it would need {}",
                    format_bytes(estimate(p, first, 1).total())
                ),
                (None, None) if sequences > 1 => format!(
                    "it does not fit this machine: even with {} it would need {}",
                    batch(1),
                    format_bytes(estimate(&plan, first, 1).total())
                ),
                (None, None) => "it does not fit this machine".to_string(),
            });
        }
        let what = match need {
            ContextNeed::Fixed { .. } => format!("for a context of {first} tokens"),
            ContextNeed::AsMuchAsFits { .. } => format!("even for the smallest context ({first} tokens)"),
            ContextNeed::Batch { .. } => format!(
                "even for the smallest context ({first} tokens) in each of {sequences} sequences at once ({})",
                batch(sequences)
            ),
        };
        bail!(
            "not enough memory to run {} in {}{}: needed {} {what} ({}), available {} ({}); {}. \
             (--no-memory-check skips this check.)",
            self.model.display(),
            dtype_name(dtype),
            if nf4.is_some() { " with NF4 decoder weights" } else { "" },
            format_bytes(needed.total()),
            needed.describe(),
            format_bytes(available.bytes),
            available.limited_by.describe(),
            advice.join("; or "),
        )
    }

    /// Applies the `--adapter` directories (checked against the model before anything changes).
    fn apply_adapters(&self, model: &mut Model) -> Result<()> {
        let mut adapters = Vec::with_capacity(self.adapter.len());
        for arg in &self.adapter {
            let (dir, weight) = trainer::lora::peft::parse_adapter_arg(arg)?;
            let adapter = trainer::lora::peft::load_adapter(&dir, &model.config)
                .with_context(|| format!("--adapter {}", dir.display()))?;
            adapters.push((adapter, weight));
        }
        if !adapters.is_empty() {
            trainer::lora::peft::apply_adapters(model, &adapters)?;
        }
        Ok(())
    }
}

/// Parses `1,2,3` into token ids.
pub fn parse_ids(text: &str) -> Result<Vec<u32>> {
    text.split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().with_context(|| format!("--prompt-ids: `{s}` is not a token id")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_unquantized_takes_the_recipes_names() {
        let names = |list: &[&str]| keep_dense_modules(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            names(&["down", "attention", "q_proj", "lm_head"]).unwrap(),
            ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
        );
        assert_eq!(names(&["experts", "router"]).unwrap(), ["w1", "w2", "w3"]);
        assert!(names(&[]).unwrap().is_empty());
        let err = names(&["atention"]).unwrap_err().to_string();
        assert!(err.contains("unknown layer `atention`"), "{err}");
    }

    #[test]
    fn keep_unquantized_without_quantize_is_an_error() {
        let load = LoadArgs {
            dtype: None,
            quantize: None,
            double_quant: true,
            keep_unquantized: vec!["q".into()],
            device: DeviceChoice::Auto,
            no_memory_check: false,
        };
        assert!(load.nf4().is_err());
        let nf4 = LoadArgs { quantize: Some(Quantize::Nf4), double_quant: false, ..load }.nf4().unwrap();
        assert_eq!(nf4, Some(Nf4Options { double_quant: false, keep_dense: vec!["q_proj".into()] }));
    }
}
