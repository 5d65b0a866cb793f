//! A frozen linear layer with its LoRA update as one op:
//! `y = x W^T + s (x' A^T) B^T`, with `x' = x * mask` (dropout, a [`DropoutMask`]) or `x`.
//!
//! Composed from candle ops, every adapted linear writes its `[m, out]` output four times in the
//! forward (the frozen product, its copy into the graph, the update's product, its scaling and the
//! sum) and more in the backward, where each intermediate's gradient is also zero-filled and added by
//! candle's gradient store. Here the update is accumulated straight into the frozen product's output
//! (`s (x' A^T)` is only `[m, r]`), and the backward writes `dx = dy W + ((s dy B) A) * mask` into one
//! buffer and the small `dA = (s dy B)^T x'`, `dB = dy^T (s x' A^T)` directly. The frozen product
//! runs at the current [`super::precision`]; the adapter's products stay in f32. Activations (`x`, `y`
//! and their gradients) may be f32, bf16 or f16: read as f32, stored in `x`'s dtype.

use super::dropout::DropoutMask;
use super::sgemm::{sgemm, MatRef};
use super::storage::{
    contiguous_values, is_cpu_activation, matrix_f32, output_f32, storage_in, tensor_in, with_contiguous_values,
};
use crate::quant::FrozenWeight;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// The fused op over `(x [.., in], A [r, in], B [out, r])` on the CPU: `x` f32, bf16 or f16, the adapter f32.
#[derive(Debug)]
pub struct LoraLinear {
    weight: FrozenWeight,
    scale: f32,
    /// Dropout of the adapter's input, one bit per value of `x`.
    mask: Option<DropoutMask>,
    /// `s x' A^T` `[m, r]` from the forward, for `dB` in the backward.
    hidden: Mutex<Vec<f32>>,
}

impl LoraLinear {
    /// `x W^T + scale (x' A^T) B^T` over the last dimension of `x`, in `x`'s dtype; `None` when the fused
    /// path does not apply (see [`LoraLinear::applies`]).
    pub fn forward(
        x: &Tensor,
        weight: &FrozenWeight,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        mask: Option<DropoutMask>,
    ) -> candle_core::Result<Option<Tensor>> {
        if !Self::applies(x, weight, a, b) {
            return Ok(None);
        }
        if mask.as_ref().is_some_and(|m| m.len() != x.elem_count()) {
            bail!("lora linear: {} dropout multipliers for an input of {:?}", mask.map_or(0, |m| m.len()), x.dims())
        }
        let op = LoraLinear { weight: weight.clone(), scale: scale as f32, mask, hidden: Mutex::new(Vec::new()) };
        x.contiguous()?.apply_op3_arc(a, b, Arc::new(Box::new(op))).map(Some)
    }

    /// Whether the fused op computes this product: on the CPU an f32/bf16/f16 input, an f32 adapter, and
    /// a base weight the CPU products take (NF4, or dense f32/bf16/f16).
    pub fn applies(x: &Tensor, weight: &FrozenWeight, a: &Tensor, b: &Tensor) -> bool {
        let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        is_cpu_activation(x) && f32_cpu(a) && f32_cpu(b) && weight.has_cpu_products()
    }

    /// `x * mask`, or `x` itself without dropout.
    fn dropped<'a>(&self, x: &'a [f32], buf: &'a mut Vec<f32>) -> &'a [f32] {
        match &self.mask {
            Some(mask) => {
                *buf = output_f32(x.len());
                // Every value is written (accumulate = false).
                mask.apply(x, buf, false);
                buf
            }
            None => x,
        }
    }

    /// `(m, in, out, r)` for an input layout and the adapter's matrices, checked against the weight.
    fn dims(&self, xl: &Layout, a: MatRef<'_>, b: MatRef<'_>) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (out, inp) = self.weight.dims()?;
        let dims = xl.dims();
        if dims.last() != Some(&inp) || a.cols != inp || a.rows != b.cols || b.rows != out {
            bail!(
                "lora linear: input {dims:?}, A [{}, {}], B [{}, {}] for a [{out}, {inp}] weight",
                a.rows,
                a.cols,
                b.rows,
                b.cols
            )
        }
        Ok((xl.shape().elem_count() / inp.max(1), inp, out, a.rows))
    }
}

