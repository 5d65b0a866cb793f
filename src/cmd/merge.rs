//! `tramontane merge`: adapters merged into their base model, written as a Hugging Face model directory (and
//! optionally a GGUF file for llama.cpp / Ollama).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use trainer::lora::peft::{from_adapters_error, load_adapter, model_facts, parse_adapter_arg, CheckpointWeights};
use trainer::model::ModelConfig;

const LONG_ABOUT: &str = "Merge one or more LoRA adapters into their base model and write a complete Hugging Face \
model directory (sharded safetensors with an index, config.json, tokenizer files, generation_config.json) in the \
hub layout, which transformers and vLLM load as-is. With --gguf, also write a single GGUF file (llama.cpp's \
`llama` architecture, which covers Mistral and Mixtral) that llama.cpp, Ollama and `tramontane generate` run.

The merged weight is W + sum_i weight_i * scale_i * B_i A_i, computed in f32 and stored in --dtype. Weights are \
read and written one tensor at a time; memory stays near one output shard.

QLoRA and quantized bases: a base stored in NF4 (bitsandbytes) is merged into its *dequantized* weights, exactly \
the weights the adapter was trained against, and written in --dtype (bf16 by default for such a base). Do not \
quantize the merged model back to NF4, and do not merge into a base that was re-quantized after merging: the LoRA \
update is small next to the 4-bit rounding steps, so re-quantizing rounds much of it away and silently loses \
what fine-tuning gained. To serve in 4 bits, keep the NF4 base and load the adapter unmerged \
(`tramontane generate --model BASE --adapter DIR`), or export GGUF q4_k from the merged bf16/f16 weights, which \
quantizes once, with finer blocks.";

/// Arguments of `tramontane merge`.
#[derive(clap::Args)]
#[command(long_about = LONG_ABOUT, after_help = "Examples:\n  tramontane merge --model ~/models/Mistral-7B-v0.3 \
--adapter runs/demo/adapter --out runs/demo/merged --dtype bf16\n  tramontane merge --model BASE --adapter a:0.7 \
--adapter b:0.3 --out merged --gguf q8_0")]
pub struct MergeArgs {
    /// Base model directory (Hugging Face layout; f32/bf16/f16 or bitsandbytes NF4 weights).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// PEFT adapter directory, optionally with a weight (`DIR:0.5`); repeat to merge several.
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]", required = true)]
    adapters: Vec<String>,
    /// Output directory; must not exist.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Output dtype: f32, bf16 or f16 [default: the base's declared dtype, else f32].
    #[arg(long, value_name = "DTYPE")]
    dtype: Option<String>,
    /// Also write `OUT/<name>-<type>.gguf`: f16, q8_0 or q4_k (rows not a multiple of 256 use q8_0).
    #[arg(long, value_name = "TYPE")]
    gguf: Option<String>,
    /// Largest safetensors shard, e.g. 5GB, 500MB, 300KB.
    #[arg(long, default_value = "5GB", value_name = "SIZE")]
    max_shard_size: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [
        ("GIB", 1usize << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1000),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1));
    let n: f64 = num.parse().with_context(|| format!("--max-shard-size: `{s}` is not a size like 5GB"))?;
    if n.is_nan() || n <= 0.0 {
        bail!("--max-shard-size must be positive");
    }
    Ok((n * mult as f64) as usize)
}

/// Runs `tramontane merge`.
pub fn run(args: MergeArgs) -> Result<()> {
    if args.out.exists() {
        bail!("{}: the output directory already exists; choose a new path", args.out.display());
    }
    let config = ModelConfig::from_path(&args.model)?;
    let mut adapters = Vec::with_capacity(args.adapters.len());
    for a in &args.adapters {
        let (dir, weight) = parse_adapter_arg(a)?;
        let adapter = load_adapter(&dir, &config).with_context(|| format!("adapter {}", dir.display()))?;
        adapters.push((adapter, weight));
    }
    let base = CheckpointWeights::open(&args.model)?;
    let dtype_name = match &args.dtype {
        Some(d) => d.clone(),
        None => match config.declared_dtype.as_deref() {
            Some("bfloat16") => "bf16".into(),
            Some("float16") => "f16".into(),
            _ => "f32".into(),
        },
    };
    let dtype = adapters::merge::parse_dtype(&dtype_name).map_err(from_adapters_error)?;
    let gguf = args.gguf.as_deref().map(adapters::gguf::GgufType::parse).transpose().map_err(from_adapters_error)?;
    let req = adapters::merge::MergeRequest {
        model_dir: args.model.clone(),
        facts: model_facts(&config),
        adapters,
        out: args.out.clone(),
        dtype,
        max_shard_bytes: parse_size(&args.max_shard_size)?,
        gguf,
    };
    let report = adapters::merge::merge(&base, &req).map_err(from_adapters_error)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "out": args.out, "dtype": dtype_name, "shards": report.shards, "tensors": report.tensors,
                "merged": report.merged, "dequantized_nf4": report.dequantized, "bytes": report.total_bytes,
                "gguf": report.gguf,
            })
        );
    } else {
        println!(
            "wrote {} ({} tensors, {} updated by the adapter(s), {} shard(s), {dtype_name})",
            args.out.display(),
            report.tensors,
            report.merged,
            report.shards
        );
        if report.dequantized > 0 {
            println!("merged into the dequantized weights of {} NF4 base tensors", report.dequantized);
        }
        if let Some(g) = &report.gguf {
            println!("wrote {}", g.display());
        }
    }
    Ok(())
}
