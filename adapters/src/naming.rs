//! The modules LoRA can sit on, their names (ours, PEFT's dense and legacy names, PEFT 0.21's parameter names) and
//! their shapes given the base model's dimensions.

use std::fmt;

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

    /// The short name used in `targets` (`q_proj`, `gate_proj`, `w1`, ...; `gate` for the router).
    pub fn short(&self) -> &'static str {
        match self {
            Site::Attn(_, Proj::Q) => "q_proj",
            Site::Attn(_, Proj::K) => "k_proj",
            Site::Attn(_, Proj::V) => "v_proj",
            Site::Attn(_, Proj::O) => "o_proj",
            Site::Mlp(_, MlpProj::Gate) => "gate_proj",
            Site::Mlp(_, MlpProj::Up) => "up_proj",
            Site::Mlp(_, MlpProj::Down) => "down_proj",
            Site::Router(_) => "gate",
            Site::Expert(_, _, ExpertProj::W1) => "w1",
            Site::Expert(_, _, ExpertProj::W2) => "w2",
            Site::Expert(_, _, ExpertProj::W3) => "w3",
        }
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
            let p = match p {
                "q_proj" => Proj::Q,
                "k_proj" => Proj::K,
                "v_proj" => Proj::V,
                "o_proj" => Proj::O,
                _ => return None,
            };
            return Some(Site::Attn(l, p));
        }
        if rest == "block_sparse_moe.gate" || rest == "mlp.gate" {
            return Some(Site::Router(l));
        }
        if let Some(p) = rest.strip_prefix("mlp.") {
            let p = match p {
                "gate_proj" => MlpProj::Gate,
                "up_proj" => MlpProj::Up,
                "down_proj" => MlpProj::Down,
                _ => return None,
            };
            return Some(Site::Mlp(l, p));
        }
        let rest = rest.strip_prefix("block_sparse_moe.experts.")?;
        let (e, w) = rest.split_once('.')?;
        let e: usize = e.parse().ok()?;
        let w = match w {
            "w1" => ExpertProj::W1,
            "w2" => ExpertProj::W2,
            "w3" => ExpertProj::W3,
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

/// The module names `targets` may hold, in a fixed order (ours = PEFT's for dense modules).
pub const TARGETABLE: [&str; 10] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"];
