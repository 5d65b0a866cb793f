//! The modules LoRA can sit on, their names (ours, PEFT's dense and legacy names, PEFT 0.21's parameter names) and
//! their shapes given the base model's dimensions; and the one list of target names: a [`Target`] is a kind of
//! linear layer (`q`, ..., `w3`; groups `attention`, `mlp`, `experts`, `all`), named as recipes write it and as
//! PEFT's `target_modules` does (`q_proj`, ..., `w3`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The base model's dimensions, as plain numbers (the caller reads them from config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseShape {
    /// Decoder layers.
    pub num_layers: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// (Expert) feed-forward width.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Experts per layer (Mixtral), `None` for a dense model.
    pub num_experts: Option<usize>,
}

impl BaseShape {
    /// Whether the model is a mixture of experts.
    pub fn is_moe(&self) -> bool {
        self.num_experts.is_some()
    }

    /// Every module LoRA can target in this model, in model order.
    pub fn sites(&self) -> Vec<Site> {
        let mut out = Vec::new();
        for l in 0..self.num_layers {
            for p in [Proj::Q, Proj::K, Proj::V, Proj::O] {
                out.push(Site::Attn(l, p));
            }
            match self.num_experts {
                None => {
                    for m in [MlpProj::Gate, MlpProj::Up, MlpProj::Down] {
                        out.push(Site::Mlp(l, m));
                    }
                }
                Some(e) => {
                    out.push(Site::Router(l));
                    for x in 0..e {
                        for w in [ExpertProj::W1, ExpertProj::W2, ExpertProj::W3] {
                            out.push(Site::Expert(l, x, w));
                        }
                    }
                }
            }
        }
        out
    }

    /// `(out, in)` of a module's weight.
    pub fn dims(&self, site: Site) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (qd, kvd) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        match site {
            Site::Attn(_, Proj::Q) => (qd, h),
            Site::Attn(_, Proj::K) | Site::Attn(_, Proj::V) => (kvd, h),
            Site::Attn(_, Proj::O) => (h, qd),
            Site::Mlp(_, MlpProj::Down) | Site::Expert(_, _, ExpertProj::W2) => (h, i),
            Site::Mlp(_, _) | Site::Expert(_, _, _) => (i, h),
            Site::Router(_) => (self.num_experts.unwrap_or(0), h),
        }
    }

    /// Checks that a site exists in this model.
    pub fn has(&self, site: Site) -> bool {
        let l = site.layer() < self.num_layers;
        match (site, self.num_experts) {
            (Site::Attn(..), _) => l,
            (Site::Mlp(..), None) => l,
            (Site::Router(_), Some(_)) => l,
            (Site::Expert(_, x, _), Some(e)) => l && x < e,
            _ => false,
        }
    }
}

/// Attention projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proj {
    /// q_proj.
    Q,
    /// k_proj.
    K,
    /// v_proj.
    V,
    /// o_proj.
    O,
}

/// Dense MLP projections (Mistral).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MlpProj {
    /// gate_proj.
    Gate,
    /// up_proj.
    Up,
    /// down_proj.
    Down,
}

/// Mixtral expert matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExpertProj {
    /// w1 (gate).
    W1,
    /// w2 (down).
    W2,
    /// w3 (up).
    W3,
}

/// One module LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// `model.layers.L.self_attn.X_proj`.
    Attn(usize, Proj),
    /// `model.layers.L.mlp.X_proj` (dense).
    Mlp(usize, MlpProj),
    /// `model.layers.L.block_sparse_moe.gate` (the router).
    Router(usize),
    /// `model.layers.L.block_sparse_moe.experts.E.wN`.
    Expert(usize, usize, ExpertProj),
}

impl Site {
    /// The layer index.
    pub fn layer(&self) -> usize {
        match *self {
            Site::Attn(l, _) | Site::Mlp(l, _) | Site::Router(l) | Site::Expert(l, _, _) => l,
        }
    }

