//! Builds a [`Model`] from a Hugging Face model directory, tensor by tensor.
//!
//! Mixtral experts are read from either the hub per-expert layout
//! (`block_sparse_moe.experts.E.w1/w2/w3.weight`, `block_sparse_moe.gate.weight`) or the
//! transformers 5 fused layout (`mlp.experts.gate_up_proj` `[E, 2I, H]` with w1 rows first, then
//! w3; `mlp.experts.down_proj` `[E, H, I]`; `mlp.gate.weight`), reading each expert's slice
//! straight from the file.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::attention::Attention;
use super::checkpoint::{Checkpoint, DiskDType};
use super::config::{Architecture, ModelConfig};
use super::decoder::{DecoderLayer, FeedForward, Model};
use super::linear::Linear;
use super::mlp::Mlp;
use super::moe::SparseMoe;
use super::norm::RmsNorm;
use crate::quant::bnb_format::QUANT_STATE_SUFFIX;
use crate::quant::{BnbParts, FrozenWeight, Nf4Weight, RawTensor};
use crate::{Error, Result};

/// How a model is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype of weights and activations.
    pub dtype: DType,
    /// Device to load onto.
    pub device: Device,
    /// Make every weight a trainable `Var` (full fine-tuning, gradient checks).
    pub trainable: bool,
    /// Quantize every decoder linear (attention, MLP, each expert) to NF4 while loading, one tensor
    /// at a time; embeddings, norms, routers and lm_head stay at `dtype`.
    pub nf4: Option<Nf4Options>,
}

/// NF4 settings (bitsandbytes' defaults: blocks of 64, double quantization of the scales).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nf4Options {
    /// Quantize the block scales too (~0.127 instead of 0.5 bits/parameter of overhead).
    pub double_quant: bool,
    /// Decoder linears kept dense, by module name (`q_proj`, `gate_proj`, `w1`, ...).
    pub keep_dense: Vec<String>,
}

impl Nf4Options {
    /// bitsandbytes' QLoRA defaults: double quantization, every decoder linear quantized.
    pub fn qlora() -> Self {
        Nf4Options { double_quant: true, keep_dense: Vec::new() }
    }

    /// Whether the weight `name` (e.g. `model.layers.0.self_attn.q_proj.weight`) is quantized.
    fn quantizes(&self, name: &str) -> bool {
        let module = name.rsplit('.').nth(1).unwrap_or("");
        !self.keep_dense.iter().any(|k| k == module)
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, device: Device::Cpu, trainable: false, nf4: None }
    }
}

/// How the experts of a Mixtral checkpoint are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// `block_sparse_moe.experts.E.{w1,w2,w3}.weight` (the hub's, and transformers 5's default save).
    PerExpert,
    /// `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` (transformers 5 in memory).
    Fused,
}

impl ExpertLayout {
    /// Detects the layout of layer `layer` of a checkpoint.
    pub fn detect(ckpt: &Checkpoint, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        if ckpt.contains(&format!("{p}.block_sparse_moe.gate.weight")) {
            Ok(ExpertLayout::PerExpert)
        } else if ckpt.contains(&format!("{p}.mlp.experts.gate_up_proj")) {
            Ok(ExpertLayout::Fused)
        } else {
            Err(Error::MissingTensor {
                path: ckpt.dir.clone(),
                name: format!("{p}.block_sparse_moe.gate.weight (or {p}.mlp.experts.gate_up_proj)"),
            })
        }
    }
}

/// A loaded model plus, when loaded trainable, its parameters by (hub-layout) name.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model.
    pub model: Model,
    /// Trainable parameters in load order (empty unless `trainable`).
    pub params: Vec<(String, Var)>,
}

struct TensorSource<'a> {
    ckpt: &'a Checkpoint,
    opts: &'a LoadOptions,
    params: Vec<(String, Var)>,
}

