//! NF4 storage (bitsandbytes-exact) and the frozen-linear op.
//!
//! - [`nf4`]: the NF4 code book, blockwise quantization and tiled dequantization ([`Nf4Weight`]);
//! - [`dynamic_map`]: bitsandbytes' signed dynamic 8-bit map and blockwise 8-bit quantizer (double
//!   quantization of the block scales);
//! - [`torch_mean`]: PyTorch's f32 mean, reproduced bit for bit (the double-quantization offset);
//! - [`bnb_format`]: reading and writing bitsandbytes' serialized 4-bit tensors;
//! - [`tiled_matmul`]: the CPU kernels `x W^T` and `g W` over tiles expanded to f32 (NF4, bf16, f16);
//! - [`frozen_linear`]: [`FrozenWeight`], a linear whose base weight never gets or costs a gradient.

pub mod bnb_format;
pub mod dynamic_map;
pub mod frozen_linear;
pub mod nf4;
pub mod tiled_matmul;
pub mod torch_mean;

pub use bnb_format::{BnbParts, RawTensor};
pub use frozen_linear::FrozenWeight;
pub use nf4::{AbsmaxStorage, DoubleQuantAbsmax, Nf4Weight, QuantizeOptions, NF4_CODE};
