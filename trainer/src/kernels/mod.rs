//! Hand-written CPU kernels for the work that dominates training and inference: the matrix product,
//! the frozen linear layer's products, vectorized exponentials, and the fused losses built on them.

pub(crate) mod amx;
pub mod attention;
pub mod convert;
pub mod cross_entropy;
pub mod dense_linear;
pub mod dropout;
pub mod linear_cross_entropy;
pub mod lora_linear;
pub mod matmul;
pub(crate) mod pack;
pub mod parallel;
pub mod precision;
pub mod rms_norm;
pub mod rope;
pub mod sgemm;
pub(crate) mod storage;
pub mod swiglu;
pub mod vmath;

pub use attention::FusedAttention;
pub use cross_entropy::CrossEntropy;
pub use dense_linear::{DenseLinear, DenseProduct};
pub use dropout::DropoutMask;
pub use linear_cross_entropy::LinearCrossEntropy;
pub use matmul::matmul;
pub use precision::{frozen_gemm, matmul_precision, set_matmul_precision, MatmulPrecision};
pub use rms_norm::rms_norm;
pub use rope::RopeTranspose;
pub use sgemm::{bf16_gemm, bf16_gemm_on, sgemm, sgemm_serial, Bf16Path, MatRef};
pub use storage::{is_activation_dtype, is_cpu_activation};
pub use swiglu::swiglu;
