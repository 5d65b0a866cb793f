//! The frozen linear `y = x W^T` with a base weight (dense or NF4) that never receives a gradient and
//! never costs one.
//!
//! candle's matmul backward computes the gradient of both operands, even a frozen one. Here `y` is
//! computed outside the graph (from a detached `x`), then attached to `x` by a bridge op
//! ([`FrozenLinearBridge`], a `CustomOp2` over `(x, y)`) whose forward returns `y` and whose backward
//! returns only `dx = dy W` (and nothing for `y`). The weight is not an input of any recorded op, so the
//! GradStore never holds anything of its size. When `x` carries no gradient (inference) the bridge is
//! skipped.
//!
//! Dtypes: on the CPU an f32/bf16/f16 input takes the f32 kernels whatever the weight's storage (the
//! input read as f32, the result stored in its dtype): an f32 weight directly, a bf16/f16 weight
//! expanded to f32 a tile of rows at a time (so a bf16 model computes in f32 without an f32 copy of its
//! weights). Elsewhere a dense weight is used in its own dtype (`x` is converted to it and the result
//! back to `x`'s dtype); an NF4 weight computes in f32 (`x` converted to f32 and back, through
//! differentiable conversions). Devices: the products run wherever candle runs (dense) or on the CPU
//! (NF4; a GPU kernel would go into [`TiledProduct`]'s `cuda_fwd`). The bridge has only
//! a `cpu_fwd` (it copies `y`): training on a GPU needs its `cuda_fwd` too (a device copy), not written
//! while the crate builds without candle's `cuda` feature. Inference needs no bridge.

use super::nf4::Nf4Weight;
use super::tiled_matmul::HalfRows;
use crate::kernels::is_cpu_activation;
use crate::kernels::storage::with_matrix_f32;
use crate::kernels::{frozen_gemm, DenseLinear, DenseProduct, MatRef};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use std::sync::Arc;

/// A frozen base weight `[out, in]`.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// A dense weight (any float dtype); detached at every use, so even a `Var`'s tensor stays frozen.
    Dense(Tensor),
    /// An NF4 weight (2-D).
    Nf4(Arc<Nf4Weight>),
}

impl FrozenWeight {
    /// A dense frozen weight; errors unless `w` is 2-D.
    pub fn dense(w: &Tensor) -> crate::Result<Self> {
        if w.rank() != 2 {
            return Err(crate::Error::Invalid(format!(
                "frozen linear: weight must be [out, in], found {:?}",
                w.dims()
            )));
        }
        Ok(FrozenWeight::Dense(w.detach()))
    }

    /// An NF4 frozen weight; errors unless it is 2-D.
    pub fn nf4(w: Nf4Weight) -> crate::Result<Self> {
        if w.shape().len() != 2 {
            return Err(crate::Error::Invalid(format!(
                "frozen linear: NF4 weight must be [out, in], found {:?}",
                w.shape()
            )));
        }
        Ok(FrozenWeight::Nf4(Arc::new(w)))
    }

