//! Matrix products with a weight stored more compactly than f32 (NF4, or bf16/f16), tile by tile:
//! `y = x W^T` (forward) and `dx = g W` (input gradient). The weight is expanded to f32 a block of rows
//! at a time into a scratch tile and multiplied with [`frozen_gemm`] (f32 or bf16 operands) straight
//! into the destination, so no f32 copy of the whole weight ever exists.
//!
//! This file is the whole CPU path; the candle op over it is the frozen linear's
//! (`quant::frozen_linear`), where a GPU kernel would go as its `cuda_fwd`.

use super::nf4::Nf4Weight;
use crate::kernels::{frozen_gemm, MatRef};
use half::{bf16, f16};
use std::ops::Range;

/// A `[rows, cols]` weight that can write any block of its rows as f32.
pub trait WeightRows: Sync {
    /// Rows (output features).
    fn rows(&self) -> usize;
    /// Columns (input features).
    fn cols(&self) -> usize;
    /// Writes rows `range` as f32 into `out` (`range.len() * cols` values).
    fn rows_f32(&self, range: Range<usize>, out: &mut [f32]) -> crate::Result<()>;
}

impl WeightRows for Nf4Weight {
    fn rows(&self) -> usize {
        Nf4Weight::rows(self)
    }
    fn cols(&self) -> usize {
        Nf4Weight::cols(self)
    }
    fn rows_f32(&self, range: Range<usize>, out: &mut [f32]) -> crate::Result<()> {
        self.dequantize_rows(range, out)
    }
}

/// A row-major 16-bit float weight borrowed from a tensor's storage.
#[derive(Debug, Clone, Copy)]
pub enum HalfRows<'a> {
    /// bfloat16 values.
    Bf16 {
        /// `rows * cols` values, row-major.
        data: &'a [bf16],
        /// Columns.
        cols: usize,
    },
    /// IEEE half values.
    F16 {
        /// `rows * cols` values, row-major.
        data: &'a [f16],
        /// Columns.
        cols: usize,
    },
}

impl WeightRows for HalfRows<'_> {
    fn rows(&self) -> usize {
        match self {
            HalfRows::Bf16 { data, cols } => data.len() / (*cols).max(1),
            HalfRows::F16 { data, cols } => data.len() / (*cols).max(1),
        }
    }
    fn cols(&self) -> usize {
        match self {
            HalfRows::Bf16 { cols, .. } | HalfRows::F16 { cols, .. } => *cols,
        }
    }
    fn rows_f32(&self, range: Range<usize>, out: &mut [f32]) -> crate::Result<()> {
        let cols = self.cols();
        if range.end > self.rows() || out.len() != range.len() * cols {
            return Err(crate::Error::Invalid(format!(
                "16-bit weight: rows {range:?} of {} into {} values",
                self.rows(),
                out.len()
            )));
        }
        let first = range.start * cols;
        match self {
            HalfRows::Bf16 { data, .. } => crate::kernels::parallel::for_rows_mut(out, cols, |i, o| {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&data[first + i * cols..][..cols], o)
            }),
            HalfRows::F16 { data, .. } => crate::kernels::parallel::for_rows_mut(out, cols, |i, o| {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&data[first + i * cols..][..cols], o)
            }),
        }
        Ok(())
    }
}

/// Scratch floats per dequantized tile (64 MiB): 4096 rows of a 4096-column weight, so that packing the
/// input once per tile is small next to the tile's product.
pub const TILE_FLOATS: usize = 1 << 24;

/// Rows per dequantized tile of a `[rows, cols]` weight: as many whole rows as [`TILE_FLOATS`] holds, at
/// least one and at most the weight. An empty weight (0 rows or 0 columns) has no tile: 0.
pub fn tile_rows(rows: usize, cols: usize) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    (TILE_FLOATS / cols).clamp(1, rows)
}

