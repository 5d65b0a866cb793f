//! Reading and writing CPU storage inside candle ops: the checks every kernel makes before touching the
//! values. Activations may be f32, bf16 or f16 ([`is_activation_dtype`]): a kernel reads them as f32
//! ([`contiguous_values`], converted when 16-bit), computes in f32 and stores its result in the
//! activations' dtype ([`storage_in`], [`tensor_in`]).

use std::borrow::Cow;

use super::convert;
use super::sgemm::MatRef;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Shape, Storage, Tensor};

/// Whether the fused kernels read and write activations of this dtype (f32, bf16, f16; they compute in
/// f32 whatever it is).
pub fn is_activation_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// Whether `t` is an activation the fused CPU kernels take: on the CPU, in an [`is_activation_dtype`].
pub fn is_cpu_activation(t: &Tensor) -> bool {
    t.device().is_cpu() && is_activation_dtype(t.dtype())
}

/// The values of a contiguous f32/bf16/f16 layout as f32: borrowed when f32, converted otherwise.
pub(crate) fn contiguous_values<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: contiguous operands expected") };
    Ok(match storage {
        CpuStorage::F32(data) => Cow::Borrowed(&data[start..end]),
        CpuStorage::BF16(data) => Cow::Owned(convert::bf16_to_f32(&data[start..end])),
        CpuStorage::F16(data) => Cow::Owned(convert::f16_to_f32(&data[start..end])),
        other => bail!("{op}: f32, bf16 or f16 operands expected, found {:?}", other.dtype()),
    })
}

/// Calls `f` with the values of a contiguous f32/bf16/f16 tensor on the CPU, as f32.
pub(crate) fn with_contiguous_values<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else { bail!("{op}: CPU tensors expected") };
    f(&contiguous_values(storage, layout, op)?)
}

/// f32 results stored in `dtype` (f32 as is, bf16/f16 rounded to nearest).
pub(crate) fn storage_in(values: Vec<f32>, dtype: DType) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::BF16 => CpuStorage::BF16(convert::f32_to_bf16(&values)),
        DType::F16 => CpuStorage::F16(convert::f32_to_f16(&values)),
        other => bail!("activations of dtype {other:?} are not supported by the fused kernels"),
    })
}

/// A tensor of f32 results stored in `dtype` (see [`storage_in`]).
pub(crate) fn tensor_in(
    values: Vec<f32>,
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    match dtype {
        DType::F32 => Tensor::from_vec(values, shape, device),
        DType::BF16 => Tensor::from_vec(convert::f32_to_bf16(&values), shape, device),
        DType::F16 => Tensor::from_vec(convert::f32_to_f16(&values), shape, device),
        other => bail!("activations of dtype {other:?} are not supported by the fused kernels"),
    }
}

/// The values of a contiguous f32 layout; `op` names the caller in errors.
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { bail!("{op}: f32 operands expected, found {:?}", storage.dtype()) };
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: contiguous operands expected") };
    Ok(&data[start..end])
}

/// The strided 2-D view of an f32 layout (any strides); errors unless it is 2-D.
pub(crate) fn matrix_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<MatRef<'a>> {
    let CpuStorage::F32(data) = storage else { bail!("{op}: f32 operands expected, found {:?}", storage.dtype()) };
    let (&[rows, cols], &[rs, cs]) = (layout.dims(), layout.stride()) else {
        bail!("{op}: 2-D operands expected, found {:?}", layout.dims())
    };
    Ok(MatRef { data: &data[layout.start_offset()..], rows, cols, row_stride: rs, col_stride: cs })
}

/// Calls `f` with the strided 2-D view of an f32 tensor on the CPU.
pub(crate) fn with_matrix_f32<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(MatRef<'_>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else { bail!("{op}: CPU tensors expected") };
    f(matrix_f32(storage, layout, op)?)
}

/// A vector of `len` f32 whose values are left as the allocator returns them, for an output that the
/// caller overwrites entirely before anything reads it (a product with `accumulate = false`, an
/// element-wise map): skipping the zero fill saves a pass over memory, the same way candle allocates
/// its own outputs.
#[allow(clippy::uninit_vec)]
pub(crate) fn output_f32(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns and every caller writes all `len` values before
    // reading any (see each call site).
    unsafe { v.set_len(len) };
    v
}
