//! `tramontane merge`: adapters merged into their base model, written as a Hugging Face model directory (and
//! optionally a GGUF file for llama.cpp / Ollama).

use std::path::PathBuf;

use adapters::merge::BaseWeights;
use anyhow::{bail, Context, Result};
use trainer::lora::peft::{from_adapters_error, load_adapter, model_facts, parse_adapter_arg, CheckpointWeights};
use trainer::model::loader::checkpoint_dtype;
use trainer::model::memory::{estimate_merge, format_bytes, MergePlan};
use trainer::model::{Checkpoint, ModelConfig};
use trainer::quant::Nf4Weight;

use trainer::device::DeviceChoice;

use super::model_args::{adapter_bytes, dtype_name, keep_dense_modules, parse_dtype, resolve_device, Quantize};

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
quantizes once, with finer blocks.

A dense base whose adapter was trained with QLoRA (`quantization.method = \"nf4\"` on a bf16/f32 checkpoint): pass \
--quantize nf4 to merge into the base's NF4-rounded weights, the ones the adapter was trained against, with the \
recipe's `quantization.double_quant` as --double-quant and its `quantization.keep_unquantized` as \
--keep-unquantized: only then are they rounded exactly as training rounded them. Without --quantize the update is \
added to the unrounded weights.

Before anything is written, the memory the merge holds at once (one output shard, one tensor's buffers, the \
adapters, and for --gguf its largest tensor) is compared with what this process can allocate; when it does not \
fit, the message says which --max-shard-size would.";

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
    /// Output dtype: f32, bf16 or f16 [default: the base's own: config.json's torch_dtype, else its tensors'].
    #[arg(long, value_name = "DTYPE")]
    dtype: Option<String>,
    /// Round the base's decoder linears (all of them but --keep-unquantized) through NF4 before adding the
    /// update, as QLoRA training quantized them (weights stored in NF4 are dequantized in any case).
    #[arg(long, value_name = "METHOD")]
    quantize: Option<Quantize>,
    /// With --quantize nf4: double quantization of the block scales, as training's `quantization.double_quant`.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    double_quant: bool,
    /// With --quantize nf4: decoder linears left unrounded, named as the recipe's
    /// `quantization.keep_unquantized` names them (q, k, v, o, gate, up, down, w1, w2, w3, attention, mlp,
    /// experts, all). It must match the recipe's `keep_unquantized` for the merge to use the weights the
    /// adapter was trained against.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',', requires = "quantize")]
    keep_unquantized: Vec<String>,
    /// Skip the memory check before merging.
    #[arg(long)]
    no_memory_check: bool,
    /// Device the sums W + w s B A are computed on: auto (the best this build supports: the CPU on this build),
    /// cpu, cuda or cuda:N (the N-th GPU; needs a build with --features cuda). Weights are read and written
    /// through host memory either way.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: DeviceChoice,
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
    let device = resolve_device(args.device)?;
    if args.out.exists() {
        bail!("{}: the output directory already exists; choose a new path", args.out.display());
    }
    let config = ModelConfig::from_path(&args.model)?;
    let base = CheckpointWeights::open(&args.model)?;
    let ckpt = Checkpoint::open(&args.model)?;
    let dtype_name = match &args.dtype {
        Some(d) => d.clone(),
        None => dtype_name(checkpoint_dtype(&config, &ckpt)).to_string(),
    };
    let out_dtype = parse_dtype(&dtype_name)?;
    let dtype = adapters::merge::output_dtype(out_dtype).map_err(from_adapters_error)?;
    let keep_dense = keep_dense_modules(&args.keep_unquantized)?;
    let gguf = args.gguf.as_deref().map(adapters::gguf::GgufType::parse).transpose().map_err(from_adapters_error)?;
    let max_shard_bytes = parse_size(&args.max_shard_size)?;
    if !args.no_memory_check {
        let dirs: Vec<PathBuf> = args.adapters.iter().map(PathBuf::from).collect();
        let stored = ckpt.tensors().map(|(_, i)| i.dtype.size() as u64).max().unwrap_or(4);
        let plan = MergePlan {
            out_bytes_per_param: out_dtype.size_in_bytes() as u64,
            max_shard_bytes: max_shard_bytes as u64,
            stored_bytes_per_param: stored,
            largest_tensor: (config.vocab_size.max(config.intermediate_size) * config.hidden_size) as u64,
            nf4_round_trip: args.quantize.is_some(),
            adapter_bytes: adapter_bytes(&dirs),
            gguf: gguf.is_some(),
        };
        check_merge_memory(&args, &config, &plan)?;
    }
    drop(ckpt);
    let mut adapters = Vec::with_capacity(args.adapters.len());
    for a in &args.adapters {
        let (dir, weight) = parse_adapter_arg(a)?;
        let adapter = load_adapter(&dir, &config).with_context(|| format!("adapter {}", dir.display()))?;
        adapters.push((adapter, weight));
    }
    let req = adapters::merge::MergeRequest {
        model_dir: args.model.clone(),
        facts: model_facts(&config),
        adapters,
        out: args.out.clone(),
        dtype,
        max_shard_bytes,
        gguf,
        device,
    };
    let report = match args.quantize {
        Some(Quantize::Nf4) => {
            let rounded = Nf4RoundTrip {
                base,
                double_quant: args.double_quant,
                keep_dense,
                expert_matrix: config.intermediate_size * config.hidden_size,
            };
            adapters::merge::merge(&rounded, &req)
        }
        None => adapters::merge::merge(&base, &req),
    }
    .map_err(from_adapters_error)?;
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
            let how = if args.quantize.is_some() { "NF4-rounded or dequantized" } else { "dequantized" };
            println!("merged into the {how} weights of {} NF4 base tensors", report.dequantized);
        }
        if let Some(g) = &report.gguf {
            println!("wrote {}", g.display());
        }
    }
    Ok(())
}