    /// The kind of linear layer this is, `None` for the router (which `targets` never names).
    pub fn target(&self) -> Option<Target> {
        Some(match self {
            Site::Attn(_, Proj::Q) => Target::Q,
            Site::Attn(_, Proj::K) => Target::K,
            Site::Attn(_, Proj::V) => Target::V,
            Site::Attn(_, Proj::O) => Target::O,
            Site::Mlp(_, MlpProj::Gate) => Target::Gate,
            Site::Mlp(_, MlpProj::Up) => Target::Up,
            Site::Mlp(_, MlpProj::Down) => Target::Down,
            Site::Router(_) => return None,
            Site::Expert(_, _, ExpertProj::W1) => Target::W1,
            Site::Expert(_, _, ExpertProj::W2) => Target::W2,
            Site::Expert(_, _, ExpertProj::W3) => Target::W3,
        })
    }

    /// The short name used in `targets` (`q_proj`, `gate_proj`, `w1`, ...; `gate` for the router).
    pub fn short(&self) -> &'static str {
        self.target().map_or(ROUTER, Target::hf_name)
    }

    /// Our module name (= PEFT's for dense modules, the transformers 4 name for experts and router), without the
    /// `base_model.model.` prefix: `model.layers.0.self_attn.q_proj`, `model.layers.0.block_sparse_moe.experts.3.w1`.
    pub fn module_name(&self) -> String {
        match *self {
            Site::Attn(l, _) => format!("model.layers.{l}.self_attn.{}", self.short()),
            Site::Mlp(l, _) => format!("model.layers.{l}.mlp.{}", self.short()),
            Site::Router(l) => format!("model.layers.{l}.block_sparse_moe.gate"),
            Site::Expert(l, e, _) => format!("model.layers.{l}.block_sparse_moe.experts.{e}.{}", self.short()),
        }
    }

    /// Parses one of our module names (or PEFT's transformers 5 router name `model.layers.L.mlp.gate`).
    pub fn parse(name: &str) -> Option<Site> {
        let rest = name.strip_prefix("model.layers.")?;
        let (l, rest) = rest.split_once('.')?;
        let l: usize = l.parse().ok()?;
        if let Some(p) = rest.strip_prefix("self_attn.") {
            let p = match Target::from_hf_name(p)? {
                Target::Q => Proj::Q,
                Target::K => Proj::K,
                Target::V => Proj::V,
                Target::O => Proj::O,
                _ => return None,
            };
            return Some(Site::Attn(l, p));
        }
        if rest == "block_sparse_moe.gate" || rest == "mlp.gate" {
            return Some(Site::Router(l));
        }
        if let Some(p) = rest.strip_prefix("mlp.") {
            let p = match Target::from_hf_name(p)? {
                Target::Gate => MlpProj::Gate,
                Target::Up => MlpProj::Up,
                Target::Down => MlpProj::Down,
                _ => return None,
            };
            return Some(Site::Mlp(l, p));
        }
        let rest = rest.strip_prefix("block_sparse_moe.experts.")?;
        let (e, w) = rest.split_once('.')?;
        let e: usize = e.parse().ok()?;
        let w = match Target::from_hf_name(w)? {
            Target::W1 => ExpertProj::W1,
            Target::W2 => ExpertProj::W2,
            Target::W3 => ExpertProj::W3,
            _ => return None,
        };
        Some(Site::Expert(l, e, w))
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.module_name())
    }
}

/// The prefix PEFT puts before module names in adapter files.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The module names `targets` may hold, in a fixed order (ours = PEFT's for dense modules): the
/// [`Target::hf_name`]s of [`Target::ALL`].
pub const TARGETABLE: [&str; 10] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"];

/// The router's short name (`block_sparse_moe.gate`), which is not a [`Target`].
pub const ROUTER: &str = "gate";

