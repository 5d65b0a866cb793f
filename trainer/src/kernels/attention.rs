//! Fused scaled-dot-product attention with grouped key/value heads, forward and backward, on the CPU.
//!
//! The composed version materializes `[b, heads, t, keys]` scores, adds the mask, runs a composed
//! softmax (five element-wise passes) and keeps every intermediate for the backward. This computes, per
//! query head and per block of query rows, `S = scale * Q K^T + mask`, the softmax in place and `O = P V`,
//! keeping only each row's max and inverse sum; the backward recomputes `P` block by block from them
//! (`dV += P^T dO`, `dS = P * (dO V^T - rowsum(dO * O))`, `dQ = scale * dS K`, `dK += scale * dS^T Q`).
//! Memory: one `[block, keys]` scratch per thread instead of the whole score tensor. Work is spread over
//! candle's CPU pool by (batch, key/value head), so the heads sharing a key/value head accumulate their
//! `dK`/`dV` on one thread.
//!
//! Semantics equal the composed path (and Hugging Face's eager attention): the mask is additive
//! (`f32::MIN` forbids), the softmax is over all keys of a row in f32.

use super::parallel::{try_for_chunks, SharedMut};
use super::sgemm::{sgemm_serial, MatRef};
use super::storage::{contiguous_values, output_f32, storage_in, tensor_in};
use super::vmath;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// Query rows per block (the scratch is `BLOCK x keys`).
pub const BLOCK: usize = 256;

/// `attention(q [b, heads, t, d], k [b, kv_heads, s, d], v [b, kv_heads, s, d]) -> [b, heads, t, d]`,
/// on the CPU, f32, bf16 or f16 (one dtype for the three; computed in f32, the result in their dtype).
/// Query head `h` uses key/value head `h / (heads / kv_heads)`.
#[derive(Debug)]
pub struct FusedAttention {
    /// Multiplier of the scores (`1 / sqrt(d)`).
    pub scale: f32,
    /// Additive mask `[rows, 1, 1, t, s]` (rows 1 or b, f32), or none.
    pub mask: Option<Tensor>,
    /// Each row's softmax shift and inverse sum `[b, heads, t, 2]` from the forward, for the backward.
    row_stats: Mutex<Vec<f32>>,
}

/// The dimensions of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    s: usize,
    d: usize,
}

impl Dims {
    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn q_at(&self, b: usize, h: usize) -> usize {
        (b * self.heads + h) * self.t * self.d
    }
    fn kv_at(&self, b: usize, g: usize) -> usize {
        (b * self.kv_heads + g) * self.s * self.d
    }
}

impl FusedAttention {
    /// Attention of `q`, `k`, `v` (see the type) with an optional additive mask, differentiable in all three.
    pub fn apply(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let d = q.dim(3)?;
        let op =
            FusedAttention { scale: (d as f32).powf(-0.5), mask: mask.cloned(), row_stats: Mutex::new(Vec::new()) };
        q.contiguous()?.apply_op3_arc(&k.contiguous()?, &v.contiguous()?, Arc::new(Box::new(op)))
    }

    /// Checks the operand shapes.
    fn dims(ql: &Layout, kl: &Layout, vl: &Layout) -> candle_core::Result<Dims> {
        let (&[b, heads, t, d], &[kb, kv_heads, s, kd]) = (ql.dims(), kl.dims()) else {
            bail!("attention: q and k must be 4-D, found {:?} and {:?}", ql.dims(), kl.dims())
        };
        if kb != b || kd != d || vl.dims() != kl.dims() || kv_heads == 0 || heads % kv_heads != 0 {
            bail!("attention: q {:?}, k {:?}, v {:?} do not fit together", ql.dims(), kl.dims(), vl.dims())
        }
        Ok(Dims { b, heads, kv_heads, t, s, d })
    }

