//! Which modules get LoRA, with what rank and alpha: targets, layers, PEFT-style
//! `rank_pattern` / `alpha_pattern` (regular expressions matched like PEFT: `^(.*\.)?(KEY)$`
//! against the module name, in the order the user wrote them: the first matching key wins), rsLoRA,
//! dropout, and what happens to Mixtral's router.
//!
//! [`LoraSettings`] is the one definition of LoRA settings: a recipe's `[lora]` section deserializes into it
//! (with [`LoraSettings::recipe_defaults`] for what the recipe leaves out), the run trains with it, and adapter
//! files record it (as `adapters::LoraSpec`, through [`crate::lora::peft::lora_spec`]).

use std::path::PathBuf;

use adapters::naming::Target;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

/// What to do with Mixtral's router: `frozen` (the default), `lora` or `full`. The same type as the adapter
/// files' `adapters::RouterTraining`.
pub use adapters::RouterTraining as RouterMode;

/// Module names LoRA can target (PEFT's names; `w1`/`w2`/`w3` are Mixtral's expert FFNs).
pub use adapters::naming::TARGETABLE;

/// LoRA settings: the recipe's `[lora]` section and what the engine trains with.
///
/// Defaults, stated here only: a recipe gets [`LoraSettings::recipe_defaults`] (r 16, alpha 32, dropout 0.05,
/// targets `q k v o`, no patterns, every layer, router frozen, fresh init); [`LoraSettings::default`] is the
/// same but for r 8, alpha 16 and no dropout (what library callers who fill in the rest get).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default = "LoraSettings::recipe_defaults", deny_unknown_fields)]
pub struct LoraSettings {
    /// Rank. Recipe default 16.
    pub r: usize,
    /// Scale numerator: the update is `alpha / r * B A x` (or `alpha / sqrt(r)` with rsLoRA). Recipe default 32.
    pub alpha: f64,
    /// Dropout on the LoRA input during training. Recipe default 0.05.
    pub dropout: f64,
    /// rsLoRA scaling `alpha / sqrt(r)`. Default false.
    pub use_rslora: bool,
    /// Layers to adapt, by target name or group (`q`, ..., `w3`, PEFT's `q_proj`, ..., `attention`, `mlp`,
    /// `experts`, `all`: see [`Target::parse_group`]). Default `["q", "k", "v", "o"]`.
    pub targets: Vec<String>,
    /// Per-module rank overrides, PEFT semantics (regex or name suffix -> rank): matched against the module's
    /// full name (`model.layers.0.self_attn.q_proj`) in the order written, the first matching key wins (as in
    /// PEFT's `get_pattern_key`).
    pub rank_pattern: IndexMap<String, usize>,
    /// Per-module alpha overrides, PEFT semantics (regex or name suffix -> alpha), in order: the first matching
    /// key wins.
    pub alpha_pattern: IndexMap<String, f64>,
    /// Only these decoder layers (0-based); empty = all.
    pub layers_to_transform: Vec<usize>,
    /// MoE router: `frozen`, `lora` or `full`. Default `frozen`.
    pub router: RouterMode,
    /// Start from an existing adapter directory (PEFT layout) instead of the standard init.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
}

impl LoraSettings {
    /// What a recipe's `[lora]` gets for every key it leaves out.
    pub fn recipe_defaults() -> Self {
        LoraSettings {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            use_rslora: false,
            targets: ["q", "k", "v", "o"].map(String::from).to_vec(),
            rank_pattern: IndexMap::new(),
            alpha_pattern: IndexMap::new(),
            layers_to_transform: Vec::new(),
            router: RouterMode::Frozen,
            init_from: None,
        }
    }

    /// The targets with groups and Hugging Face names expanded, deduplicated, in canonical order (unknown names,
    /// which validation refuses, are skipped).
    pub fn target_set(&self) -> Vec<Target> {
        Target::expand(&self.targets)
    }

    /// The targeted module names (`q_proj`, ..., `w3`), in canonical order: PEFT's `target_modules`.
    pub fn target_modules(&self) -> Vec<String> {
        self.target_set().into_iter().map(|t| t.hf_name().to_string()).collect()
    }
}

