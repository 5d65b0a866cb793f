//! PEFT's `adapter_config.json`: reading (unknown keys tolerated, math-changing features refused by name),
//! PEFT's module-targeting and pattern rules, and writing the file PEFT 0.21 reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ordered::OrderedMap;
use crate::{Error, Result};

/// `target_modules` / `exclude_modules`: a list of name suffixes, or one regular expression (full match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    /// A regular expression matched against the whole module name (`"all-linear"` is special).
    Regex(String),
    /// Module names or name suffixes (after a dot).
    List(Vec<String>),
}

/// `layers_to_transform`: one index or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSelector {
    /// A single layer.
    One(usize),
    /// Several layers.
    Many(Vec<usize>),
}

impl LayerSelector {
    /// The layers as a list.
    pub fn to_vec(&self) -> Vec<usize> {
        match self {
            LayerSelector::One(l) => vec![*l],
            LayerSelector::Many(v) => v.clone(),
        }
    }
}

/// `layers_pattern`: one name or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StrOrList {
    /// One pattern.
    One(String),
    /// Several patterns.
    Many(Vec<String>),
}

fn default_r() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

fn default_bias() -> String {
    "none".into()
}

/// The fields of `adapter_config.json` that matter to us; every other key is kept in `other`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PeftConfig {
    /// Must be `"LORA"`.
    pub peft_type: Option<String>,
    /// `"CAUSAL_LM"` for our models (informational).
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The base model's revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// Default rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Default alpha.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA input (training only).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Targeted modules.
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    /// Targeted parameters (`nn.Parameter`s such as fused expert tensors).
    #[serde(default)]
    pub target_parameters: Option<Vec<String>>,
    /// Modules excluded from targeting.
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// `"none"`, `"all"` or `"lora_only"`.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Whether LoRA B has a bias.
    #[serde(default)]
    pub lora_bias: bool,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (weight-decomposed LoRA).
    #[serde(default)]
    pub use_dora: bool,
    /// Weights stored transposed (GPT-2 Conv1D style).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Modules trained fully and saved whole.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Per-module rank overrides (regex key -> rank), first match wins.
    #[serde(default)]
    pub rank_pattern: OrderedMap<usize>,
    /// Per-module alpha overrides (regex key -> alpha), first match wins.
    #[serde(default)]
    pub alpha_pattern: OrderedMap<f64>,
    /// How LoRA weights were initialized (informational).
    #[serde(default)]
    pub init_lora_weights: Value,
    /// Only these layers are targeted (applies to `target_modules` given as a list).
    #[serde(default)]
    pub layers_to_transform: Option<LayerSelector>,
    /// The name of the layer list used to find layer indices.
    #[serde(default)]
    pub layers_pattern: Option<StrOrList>,
    /// Every other key of the file.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Keys whose presence (non-null, non-false, non-empty) changes the adapter's math in ways we do not implement.
const REFUSED_WHEN_SET: [(&str, &str); 12] = [
    ("layer_replication", "layers duplicated by PEFT are not supported"),
    ("trainable_token_indices", "trainable token embeddings are not supported"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA) is not supported"),
    ("use_qalora", "QA-LoRA is not supported"),
    ("use_bdlora", "block-diagonal LoRA (BD-LoRA) is not supported"),
    ("velora_config", "VeLoRA is not supported"),
    ("kasa_config", "KaSA is not supported"),
    ("arrow_config", "Arrow routing is not supported"),
    ("monteclora_config", "MonteCLoRA is not supported"),
    ("lora_ga_config", "LoRA-GA is not supported"),
    ("megatron_config", "Megatron-parallel LoRA layers are not supported"),
    ("use_intruders", "intruder-dimension correction is not supported"),
];

/// Router module names PEFT users write in `modules_to_save` (we honour exactly these: the Mixtral router).
const ROUTER_SAVE_NAMES: [&str; 3] = ["gate", "block_sparse_moe.gate", "mlp.gate"];