/// Fails with the shard size that would fit when the merge needs more memory than this process can allocate.
fn check_merge_memory(args: &MergeArgs, config: &ModelConfig, plan: &MergePlan) -> Result<()> {
    let Some(available) = trainer::system::memory_available_to_process() else {
        return Ok(());
    };
    let needed = estimate_merge(config, plan);
    if needed.total() <= available.bytes {
        return Ok(());
    }
    // The shard is the part a flag controls: the largest that fits, in whole MB (at least one tensor).
    let without_shard = estimate_merge(config, &MergePlan { max_shard_bytes: 0, ..*plan });
    let room = available.bytes.saturating_sub(without_shard.total());
    let advice = if room >= 1_000_000 && without_shard.total() < available.bytes {
        format!("with --max-shard-size {}MB it fits", room / 1_000_000)
    } else {
        "it does not fit this machine even with small shards".to_string()
    };
    bail!(
        "not enough memory to merge into {}: needed {} ({}), available {} ({}); {advice}. \
         (--no-memory-check skips this check.)",
        args.model.display(),
        format_bytes(needed.total()),
        needed.describe(),
        format_bytes(available.bytes),
        available.limited_by.describe(),
    )
}

/// The base as QLoRA training saw it: every decoder linear (attention, MLP, each expert, each expert's slice of
/// a fused tensor) but those `keep_dense` names quantized to NF4 and dequantized again, as the loader quantizes
/// it for training; weights stored in NF4 are dequantized as they are.
struct Nf4RoundTrip {
    base: CheckpointWeights,
    double_quant: bool,
    /// Decoder linears left as they are, by module name (`q_proj`, ..., `w3`), as [`keep_dense_modules`] gives.
    keep_dense: Vec<String>,
    /// Elements of one expert's w1 (or w3) in a fused `mlp.experts.gate_up_proj` `[E, 2I, H]`: `I * H`.
    expert_matrix: usize,
}

/// Module names of the decoder linears (what training quantizes): the modules LoRA can target.
const DECODER_LINEARS: [&str; 10] = adapters::naming::TARGETABLE;

/// Suffix of the fused expert tensor holding each expert's w1 then w3 rows (transformers 5).
const FUSED_GATE_UP: &str = ".mlp.experts.gate_up_proj";
/// Suffix of the fused expert tensor holding each expert's w2.
const FUSED_DOWN: &str = ".mlp.experts.down_proj";

impl Nf4RoundTrip {
    /// The decoder linear module the weight `name` is (`w2` for a fused down projection; a fused gate/up
    /// tensor is `w1` and `w3` by turns, see [`Nf4RoundTrip::rounded`]), or `None` for any other weight.
    fn decoder_module(name: &str) -> Option<&'static str> {
        if !name.starts_with("model.layers.") {
            return None;
        }
        if name.ends_with(FUSED_GATE_UP) {
            return Some("w1");
        }
        if name.ends_with(FUSED_DOWN) {
            return Some("w2");
        }
        let module = name.strip_suffix(".weight").and_then(|n| n.rsplit('.').next())?;
        DECODER_LINEARS.iter().find(|&&m| m == module).copied()
    }

    /// Whether the weight `name` is a decoder linear or a fused expert tensor (read by slices).
    #[cfg(test)]
    fn is_decoder_linear(name: &str) -> bool {
        Self::decoder_module(name).is_some()
    }

    /// Whether training quantized the module (a decoder linear not kept dense).
    fn quantizes(&self, module: &str) -> bool {
        !self.keep_dense.iter().any(|k| k == module)
    }

    fn round_trip(&self, values: Vec<f32>) -> std::result::Result<Vec<f32>, String> {
        let n = values.len();
        Ok(Nf4Weight::quantize(&values, &[n], self.double_quant).map_err(|e| e.to_string())?.dequantize())
    }

    /// `values`, elements `first..` of the dense weight `name`, as training saw them: rounded through NF4 where
    /// it quantized them. A fused gate/up tensor is rounded one expert matrix at a time (as the loader
    /// quantizes each expert's slice), w1 and w3 by turns.
    fn rounded(&self, name: &str, first: usize, values: Vec<f32>) -> std::result::Result<Vec<f32>, String> {
        let Some(module) = Self::decoder_module(name) else { return Ok(values) };
        if !name.ends_with(FUSED_GATE_UP) || self.expert_matrix == 0 {
            return if self.quantizes(module) { self.round_trip(values) } else { Ok(values) };
        }
        let m = self.expert_matrix;
        let mut out = Vec::with_capacity(values.len());
        let (mut pos, mut rest) = (first, values.as_slice());
        while !rest.is_empty() {
            let take = (m - pos % m).min(rest.len());
            let (chunk, tail) = rest.split_at(take);
            let module = if (pos / m).is_multiple_of(2) { "w1" } else { "w3" };
            if self.quantizes(module) {
                out.extend(self.round_trip(chunk.to_vec())?);
            } else {
                out.extend_from_slice(chunk);
            }
            pos += take;
            rest = tail;
        }
        Ok(out)
    }
}