    /// Reads the mask as `[rows, t, s]` values and the row count.
    fn with_mask<R>(
        &self,
        dims: Dims,
        f: impl FnOnce(Option<(&[f32], usize)>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let Some(mask) = &self.mask else { return f(None) };
        let mask = mask.contiguous()?;
        let (storage, layout) = mask.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else { bail!("attention: the mask must be on the CPU") };
        let values = contiguous_values(storage, layout, "attention")?;
        let values = &values[..];
        let per_row = dims.t * dims.s;
        let rows = values.len() / per_row.max(1);
        if rows * per_row != values.len() || (rows != 1 && rows != dims.b) {
            bail!("attention: mask {:?} does not fit {} rows of {}x{}", layout.dims(), dims.b, dims.t, dims.s)
        }
        f(Some((values, rows)))
    }

    /// `S = scale * Q[r0..r1] K^T + mask` into `scores` (`[r1 - r0, s]`), `q` being the stacked
    /// `[groups * t, d]` queries of the heads that share `k`.
    #[allow(clippy::too_many_arguments)]
    fn scores(
        &self,
        dims: Dims,
        q: &[f32],
        k: &[f32],
        mask: Option<(&[f32], usize)>,
        b: usize,
        rows: std::ops::Range<usize>,
        scores: &mut [f32],
    ) -> candle_core::Result<()> {
        let (s, d) = (dims.s, dims.d);
        let n = rows.len();
        let q_blk = MatRef::row_major(&q[rows.start * d..rows.end * d], n, d);
        sgemm_serial(q_blk, MatRef::row_major(k, s, d).t(), scores, s, false).map_err(candle_core::Error::Msg)?;
        let mask_rows = mask.map(|(m, count)| &m[(if count == 1 { 0 } else { b }) * dims.t * s..][..dims.t * s]);
        for (i, row) in scores.chunks_exact_mut(s).enumerate() {
            match mask_rows {
                Some(m) => {
                    // Rows stack the query heads of one key/value head: row r is query r % t.
                    let mrow = &m[((rows.start + i) % dims.t) * s..][..s];
                    for (x, &mv) in row.iter_mut().zip(mrow) {
                        *x = *x * self.scale + mv;
                    }
                }
                None => row.iter_mut().for_each(|x| *x *= self.scale),
            }
        }
        Ok(())
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Self::dims(ql, kl, vl)?;
        if ks.dtype() != qs.dtype() || vs.dtype() != qs.dtype() {
            bail!(
                "attention: q, k and v in one dtype expected, found {:?}, {:?}, {:?}",
                qs.dtype(),
                ks.dtype(),
                vs.dtype()
            )
        }
        let (q, k, v) = (
            contiguous_values(qs, ql, "attention")?,
            contiguous_values(ks, kl, "attention")?,
            contiguous_values(vs, vl, "attention")?,
        );
        let (q, k, v) = (&q[..], &k[..], &v[..]);
        let Dims { b, heads, kv_heads, t, s, d } = dims;
        let groups = dims.groups();
        // The query heads sharing a key/value head are contiguous: one [groups * t, d] block of rows.
        let rows = groups * t;
        // Every (batch, key/value head) unit writes all rows of its query heads.
        let mut out = output_f32(b * heads * t * d);
        let mut row_stats = vec![0f32; 2 * b * heads * t];
        let (out_ptr, row_stats_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(row_stats.as_mut_ptr()));
        self.with_mask(dims, |mask| {
            try_for_chunks(b * kv_heads, |units| {
                let mut scratch = vec![0f32; BLOCK.min(rows) * s];
                for unit in units {
                    let (bi, g) = (unit / kv_heads, unit % kv_heads);
                    let first = dims.q_at(bi, g * groups);
                    let qh = &q[first..][..rows * d];
                    let (kg, vg) = (&k[dims.kv_at(bi, g)..][..s * d], &v[dims.kv_at(bi, g)..][..s * d]);
                    // SAFETY: unit (bi, g) alone owns the output rows and row statistics of its query heads.
                    let (oh, lh) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(out_ptr.ptr().add(first), rows * d),
                            std::slice::from_raw_parts_mut(
                                row_stats_ptr.ptr().add(2 * (bi * heads + g * groups) * t),
                                2 * rows,
                            ),
                        )
                    };
                    for r0 in (0..rows).step_by(BLOCK) {
                        let r1 = (r0 + BLOCK).min(rows);
                        let p = &mut scratch[..(r1 - r0) * s];
                        self.scores(dims, qh, kg, mask, bi, r0..r1, p)?;
                        for (i, row) in p.chunks_exact_mut(s).enumerate() {
                            // Normalized by the sum rather than shifted by m + ln(sum): with every key
                            // masked, m is f32::MIN and would absorb ln(sum).
                            let m = vmath::max(row);
                            let inv = 1.0 / vmath::sum_exp(row, m);
                            vmath::scaled_exp_in_place(row, m, inv);
                            lh[2 * (r0 + i)] = m;
                            lh[2 * (r0 + i) + 1] = inv;
                        }
                        let o_blk = &mut oh[r0 * d..r1 * d];
                        sgemm_serial(MatRef::row_major(p, r1 - r0, s), MatRef::row_major(vg, s, d), o_blk, d, false)
                            .map_err(candle_core::Error::Msg)?;
                    }
                }
                Ok(())
            })
        })?;
        *self.row_stats.lock().map_err(|_| candle_core::Error::Msg("attention: poisoned lock".into()))? = row_stats;
        Ok((storage_in(out, qs.dtype())?, Shape::from((b, heads, t, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, out, grad) =
            (q.contiguous()?, k.contiguous()?, v.contiguous()?, out.contiguous()?, grad.contiguous()?);
        let row_stats =
            self.row_stats.lock().map_err(|_| candle_core::Error::Msg("attention: poisoned lock".into()))?.clone();
        let guards = [&q, &k, &v, &out, &grad].map(|x| x.storage_and_layout());
        let mut views = Vec::with_capacity(5);
        for ((storage, layout), what) in guards.iter().zip(["q", "k", "v", "the output", "the gradient"]) {
            let Storage::Cpu(storage) = &**storage else { bail!("attention: {what} must be on the CPU") };
            views.push((contiguous_values(storage, layout, "attention")?, *layout));
        }
        let dims = Self::dims(views[0].1, views[1].1, views[2].1)?;
        let Dims { b, heads, kv_heads, t, s, d } = dims;
        if row_stats.len() != 2 * b * heads * t {
            bail!("attention: backward without a matching forward")
        }
        let (qv, kv, vv, ov, gv) =
            (&views[0].0[..], &views[1].0[..], &views[2].0[..], &views[3].0[..], &views[4].0[..]);
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv.len()];
        let mut dv = vec![0f32; vv.len()];
        let (dq_ptr, dk_ptr, dv_ptr) =
            (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        let groups = dims.groups();
        let msg = candle_core::Error::Msg;
        self.with_mask(dims, |mask| {
            try_for_chunks(b * kv_heads, |units| {
                let rows = groups * t;
                let (mut p, mut dp) = (vec![0f32; BLOCK.min(rows) * s], vec![0f32; BLOCK.min(rows) * s]);
                for unit in units {
                    let (bi, g) = (unit / kv_heads, unit % kv_heads);
                    let (kg, vg) = (&kv[dims.kv_at(bi, g)..][..s * d], &vv[dims.kv_at(bi, g)..][..s * d]);
                    // SAFETY: unit (bi, g) alone writes dK/dV of kv head g and dQ of its query heads.
                    let (dkg, dvg) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(dk_ptr.ptr().add(dims.kv_at(bi, g)), s * d),
                            std::slice::from_raw_parts_mut(dv_ptr.ptr().add(dims.kv_at(bi, g)), s * d),
                        )
                    };
                    let at = dims.q_at(bi, g * groups);
                    let (qh, oh, goh) = (&qv[at..][..rows * d], &ov[at..][..rows * d], &gv[at..][..rows * d]);
                    // SAFETY: as above.
                    let dqh = unsafe { std::slice::from_raw_parts_mut(dq_ptr.ptr().add(at), rows * d) };
                    let lh = &row_stats[2 * (bi * heads + g * groups) * t..][..2 * rows];
                    for r0 in (0..rows).step_by(BLOCK) {
                        let r1 = (r0 + BLOCK).min(rows);
                        let n = r1 - r0;
                        let (p, dp) = (&mut p[..n * s], &mut dp[..n * s]);
                        self.scores(dims, qh, kg, mask, bi, r0..r1, p)?;
                        for (i, row) in p.chunks_exact_mut(s).enumerate() {
                            vmath::scaled_exp_in_place(row, lh[2 * (r0 + i)], lh[2 * (r0 + i) + 1]);
                        }
                        let go_blk = MatRef::row_major(&goh[r0 * d..r1 * d], n, d);
                        // dV += P^T dO
                        sgemm_serial(MatRef::row_major(p, n, s).t(), go_blk, dvg, d, true).map_err(msg)?;
                        // dP = dO V^T
                        sgemm_serial(go_blk, MatRef::row_major(vg, s, d).t(), dp, s, false).map_err(msg)?;
                        // dS = scale * P (dP - rowsum(dO * O)), in place of P.
                        for i in 0..n {
                            let row = (r0 + i) * d;
                            let delta: f32 = goh[row..row + d].iter().zip(&oh[row..row + d]).map(|(a, b)| a * b).sum();
                            let (prow, dprow) = (&mut p[i * s..(i + 1) * s], &dp[i * s..(i + 1) * s]);
                            for (x, &y) in prow.iter_mut().zip(dprow) {
                                *x = self.scale * *x * (y - delta);
                            }
                        }
                        let ds = MatRef::row_major(p, n, s);
                        // dQ = dS K ; dK += dS^T Q
                        sgemm_serial(ds, MatRef::row_major(kg, s, d), &mut dqh[r0 * d..r1 * d], d, false)
                            .map_err(msg)?;
                        let q_blk = MatRef::row_major(&qh[r0 * d..r1 * d], n, d);
                        sgemm_serial(ds.t(), q_blk, dkg, d, true).map_err(msg)?;
                    }
                }
                Ok(())
            })
        })?;
        let dev = q.device();
        Ok((
            Some(tensor_in(dq, (b, heads, t, d), q.dtype(), dev)?),
            Some(tensor_in(dk, (b, kv_heads, s, d), k.dtype(), dev)?),
            Some(tensor_in(dv, (b, kv_heads, s, d), v.dtype(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// The composed reference: repeat kv heads, softmax(scale q k^T + mask) v.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let (_, kvh, s, _) = k.dims4().unwrap();
        let groups = h / kvh;
        let q = q.reshape((b, kvh, groups * t, d)).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * (d as f64).powf(-0.5))
            .unwrap()
            .reshape((b, kvh, groups, t, s))
            .unwrap();
        let scores = match mask {
            Some(m) => scores.broadcast_add(m).unwrap(),
            None => scores,
        };
        let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap().reshape((b, kvh, groups * t, s)).unwrap();
        p.matmul(v).unwrap().reshape((b, h, t, d)).unwrap()
    }

    fn check(b: usize, h: usize, kvh: usize, t: usize, s: usize, d: usize, masked: bool) {
        let dev = Device::Cpu;
        let rnd = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| (((i + seed) * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0).collect()
        };
        let q = Var::from_vec(rnd(b * h * t * d, 1), (b, h, t, d), &dev).unwrap();
        let k = Var::from_vec(rnd(b * kvh * s * d, 2), (b, kvh, s, d), &dev).unwrap();
        let v = Var::from_vec(rnd(b * kvh * s * d, 3), (b, kvh, s, d), &dev).unwrap();
        let mask = masked.then(|| {
            // Causal over the last t of s keys, with a per-row padded key.
            let mut m = vec![0f32; b * t * s];
            for r in 0..b {
                for i in 0..t {
                    for j in 0..s {
                        if j > s - t + i || j == r {
                            m[(r * t + i) * s + j] = f32::MIN;
                        }
                    }
                }
            }
            Tensor::from_vec(m, (b, 1, 1, t, s), &dev).unwrap()
        });
        let weights = Tensor::from_vec(rnd(b * h * t * d, 4), (b, h, t, d), &dev).unwrap();
        let fused = FusedAttention::apply(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask.as_ref()).unwrap();
        let reference = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask.as_ref());
        let diff = (&fused - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "b{b} h{h} kvh{kvh} t{t} s{s} d{d} masked {masked}: output differs by {diff}");
        let gf = (&fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&reference * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let a = gf.get(var.as_tensor()).unwrap();
            let r = gr.get(var.as_tensor()).unwrap();
            let diff = (a - r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = r.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * scale.max(1.0), "d{name} differs by {diff} (scale {scale})");
        }
        assert_eq!(fused.dtype(), DType::F32);
    }

    #[test]
    fn equals_the_composed_attention_and_its_gradients() {
        check(1, 1, 1, 3, 3, 2, false);
        check(1, 2, 1, 3, 3, 2, false);
        check(2, 1, 1, 3, 3, 2, false);
        check(1, 1, 1, 3, 3, 2, true);
        check(2, 4, 2, 7, 7, 8, true);
        check(1, 8, 2, 300, 300, 16, true);
        check(2, 2, 1, 1, 9, 4, false);
        check(2, 6, 3, 5, 12, 8, true);
    }
}
