//! The precision of the frozen base's f32 matrix products, process-wide (like PyTorch's
//! `torch.set_float32_matmul_precision`).
//!
//! `Highest` multiplies in f32. `Medium` rounds both operands of the frozen base's products (the
//! decoder linears and the lm_head, dense or NF4) to bf16 and accumulates in f32, on AMX tiles where the
//! CPU has them (~3-4x the f32 product on a Sapphire Rapids Xeon), else with AVX-512 BF16 dot products
//! (up to ~1.7x on AMD Zen 4; about f32's speed on Intel), else in f32. LoRA products, attention, norms and the loss always run in f32,
//! and so do all gradients of trainable weights. Real Mistral checkpoints are bf16 already, so rounding their weights loses nothing; the
//! activations lose mantissa bits, as under GPU autocast.

use std::sync::atomic::{AtomicU8, Ordering};

/// How f32 products of frozen weights are computed (`"highest"` or `"medium"` in a recipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// f32 products (the default).
    #[default]
    Highest,
    /// bf16 operands, f32 accumulation.
    Medium,
}

impl MatmulPrecision {
    /// Parses `"highest"` or `"medium"`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "highest" => Some(MatmulPrecision::Highest),
            "medium" => Some(MatmulPrecision::Medium),
            _ => None,
        }
    }

    /// The precision a model of `dtype` multiplies at unless told otherwise: `Medium` for bf16 and f16
    /// models (their weights and activations are 16-bit already, and PyTorch multiplies them with 16-bit
    /// operands too), `Highest` for f32 models.
    pub fn for_model_dtype(dtype: candle_core::DType) -> Self {
        match dtype {
            candle_core::DType::BF16 | candle_core::DType::F16 => MatmulPrecision::Medium,
            _ => MatmulPrecision::Highest,
        }
    }

    /// The name [`MatmulPrecision::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::Highest => "highest",
            MatmulPrecision::Medium => "medium",
        }
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of the frozen base's products for the whole process.
pub fn set_matmul_precision(precision: MatmulPrecision) {
    PRECISION.store(precision as u8, Ordering::Relaxed);
}

/// The current precision of the frozen base's products.
pub fn matmul_precision() -> MatmulPrecision {
    if PRECISION.load(Ordering::Relaxed) == MatmulPrecision::Medium as u8 {
        MatmulPrecision::Medium
    } else {
        MatmulPrecision::Highest
    }
}

/// The frozen base's product at the current precision: [`super::sgemm`] or [`super::bf16_gemm`].
pub fn frozen_gemm(
    a: super::MatRef<'_>,
    b: super::MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> Result<(), String> {
    match matmul_precision() {
        MatmulPrecision::Highest => super::sgemm(a, b, c, ldc, accumulate),
        MatmulPrecision::Medium => super::bf16_gemm(a, b, c, ldc, accumulate),
    }
}