impl TensorSource<'_> {
    fn finish(&mut self, name: &str, t: Tensor) -> Result<Tensor> {
        if !self.opts.trainable {
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let t = var.as_tensor().clone();
        self.params.push((name.to_string(), var));
        Ok(t)
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.ckpt.load(name, shape, self.opts.dtype, &self.opts.device)?;
        self.finish(name, t)
    }

    /// A decoder linear: NF4 when quantizing (or when the checkpoint stores it in bitsandbytes'
    /// 4-bit format), else dense at the compute dtype.
    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        if let Some(w) = self.bnb_nf4(name, out, inp)? {
            return Ok(Linear::frozen(FrozenWeight::nf4(w)?));
        }
        match (&self.opts.nf4, self.opts.trainable) {
            (Some(nf4), false) if nf4.quantizes(name) => {
                // Read into host memory: NF4 quantization runs on the host (its codes are host bytes).
                let t = self.ckpt.load(name, &[out, inp], DType::F32, &Device::Cpu)?;
                self.quantized(t, nf4)
            }
            _ => Ok(Linear::new(self.tensor(name, &[out, inp])?)),
        }
    }

    /// A linear that is never quantized (lm_head).
    fn plain_linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear::new(self.tensor(name, &[out, inp])?))
    }

    fn quantized(&self, t: Tensor, nf4: &Nf4Options) -> Result<Linear> {
        let mut w = Nf4Weight::quantize_tensor(&t, nf4.double_quant)?;
        w.set_dtype(self.opts.dtype);
        Ok(Linear::frozen(FrozenWeight::nf4(w)?))
    }

    /// Reads a weight stored by bitsandbytes as NF4 (`name` + `.absmax`, `.quant_map`, ...).
    fn bnb_nf4(&self, name: &str, out: usize, inp: usize) -> Result<Option<Nf4Weight>> {
        if !self.ckpt.contains(&format!("{name}{QUANT_STATE_SUFFIX}")) {
            return Ok(None);
        }
        let path = self.ckpt.info(name)?;
        let path = self.ckpt.files[path.file].clone();
        let mut raw: Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> = Vec::new();
        for (n, info) in self.ckpt.tensors() {
            if n == name || n.strip_prefix(name).is_some_and(|rest| rest.starts_with('.')) {
                let (bytes, _) = self.ckpt.load_raw(n)?;
                raw.push((n.clone(), bytes, info.dtype.to_safetensors(), info.shape.clone()));
            }
        }
        let parts = BnbParts::collect(name, &path, |full| {
            Ok(raw.iter().find(|(n, ..)| n == full).map(|(_, b, d, s)| RawTensor::new(*d, s.clone(), b)))
        })?;
        let mut w = Nf4Weight::from_bnb_parts(&parts, name, &path)?;
        if w.shape() != [out, inp] {
            return Err(Error::ShapeMismatch {
                path,
                name: name.to_string(),
                expected: vec![out, inp],
                actual: w.shape().to_vec(),
            });
        }
        w.set_dtype(self.opts.dtype);
        Ok(Some(w))
    }

    /// A `[rows, cols]` slice starting at flat element `first` of the tensor `source`, registered
    /// under the hub-layout `name` (one expert of a fused expert tensor).
    fn slice(&mut self, source: &str, name: &str, first: usize, rows: usize, cols: usize) -> Result<Linear> {
        if let (Some(nf4), false) = (&self.opts.nf4, self.opts.trainable) {
            if !nf4.quantizes(name) {
                let t = self.ckpt.load_range(source, first, &[rows, cols], self.opts.dtype, &self.opts.device)?;
                return Ok(Linear::new(self.finish(name, t)?));
            }
            // Host memory, as in `linear`: NF4 quantization runs on the host.
            let t = self.ckpt.load_range(source, first, &[rows, cols], DType::F32, &Device::Cpu)?;
            return self.quantized(t, nf4);
        }
        let t = self.ckpt.load_range(source, first, &[rows, cols], self.opts.dtype, &self.opts.device)?;
        Ok(Linear::new(self.finish(name, t)?))
    }

    fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let info = self.ckpt.info(name)?;
        if info.shape != expected {
            return Err(Error::ShapeMismatch {
                path: self.ckpt.files[info.file].clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: info.shape.clone(),
            });
        }
        Ok(())
    }
}

/// The dtype a checkpoint is stored in: config.json's `torch_dtype` / `dtype` when it names a float
/// type, else the float dtype holding most of the safetensors' elements, else f32.
pub fn checkpoint_dtype(config: &ModelConfig, ckpt: &Checkpoint) -> DType {
    let declared = config.declared_dtype.as_deref().map(|d| d.trim_start_matches("torch."));
    match declared {
        Some("float32" | "fp32" | "float") => return DType::F32,
        Some("bfloat16" | "bf16") => return DType::BF16,
        Some("float16" | "fp16" | "half") => return DType::F16,
        _ => {}
    }
    let mut counts = [(DType::F32, 0usize), (DType::BF16, 0), (DType::F16, 0)];
    for (_, info) in ckpt.tensors() {
        let slot = match info.dtype {
            DiskDType::F32 => 0,
            DiskDType::BF16 => 1,
            DiskDType::F16 => 2,
            _ => continue,
        };
        counts[slot].1 += info.numel();
    }
    counts.iter().filter(|(_, n)| *n > 0).max_by_key(|(_, n)| *n).map_or(DType::F32, |(d, _)| *d)
}