impl BaseWeights for Nf4RoundTrip {
    fn contains(&self, name: &str) -> bool {
        self.base.contains(name)
    }

    fn read_f32(&self, name: &str, shape: &[usize]) -> std::result::Result<Vec<f32>, String> {
        let values = self.base.read_f32(name, shape)?;
        if self.base.is_quantized(name) {
            return Ok(values);
        }
        self.rounded(name, 0, values)
    }

    fn read_range_f32(&self, name: &str, first: usize, count: usize) -> std::result::Result<Vec<f32>, String> {
        let values = self.base.read_range_f32(name, first, count)?;
        if self.base.is_quantized(name) {
            return Ok(values);
        }
        self.rounded(name, first, values)
    }

    fn is_quantized(&self, name: &str) -> bool {
        let rounded = match Self::decoder_module(name) {
            Some(_) if name.ends_with(FUSED_GATE_UP) => self.quantizes("w1") || self.quantizes("w3"),
            Some(module) => self.quantizes(module),
            None => false,
        };
        self.base.is_quantized(name) || rounded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decoder_linears_are_what_training_quantizes() {
        for name in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
            "model.layers.1.block_sparse_moe.experts.2.w3.weight",
            "model.layers.1.mlp.experts.gate_up_proj",
        ] {
            assert!(Nf4RoundTrip::is_decoder_linear(name), "{name}");
        }
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.1.block_sparse_moe.gate.weight",
            "model.layers.1.mlp.gate.weight",
            "model.norm.weight",
        ] {
            assert!(!Nf4RoundTrip::is_decoder_linear(name), "{name}");
        }
    }

    #[test]
    fn kept_linears_are_not_rounded_and_a_fused_tensor_is_rounded_expert_matrix_by_matrix() {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-mistral");
        let keep = ["w3".to_string(), "attention".to_string()];
        let rt = Nf4RoundTrip {
            base: CheckpointWeights::open(&model).unwrap(),
            double_quant: true,
            keep_dense: keep_dense_modules(&keep).unwrap(),
            expert_matrix: 128,
        };
        let values: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let round = |v: &[f32]| rt.round_trip(v.to_vec()).unwrap();
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert_eq!(rt.rounded(q, 0, values.clone()).unwrap(), values);
        let gate = "model.layers.0.mlp.gate_proj.weight";
        assert_eq!(rt.rounded(gate, 0, values.clone()).unwrap(), round(&values));
        assert_ne!(round(&values), values);
        // [w1 of expert 0, w3 of expert 0, w1 of expert 1, w3 of expert 1], 128 values each: w3 is kept.
        let fused = "model.layers.0.mlp.experts.gate_up_proj";
        let whole = rt.rounded(fused, 0, values.clone()).unwrap();
        for (k, chunk) in values.chunks(128).enumerate() {
            let expected = if k % 2 == 0 { round(chunk) } else { chunk.to_vec() };
            assert_eq!(whole[k * 128..][..128], expected[..], "matrix {k}");
        }
        // A range read (one expert's matrix, as the merge reads them) is rounded as that matrix.
        assert_eq!(rt.rounded(fused, 128, values[..128].to_vec()).unwrap(), values[..128]);
        assert_eq!(rt.rounded(fused, 256, values[..128].to_vec()).unwrap(), round(&values[..128]));
        assert!(rt.is_quantized(fused) && rt.is_quantized(gate));
        assert!(!rt.is_quantized(q) && !rt.is_quantized("model.layers.0.mlp.experts.3.w3.weight"));
    }
}
