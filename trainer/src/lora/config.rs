//! Which modules get LoRA, with what rank and alpha: targets, layers, PEFT-style
//! `rank_pattern` / `alpha_pattern` (regular expressions matched like PEFT: `^(.*\.)?(KEY)$`
//! against the module name, in the order the user wrote them: the first matching key wins), rsLoRA,
//! dropout, and what happens to Mixtral's router.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

/// What to do with Mixtral's router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterMode {
    /// Keep the router frozen.
    #[default]
    Frozen,
    /// Put a LoRA on the router.
    Lora,
    /// Train the router's weight fully.
    Full,
}

/// Module names LoRA can target (PEFT's names; `w1`/`w2`/`w3` are Mixtral's expert FFNs).
pub const TARGETABLE: [&str; 10] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"];

/// LoRA settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    /// Default rank.
    pub r: usize,
    /// Default alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).
    pub alpha: f64,
    /// Dropout probability on the LoRA input during training.
    pub dropout: f64,
    /// Rank-stabilized scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Target module names (see [`TARGETABLE`]).
    pub targets: Vec<String>,
    /// Per-module rank overrides: regex key -> rank, in the user's order (the first matching key wins, as in
    /// PEFT's `get_pattern_key`).
    pub rank_pattern: IndexMap<String, usize>,
    /// Per-module alpha overrides: regex key -> alpha, in the user's order (the first matching key wins).
    pub alpha_pattern: IndexMap<String, f64>,
    /// Only these layer indices get LoRA (all when `None`).
    pub layers: Option<Vec<usize>>,
    /// Mixtral router treatment.
    pub router: RouterMode,
}

impl Default for LoraSettings {
    fn default() -> Self {
        LoraSettings {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            use_rslora: false,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec(),
            rank_pattern: IndexMap::new(),
            alpha_pattern: IndexMap::new(),
            layers: None,
            router: RouterMode::Frozen,
        }
    }
}

/// The compiled form of the settings, answering "what rank and scale for this module?".
#[derive(Debug, Clone)]
pub struct LoraPlan {
    settings: LoraSettings,
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
            if !TARGETABLE.contains(&t.as_str()) {
                return Err(format!("lora.targets: unknown module `{t}`; expected some of {}", TARGETABLE.join(", ")));
            }
        }
        if let Some((key, _)) = settings.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return Err(format!("lora.rank_pattern: `{key}` has rank 0"));
        }
        let rank_pattern = compile(&settings.rank_pattern, "rank_pattern")?;
        let alpha_pattern = compile(&settings.alpha_pattern, "alpha_pattern")?;
        Ok(LoraPlan { settings, rank_pattern, alpha_pattern })
    }

    /// The settings this plan was made from.
    pub fn settings(&self) -> &LoraSettings {
        &self.settings
    }

    /// Whether layer `layer`'s module called `short` (e.g. `q_proj`, `w1`) gets a LoRA.
    pub fn targets(&self, layer: usize, short: &str) -> bool {
        let layer_ok = self.settings.layers.as_ref().is_none_or(|l| l.contains(&layer));
        layer_ok && self.settings.targets.iter().any(|t| t == short)
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
