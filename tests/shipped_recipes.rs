//! Every recipe in `recipes/` runs end to end, for two optimizer steps, with every setting as shipped
//! (dtype, quantization, LoRA targets and router, matmul precision, checkpointing and its budget, packing,
//! sequence length, batch and accumulation, evaluation and its sample generations) except three overrides:
//! the model is a tiny random one with the SAME family quirks as the real model the recipe names (vocabulary
//! size, head_dim vs hidden / heads, expert count and top-k, sliding window, bf16 on disk, the v1 or v3
//! tokenizer), the data is a bundled sample, and the run directory is a temporary one. A recipe added
//! without its family's quirks here fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use trainer::model::synthetic::{write_random_checkpoint, StoredDtype};
use trainer::model::ModelConfig;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The quirks of the family a recipe is for, at tiny width.
struct Family {
    model_type: &'static str,
    vocab: usize,
    /// `Some` when the real model's head_dim is not hidden / heads (scaled down the same way).
    head_dim: Option<usize>,
    experts: Option<(usize, usize)>,
    sliding_window: Option<usize>,
    max_positions: usize,
    tokenizer: &'static str,
}

/// The real model behind each shipped recipe (its config.json and tokenizer), at hidden 64, 4 heads.
fn family(recipe: &str) -> Option<Family> {
    let mistral_v03 = Family {
        model_type: "mistral",
        vocab: 32768,
        head_dim: None,
        experts: None,
        sliding_window: None,
        max_positions: 32768,
        tokenizer: "mistral-v3",
    };
    Some(match recipe {
        // Mistral-7B-Instruct-v0.3 and Mathstral-7B-v0.1 (the same architecture and tokenizer).
        "mistral-7b-qlora" | "mathstral-7b-qlora" => mistral_v03,
        // Codestral-22B-v0.1: hidden 6144, 48 heads of 128 (= hidden / heads), v3 tokenizer.
        "codestral-22b-qlora" => mistral_v03,
        // Mistral-Nemo-Instruct-2407: 131072 tokens, head_dim 128 != 5120 / 32 (here 32 != 64 / 4). Its
        // tekken tokenizer is converted to a tokenizer.json; a v3 tokenizer stands in for it (the prompt
        // format the recipe sets is v3).
        "mistral-nemo-12b-qlora" => Family { vocab: 131072, head_dim: Some(32), max_positions: 131072, ..mistral_v03 },
        // Mixtral-8x7B-Instruct-v0.1: 8 experts top-2, 32000 tokens, v1 tokenizer.
        "mixtral-8x7b-qlora" => Family {
            model_type: "mixtral",
            vocab: 32000,
            experts: Some((8, 2)),
            tokenizer: "mistral-v1",
            ..mistral_v03
        },
        // Mixtral-8x22B-Instruct-v0.1: 8 experts top-2, 32768 tokens, v3 tokenizer, 65536 positions.
        "mixtral-8x22b-qlora" => {
            Family { model_type: "mixtral", experts: Some((8, 2)), max_positions: 65536, ..mistral_v03 }
        }
        _ => return None,
    })
}

/// Writes the tiny model of `family` (bf16 on disk, as the real checkpoints ship) into `dir`.
fn tiny_model(family: &Family, dir: &Path) {
    let mut j = serde_json::json!({
        "model_type": family.model_type, "vocab_size": family.vocab, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e6,
        "rms_norm_eps": 1e-5, "max_position_embeddings": family.max_positions, "bos_token_id": 1,
        "eos_token_id": 2, "sliding_window": family.sliding_window,
    });
    if let Some(d) = family.head_dim {
        j["head_dim"] = d.into();
    }
    if let Some((e, k)) = family.experts {
        j["num_local_experts"] = e.into();
        j["num_experts_per_tok"] = k.into();
        j["router_aux_loss_coef"] = 0.02.into();
    }
    let config = ModelConfig::from_json_str(&j.to_string()).expect("valid config");
    write_random_checkpoint(dir, &config, 7, 0.05, StoredDtype::Bf16, usize::MAX).expect("write model");
    let tokenizer = repo(&format!("tests/fixtures/tokenizers/{}.tokenizer.json", family.tokenizer));
    std::fs::copy(tokenizer, dir.join("tokenizer.json")).expect("copy tokenizer");
}

#[test]
fn every_shipped_recipe_trains_as_shipped_on_a_tiny_model_of_its_family() {
    let mut recipes: Vec<PathBuf> = std::fs::read_dir(repo("recipes"))
        .expect("recipes/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    recipes.sort();
    assert!(recipes.len() >= 7, "recipes/ has {} recipes", recipes.len());
    for recipe in recipes {
        let name = recipe.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let tmp = tempfile::tempdir().expect("temp dir");
        let model = tmp.path().join("model");
        // Two steps: the recipe's duration (`epochs = N` or `max_steps = N`) becomes `max_steps = 2`, in a copy
        // (a `--set` cannot remove `epochs`); everything else in the copy is the shipped text.
        let text = std::fs::read_to_string(&recipe).expect("recipe");
        let text: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("epochs =") || l.starts_with("max_steps =") {
                    "max_steps = 2".into()
                } else {
                    l.into()
                }
            })
            .collect();
        assert!(text.iter().any(|l| l == "max_steps = 2"), "recipes/{name}.toml sets no duration");
        let copy = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&copy, text.join("\n")).expect("write the copy");
        let mut sets = vec![
            format!("output.dir={}", tmp.path().join("run").display()),
            format!("data.files=[\"{}\"]", repo(sample_data(&name)).display()),
        ];
        if name.starts_with("quickstart") {
            // The bundled model, generated into the temporary directory.
            sets.push(format!("model.path={}", model.display()));
        } else {
            let family = family(&name).unwrap_or_else(|| panic!("recipes/{name}.toml: add its family's quirks here"));
            tiny_model(&family, &model);
            sets.push(format!("model.path={}", model.display()));
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tramontane"));
        cmd.arg("train").arg(&copy);
        for s in &sets {
            cmd.arg("--set").arg(s);
        }
        let out = cmd.output().expect("binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "recipes/{name}.toml failed:\n{stderr}");
        let run = tmp.path().join("run");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("adapter/adapter_config.json")).expect("adapter"))
                .expect("adapter_config.json");
        assert!(config["r"].as_u64().is_some(), "recipes/{name}.toml: {config}");
        let losses: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .expect("metrics.jsonl")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "train")
            .filter_map(|v| v["loss"].as_f64())
            .collect();
        assert!(!losses.is_empty() && losses.iter().all(|l| l.is_finite()), "recipes/{name}.toml: losses {losses:?}");
    }
}

/// The bundled data a shipped recipe trains on in this test: preference pairs for the DPO quickstart, chats
/// for every other.
fn sample_data(recipe: &str) -> &'static str {
    if recipe == "quickstart-dpo" {
        "datasets/samples/pirate-preference.parquet"
    } else {
        "datasets/samples/pirate-chat.parquet"
    }
}
