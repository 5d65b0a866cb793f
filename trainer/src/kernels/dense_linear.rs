//! The f32 products of a dense frozen linear layer on the CPU through [`super::frozen_gemm`] (f32 or
//! bf16 operands, see [`super::precision`]):
//! `y = x W^T` (forward) and `dx = g W` (input gradient), as a candle op without backward (the
//! frozen-linear bridge owns the gradient rule).

use super::precision::frozen_gemm;
use super::sgemm::MatRef;
use super::storage::{contiguous_f32, matrix_f32, output_f32};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape};

/// Which product [`DenseLinear`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseProduct {
    /// `x [.., in] -> x W^T [.., out]`.
    Forward,
    /// `g [.., out] -> g W [.., in]`.
    InputGrad,
}

/// `apply_op2_no_bwd(x, w)` with `w` a 2-D `[out, in]` f32 weight (any strides) and `x` f32 with any
/// leading dimensions.
#[derive(Debug, Clone, Copy)]
pub struct DenseLinear(pub DenseProduct);

impl CustomOp2 for DenseLinear {
    fn name(&self) -> &'static str {
        match self.0 {
            DenseProduct::Forward => "dense-linear-forward",
            DenseProduct::InputGrad => "dense-linear-input-grad",
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x_all = contiguous_f32(xs, xl, self.name())?;
        let w = matrix_f32(ws, wl, self.name())?;
        let w = match self.0 {
            DenseProduct::Forward => w.t(),
            DenseProduct::InputGrad => w,
        };
        let dims = xl.dims();
        let Some(&k) = dims.last() else { bail!("{}: input must have a dimension", self.name()) };
        if k != w.rows {
            bail!("{}: input {dims:?} does not end in {}", self.name(), w.rows)
        }
        let m = x_all.len() / k.max(1);
        let x = MatRef::row_major(x_all, m, k);
        // Overwritten by the product (accumulate = false).
        let mut out = output_f32(m * w.cols);
        frozen_gemm(x, w, &mut out, w.cols, false).map_err(candle_core::Error::Msg)?;
        let mut out_dims = dims.to_vec();
        if let Some(l) = out_dims.last_mut() {
            *l = w.cols;
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}
