//! RMSNorm fused, forward and backward: `y = (x * inv) * w` with `inv = 1 / sqrt(mean(x^2) + eps)` per
//! row (the order Hugging Face's f32 path computes), `dx = inv * (dy w - n mean(dy w n))` with
//! `n = x * inv`, and `dw = sum over rows of dy n` (only when `w` takes a gradient).

use super::parallel::{for_chunks, for_rows_mut};
use super::storage::{contiguous_values, is_activation_dtype, is_cpu_activation, output_f32, storage_in, tensor_in};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use std::sync::Mutex;

/// The fused op over `(x [.., h], w [h])` on the CPU: f32, bf16 or f16 values, computed in f32, the
/// result in `x`'s dtype.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormOp {
    /// Added to the mean square.
    pub eps: f32,
}

/// RMSNorm of `x` with scale `w`: fused for f32/bf16/f16 on the CPU; `None` when that path does not apply.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    if !is_cpu_activation(x) || !is_activation_dtype(w.dtype()) || w.rank() != 1 {
        return Ok(None);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNormOp { eps: eps as f32 }).map(Some)
}

/// `1 / sqrt(mean(row^2) + eps)`.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous_values(xs, xl, "rms-norm")?, contiguous_values(ws, wl, "rms-norm")?);
        let (x, w) = (&x[..], &w[..]);
        let h = w.len();
        if xl.dims().last() != Some(&h) {
            bail!("rms-norm: input {:?} does not end in the scale's {h}", xl.dims())
        }
        // Every row is written whole.
        let mut out = output_f32(x.len());
        for_rows_mut(&mut out, h, |r, y| {
            let row = &x[r * h..(r + 1) * h];
            let inv = inv_rms(row, self.eps);
            for ((y, &xv), &wv) in y.iter_mut().zip(row).zip(w) {
                *y = (xv * inv) * wv;
            }
        });
        Ok((storage_in(out, xs.dtype())?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w, grad) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let want_dw = w.track_op() || w.is_variable();
        let guards = [&x, &w, &grad].map(|t| t.storage_and_layout());
        let mut views = Vec::with_capacity(3);
        for (storage, layout) in &guards {
            let Storage::Cpu(s) = &**storage else { bail!("rms-norm: CPU tensors expected") };
            views.push(contiguous_values(s, layout, "rms-norm")?);
        }
        let (xv, wv, dy) = (&views[0][..], &views[1][..], &views[2][..]);
        let h = wv.len();
        // Every row is written whole.
        let mut dx = output_f32(xv.len());
        for_rows_mut(&mut dx, h, |r, dxr| {
            let (row, g) = (&xv[r * h..(r + 1) * h], &dy[r * h..(r + 1) * h]);
            let inv = inv_rms(row, self.eps);
            let mean: f32 =
                row.iter().zip(g).zip(wv).map(|((&xv, &gv), &wv)| gv * wv * xv * inv).sum::<f32>() / h as f32;
            for (((d, &xv), &gv), &wv) in dxr.iter_mut().zip(row).zip(g).zip(wv) {
                *d = inv * (gv * wv - xv * inv * mean);
            }
        });
        let dw = if want_dw {
            let total = Mutex::new(vec![0f32; h]);
            let rows = xv.len() / h.max(1);
            for_chunks(rows, |range| {
                let mut part = vec![0f32; h];
                for r in range {
                    let (row, g) = (&xv[r * h..(r + 1) * h], &dy[r * h..(r + 1) * h]);
                    let inv = inv_rms(row, self.eps);
                    for ((p, &xv), &gv) in part.iter_mut().zip(row).zip(g) {
                        *p += gv * xv * inv;
                    }
                }
                if let Ok(mut t) = total.lock() {
                    t.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
                }
            });
            let total = total.into_inner().map_err(|_| candle_core::Error::Msg("rms-norm: poisoned lock".into()))?;
            Some(tensor_in(total, h, w.dtype(), w.device())?)
        } else {
            None
        };
        drop(views);
        drop(guards);
        Ok((Some(tensor_in(dx, x.shape(), x.dtype(), x.device())?), dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn equals_the_composed_norm_and_its_gradients() {
        let dev = Device::Cpu;
        let (rows, h) = (37usize, 64usize);
        let vals =
            |n: usize, s: usize| -> Vec<f32> { (0..n).map(|i| ((i * 53 + s) % 199) as f32 / 50.0 - 2.0).collect() };
        let x = Var::from_vec(vals(rows * h, 1), (rows, h), &dev).unwrap();
        let w = Var::from_vec(vals(h, 2), h, &dev).unwrap();
        let k = Tensor::from_vec(vals(rows * h, 3), (rows, h), &dev).unwrap();
        let ours = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap().unwrap();
        let inv = (x.as_tensor().sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let theirs = x.as_tensor().broadcast_mul(&inv).unwrap().broadcast_mul(w.as_tensor()).unwrap();
        let g1 = (&ours * &k).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &k).unwrap().sum_all().unwrap().backward().unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 2e-6 * s.max(1.0), "{what} differs by {d} (scale {s})");
        };
        close(&ours, &theirs, "value");
        close(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap(), "dx");
        close(g1.get(w.as_tensor()).unwrap(), g2.get(w.as_tensor()).unwrap(), "dw");
        // A frozen scale gets no gradient.
        let frozen = w.as_tensor().detach();
        let y = rms_norm(x.as_tensor(), &frozen, 1e-5).unwrap().unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&frozen).is_none());
    }
}