impl Default for LoraSettings {
    /// [`LoraSettings::recipe_defaults`] with r 8, alpha 16 and no dropout.
    fn default() -> Self {
        LoraSettings { r: 8, alpha: 16.0, dropout: 0.0, ..LoraSettings::recipe_defaults() }
    }
}

/// The compiled form of the settings, answering "what rank and scale for this module?".
#[derive(Debug, Clone)]
pub struct LoraPlan {
    settings: LoraSettings,
    /// The targeted module names (`q_proj`, ..., `w3`).
    targets: Vec<&'static str>,
    rank_pattern: Vec<(regex::Regex, usize)>,
    alpha_pattern: Vec<(regex::Regex, f64)>,
}

/// Rank and scale of one module's adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModuleLora {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// The multiplier of `B A x`.
    pub scale: f64,
}

fn compile<T: Copy>(patterns: &IndexMap<String, T>, field: &str) -> Result<Vec<(regex::Regex, T)>, String> {
    patterns
        .iter()
        .map(|(key, v)| {
            adapters::config::pattern_regex(key)
                .map(|re| (re, *v))
                .map_err(|e| format!("lora.{field}: key `{key}` is not a valid regular expression: {e}"))
        })
        .collect()
}

impl LoraPlan {
    /// Validates the settings (naming the offending field) and compiles the patterns.
    pub fn new(settings: LoraSettings) -> Result<Self, String> {
        if settings.r == 0 {
            return Err("lora.r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&settings.dropout) {
            return Err(format!("lora.dropout must be in [0, 1), got {}", settings.dropout));
        }
        for t in &settings.targets {
            if Target::parse_group(t).is_none() {
                return Err(format!("lora.targets: unknown module `{t}`; expected some of {}", TARGETABLE.join(", ")));
            }
        }
        if let Some((key, _)) = settings.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return Err(format!("lora.rank_pattern: `{key}` has rank 0"));
        }
        let rank_pattern = compile(&settings.rank_pattern, "rank_pattern")?;
        let alpha_pattern = compile(&settings.alpha_pattern, "alpha_pattern")?;
        let targets = settings.target_set().into_iter().map(Target::hf_name).collect();
        Ok(LoraPlan { settings, targets, rank_pattern, alpha_pattern })
    }

    /// The settings this plan was made from.
    pub fn settings(&self) -> &LoraSettings {
        &self.settings
    }

    /// Whether layer `layer`'s module called `short` (e.g. `q_proj`, `w1`) gets a LoRA.
    pub fn targets(&self, layer: usize, short: &str) -> bool {
        let layers = &self.settings.layers_to_transform;
        let layer_ok = layers.is_empty() || layers.contains(&layer);
        layer_ok && self.targets.contains(&short)
    }

