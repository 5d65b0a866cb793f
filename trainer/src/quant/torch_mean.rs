//! `torch.Tensor.mean()` of a 1-D f32 tensor on CPU, reproduced bit for bit.
//!
//! Double quantization subtracts `offset = absmax.mean()` from the block scales, so the offset (and
//! through it every nested code) depends on the exact rounding of PyTorch's sum. PyTorch 2.x sums f32
//! with a cascade (`aten/src/ATen/native/cpu/SumKernel.cpp`): 8-lane vectors (the width measured with
//! PyTorch 2.15, also on AVX-512 machines), four interleaved accumulators, partial sums folded in
//! levels of 16, the scalar tail, then the lanes in order. Inputs of 32768 values or more are split
//! across threads (`parallel_reduce`, two passes: one partial sum per thread chunk, then a sum of the
//! partials), so the result also depends on PyTorch's thread count. The mean is `sum / n` in f32.
//! Checked against PyTorch for many lengths with 1 and 2 threads (see tests/fixtures/nf4).

/// Vector width of PyTorch's f32 sum kernel.
const LANES: usize = 8;
/// `at::internal::GRAIN_SIZE`: below it a reduction never runs in parallel.
const GRAIN_SIZE: usize = 32768;

type Vector = [f32; LANES];

/// `c10::utils::CeilLog2`.
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// Element-wise accumulate.
#[inline]
fn add_assign<const L: usize>(acc: &mut [f32; L], v: &[f32; L]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += *b;
    }
}

/// `multi_row_sum` with `nrows = 4`: the cascade over `size` rows of four `L`-lane items each,
/// `load(i, k)` giving item `k` of row `i`.
fn multi_row_sum<const L: usize>(size: usize, load: impl Fn(usize, usize) -> [f32; L]) -> [[f32; L]; 4] {
    const LEVELS: usize = 4;
    let level_power = (ceil_log2(size) / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; 4]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add_assign(a, &load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (u, l) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add_assign(u, l);
                *l = [0f32; L];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add_assign(a, &load(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        let (lower, upper) = acc.split_at_mut(j);
        for (a, u) in lower[0].iter_mut().zip(upper[0].iter()) {
            add_assign(a, u);
        }
    }
    acc[0]
}

/// `row_sum` (interleave factor 4) over `size` items of `L` lanes.
fn row_sum<const L: usize>(size: usize, load: impl Fn(usize) -> [f32; L]) -> [f32; L] {
    let size_ilp = size / 4;
    let mut partial = multi_row_sum(size_ilp, |i, k| load(i * 4 + k));
    for i in size_ilp * 4..size {
        add_assign(&mut partial[0], &load(i));
    }
    let mut total = partial[0];
    for p in &partial[1..] {
        add_assign(&mut total, p);
    }
    total
}

/// One serial `cascade_sum` pass over a contiguous slice.
fn serial_sum(a: &[f32]) -> f32 {
    let n = a.len();
    if n >= LANES {
        let vec_size = n / LANES;
        let lanes: Vector = row_sum(vec_size, |i| {
            let mut v = [0f32; LANES];
            v.copy_from_slice(&a[i * LANES..(i + 1) * LANES]);
            v
        });
        let mut total = 0f32;
        for &x in &a[vec_size * LANES..] {
            total += x;
        }
        for x in lanes {
            total += x;
        }
        0.0 + total
    } else {
        let [total] = row_sum(n, |i| [a[i]]);
        0.0 + total
    }
}

/// `torch.sum` of a 1-D f32 tensor on CPU with `threads` intra-op threads (`torch.get_num_threads()`).
pub fn torch_sum(a: &[f32], threads: usize) -> f32 {
    let n = a.len();
    let threads = threads.max(1);
    if n < GRAIN_SIZE || threads == 1 {
        return serial_sum(a);
    }
    // `at::parallel_for` (OpenMP): min(threads, ceil(n / grain)) chunks of ceil(n / chunks) values.
    let used = threads.min(n.div_ceil(GRAIN_SIZE));
    let chunk = n.div_ceil(used);
    let mut partials = vec![0f32; threads];
    for (t, part) in a.chunks(chunk).enumerate() {
        partials[t] += serial_sum(part);
    }
    serial_sum(&partials)
}

/// `torch.mean` of a 1-D f32 tensor on CPU: `torch_sum(a, threads) / n` in f32.
/// Returns NaN for an empty slice, as PyTorch does.
pub fn torch_mean(a: &[f32], threads: usize) -> f32 {
    torch_sum(a, threads) / a.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order of additions shows in how many small terms survive next to 2^24 (PyTorch 2.15, 1
    /// thread: `torch.ones(15)` with one entry set to 2^24, minus 2^24).
    #[test]
    fn summation_order_matches_pytorch_on_a_probe() {
        let expected = [8.0, 8.0, 8.0, 12.0, 12.0, 12.0, 12.0, 14.0, 0.0, 0.0, 4.0, 4.0, 4.0, 4.0, 8.0];
        for (p, want) in expected.iter().enumerate() {
            let mut a = vec![1f32; 15];
            a[p] = 16777216.0;
            assert_eq!(torch_sum(&a, 1) - 16777216.0, *want, "big value at {p}");
        }
    }

    #[test]
    fn small_sums_are_exact() {
        let a: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        let want: f32 = a.iter().sum();
        assert_eq!(torch_sum(&a, 1), want);
        assert_eq!(torch_sum(&a, 2), want);
        assert_eq!(torch_mean(&[2.0, 4.0], 1), 3.0);
    }
}
