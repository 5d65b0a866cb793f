//! `tramontane inspect`: what a model directory holds, read from config.json and the safetensors
//! headers only (no weights are loaded).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use trainer::model::{Checkpoint, ExpertLayout, ModelConfig, ModelTokenizer, ParameterCounts};

/// Arguments of `tramontane inspect`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  tramontane inspect ~/models/Mixtral-8x7B-v0.1 --json")]
pub struct InspectArgs {
    /// Hugging Face model directory, or a PEFT adapter directory (adapter_config.json).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// For an adapter: the base model directory to check it against [default: its base_model_name_or_path].
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn gib(bytes: f64) -> String {
    if bytes >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", bytes / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.2} MiB", bytes / (1024.0 * 1024.0))
    }
}

/// Runs `tramontane inspect`.
pub fn run(args: InspectArgs) -> Result<()> {
    if args.dir.join("adapter_config.json").is_file() {
        let (json, lines) = trainer::lora::peft::describe_adapter(&args.dir, args.model.as_deref())?;
        if args.json {
            println!("{json}");
        } else {
            lines.iter().for_each(|l| println!("{l}"));
        }
        return Ok(());
    }
    let config = ModelConfig::from_path(&args.dir)?;
    let ckpt = Checkpoint::open(&args.dir)?;
    let counts = ParameterCounts::from_config(&config);
    let mut on_disk_params: u64 = 0;
    let mut dtypes: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, info) in ckpt.tensors() {
        on_disk_params += info.numel() as u64;
        *dtypes.entry(info.dtype.name()).or_default() += info.numel() as u64;
    }
    let layout = match config.moe {
        None => "dense".to_string(),
        Some(_) => match ExpertLayout::detect(&ckpt, 0)? {
            ExpertLayout::PerExpert => "per-expert (hub: block_sparse_moe.experts.E.w1/w2/w3)".to_string(),
            ExpertLayout::Fused => "fused (transformers 5: mlp.experts.gate_up_proj/down_proj)".to_string(),
        },
    };
    let tokenizer = ModelTokenizer::load(&args.dir, &config).ok();
    let c = &config;
    if args.json {
        let value = serde_json::json!({
            "architecture": c.architecture.model_type(),
            "layers": c.num_layers, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "heads": c.num_heads, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "rope_theta": c.rope_theta, "sliding_window": c.sliding_window,
            "experts": c.moe.as_ref().map(|m| m.num_experts), "experts_per_token": c.moe.as_ref().map(|m| m.experts_per_token),
            "parameters": counts, "parameters_on_disk": on_disk_params,
            "dtypes_on_disk": dtypes, "declared_dtype": c.declared_dtype,
            "files": ckpt.files.len(), "expert_layout": layout,
            "tokenizer": tokenizer.as_ref().map(|t| serde_json::json!({
                "vocab_size": t.vocab_size(), "bos_id": t.bos_id, "eos_ids": t.eos_ids,
                "prompt_format": t.prompt_format().map(|f| f.name().to_string()).unwrap_or_else(|e| e)})),
            "memory_bytes": {"f32": counts.bytes_at(4.0), "bf16": counts.bytes_at(2.0), "nf4": counts.bytes_nf4()},
        });
        println!("{value}");
        return Ok(());
    }
    println!("model        {}", args.dir.display());
    println!(
        "architecture {} ({} layers, hidden {}, intermediate {})",
        c.architecture.model_type(),
        c.num_layers,
        c.hidden_size,
        c.intermediate_size
    );
    println!(
        "attention    {} heads, {} kv heads, head_dim {}, rope theta {}, sliding window {}",
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.rope_theta,
        c.sliding_window.map_or("none".into(), |w| w.to_string())
    );
    if let Some(m) = &c.moe {
        println!(
            "experts      {} per layer, top-{} routing, router aux coef {}",
            m.num_experts, m.experts_per_token, m.router_aux_loss_coef
        );
    }
    println!(
        "parameters   {} total, {} active per token, {} in decoder linears",
        counts.total, counts.active_per_token, counts.decoder_linear
    );
    if on_disk_params != counts.total {
        println!("             ({on_disk_params} stored on disk)");
    }
    let dt: Vec<String> = dtypes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    println!(
        "on disk      {} file(s), {}; declared dtype {}",
        ckpt.files.len(),
        dt.join(", "),
        c.declared_dtype.as_deref().unwrap_or("-")
    );
    println!("layout       {layout}");
    match &tokenizer {
        Some(t) => println!(
            "tokenizer    {} tokens, bos {}, eos {}, prompt format {}",
            t.vocab_size(),
            t.bos_id.map_or("none".into(), |id| id.to_string()),
            if t.eos_ids.is_empty() {
                "none".to_string()
            } else {
                t.eos_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            },
            t.prompt_format().map(|f| f.name().to_string()).unwrap_or_else(|e| e)
        ),
        None => println!("tokenizer    none usable (tokenizer.json missing or invalid)"),
    }
    println!(
        "memory       f32 {}, bf16 {}, NF4 (double quant, rest bf16) {}",
        gib(counts.bytes_at(4.0)),
        gib(counts.bytes_at(2.0)),
        gib(counts.bytes_nf4())
    );
    Ok(())
}