    /// `(out, in)`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(w) => w.dims2(),
            FrozenWeight::Nf4(w) => match w.shape() {
                [o, i] => Ok((*o, *i)),
                s => bail!("frozen linear: NF4 weight must be [out, in], found {s:?}"),
            },
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.dims().map(|d| d.0).unwrap_or(0)
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.dims().map(|d| d.1).unwrap_or(0)
    }

    /// Bytes held by the weight.
    pub fn memory_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            FrozenWeight::Nf4(w) => w.memory_bytes(),
        }
    }

    /// The weight as a dense tensor (NF4 dequantized to f32 on `device`), e.g. to merge an adapter into.
    pub fn to_dense(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => w.detach().to_device(device),
            FrozenWeight::Nf4(w) => w.to_tensor(device).map_err(|e| candle_core::Error::Msg(e.to_string())),
        }
    }

    /// `x [..., in] -> x W^T [..., out]`, in `x`'s dtype. Gradients flow to `x` only; the weight never
    /// gets one.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, in_features) = self.dims()?;
        if x.rank() == 0 || x.dim(candle_core::D::Minus1)? != in_features {
            bail!("frozen linear: input {:?} does not end in {in_features}", x.dims())
        }
        // The CPU products read f32/bf16/f16 inputs as they are; off that path an NF4 weight computes in f32.
        let compute_dtype = match self {
            FrozenWeight::Nf4(_) if !(is_cpu_activation(x) && self.has_cpu_products()) => DType::F32,
            _ => x.dtype(),
        };
        let x_in = if x.dtype() == compute_dtype { x.clone() } else { x.to_dtype(compute_dtype)? };
        let y = self.product(&x_in.detach(), false)?;
        let y = if x_in.track_op() {
            x_in.apply_op2_arc(&y, Arc::new(Box::new(FrozenLinearBridge { weight: self.clone() })))?
        } else {
            y
        };
        if y.dtype() == x.dtype() {
            Ok(y)
        } else {
            y.to_dtype(x.dtype())
        }
    }

    /// `y [m, out] = x [m, in] W^T` on plain f32 slices, for the weights [`FrozenWeight::has_cpu_products`]
    /// takes (NF4, dense f32/bf16/f16 on the CPU), at the current matmul precision.
    pub fn forward_f32(&self, x: &[f32], m: usize, y: &mut [f32]) -> crate::Result<()> {
        self.slice_product(x, m, y, false)
    }

    /// `dx [m, in] = g [m, out] W` on plain f32 slices, for the weights [`FrozenWeight::has_cpu_products`]
    /// takes.
    pub fn input_grad_f32(&self, g: &[f32], m: usize, dx: &mut [f32]) -> crate::Result<()> {
        self.slice_product(g, m, dx, true)
    }

    /// The slice products behind [`FrozenWeight::forward_f32`] and [`FrozenWeight::input_grad_f32`].
    fn slice_product(&self, x: &[f32], m: usize, out: &mut [f32], transposed: bool) -> crate::Result<()> {
        match self {
            FrozenWeight::Nf4(w) => {
                if transposed {
                    super::tiled_matmul::input_grad_cpu(&**w, x, m, out)
                } else {
                    super::tiled_matmul::forward_cpu(&**w, x, m, out)
                }
            }
            FrozenWeight::Dense(w) if w.dtype() != DType::F32 => with_half_rows(w, |rows| {
                if transposed {
                    super::tiled_matmul::input_grad_cpu(&rows, x, m, out)
                } else {
                    super::tiled_matmul::forward_cpu(&rows, x, m, out)
                }
            }),
            FrozenWeight::Dense(w) => Ok(with_matrix_f32(w, "frozen linear", |weight| {
                let (k, b) = if transposed { (weight.rows, weight) } else { (weight.cols, weight.t()) };
                if x.len() != m * k || out.len() != m * b.cols {
                    bail!(
                        "frozen linear: {} inputs and {} outputs for {m} rows of a [{}, {}] weight",
                        x.len(),
                        out.len(),
                        weight.rows,
                        weight.cols
                    )
                }
                frozen_gemm(MatRef::row_major(x, m, k), b, out, b.cols, false).map_err(candle_core::Error::Msg)
            })?),
        }
    }

    /// Whether the CPU slice products ([`FrozenWeight::forward_f32`], [`FrozenWeight::input_grad_f32`])
    /// take this weight: NF4, or a dense f32/bf16/f16 weight on the CPU.
    pub fn has_cpu_products(&self) -> bool {
        match self {
            FrozenWeight::Nf4(_) => true,
            FrozenWeight::Dense(w) => w.device().is_cpu() && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16),
        }
    }

    /// `dy [..., out] -> dy W [..., in]` outside the graph, in `dy`'s dtype.
    pub fn input_grad(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        self.product(&dy.detach(), true)
    }

    /// `x W^T` (or `x W` when `transposed`) over the last dimension, outside the graph, result in `x`'s dtype.
    fn product(&self, x: &Tensor, transposed: bool) -> candle_core::Result<Tensor> {
        if is_cpu_activation(x) && self.has_cpu_products() {
            if let FrozenWeight::Dense(w) = self {
                if w.dtype() == DType::F32 && x.dtype() == DType::F32 {
                    let product = if transposed { DenseProduct::InputGrad } else { DenseProduct::Forward };
                    return x.contiguous()?.apply_op2_no_bwd(&w.detach(), &DenseLinear(product));
                }
            }
            return x.contiguous()?.apply_op1_no_bwd(&TiledProduct { weight: self.clone(), transposed });
        }
        match self {
            FrozenWeight::Dense(w) => {
                let dims = x.dims().to_vec();
                let k = dims[dims.len() - 1];
                let x2 = x.reshape((x.elem_count() / k.max(1), k))?;
                let x2 = if x2.dtype() == w.dtype() { x2 } else { x2.to_dtype(w.dtype())? };
                let w = w.detach();
                let y = if transposed { x2.matmul(&w)? } else { x2.matmul(&w.t()?)? };
                let y = if y.dtype() == x.dtype() { y } else { y.to_dtype(x.dtype())? };
                let mut out = dims;
                if let Some(l) = out.last_mut() {
                    *l = y.dim(1)?;
                }
                y.reshape(out)
            }
            FrozenWeight::Nf4(_) => {
                if !x.device().is_cpu() {
                    bail!("frozen linear: the NF4 kernel runs on the CPU only, input is on {:?}", x.device())
                }
                let y = x
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .apply_op1_no_bwd(&TiledProduct { weight: self.clone(), transposed })?;
                y.to_dtype(x.dtype())
            }
        }
    }
}