fn is_set(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// PEFT's pattern key test: `re.match(rf"(.*\.)?({key})$", name)`.
pub fn pattern_regex(key: &str) -> std::result::Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

/// First-match-wins lookup over compiled patterns.
#[derive(Debug, Clone)]
pub struct Patterns<T> {
    entries: Vec<(String, regex::Regex, T)>,
}

impl<T: Copy> Patterns<T> {
    /// Compiles `(key, value)` entries in order; `field` names the config key in errors.
    pub fn compile(entries: &[(String, T)], path: &Path, field: &str) -> Result<Self> {
        let entries = entries
            .iter()
            .map(|(k, v)| {
                pattern_regex(k).map(|re| (k.clone(), re, *v)).map_err(|e| {
                    Error::format(path, format!("`{field}`: key `{k}` is not a valid regular expression: {e}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Patterns { entries })
    }

    /// The value of the first key matching `name`, if any.
    pub fn lookup(&self, name: &str) -> Option<T> {
        self.entries.iter().find(|(_, re, _)| re.is_match(name)).map(|(_, _, v)| *v)
    }
}

impl PeftConfig {
    /// Reads and validates `dir/adapter_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        if !path.exists() {
            return Err(Error::format(
                dir,
                "no adapter_config.json in this directory (a PEFT adapter directory holds adapter_config.json and \
                 adapter_model.safetensors)",
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text, &path)
    }

    /// Parses and validates config text; `path` names the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let cfg: PeftConfig =
            serde_json::from_str(text).map_err(|e| Error::format(path, format!("invalid adapter_config.json: {e}")))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let unsupported = |field: &str, m: String| Err(Error::unsupported(path, field, m));
        match self.peft_type.as_deref() {
            Some("LORA") => {}
            Some(other) => {
                return unsupported("peft_type", format!("`{other}`: only LoRA adapters (`\"LORA\"`) are supported"))
            }
            None => return Err(Error::format(path, "missing key `peft_type` (expected \"LORA\")")),
        }
        if self.use_dora {
            return unsupported("use_dora", "DoRA adapters are not supported".into());
        }
        if self.bias != "none" {
            return unsupported(
                "bias",
                format!("`{}`: only \"none\" is supported (Mistral layers have no bias)", self.bias),
            );
        }
        if self.lora_bias {
            return unsupported("lora_bias", "LoRA B biases are not supported".into());
        }
        if self.fan_in_fan_out {
            return unsupported("fan_in_fan_out", "transposed (Conv1D-style) weights are not supported".into());
        }
        for (key, why) in REFUSED_WHEN_SET {
            if let Some(v) = self.other.get(key) {
                if is_set(v) {
                    return unsupported(key, format!("{v}: {why}"));
                }
            }
        }
        if let Some(v) = self.other.get("lora_variant").or_else(|| self.other.get("variant")) {
            if is_set(v) {
                return unsupported("lora_variant", format!("{v}: LoRA variants are not supported"));
            }
        }
        if let Some(list) = &self.modules_to_save {
            if let Some(m) = list.iter().find(|m| !ROUTER_SAVE_NAMES.contains(&m.as_str())) {
                return unsupported(
                    "modules_to_save",
                    format!(
                        "`{m}`: only the Mixtral router (`gate`) can be trained fully; other saved modules \
                         (embeddings, lm_head, norms) are not supported"
                    ),
                );
            }
        }
        if self.r == 0 {
            return Err(Error::format(path, "`r` must be at least 1"));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| *r == 0) {
            return Err(Error::format(path, format!("`rank_pattern`: `{k}` has rank 0")));
        }
        if !self.lora_alpha.is_finite() {
            return Err(Error::format(path, "`lora_alpha` must be a finite number"));
        }
        if let Some(ModuleSelector::Regex(re)) = &self.target_modules {
            if re != "all-linear" {
                regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| {
                    Error::format(path, format!("`target_modules`: `{re}` is not a valid regular expression: {e}"))
                })?;
            }
        }
        Patterns::compile(&self.rank_pattern.0, path, "rank_pattern")?;
        Patterns::compile(&self.alpha_pattern.0, path, "alpha_pattern")?;
        Ok(())
    }

    /// Whether the Mixtral router is saved whole (`modules_to_save`).
    pub fn saves_router(&self) -> bool {
        self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty())
    }

    /// PEFT's `check_target_module_exists` for a module name such as `model.layers.0.self_attn.q_proj`.
    /// `linear` says whether the module is an `nn.Linear` in the model the adapter was made for (for
    /// `"all-linear"`).
    pub fn targets_module(&self, key: &str, linear: bool) -> bool {
        let suffix_match = |list: &[String]| list.iter().any(|t| key == t || key.ends_with(&format!(".{t}")));
        match &self.exclude_modules {
            Some(ModuleSelector::Regex(re)) if full_match(re, key) => return false,
            Some(ModuleSelector::List(l)) if suffix_match(l) => return false,
            _ => {}
        }
        if let Some(saved) = &self.modules_to_save {
            if saved.iter().any(|m| {
                regex::Regex::new(&format!(r"^(?:|.*\.){}(?:$|\..*)", regex::escape(m)))
                    .is_ok_and(|re| re.is_match(key))
            }) {
                return false;
            }
        }
        match &self.target_modules {
            None => false,
            Some(ModuleSelector::Regex(re)) if re == "all-linear" => linear,
            Some(ModuleSelector::Regex(re)) => full_match(re, key),
            Some(ModuleSelector::List(list)) => {
                if list.iter().any(|t| t == key) {
                    return true;
                }
                if !suffix_match(list) {
                    return false;
                }
                match self.layers_to_transform.as_ref().map(LayerSelector::to_vec) {
                    None => true,
                    Some(v) if v.is_empty() => true,
                    Some(layers) => layer_index(key, self.layers_pattern.as_ref()).is_some_and(|l| layers.contains(&l)),
                }
            }
        }
    }

    /// PEFT's `_inject_parameters` test for a parameter name such as `model.layers.0.mlp.experts.gate_up_proj`
    /// (no layer filtering: PEFT 0.21 ignores `layers_to_transform` for `target_parameters`).
    pub fn targets_parameter(&self, key: &str) -> bool {
        self.target_parameters
            .as_ref()
            .is_some_and(|list| list.iter().any(|t| key == t || key.ends_with(&format!(".{t}"))))
    }
}

fn full_match(re: &str, key: &str) -> bool {
    regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(key))
}

/// The layer index PEFT finds in a module name (the first numbered segment, or the one after `layers_pattern`).
fn layer_index(key: &str, pattern: Option<&StrOrList>) -> Option<usize> {
    let patterns: Vec<String> = match pattern {
        None => Vec::new(),
        Some(StrOrList::One(s)) if s.is_empty() => Vec::new(),
        Some(StrOrList::One(s)) => vec![s.clone()],
        Some(StrOrList::Many(v)) => v.clone(),
    };
    let captures = |re: &str| regex::Regex::new(re).ok()?.captures(key)?.name("idx")?.as_str().parse().ok();
    if patterns.is_empty() {
        captures(r"^.*?\.[^.]*\.(?P<idx>\d+)\.")
    } else {
        patterns.iter().find_map(|p| captures(&format!(r"^(?:|.*?\.){p}\.(?P<idx>\d+)\.")))
    }
}

/// The `adapter_config.json` we write: PEFT 0.21's keys (alphabetical, as PEFT writes them), patterns in order.
#[derive(Debug, Clone, Serialize)]
pub struct PeftConfigOut {
    /// Per-module alpha overrides in match order.
    pub alpha_pattern: OrderedMap<f64>,
    /// The base model.
    pub base_model_name_or_path: Option<String>,
    /// Always `"none"`.
    pub bias: &'static str,
    /// Always null.
    pub exclude_modules: Option<Value>,
    /// Always false.
    pub fan_in_fan_out: bool,
    /// Always true.
    pub inference_mode: bool,
    /// Always true.
    pub init_lora_weights: bool,
    /// Always null.
    pub layers_pattern: Option<Value>,
    /// The layers `target_modules` apply to (null: all).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Default alpha.
    pub lora_alpha: f64,
    /// Always false.
    pub lora_bias: bool,
    /// Dropout (0 when parameters are targeted: PEFT refuses dropout there).
    pub lora_dropout: f64,
    /// `["gate"]` when the router is trained fully.
    pub modules_to_save: Option<Vec<String>>,
    /// Always `"LORA"`.
    pub peft_type: &'static str,
    /// Default rank.
    pub r: usize,
    /// Per-module rank overrides in match order.
    pub rank_pattern: OrderedMap<usize>,
    /// Always null.
    pub revision: Option<String>,
    /// Targeted module names.
    pub target_modules: Vec<String>,
    /// Targeted parameters (fused experts, router), or null.
    pub target_parameters: Option<Vec<String>>,
    /// Always `"CAUSAL_LM"`.
    pub task_type: &'static str,
    /// Always false.
    pub use_dora: bool,
    /// rsLoRA.
    pub use_rslora: bool,
}

impl PeftConfigOut {
    /// Writes the config as pretty JSON.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Where the config file of an adapter directory is.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("adapter_config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PeftConfig> {
        PeftConfig::from_json_str(text, Path::new("adapter_config.json"))
    }

    #[test]
    fn unknown_keys_are_tolerated_and_order_kept() {
        let c = parse(
            r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"something_new":{"x":1},
                "rank_pattern":{"z":2,"a":3},"target_modules":["q_proj"]}"#,
        )
        .unwrap();
        assert_eq!(c.rank_pattern.0, vec![("z".to_string(), 2), ("a".to_string(), 3)]);
        assert!(c.other.contains_key("something_new"));
    }

    #[test]
    fn refusals_name_the_field() {
        for (text, field) in [
            (r#"{"peft_type":"IA3"}"#, "peft_type"),
            (r#"{"peft_type":"LORA","use_dora":true}"#, "use_dora"),
            (r#"{"peft_type":"LORA","bias":"all"}"#, "bias"),
            (r#"{"peft_type":"LORA","fan_in_fan_out":true}"#, "fan_in_fan_out"),
            (r#"{"peft_type":"LORA","modules_to_save":["lm_head"]}"#, "modules_to_save"),
            (r#"{"peft_type":"LORA","layer_replication":[[0,1]]}"#, "layer_replication"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{e}");
        }
    }

    #[test]
    fn targeting_follows_peft() {
        let c = parse(r#"{"peft_type":"LORA","target_modules":["q_proj","w1"],"layers_to_transform":[1]}"#).unwrap();
        assert!(c.targets_module("model.layers.1.self_attn.q_proj", true));
        assert!(!c.targets_module("model.layers.0.self_attn.q_proj", true));
        assert!(c.targets_module("model.layers.1.block_sparse_moe.experts.3.w1", true));
        assert!(!c.targets_module("model.layers.1.block_sparse_moe.experts.3.w2", true));
        let c = parse(
            r#"{"peft_type":"LORA","target_modules":".*\\.(q|v)_proj","target_parameters":["mlp.experts.down_proj"]}"#,
        )
        .unwrap();
        assert!(c.targets_module("model.layers.0.self_attn.v_proj", true));
        assert!(!c.targets_module("model.layers.0.self_attn.k_proj", true));
        assert!(c.targets_parameter("model.layers.3.mlp.experts.down_proj"));
        assert!(!c.targets_parameter("model.layers.3.mlp.experts.gate_up_proj"));
        let p = Patterns::compile(&[("v_proj".to_string(), 2usize)], Path::new("x"), "rank_pattern").unwrap();
        assert_eq!(p.lookup("model.layers.0.self_attn.v_proj"), Some(2));
        assert_eq!(p.lookup("model.layers.0.self_attn.xv_proj"), None);
    }
}