    /// Rank, alpha and scale of the module with full name `module` (e.g.
    /// `model.layers.0.self_attn.q_proj`); the first matching pattern wins, as in PEFT.
    pub fn module(&self, module: &str) -> ModuleLora {
        let r = self.rank_pattern.iter().find(|(re, _)| re.is_match(module)).map_or(self.settings.r, |(_, r)| *r);
        let alpha =
            self.alpha_pattern.iter().find(|(re, _)| re.is_match(module)).map_or(self.settings.alpha, |(_, a)| *a);
        let scale = adapters::adapter::lora_scale(r, alpha, self.settings.use_rslora);
        ModuleLora { r, alpha, scale }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_peft() {
        let mut s = LoraSettings { r: 4, alpha: 8.0, ..LoraSettings::default() };
        s.rank_pattern.insert("v_proj".into(), 2);
        s.alpha_pattern.insert(r"layers\.1\.self_attn\.o_proj".into(), 32.0);
        let plan = LoraPlan::new(s).unwrap();
        assert_eq!(plan.module("model.layers.0.self_attn.v_proj").r, 2);
        assert_eq!(plan.module("model.layers.0.self_attn.q_proj").scale, 2.0);
        assert_eq!(plan.module("model.layers.1.self_attn.o_proj").scale, 8.0);
        assert_eq!(plan.module("model.layers.0.self_attn.o_proj").scale, 2.0);
        // `v_proj` must not match a module merely ending in those letters.
        assert_eq!(plan.module("model.layers.0.self_attn.xv_proj").r, 4);
    }

    /// A recipe that leaves `[lora]` out gets exactly what it got before the settings were one type.
    #[test]
    fn the_defaults_are_stated_once() {
        let r = LoraSettings::recipe_defaults();
        assert_eq!((r.r, r.alpha, r.dropout, r.use_rslora), (16, 32.0, 0.05, false));
        assert_eq!(r.target_modules(), ["q_proj", "k_proj", "v_proj", "o_proj"]);
        assert!(r.rank_pattern.is_empty() && r.alpha_pattern.is_empty() && r.layers_to_transform.is_empty());
        assert_eq!((r.router, r.init_from.clone()), (RouterMode::Frozen, None));
        let empty: LoraSettings = toml::from_str("").unwrap();
        assert_eq!(empty, r);
        let partial: LoraSettings = toml::from_str("r = 4\ntargets = [\"attention\", \"w1\"]").unwrap();
        assert_eq!((partial.r, partial.alpha, partial.dropout), (4, 32.0, 0.05));
        assert_eq!(partial.target_modules(), ["q_proj", "k_proj", "v_proj", "o_proj", "w1"]);
        let d = LoraSettings::default();
        assert_eq!((d.r, d.alpha, d.dropout), (8, 16.0, 0.0));
        assert_eq!(LoraSettings { r: 16, alpha: 32.0, dropout: 0.05, ..d.clone() }, r);
        // Recipe spellings and PEFT's target the same modules.
        let plan = LoraPlan::new(LoraSettings { targets: vec!["mlp".into(), "q_proj".into()], ..d }).unwrap();
        assert!(plan.targets(0, "q_proj") && plan.targets(0, "down_proj") && !plan.targets(0, "k_proj"));
        let layer1 = LoraPlan::new(LoraSettings { layers_to_transform: vec![1], ..LoraSettings::default() }).unwrap();
        assert!(!layer1.targets(0, "q_proj") && layer1.targets(1, "q_proj"));
    }

    #[test]
    fn rslora_scale() {
        let plan =
            LoraPlan::new(LoraSettings { r: 16, alpha: 8.0, use_rslora: true, ..LoraSettings::default() }).unwrap();
        assert_eq!(plan.module("model.layers.0.self_attn.q_proj").scale, 2.0);
    }

    #[test]
    fn bad_settings_name_the_field() {
        let bad = LoraSettings { targets: vec!["qproj".into()], ..LoraSettings::default() };
        assert!(LoraPlan::new(bad).unwrap_err().contains("lora.targets: unknown module `qproj`"));
        let bad = LoraSettings { dropout: 1.5, ..LoraSettings::default() };
        assert!(LoraPlan::new(bad).unwrap_err().contains("lora.dropout"));
    }

    /// PEFT's `get_pattern_key` returns the first key, in the dict's insertion order, whose
    /// `(.*\.)?(KEY)$` matches: `{"q_proj": 4, "layers.0.self_attn.q_proj": 2}` gives every q_proj rank 4
    /// (the second key is never reached), the reversed dict gives layer 0's q_proj rank 2. Sorted keys
    /// would pick `layers.0...` first both times.
    #[test]
    fn the_first_pattern_in_the_users_order_wins() {
        let plan = |keys: &[(&str, usize)]| {
            let mut s = LoraSettings { r: 8, ..LoraSettings::default() };
            for (k, r) in keys {
                s.rank_pattern.insert(k.to_string(), *r);
                s.alpha_pattern.insert(k.to_string(), *r as f64 * 10.0);
            }
            LoraPlan::new(s).unwrap()
        };
        let (q0, q1) = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj");
        let short_first = plan(&[("q_proj", 4), (r"layers\.0\.self_attn\.q_proj", 2)]);
        assert_eq!((short_first.module(q0).r, short_first.module(q0).alpha), (4, 40.0));
        assert_eq!(short_first.module(q1).r, 4);
        let long_first = plan(&[(r"layers\.0\.self_attn\.q_proj", 2), ("q_proj", 4)]);
        assert_eq!((long_first.module(q0).r, long_first.module(q0).alpha), (2, 20.0));
        assert_eq!(long_first.module(q1).r, 4);
        assert_eq!(long_first.module("model.layers.0.self_attn.k_proj").r, 8);
    }
}