/// Loads config.json and the weights of a model directory.
pub fn load_model(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let config = ModelConfig::from_path(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let loaded = load_from_checkpoint(config, &ckpt, opts);
    // Loading converted tensors one at a time; give those buffers back to the OS.
    crate::system::release_free_memory();
    loaded
}

/// Loads the weights of an opened checkpoint for a given configuration.
pub fn load_from_checkpoint(config: ModelConfig, ckpt: &Checkpoint, opts: &LoadOptions) -> Result<LoadedModel> {
    let c = &config;
    let mut src = TensorSource { ckpt, opts, params: Vec::new() };
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let embed_tokens = src.tensor("model.embed_tokens.weight", &[c.vocab_size, h])?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let norm = |src: &mut TensorSource, n: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(src.tensor(&format!("{p}.{n}.weight"), &[h])?, c.rms_norm_eps))
        };
        let input_layernorm = norm(&mut src, "input_layernorm")?;
        let post_attention_layernorm = norm(&mut src, "post_attention_layernorm")?;
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let a = format!("{p}.self_attn");
        let self_attn = Attention::new(
            [
                src.linear(&format!("{a}.q_proj.weight"), qd, h)?,
                src.linear(&format!("{a}.k_proj.weight"), kvd, h)?,
                src.linear(&format!("{a}.v_proj.weight"), kvd, h)?,
                src.linear(&format!("{a}.o_proj.weight"), h, qd)?,
            ],
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
        );
        let feed_forward = match (&c.architecture, &c.moe) {
            (Architecture::Mixtral, Some(moe)) => {
                FeedForward::Sparse(load_moe(&mut src, l, moe.num_experts, moe.experts_per_token, h, i)?)
            }
            _ => FeedForward::Dense(Mlp {
                gate_proj: src.linear(&format!("{p}.mlp.gate_proj.weight"), i, h)?,
                up_proj: src.linear(&format!("{p}.mlp.up_proj.weight"), i, h)?,
                down_proj: src.linear(&format!("{p}.mlp.down_proj.weight"), h, i)?,
            }),
        };
        layers.push(DecoderLayer { input_layernorm, self_attn, post_attention_layernorm, feed_forward });
    }
    let norm = RmsNorm::new(src.tensor("model.norm.weight", &[h])?, c.rms_norm_eps);
    let lm_head = if c.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
        Linear::new(embed_tokens.clone())
    } else {
        src.plain_linear("lm_head.weight", c.vocab_size, h)?
    };
    let model = Model {
        config: config.clone(),
        embed_tokens,
        layers,
        norm,
        lm_head,
        dtype: opts.dtype,
        device: opts.device.clone(),
    };
    Ok(LoadedModel { model, params: src.params })
}

fn load_moe(src: &mut TensorSource, l: usize, e: usize, k: usize, h: usize, i: usize) -> Result<SparseMoe> {
    let hub = format!("model.layers.{l}.block_sparse_moe");
    let layout = ExpertLayout::detect(src.ckpt, l)?;
    let router_name = match layout {
        ExpertLayout::PerExpert => format!("{hub}.gate.weight"),
        ExpertLayout::Fused => format!("model.layers.{l}.mlp.gate.weight"),
    };
    let router = Linear::new({
        let t = src.ckpt.load(&router_name, &[e, h], src.opts.dtype, &src.opts.device)?;
        src.finish(&format!("{hub}.gate.weight"), t)?
    });
    let mut experts = Vec::with_capacity(e);
    match layout {
        ExpertLayout::PerExpert => {
            for x in 0..e {
                let p = format!("{hub}.experts.{x}");
                experts.push(Mlp {
                    gate_proj: src.linear(&format!("{p}.w1.weight"), i, h)?,
                    up_proj: src.linear(&format!("{p}.w3.weight"), i, h)?,
                    down_proj: src.linear(&format!("{p}.w2.weight"), h, i)?,
                });
            }
        }
        ExpertLayout::Fused => {
            let gate_up = format!("model.layers.{l}.mlp.experts.gate_up_proj");
            let down = format!("model.layers.{l}.mlp.experts.down_proj");
            src.expect_shape(&gate_up, &[e, 2 * i, h])?;
            src.expect_shape(&down, &[e, h, i])?;
            for x in 0..e {
                let p = format!("{hub}.experts.{x}");
                let base = x * 2 * i * h;
                experts.push(Mlp {
                    gate_proj: src.slice(&gate_up, &format!("{p}.w1.weight"), base, i, h)?,
                    up_proj: src.slice(&gate_up, &format!("{p}.w3.weight"), base + i * h, i, h)?,
                    down_proj: src.slice(&down, &format!("{p}.w2.weight"), x * h * i, h, i)?,
                });
            }
        }
    }
    Ok(SparseMoe::new(router, experts, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
    }

    #[test]
    fn the_checkpoint_dtype_is_the_declared_one_else_the_tensors() {
        // tiny-mistral declares float32, tiny-mistral-bf16-sharded bfloat16 (`dtype`, transformers 5).
        for (name, dtype) in [("tiny-mistral", DType::F32), ("tiny-mistral-bf16-sharded", DType::BF16)] {
            let dir = fixture(name);
            let mut config = ModelConfig::from_path(&dir).unwrap();
            let ckpt = Checkpoint::open(&dir).unwrap();
            assert_eq!(checkpoint_dtype(&config, &ckpt), dtype, "{name}");
            // Without the declaration, the tensors' own dtype decides.
            config.declared_dtype = None;
            assert_eq!(checkpoint_dtype(&config, &ckpt), dtype, "{name} by its tensors");
            config.declared_dtype = Some("float16".into());
            assert_eq!(checkpoint_dtype(&config, &ckpt), DType::F16, "{name} declared f16");
        }
    }
}