/// Calls `f` with the rows of a contiguous bf16/f16 CPU weight.
fn with_half_rows<R>(w: &Tensor, f: impl FnOnce(HalfRows<'_>) -> crate::Result<R>) -> crate::Result<R> {
    let cols = w.dims().last().copied().unwrap_or(0);
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        return Err(crate::Error::Invalid("frozen linear: a CPU weight expected".into()));
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Err(crate::Error::Invalid("frozen linear: a contiguous 16-bit weight expected".into()));
    };
    match storage {
        CpuStorage::BF16(v) => f(HalfRows::Bf16 { data: &v[a..b], cols }),
        CpuStorage::F16(v) => f(HalfRows::F16 { data: &v[a..b], cols }),
        other => {
            Err(crate::Error::Invalid(format!("frozen linear: bf16/f16 weight expected, found {:?}", other.dtype())))
        }
    }
}

/// `x W^T` (or `g W` when `transposed`) of an f32/bf16/f16 input (read as f32, the result in its dtype)
/// with any weight the CPU products take; a weight stored more compactly than f32 (NF4, or dense
/// bf16/f16) is expanded to f32 a tile of rows at a time ([`super::tiled_matmul`]); no backward: the
/// frozen-linear bridge owns the gradient rule.
#[derive(Debug, Clone)]
struct TiledProduct {
    weight: FrozenWeight,
    transposed: bool,
}

impl candle_core::CustomOp1 for TiledProduct {
    fn name(&self) -> &'static str {
        if self.transposed {
            "tiled-linear-input-grad"
        } else {
            "tiled-linear-forward"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::kernels::storage::contiguous_values(storage, layout, self.name())?;
        let x = &x[..];
        let (out_features, in_features) = self.weight.dims()?;
        let (k, n) = if self.transposed { (out_features, in_features) } else { (in_features, out_features) };
        let dims = layout.dims();
        if dims.last() != Some(&k) {
            bail!("{}: input {dims:?} does not end in {k}", self.name())
        }
        let m = x.len() / k.max(1);
        // The first tile of each product writes (accumulate = false) every value, so the output needs no
        // zero fill unless there is no tile at all.
        let mut out = if k > 0 && n > 0 { crate::kernels::storage::output_f32(m * n) } else { vec![0f32; m * n] };
        self.weight
            .slice_product(x, m, &mut out, self.transposed)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut out_dims = dims.to_vec();
        if let Some(l) = out_dims.last_mut() {
            *l = n;
        }
        Ok((crate::kernels::storage::storage_in(out, storage.dtype())?, Shape::from(out_dims)))
    }
}

/// The bridge op over `(x, y)`: forward returns `y`; backward gives `x` the gradient `dy W` and `y`
/// nothing.
#[derive(Debug, Clone)]
pub struct FrozenLinearBridge {
    /// The frozen weight whose product `y` is.
    pub weight: FrozenWeight,
}

/// Copies a contiguous slice of a float CPU storage.
fn copy_storage(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
    let Some((a, b)) = l.contiguous_offsets() else { bail!("frozen-linear bridge: contiguous output expected") };
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        other => bail!("frozen-linear bridge: float output expected, found {:?}", other.dtype()),
    })
}

impl CustomOp2 for FrozenLinearBridge {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((copy_storage(y, ly)?, ly.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.weight.input_grad(grad)?), None))
    }
}