/// A kernel's error message as candle's.
fn msg(e: String) -> candle_core::Error {
    candle_core::Error::Msg(e)
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_values(xs, xl, self.name())?;
        let x = &x[..];
        let (a, b) = (matrix_f32(as_, al, self.name())?, matrix_f32(bs, bl, self.name())?);
        let (m, inp, out, r) = self.dims(xl, a, b)?;
        // Overwritten by the frozen product (every value), then the update is added in.
        let mut y = output_f32(m * out);
        self.weight.forward_f32(x, m, &mut y).map_err(|e| msg(e.to_string()))?;
        let mut buf = Vec::new();
        let xd = MatRef::row_major(self.dropped(x, &mut buf), m, inp);
        let mut hidden = vec![0f32; m * r];
        sgemm(xd, a.t(), &mut hidden, r, false).map_err(msg)?;
        hidden.iter_mut().for_each(|v| *v *= self.scale);
        sgemm(MatRef::row_major(&hidden, m, r), b.t(), &mut y, out, true).map_err(msg)?;
        *self.hidden.lock().map_err(|_| msg("lora linear: poisoned lock".into()))? = hidden;
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((storage_in(y, xs.dtype())?, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, grad) = (x.contiguous()?, a.contiguous()?, b.contiguous()?, grad.contiguous()?);
        let (r, inp) = a.dims2()?;
        let out = b.dim(0)?;
        let m = x.elem_count() / inp.max(1);
        if grad.elem_count() != m * out {
            bail!("lora linear: gradient {:?} for {m} rows of {out}", grad.dims())
        }
        let hidden = self.hidden.lock().map_err(|_| msg("lora linear: poisoned lock".into()))?;
        if hidden.len() != m * r {
            bail!("lora linear: backward without a matching forward")
        }
        let dev = x.device().clone();
        let want_dx = x.track_op() || x.is_variable();
        with_contiguous_values(&grad, self.name(), |dy| {
            with_contiguous_values(&x, self.name(), |xv| {
                with_contiguous_values(&a, self.name(), |av| {
                    with_contiguous_values(&b, self.name(), |bv| {
                        let dy_m = MatRef::row_major(dy, m, out);
                        let (a_m, b_m) = (MatRef::row_major(av, r, inp), MatRef::row_major(bv, out, r));
                        // s dy B [m, r]
                        let mut g_hidden = vec![0f32; m * r];
                        sgemm(dy_m, b_m, &mut g_hidden, r, false).map_err(msg)?;
                        g_hidden.iter_mut().for_each(|v| *v *= self.scale);
                        let gh = MatRef::row_major(&g_hidden, m, r);
                        let dx = if want_dx {
                            // Overwritten by the frozen input gradient, then the update's part is added.
                            let mut dx = output_f32(m * inp);
                            self.weight.input_grad_f32(dy, m, &mut dx).map_err(|e| msg(e.to_string()))?;
                            match &self.mask {
                                None => sgemm(gh, a_m, &mut dx, inp, true).map_err(msg)?,
                                Some(mask) => {
                                    // Overwritten by the product (accumulate = false).
                                    let mut part = output_f32(m * inp);
                                    sgemm(gh, a_m, &mut part, inp, false).map_err(msg)?;
                                    mask.apply(&part, &mut dx, true);
                                }
                            }
                            Some(tensor_in(dx, x.shape(), x.dtype(), &dev)?)
                        } else {
                            None
                        };
                        let mut buf = Vec::new();
                        let xd = MatRef::row_major(self.dropped(xv, &mut buf), m, inp);
                        let mut da = vec![0f32; r * inp];
                        sgemm(gh.t(), xd, &mut da, inp, false).map_err(msg)?;
                        let mut db = vec![0f32; out * r];
                        sgemm(dy_m.t(), MatRef::row_major(&hidden, m, r), &mut db, r, false).map_err(msg)?;
                        Ok((
                            dx,
                            Some(Tensor::from_vec(da, (r, inp), &dev)?),
                            Some(Tensor::from_vec(db, (out, r), &dev)?),
                        ))
                    })
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Nf4Weight, QuantizeOptions};
    use candle_core::{Device, Var};

    fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| (((i + seed) * 7907) % 211) as f32 / 105.0 * scale - scale).collect()
    }

    /// The fused op against `x W^T + s ((x * mask) A^T) B^T` composed from candle ops: output and the
    /// gradients of x, A and B.
    fn check(weight: FrozenWeight, dense: &Tensor, m: usize, r: usize, mask: Option<DropoutMask>) {
        let dev = Device::Cpu;
        let (out, inp) = dense.dims2().unwrap();
        let scale = 1.75f64;
        let xv = values(m * inp, 1, 1.0);
        let upstream = Tensor::from_vec(values(m * out, 5, 1.0), (m, out), &dev).unwrap();
        let run = |fused: bool| {
            let x = Var::from_vec(xv.clone(), (m, inp), &dev).unwrap();
            let a = Var::from_vec(values(r * inp, 2, 0.3), (r, inp), &dev).unwrap();
            let b = Var::from_vec(values(out * r, 3, 0.3), (out, r), &dev).unwrap();
            let y = if fused {
                LoraLinear::forward(x.as_tensor(), &weight, a.as_tensor(), b.as_tensor(), scale, mask.clone())
                    .unwrap()
                    .unwrap()
            } else {
                let xd = match &mask {
                    Some(k) => (x.as_tensor() * Tensor::from_vec(k.multipliers(), (m, inp), &dev).unwrap()).unwrap(),
                    None => x.as_tensor().clone(),
                };
                let base = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
                let delta =
                    xd.matmul(&a.as_tensor().t().unwrap()).unwrap().matmul(&b.as_tensor().t().unwrap()).unwrap();
                (base + (delta * scale).unwrap()).unwrap()
            };
            let grads = (&y * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            (y, g(&x), g(&a), g(&b))
        };
        let (fused, composed) = (run(true), run(false));
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        for (name, got, want) in [
            ("y", &fused.0, &composed.0),
            ("dx", &fused.1, &composed.1),
            ("dA", &fused.2, &composed.2),
            ("dB", &fused.3, &composed.3),
        ] {
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            assert!(diff(got, want) <= 1e-5 * scale, "{name} differs by {} (scale {scale})", diff(got, want));
        }
    }

    #[test]
    fn equals_the_composed_update_and_its_gradients() {
        let dev = Device::Cpu;
        let (out, inp) = (48usize, 80usize);
        let w = values(out * inp, 9, 0.5);
        let dense = Tensor::from_vec(w.clone(), (out, inp), &dev).unwrap();
        let keep = 0.8f32;
        let mask = |m: usize| DropoutMask::from_fn(m * inp, 1.0 / keep, |i| (i * 31) % 5 != 0);
        check(FrozenWeight::dense(&dense).unwrap(), &dense, 37, 4, None);
        check(FrozenWeight::dense(&dense).unwrap(), &dense, 37, 4, Some(mask(37)));
        // Large enough that the rank-8 products take the blocked kernels' narrow path.
        check(FrozenWeight::dense(&dense).unwrap(), &dense, 300, 8, Some(mask(300)));
        let q = Nf4Weight::quantize_with(&w, &[out, inp], &QuantizeOptions::default()).unwrap();
        let dq = Tensor::from_vec(q.dequantize(), (out, inp), &dev).unwrap();
        check(FrozenWeight::nf4(q).unwrap(), &dq, 37, 4, Some(mask(37)));
    }

    #[test]
    fn no_input_gradient_for_an_input_that_needs_none() {
        let dev = Device::Cpu;
        let dense = Tensor::from_vec(values(6 * 5, 1, 1.0), (6, 5), &dev).unwrap();
        let x = Tensor::from_vec(values(3 * 5, 2, 1.0), (3, 5), &dev).unwrap();
        let a = Var::from_vec(values(2 * 5, 3, 1.0), (2, 5), &dev).unwrap();
        let b = Var::from_vec(values(6 * 2, 4, 1.0), (6, 2), &dev).unwrap();
        let w = FrozenWeight::dense(&dense).unwrap();
        let y = LoraLinear::forward(&x, &w, a.as_tensor(), b.as_tensor(), 1.0, None).unwrap().unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(a.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let w = FrozenWeight::dense(&Tensor::zeros((6, 5), DType::F32, &dev).unwrap()).unwrap();
        let x = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        let a = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((6, 2), DType::F32, &dev).unwrap();
        assert!(LoraLinear::forward(&x, &w, &a, &b, 1.0, None).is_err());
        let a = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        assert!(LoraLinear::forward(&x, &w, &a, &b, 1.0, Some(DropoutMask::from_fn(2, 1.0, |_| true))).is_err());
        assert!(LoraLinear::forward(&x, &w, &a, &b, 1.0, None).unwrap().is_some());
    }
}