/// A kind of linear layer that LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Attention query projection (`q_proj`).
    Q,
    /// Attention key projection (`k_proj`).
    K,
    /// Attention value projection (`v_proj`).
    V,
    /// Attention output projection (`o_proj`).
    O,
    /// Dense MLP gate projection (`gate_proj`).
    Gate,
    /// Dense MLP up projection (`up_proj`).
    Up,
    /// Dense MLP down projection (`down_proj`).
    Down,
    /// Expert gate projection (Mixtral `w1`).
    W1,
    /// Expert down projection (Mixtral `w2`).
    W2,
    /// Expert up projection (Mixtral `w3`).
    W3,
}

impl Target {
    /// Every target, in canonical order.
    pub const ALL: [Target; 10] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
        Target::W1,
        Target::W2,
        Target::W3,
    ];

    /// Every spelling [`Target::parse_group`] accepts (for suggestions in messages).
    pub const SPELLINGS: [&'static str; 21] = [
        "q",
        "k",
        "v",
        "o",
        "gate",
        "up",
        "down",
        "w1",
        "w2",
        "w3",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "attention",
        "mlp",
        "experts",
        "all",
    ];

    /// The recipe name (`q`, ..., `down`, `w1`, `w2`, `w3`).
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
            Target::W1 => "w1",
            Target::W2 => "w2",
            Target::W3 => "w3",
        }
    }

    /// The Hugging Face / PEFT module name (`q_proj`, ..., `down_proj`, `w1`, `w2`, `w3`).
    pub fn hf_name(self) -> &'static str {
        TARGETABLE[self as usize]
    }

    /// The target whose module name is `name` (`q_proj`, ..., `w3`).
    pub fn from_hf_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.hf_name() == name)
    }

    /// Parses a target name or group: `q k v o gate up down w1 w2 w3`, the Hugging Face names (`q_proj`, ...),
    /// `attention` (q k v o), `mlp` (gate up down), `experts` (w1 w2 w3), `all` (all of them; the engine uses
    /// those the model has).
    pub fn parse_group(name: &str) -> Option<Vec<Target>> {
        use Target::*;
        Some(match name {
            "attention" => vec![Q, K, V, O],
            "mlp" => vec![Gate, Up, Down],
            "experts" => vec![W1, W2, W3],
            "all" => Target::ALL.to_vec(),
            _ => vec![Target::ALL.into_iter().find(|t| t.name() == name || t.hf_name() == name)?],
        })
    }

    /// The targets `names` give (see [`Target::parse_group`]; unknown names are skipped), deduplicated, in
    /// canonical order.
    pub fn expand<S: AsRef<str>>(names: &[S]) -> Vec<Target> {
        let mut v: Vec<Target> = names.iter().filter_map(|n| Target::parse_group(n.as_ref())).flatten().collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_list_of_names() {
        for (i, t) in Target::ALL.into_iter().enumerate() {
            assert_eq!(t as usize, i);
            assert_eq!(Target::parse_group(t.name()), Some(vec![t]));
            assert_eq!(Target::parse_group(t.hf_name()), Some(vec![t]));
            assert_eq!(Target::from_hf_name(TARGETABLE[i]), Some(t));
            assert!(Target::SPELLINGS.contains(&t.name()) && Target::SPELLINGS.contains(&t.hf_name()));
        }
        for s in Target::SPELLINGS {
            assert!(Target::parse_group(s).is_some(), "{s}");
        }
        assert_eq!(Target::parse_group("qproj"), None);
        assert_eq!(Target::expand(&["v", "attention", "q_proj"]), vec![Target::Q, Target::K, Target::V, Target::O]);
        let shape = BaseShape {
            num_layers: 1,
            hidden_size: 8,
            intermediate_size: 16,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            num_experts: Some(2),
        };
        for site in shape.sites() {
            assert_eq!(Site::parse(&site.module_name()), Some(site));
            assert_eq!(site.short() == ROUTER, site.target().is_none());
        }
    }
}
