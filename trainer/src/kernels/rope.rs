//! Rotary embedding fused with the head transpose: `x [b, t, heads, d] -> y [b, heads, t, d]` with
//! `y = x cos + rotate_half(x) sin` (`rotate_half(x) = [-x2, x1]`), and its backward
//! `dx = dy cos + [ (dy sin)_2, -(dy sin)_1 ]` transposed back, in one pass each (the composed version
//! runs a transpose copy, two narrows, a negation, a concatenation, two products and a sum).

use super::parallel::for_rows_mut;
use super::storage::{contiguous_values, output_f32, storage_in, with_contiguous_values};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// The op: `cos`/`sin` are `[b, 1, t, d]` f32 CPU tables (one row per token); the input f32, bf16 or
/// f16 (rotated in f32, the result in its dtype).
#[derive(Debug, Clone)]
pub struct RopeTranspose {
    /// Cosines per token and channel.
    pub cos: Tensor,
    /// Sines per token and channel.
    pub sin: Tensor,
    /// `false`: rotate `[b, t, h, d] -> [b, h, t, d]`; `true`: the backward, `[b, h, t, d] -> [b, t, h, d]`.
    pub backward: bool,
}

impl CustomOp1 for RopeTranspose {
    fn name(&self) -> &'static str {
        if self.backward {
            "rope-transpose-backward"
        } else {
            "rope-transpose"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_values(storage, layout, "rope")?;
        let x = &x[..];
        let &[b, d1, d2, d] = layout.dims() else { bail!("rope: 4-D input expected, found {:?}", layout.dims()) };
        // Forward input is [b, t, h, d]; backward input is [b, h, t, d].
        let (t, h) = if self.backward { (d2, d1) } else { (d1, d2) };
        let half = d / 2;
        let (cos, sin) = (self.cos.contiguous()?, self.sin.contiguous()?);
        // Each row's two halves are written whole when the head dimension is even (as RoPE needs).
        let mut out = if d % 2 == 0 { output_f32(x.len()) } else { vec![0f32; x.len()] };
        with_contiguous_values(&cos, "rope", |cos| {
            with_contiguous_values(&sin, "rope", |sin| {
                if cos.len() != b * t * d || sin.len() != b * t * d {
                    bail!("rope: tables hold {} values, {b}x{t}x{d} needed", cos.len())
                }
                // One output row of d values per (b, a, c) in the output's order.
                for_rows_mut(&mut out, d, |row, y| {
                    let (bi, a, c) = (row / (d1 * d2), (row / d1) % d2, row % d1);
                    // Output [b, h, t, d] (forward: a = head, c = token) or [b, t, h, d] (backward: a = token, c = head).
                    let (hi, ti) = if self.backward { (c, a) } else { (a, c) };
                    let src = if self.backward { ((bi * h + hi) * t + ti) * d } else { ((bi * t + ti) * h + hi) * d };
                    let xr = &x[src..src + d];
                    let at = (bi * t + ti) * d;
                    let (cr, sr) = (&cos[at..at + d], &sin[at..at + d]);
                    if self.backward {
                        for j in 0..half {
                            y[j] = xr[j] * cr[j] + xr[j + half] * sr[j + half];
                            y[j + half] = xr[j + half] * cr[j + half] - xr[j] * sr[j];
                        }
                    } else {
                        for j in 0..half {
                            y[j] = xr[j] * cr[j] - xr[j + half] * sr[j];
                            y[j + half] = xr[j + half] * cr[j + half] + xr[j] * sr[j + half];
                        }
                    }
                });
                Ok(())
            })
        })?;
        Ok((storage_in(out, storage.dtype())?, Shape::from((b, d2, d1, d))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = RopeTranspose { backward: !self.backward, ..self.clone() };
        grad.contiguous()?.apply_op1_no_bwd(&op).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rope::Rotary;
    use candle_core::{Device, Var};

    #[test]
    fn equals_transpose_then_rotate_and_its_gradient() {
        let dev = Device::Cpu;
        let (b, t, h, d) = (2usize, 5usize, 3usize, 8usize);
        let positions: Vec<u32> = (0..b * t).map(|i| (i % t) as u32 * 3).collect();
        let rotary = Rotary::new(&positions, b, d, 10000.0, &dev).unwrap();
        let vals: Vec<f32> = (0..b * t * h * d).map(|i| ((i * 29) % 101) as f32 / 25.0 - 2.0).collect();
        let x = Var::from_vec(vals.clone(), (b, t, h, d), &dev).unwrap();
        let k = Tensor::from_vec(vals.iter().rev().copied().collect::<Vec<_>>(), (b, h, t, d), &dev).unwrap();
        let ours = rotary.apply_to_heads(x.as_tensor()).unwrap();
        let theirs = rotary.apply(&x.as_tensor().transpose(1, 2).unwrap()).unwrap();
        let g1 = (&ours * &k).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &k).unwrap().sum_all().unwrap().backward().unwrap();
        let diff =
            |a: &Tensor, b: &Tensor| a.sub(b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(ours.dims(), &[b, h, t, d]);
        assert!(diff(&ours, &theirs) < 1e-6);
        assert!(diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-6);
    }
}
