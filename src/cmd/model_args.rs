//! Arguments and loading shared by the commands that run a model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use trainer::model::{load_model, LoadOptions, Model, ModelConfig, ModelTokenizer};

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
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    pub dtype: String,
}

/// A loaded model with its tokenizer (when the directory has one).
pub struct Loaded {
    /// The model.
    pub model: Model,
    /// Its tokenizer, if `tokenizer.json` exists.
    pub tokenizer: Option<ModelTokenizer>,
}

/// Parses a dtype name.
pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("unknown dtype `{other}`: expected f32, bf16 or f16"),
    })
}

impl ModelArgs {
    /// Loads the model (and its tokenizer when `need_tokenizer` or when present).
    pub fn load(&self, need_tokenizer: bool) -> Result<Loaded> {
        let dtype = parse_dtype(&self.dtype)?;
        let dir = &self.model;
        if trainer::model::gguf::is_gguf(dir) {
            let g = trainer::model::gguf::load_gguf(dir, dtype, &candle_core::Device::Cpu)?;
            if need_tokenizer && g.tokenizer.is_none() {
                bail!("{}: the GGUF file has no tokenizer.huggingface.json; pass token ids instead", dir.display());
            }
            let mut model = g.model;
            self.apply_adapters(&mut model)?;
            return Ok(Loaded { model, tokenizer: g.tokenizer });
        }
        if !dir.is_dir() {
            bail!("{}: not a model directory", dir.display());
        }
        let config = ModelConfig::from_path(dir)?;
        let tokenizer = if need_tokenizer || dir.join("tokenizer.json").exists() {
            Some(ModelTokenizer::load(dir, &config)?)
        } else {
            None
        };
        let opts = LoadOptions { dtype, ..LoadOptions::default() };
        let mut loaded = load_model(dir, &opts)?;
        self.apply_adapters(&mut loaded.model)?;
        Ok(Loaded { model: loaded.model, tokenizer })
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
