//! The SwiGLU gate `silu(g) * u` fused, forward and backward (`dg = dy u silu'(g)`, `du = dy silu(g)`,
//! `silu'(g) = s (1 + g (1 - s))` with `s = sigmoid(g)`), rows spread over the CPU pool.

use super::parallel::{for_spans_mut, SharedMut};
use super::storage::{contiguous_values, is_cpu_activation, output_f32, storage_in, tensor_in, with_contiguous_values};
use super::vmath;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};

/// Values per task of the parallel split.
const SPAN: usize = 4096;

/// `silu(gate) * up` for two CPU tensors of one shape and one f32/bf16/f16 dtype (the fused path,
/// computed in f32, stored in their dtype), candle's ops otherwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if is_cpu_activation(gate) && up.dtype() == gate.dtype() && up.device().is_cpu() && gate.dims() == up.dims() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        gate.silu()? * up
    }
}

/// The fused op (see the module).
#[derive(Debug, Clone, Copy)]
pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (contiguous_values(gs, gl, "swiglu")?, contiguous_values(us, ul, "swiglu")?);
        let (g, u) = (&g[..], &u[..]);
        if g.len() != u.len() {
            bail!("swiglu: gate {:?} and up {:?} differ", gl.dims(), ul.dims())
        }
        // Every span is written by `sigmoid` before it is read.
        let mut out = output_f32(g.len());
        for_spans_mut(&mut out, SPAN, |at, o| {
            let (g, u) = (&g[at..at + o.len()], &u[at..at + o.len()]);
            vmath::sigmoid(g, o);
            for ((o, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
                *o = gv * *o * uv;
            }
        });
        Ok((storage_in(out, gs.dtype())?, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gate, up, grad) = (gate.contiguous()?, up.contiguous()?, grad.contiguous()?);
        let n = gate.elem_count();
        // Every span of both is written (`du` by `sigmoid` first).
        let (mut dg, mut du) = (output_f32(n), output_f32(n));
        with_contiguous_values(&gate, "swiglu", |g| {
            with_contiguous_values(&up, "swiglu", |u| {
                with_contiguous_values(&grad, "swiglu", |dy| {
                    let du_ptr = SharedMut(du.as_mut_ptr());
                    for_spans_mut(&mut dg, SPAN, |at, dg| {
                        // SAFETY: the same span of `du` as of `dg`, owned by this call alone.
                        let du = unsafe { std::slice::from_raw_parts_mut(du_ptr.ptr().add(at), dg.len()) };
                        let (g, u, dy) = (&g[at..at + dg.len()], &u[at..at + dg.len()], &dy[at..at + dg.len()]);
                        vmath::sigmoid(g, du);
                        for ((((dgv, duv), &gv), &uv), &dyv) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
                            let s = *duv;
                            *dgv = dyv * uv * s * (1.0 + gv * (1.0 - s));
                            *duv = dyv * gv * s;
                        }
                    });
                    Ok(())
                })
            })
        })?;
        let dev = gate.device();
        Ok((Some(tensor_in(dg, gate.shape(), gate.dtype(), dev)?), Some(tensor_in(du, up.shape(), up.dtype(), dev)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_candles_silu_times_up_and_its_gradients() {
        let dev = Device::Cpu;
        for n in [5usize, 4096 * 2 + 77] {
            let vals = |s: usize| -> Vec<f32> { (0..n).map(|i| ((i * 37 + s) % 211) as f32 / 20.0 - 5.0).collect() };
            let g = Var::from_vec(vals(1), n, &dev).unwrap();
            let u = Var::from_vec(vals(2), n, &dev).unwrap();
            let w = Tensor::from_vec(vals(3), n, &dev).unwrap();
            let ours = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
            let theirs = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
            let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let close = |x: &Tensor, y: &Tensor, what: &str| {
                let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-5, "{what} (n={n}) differs by {d}");
            };
            close(&ours, &theirs, "value");
            close(g1.get(g.as_tensor()).unwrap(), g2.get(g.as_tensor()).unwrap(), "d gate");
            close(g1.get(u.as_tensor()).unwrap(), g2.get(u.as_tensor()).unwrap(), "d up");
        }
    }
}