/// Expands `w` to f32 `tile` rows at a time into one scratch buffer and hands each tile
/// `(first row, end row, values [rows, cols])` to `f`: no full f32 copy of the weight exists at once.
/// An empty weight (0 rows or 0 columns) has no tile: `f` is never called.
fn for_each_tile(
    w: &impl WeightRows,
    tile: usize,
    mut f: impl FnMut(usize, usize, &[f32]) -> crate::Result<()>,
) -> crate::Result<()> {
    let (rows, cols) = (w.rows(), w.cols());
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let tile = tile.max(1);
    // The scratch is kept per thread between calls (every value is overwritten before it is read).
    let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if scratch.len() < tile * cols {
        scratch.resize(tile * cols, 0.0);
    }
    let result = (0..rows).step_by(tile).try_for_each(|r0| {
        let r1 = (r0 + tile).min(rows);
        let t = &mut scratch[..(r1 - r0) * cols];
        w.rows_f32(r0..r1, t)?;
        f(r0, r1, t)
    });
    SCRATCH.with(|s| *s.borrow_mut() = scratch);
    result
}

thread_local! {
    /// The dequantized tile, reused between products.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y [m, rows] = x [m, cols] W^T`, all row-major. Errors when the slices do not match the sizes.
pub fn forward_cpu(w: &impl WeightRows, x: &[f32], m: usize, y: &mut [f32]) -> crate::Result<()> {
    forward_tiled(w, x, m, y, tile_rows(w.rows(), w.cols()))
}

/// [`forward_cpu`] with `tile` weight rows per dequantized tile.
fn forward_tiled(w: &impl WeightRows, x: &[f32], m: usize, y: &mut [f32], tile: usize) -> crate::Result<()> {
    let (rows, cols) = (w.rows(), w.cols());
    if x.len() != m * cols || y.len() != m * rows {
        return Err(crate::Error::Invalid(format!(
            "tiled forward: x has {} values and y {} for m={m}, weight [{rows}, {cols}]",
            x.len(),
            y.len()
        )));
    }
    if m == 0 {
        return Ok(());
    }
    for_each_tile(w, tile, |r0, r1, t| {
        // Columns r0..r1 of `y` (row stride `rows`) = x [m, cols] times the tile read as its transpose.
        let tile = MatRef::row_major(t, r1 - r0, cols).t();
        frozen_gemm(MatRef::row_major(x, m, cols), tile, &mut y[r0..], rows, false).map_err(crate::Error::Invalid)
    })
}

/// `dx [m, cols] = g [m, rows] W`, all row-major: the tiles' products are accumulated into `dx`.
pub fn input_grad_cpu(w: &impl WeightRows, g: &[f32], m: usize, dx: &mut [f32]) -> crate::Result<()> {
    input_grad_tiled(w, g, m, dx, tile_rows(w.rows(), w.cols()))
}

/// [`input_grad_cpu`] with `tile` weight rows per dequantized tile.
fn input_grad_tiled(w: &impl WeightRows, g: &[f32], m: usize, dx: &mut [f32], tile: usize) -> crate::Result<()> {
    let (rows, cols) = (w.rows(), w.cols());
    if g.len() != m * rows || dx.len() != m * cols {
        return Err(crate::Error::Invalid(format!(
            "tiled input gradient: g has {} values and dx {} for m={m}, weight [{rows}, {cols}]",
            g.len(),
            dx.len()
        )));
    }
    if m == 0 {
        return Ok(());
    }
    for_each_tile(w, tile, |r0, r1, t| {
        // dx [m, cols] += columns r0..r1 of g (row stride `rows`) times the tile [r1 - r0, cols].
        let g_cols = MatRef { data: &g[r0..], rows: m, cols: r1 - r0, row_stride: rows, col_stride: 1 };
        frozen_gemm(g_cols, MatRef::row_major(t, r1 - r0, cols), dx, cols, r0 > 0).map_err(crate::Error::Invalid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantizeOptions;

    /// A weight without rows or without columns has no tile, and its products do not divide by zero.
    #[test]
    fn an_empty_weight_has_no_tile() {
        assert_eq!(tile_rows(0, 4096), 0);
        assert_eq!(tile_rows(4096, 0), 0);
        assert_eq!(tile_rows(0, 0), 0);
        assert_eq!(tile_rows(10, 4096), 10);
        assert_eq!(tile_rows(100_000, TILE_FLOATS * 2), 1);
        let empty = HalfRows::Bf16 { data: &[], cols: 4 };
        let (x, mut y) = (vec![1f32; 2 * 4], Vec::<f32>::new());
        forward_cpu(&empty, &x, 2, &mut y).unwrap();
        let (g, mut dx) = (Vec::<f32>::new(), vec![0f32; 2 * 4]);
        input_grad_cpu(&empty, &g, 2, &mut dx).unwrap();
        assert_eq!(dx, vec![0f32; 8]);
        let mut calls = 0;
        for_each_tile(&HalfRows::F16 { data: &[], cols: 0 }, 0, |_, _, _| {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 0);
    }

    /// Several tiles (including a ragged last one) give the products of the whole dequantized weight.
    #[test]
    fn products_over_several_tiles_equal_the_dequantized_products() {
        let (rows, cols, m) = (70usize, 64usize, 13usize);
        let wv: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 401) as f32 / 200.0 - 1.0).collect();
        let w = Nf4Weight::quantize_with(&wv, &[rows, cols], &QuantizeOptions::default()).unwrap();
        let dq = w.dequantize();
        let x: Vec<f32> = (0..m * cols).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
        let g: Vec<f32> = (0..m * rows).map(|i| ((i * 13) % 23) as f32 / 11.0 - 1.0).collect();
        // f64 references: y = x dq^T, dx = g dq.
        let y_ref: Vec<f64> = (0..m * rows)
            .map(|o| (0..cols).map(|k| x[o / rows * cols + k] as f64 * dq[o % rows * cols + k] as f64).sum())
            .collect();
        let dx_ref: Vec<f64> = (0..m * cols)
            .map(|o| (0..rows).map(|r| g[o / cols * rows + r] as f64 * dq[r * cols + o % cols] as f64).sum())
            .collect();
        for tile in [rows, 16, 7] {
            let mut y = vec![0f32; m * rows];
            forward_tiled(&w, &x, m, &mut y, tile).unwrap();
            let mut dx = vec![0f32; m * cols];
            input_grad_tiled(&w, &g, m, &mut dx, tile).unwrap();
            for (got, want) in y.iter().zip(&y_ref).chain(dx.iter().zip(&dx_ref)) {
                assert!((*got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "tile {tile}: {got} vs {want}");
            }
        }
    }

    /// The same over bf16 and f16 weights: each tile expanded exactly, products those of the 16-bit values.
    #[test]
    fn half_precision_weights_over_several_tiles_equal_their_exact_products() {
        let (rows, cols, m) = (70usize, 64usize, 13usize);
        let wv: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 401) as f32 / 200.0 - 1.0).collect();
        let bf: Vec<bf16> = wv.iter().map(|&v| bf16::from_f32(v)).collect();
        let hf: Vec<f16> = wv.iter().map(|&v| f16::from_f32(v)).collect();
        let x: Vec<f32> = (0..m * cols).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
        let g: Vec<f32> = (0..m * rows).map(|i| ((i * 13) % 23) as f32 / 11.0 - 1.0).collect();
        for (weight, exact) in [
            (HalfRows::Bf16 { data: &bf, cols }, bf.iter().map(|v| v.to_f32()).collect::<Vec<f32>>()),
            (HalfRows::F16 { data: &hf, cols }, hf.iter().map(|v| v.to_f32()).collect::<Vec<f32>>()),
        ] {
            assert_eq!((WeightRows::rows(&weight), WeightRows::cols(&weight)), (rows, cols));
            let y_ref: Vec<f64> = (0..m * rows)
                .map(|o| (0..cols).map(|k| x[o / rows * cols + k] as f64 * exact[o % rows * cols + k] as f64).sum())
                .collect();
            let dx_ref: Vec<f64> = (0..m * cols)
                .map(|o| (0..rows).map(|r| g[o / cols * rows + r] as f64 * exact[r * cols + o % cols] as f64).sum())
                .collect();
            for tile in [rows, 16, 7] {
                let mut y = vec![0f32; m * rows];
                forward_tiled(&weight, &x, m, &mut y, tile).unwrap();
                let mut dx = vec![0f32; m * cols];
                input_grad_tiled(&weight, &g, m, &mut dx, tile).unwrap();
                for (got, want) in y.iter().zip(&y_ref).chain(dx.iter().zip(&dx_ref)) {
                    assert!((*got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "tile {tile}: {got} vs {want}");
                }
            }
        }
    }
}
