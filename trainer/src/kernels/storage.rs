//! Reading f32 CPU storage inside candle ops: the checks every kernel makes before touching the values.

use super::sgemm::MatRef;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Storage, Tensor};

/// The values of a contiguous f32 layout; `op` names the caller in errors.
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { bail!("{op}: f32 operands expected, found {:?}", storage.dtype()) };
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: contiguous operands expected") };
    Ok(&data[start..end])
}

/// Calls `f` with the values of a contiguous f32 tensor on the CPU.
pub(crate) fn with_contiguous_f32<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else { bail!("{op}: CPU tensors expected") };
    f(contiguous_f32(storage, layout, op)?)
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
