//! A single-precision matrix product `C = A B` (or `C += A B`) with an AVX-512 micro-kernel.
//!
//! candle's CPU matmul goes through the `gemm` crate, whose AVX-512 kernels need a nightly compiler: on
//! stable Rust it runs 256-bit FMA kernels, about half of what an AVX-512 core does. This is the
//! classic blocked product (Goto/BLIS): B is packed into `KC x NR` column panels, A into `MR x KC` row
//! panels, and a `MR x NR` register tile (24 of the 32 zmm registers) accumulates their product. The
//! work is split over candle's CPU thread pool (the one its element-wise ops already use, so no second
//! pool spins against it): by rows of C when there are enough, by columns otherwise; each thread packs
//! its own panels, so threads never wait on each other.
//!
//! Without AVX-512 (or for products too small to pay for packing) it falls back to `gemm`.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;

use super::pack::{bf16_available, pack_bf16, pack_f32, Lines};
use super::parallel::SharedMut;

/// Rows of C per register tile.
const MR: usize = 12;
/// Columns of C per register tile (two zmm vectors).
const NR: usize = 32;
/// Depth of one packed block (a `KC x NR` panel of B stays in L1 while the A panels stream past).
const KC: usize = 256;
/// Columns of B packed at once (a `KC x NC` block stays in L2).
const NC: usize = 512;
/// Products at least this many times deeper than they are tall and wide are split along the depth.
const SPLIT_DEPTH: usize = 8;
/// Below this many multiply-adds the packing does not pay for itself.
const SMALL: usize = 32 * 32 * 32;

/// A strided read-only view of a matrix of f32: element `(i, j)` is at `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    /// The values the view reads.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between consecutive rows.
    pub row_stride: usize,
    /// Distance between consecutive columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// Whether every element the view addresses lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1).checked_mul(self.row_stride).zip((self.cols - 1).checked_mul(self.col_stride));
        matches!(last, Some((r, c)) if r.checked_add(c).is_some_and(|i| i < self.data.len()))
    }
}

/// `c [m, n] (row stride ldc) = a [m, k] b [k, n]`, or `+=` when `accumulate`, on all the pool's threads.
///
/// Errors (as a message) when the shapes disagree or a view or `c` is too short.
pub fn sgemm(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], ldc: usize, accumulate: bool) -> Result<(), String> {
    product::<F32Tile>(a, b, c, ldc, accumulate, true)
}

/// As [`sgemm`], on the calling thread only (for kernels that already run one task per thread).
pub fn sgemm_serial(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], ldc: usize, accumulate: bool) -> Result<(), String> {
    product::<F32Tile>(a, b, c, ldc, accumulate, false)
}

/// As [`sgemm`], but the operands are rounded to bf16 (round to nearest even) and multiplied with
/// AVX-512 BF16 dot products, accumulating in f32 (PyTorch's `set_float32_matmul_precision("medium")`).
/// Twice the multiply throughput of f32 on CPUs that have the instructions; elsewhere it computes in f32.
/// On CPUs with AMX tiles it runs on them (several times the AVX-512 BF16 tile's throughput), with the
/// same numbers: each output is the f32 sum of the rounded operands' products.
pub fn bf16_gemm(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], ldc: usize, accumulate: bool) -> Result<(), String> {
    bf16_gemm_on(Bf16Path::fastest(), a, b, c, ldc, accumulate)
}

/// The implementations of [`bf16_gemm`], fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Path {
    /// AMX-BF16 tiles (Intel Xeon since Sapphire Rapids).
    Amx,
    /// AVX-512 BF16 dot products (`vdpbf16ps`; Intel since Cooper Lake, AMD since Zen 4).
    Avx512Bf16,
    /// f32 products of the unrounded operands (CPUs with neither).
    F32,
}

impl Bf16Path {
    /// The fastest path this CPU runs.
    pub fn fastest() -> Self {
        if super::amx::available() {
            Bf16Path::Amx
        } else if <Bf16Tile as Kernel>::available() {
            Bf16Path::Avx512Bf16
        } else {
            Bf16Path::F32
        }
    }

    /// Every path this CPU runs, fastest first (the tests compare each with the reference).
    pub fn supported() -> Vec<Self> {
        let mut paths = Vec::new();
        if super::amx::available() {
            paths.push(Bf16Path::Amx);
        }
        if <Bf16Tile as Kernel>::available() {
            paths.push(Bf16Path::Avx512Bf16);
        }
        paths.push(Bf16Path::F32);
        paths
    }
}

/// [`bf16_gemm`] on a chosen path; a path this CPU does not run falls back to the next one.
pub fn bf16_gemm_on(
    path: Bf16Path,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> Result<(), String> {
    match path {
        // Fewer rows than one AMX tile: the AVX-512 BF16 tile, the same numbers with less padding.
        Bf16Path::Amx if <AmxTile as Kernel>::available() && a.rows >= AmxTile::ROWS => {
            product::<AmxTile>(a, b, c, ldc, accumulate, true)
        }
        Bf16Path::Amx | Bf16Path::Avx512Bf16 if <Bf16Tile as Kernel>::available() => {
            product::<Bf16Tile>(a, b, c, ldc, accumulate, true)
        }
        _ => sgemm(a, b, c, ldc, accumulate),
    }
}

/// The product with kernel `T`, over the pool's threads when `parallel`.
fn product<T: Kernel>(
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) -> Result<(), String> {
    if !prepare(a, b, c, ldc, accumulate)? {
        return Ok(());
    }
    let (m, n) = (a.rows, b.cols);
    let c_ptr = SharedMut(c.as_mut_ptr());
    // SAFETY: the views are in bounds (checked by `prepare`) and `c` covers `m` rows of `n` values at
    // stride `ldc`; the threads below write disjoint row or column ranges of `c`.
    unsafe {
        let big = a.rows * a.cols * b.cols >= SMALL;
        if T::available() && big && n < NR / 2 && m >= T::COLS {
            narrow::<T>(a, b, c_ptr, ldc, accumulate, parallel);
            return Ok(());
        }
        if !(T::available() && a.rows >= T::ROWS && big) {
            let pool = candle_core::utils::barrier_pool();
            let threads = pool.n_workers() + 1;
            if !(parallel && big && n >= threads * NR) {
                fallback(a, b, c_ptr.ptr(), ldc, accumulate);
                return Ok(());
            }
            // Few rows (decoding): `gemm` on each thread's share of the columns.
            let span = n.div_ceil(threads).next_multiple_of(NR);
            pool.execute(|tid| {
                let (lo, hi) = (tid * span, ((tid + 1) * span).min(n));
                if lo < hi {
                    let b_part = MatRef { data: &b.data[lo * b.col_stride..], cols: hi - lo, ..b };
                    fallback(a, b_part, c_ptr.ptr().add(lo), ldc, accumulate);
                }
            });
            return Ok(());
        }
        if !parallel {
            T::blocked(a, b, c_ptr.ptr(), ldc, accumulate);
            return Ok(());
        }
        let pool = candle_core::utils::barrier_pool();
        let threads = pool.n_workers() + 1;
        let k = a.cols;
        if threads > 1 && k >= SPLIT_DEPTH * m.max(n) {
            split_depth::<T>(a, b, c_ptr, ldc, accumulate, threads);
            return Ok(());
        }
        // Split the larger side: each thread packs all of the other operand, so that one should be small.
        let by_rows = (m >= n && m >= threads * T::ROWS) || n < threads * T::COLS;
        let span = if by_rows {
            m.div_ceil(threads).next_multiple_of(T::ROWS)
        } else {
            n.div_ceil(threads).next_multiple_of(T::COLS)
        };
        pool.execute(|tid| {
            let (lo, hi) = (tid * span, ((tid + 1) * span).min(if by_rows { m } else { n }));
            if lo >= hi {
                return;
            }
            if by_rows {
                let a_part = MatRef { data: &a.data[lo * a.row_stride..], rows: hi - lo, ..a };
                T::blocked(a_part, b, c_ptr.ptr().add(lo * ldc), ldc, accumulate);
            } else {
                let b_part = MatRef { data: &b.data[lo * b.col_stride..], cols: hi - lo, ..b };
                T::blocked(a, b_part, c_ptr.ptr().add(lo), ldc, accumulate);
            }
        });
    }
    Ok(())
}

/// A narrow product (few columns, e.g. a LoRA down projection to rank 8) computed as its transpose
/// `C^T = B^T A^T`, whose few rows fill most of the register tile's 12 rows where the few columns
/// would leave most of its 32 columns empty; then added (or written) into `c` transposed.
///
/// # Safety
/// As [`blocked`].
unsafe fn narrow<T: Kernel>(
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: SharedMut<f32>,
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let (m, n) = (a.rows, b.cols);
    let (at, bt) = (b.t(), a.t());
    // C^T [n, m], every value written by the products below (accumulate = false).
    let mut ct = super::storage::output_f32(n * m);
    let ct_ptr = SharedMut(ct.as_mut_ptr());
    let pool = candle_core::utils::barrier_pool();
    let threads = if parallel { pool.n_workers() + 1 } else { 1 };
    let span = m.div_ceil(threads).next_multiple_of(T::COLS);
    let columns = |tid: usize| {
        let (lo, hi) = (tid * span, ((tid + 1) * span).min(m));
        if lo < hi {
            let part = MatRef { data: &bt.data[lo * bt.col_stride..], cols: hi - lo, ..bt };
            T::blocked(at, part, ct_ptr.ptr().add(lo), m, false);
        }
    };
    if threads > 1 {
        pool.execute(columns);
    } else {
        columns(0);
    }
    for i in 0..m {
        let row = std::slice::from_raw_parts_mut(c.ptr().add(i * ldc), n);
        for (j, o) in row.iter_mut().enumerate() {
            let v = ct[j * m + i];
            *o = if accumulate { *o + v } else { v };
        }
    }
}

/// A deep product (`k` much larger than `m` and `n`, e.g. the lm_head's input gradient over the whole
/// vocabulary) split along the depth: each thread multiplies its share of the columns of A by the same
/// rows of B, so no operand is packed twice; the first share goes straight to `c`, the others to
/// scratch products that are then added in.
///
/// # Safety
/// As [`blocked`]; `threads` is the pool's thread count.
unsafe fn split_depth<T: Kernel>(
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: SharedMut<f32>,
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let span = k.div_ceil(threads).next_multiple_of(2);
    // Every share but the first is written whole by its product, or zeroed when its depth range is empty
    // (more threads than depth pairs); the first range is never empty.
    let mut partial = super::storage::output_f32((threads - 1) * m * n);
    let parts = SharedMut(partial.as_mut_ptr());
    candle_core::utils::barrier_pool().execute(|tid| {
        let (lo, hi) = (tid * span, ((tid + 1) * span).min(k));
        if lo >= hi {
            if tid > 0 {
                std::slice::from_raw_parts_mut(parts.ptr().add((tid - 1) * m * n), m * n).fill(0.0);
            }
            return;
        }
        let a_part = MatRef { data: &a.data[lo * a.col_stride..], cols: hi - lo, ..a };
        let b_part = MatRef { data: &b.data[lo * b.row_stride..], rows: hi - lo, ..b };
        if tid == 0 {
            T::blocked(a_part, b_part, c.ptr(), ldc, accumulate);
        } else {
            T::blocked(a_part, b_part, parts.ptr().add((tid - 1) * m * n), n, false);
        }
    });
    for i in 0..m {
        let row = std::slice::from_raw_parts_mut(c.ptr().add(i * ldc), n);
        for share in partial.chunks_exact(m * n) {
            for (o, &v) in row.iter_mut().zip(&share[i * n..(i + 1) * n]) {
                *o += v;
            }
        }
    }
}

/// Checks shapes and bounds; handles the empty cases. `Ok(true)` when there is a product to compute.
fn prepare(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], ldc: usize, accumulate: bool) -> Result<bool, String> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return Err(format!("sgemm: A is {m}x{k} but B is {}x{n}", b.rows));
    }
    if !a.in_bounds() || !b.in_bounds() {
        return Err("sgemm: a matrix view reaches past its data".into());
    }
    if m > 0 && n > 0 && (ldc < n || c.len() < (m - 1) * ldc + n) {
        return Err(format!("sgemm: C holds {} values, {m}x{n} with row stride {ldc} needs more", c.len()));
    }
    if m == 0 || n == 0 {
        return Ok(false);
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return Ok(false);
    }
    Ok(true)
}

/// Whether this CPU runs the AVX-512 kernel.
fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The `gemm` crate's product, on one thread.
///
/// # Safety
/// The views must be in bounds and `c` must cover `a.rows` rows of `b.cols` values at stride `ldc`.
unsafe fn fallback(a: MatRef<'_>, b: MatRef<'_>, c: *mut f32, ldc: usize, accumulate: bool) {
    gemm::gemm(
        a.rows,
        b.cols,
        a.cols,
        c,
        1,
        ldc as isize,
        accumulate,
        a.data.as_ptr(),
        a.col_stride as isize,
        a.row_stride as isize,
        b.data.as_ptr(),
        b.col_stride as isize,
        b.row_stride as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

thread_local! {
    /// Per-thread packing buffers (A panels, B panels), kept between calls.
    static PACK: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A single-threaded blocked product that [`product`] spreads over the pool.
pub(crate) trait Kernel {
    /// Rows of C one register tile computes (thread shares of rows are multiples of it).
    const ROWS: usize;
    /// Columns of C one register tile computes.
    const COLS: usize;
    /// Whether this CPU runs the kernel.
    fn available() -> bool;
    /// `c [m, n] (stride ldc) (+)= a b` on the calling thread.
    ///
    /// # Safety
    /// As [`blocked`], and [`Kernel::available`] holds.
    unsafe fn blocked(a: MatRef<'_>, b: MatRef<'_>, c: *mut f32, ldc: usize, accumulate: bool);
}

impl Kernel for F32Tile {
    const ROWS: usize = MR;
    const COLS: usize = NR;
    fn available() -> bool {
        <Self as Tile>::available()
    }
    unsafe fn blocked(a: MatRef<'_>, b: MatRef<'_>, c: *mut f32, ldc: usize, accumulate: bool) {
        blocked::<Self>(a, b, c, ldc, accumulate)
    }
}

impl Kernel for Bf16Tile {
    const ROWS: usize = MR;
    const COLS: usize = NR;
    fn available() -> bool {
        <Self as Tile>::available()
    }
    unsafe fn blocked(a: MatRef<'_>, b: MatRef<'_>, c: *mut f32, ldc: usize, accumulate: bool) {
        blocked::<Self>(a, b, c, ldc, accumulate)
    }
}

/// bf16 operands on AMX tiles ([`super::amx`]).
pub(crate) struct AmxTile;

impl Kernel for AmxTile {
    const ROWS: usize = super::amx::TILE_ROWS;
    const COLS: usize = super::amx::TILE_COLS;
    fn available() -> bool {
        super::amx::available()
    }
    unsafe fn blocked(a: MatRef<'_>, b: MatRef<'_>, c: *mut f32, ldc: usize, accumulate: bool) {
        super::amx::blocked(a, b, c, ldc, accumulate)
    }
}

/// How the operands are packed and multiplied: f32 values, or bf16 pairs along K.
pub(crate) trait Tile {
    /// Depth of one packed block.
    const KC: usize;
    /// Whether this CPU runs the tile.
    fn available() -> bool;
    /// Packed words per row (A) or column (B) for a block of depth `kc`.
    fn words(kc: usize) -> usize;
    /// Packs `src.at(i, p)` for `i < rows` (at most `width`), `p < kc`, as `words(kc)` words per index,
    /// interleaved `width` at a time (zero padded).
    fn pack(src: Lines<'_>, rows: usize, width: usize, kc: usize, out: &mut [u32]);
    /// The register tile over `words` packed words.
    ///
    /// # Safety
    /// `a` holds `words * MR` and `b` `words * NR` words; `c` covers `mr` rows of `nr` values at stride `ldc`;
    /// the CPU supports the tile's instructions.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        words: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
        mr: usize,
        nr: usize,
    );
}

/// f32 operands, f32 products (the `MR x NR` FMA tile).
pub(crate) struct F32Tile;

impl Tile for F32Tile {
    const KC: usize = KC;
    fn available() -> bool {
        avx512_available()
    }
    fn words(kc: usize) -> usize {
        kc
    }
    fn pack(src: Lines<'_>, rows: usize, width: usize, kc: usize, out: &mut [u32]) {
        pack_f32(src, rows, width, kc, out)
    }
    unsafe fn tile(
        words: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
        mr: usize,
        nr: usize,
    ) {
        kernel(words, a as *const f32, b as *const f32, c, ldc, acc, mr, nr)
    }
}

/// bf16 operands (rounded from f32 while packing, two K steps per 32-bit word), f32 accumulation.
pub(crate) struct Bf16Tile;

impl Tile for Bf16Tile {
    const KC: usize = 2 * KC;
    fn available() -> bool {
        bf16_available()
    }
    fn words(kc: usize) -> usize {
        kc.div_ceil(2)
    }
    fn pack(src: Lines<'_>, rows: usize, width: usize, kc: usize, out: &mut [u32]) {
        pack_bf16(src, rows, width, kc, out)
    }
    unsafe fn tile(
        words: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
        mr: usize,
        nr: usize,
    ) {
        kernel_bf16(words, a, b, c, ldc, acc, mr, nr)
    }
}

/// The blocked product on the calling thread.
///
/// # Safety
/// As [`fallback`], and the CPU must support the tile's instructions.
pub(crate) unsafe fn blocked<T: Tile>(a: MatRef<'_>, b: MatRef<'_>, c: *mut f32, ldc: usize, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mc = m.next_multiple_of(MR);
    PACK.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let (apack, bpack) = &mut *bufs;
        // Grown, never shrunk: products of other sizes come and go, and resizing up zero-fills.
        let (a_need, b_need) = (mc * T::words(T::KC), NC * T::words(T::KC));
        if apack.len() < a_need {
            apack.resize(a_need, 0);
        }
        if bpack.len() < b_need {
            bpack.resize(b_need, 0);
        }
        // A is packed once per depth block and reused across all column blocks of B.
        for pc in (0..k).step_by(T::KC) {
            let kc = T::KC.min(k - pc);
            let w = T::words(kc);
            for (panel, i0) in (0..m).step_by(MR).enumerate() {
                let out = &mut apack[panel * MR * w..(panel + 1) * MR * w];
                let src = Lines {
                    data: a.data,
                    base: i0 * a.row_stride + pc * a.col_stride,
                    index_stride: a.row_stride,
                    depth_stride: a.col_stride,
                };
                T::pack(src, MR.min(m - i0), MR, kc, out);
            }
            let acc = accumulate || pc > 0;
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                for (panel, j0) in (0..nc).step_by(NR).enumerate() {
                    let out = &mut bpack[panel * NR * w..(panel + 1) * NR * w];
                    let src = Lines {
                        data: b.data,
                        base: pc * b.row_stride + (jc + j0) * b.col_stride,
                        index_stride: b.col_stride,
                        depth_stride: b.row_stride,
                    };
                    T::pack(src, NR.min(nc - j0), NR, kc, out);
                }
                for jr in (0..nc).step_by(NR) {
                    let nr = NR.min(nc - jr);
                    let bp = bpack.as_ptr().add(jr * w);
                    for ir in (0..m).step_by(MR) {
                        let mr = MR.min(m - ir);
                        T::tile(w, apack.as_ptr().add(ir * w), bp, c.add(ir * ldc + jc + jr), ldc, acc, mr, nr);
                    }
                }
            }
        }
    });
}

/// The `MR x NR` register tile: `c[..mr, ..nr] (+)= apanel (kc x MR) * bpanel (kc x NR)`.
///
/// # Safety
/// `a` holds `kc * MR` and `b` `kc * NR` values; `c` covers `mr` rows of `nr` values at stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    mr: usize,
    nr: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = _mm512_loadu_ps(b.add(p * NR));
        let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
        let ap = a.add(p * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*ap.add(i));
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
    }
    store(&acc, c, ldc, accumulate, mr, nr);
}

/// Writes (or adds) the first `mr` rows and `nr` columns of a register tile to `c`.
///
/// # Safety
/// `c` covers `mr` rows of `nr` values at stride `ldc`; the CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store(acc: &[[__m512; 2]; MR], c: *mut f32, ldc: usize, accumulate: bool, mr: usize, nr: usize) {
    let mask = |lo: usize| -> __mmask16 {
        let n = nr.saturating_sub(lo).min(16);
        if n == 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    };
    let (m0, m1) = (mask(0), mask(16));
    for (i, row) in acc.iter().enumerate() {
        if i < mr {
            let dst = c.add(i * ldc);
            let (mut v0, mut v1) = (row[0], row[1]);
            if accumulate {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, dst));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, dst.add(16)));
            }
            _mm512_mask_storeu_ps(dst, m0, v0);
            _mm512_mask_storeu_ps(dst.add(16), m1, v1);
        }
    }
}

/// The bf16 register tile: each word holds two consecutive K steps; `vdpbf16ps` multiplies both
/// pairs and adds them to the f32 lanes.
///
/// # Safety
/// `a` holds `words * MR` and `b` `words * NR` words; `c` covers `mr` rows of `nr` values at stride `ldc`;
/// the CPU supports AVX-512F and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_bf16(
    words: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    mr: usize,
    nr: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..words {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
        let ap = a.add(p * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
    }
    store(&acc, c, ldc, accumulate, mr, nr);
}

/// Never called: [`Bf16Tile::available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_bf16(_: usize, _: *const u32, _: *const u32, _: *mut f32, _: usize, _: bool, _: usize, _: usize) {
    unreachable!("the AVX-512 BF16 kernel is only reached on x86-64")
}

/// Never called: [`avx512_available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(_: usize, _: *const f32, _: *const f32, _: *mut f32, _: usize, _: bool, _: usize, _: usize) {
    unreachable!("the AVX-512 kernel is only reached on x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f64> {
        let mut out = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0f64;
                for p in 0..a.cols {
                    s += a.data[i * a.row_stride + p * a.col_stride] as f64
                        * b.data[p * b.row_stride + j * b.col_stride] as f64;
                }
                out[i * b.cols + j] = s;
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn matches_a_float64_reference_on_every_layout_and_edge() {
        // Shapes that exercise partial tiles, several K and N blocks, the row, column and depth splits, narrow
        // products and the fallback.
        for &(m, k, n) in &[
            (1, 7, 5),
            (2, 300, 1100),
            (13, 300, 33),
            (100, 513, 70),
            (25, 64, 1100),
            (200, 40, 48),
            (12, 260, 600),
            (16, 3001, 70),
            (300, 200, 8),
            (70, 40, 15),
        ] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let av = values(m * k, 1);
                let bv = values(k * n, 2);
                let a = if ta { MatRef::row_major(&av, k, m).t() } else { MatRef::row_major(&av, m, k) };
                let b = if tb { MatRef::row_major(&bv, n, k).t() } else { MatRef::row_major(&bv, k, n) };
                let want = reference(a, b);
                for accumulate in [false, true] {
                    let mut c = vec![0.5f32; m * n];
                    sgemm(a, b, &mut c, n, accumulate).expect("sgemm");
                    for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                        let w = if accumulate { w + 0.5 } else { w };
                        let tol = 1e-5 * (k as f64).sqrt() * 4.0 + 1e-5 * w.abs();
                        assert!(
                            (got as f64 - w).abs() <= tol,
                            "m{m} k{k} n{n} ta{ta} tb{tb} acc{accumulate} at {idx}: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_product_equals_the_product_of_the_rounded_operands_on_every_path() {
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
        let paths = Bf16Path::supported();
        eprintln!("bf16 product paths on this CPU: {paths:?}");
        // Partial tiles, several depth, row and column blocks (the AMX blocks are 512 deep, 256 rows and
        // 512 columns), narrow and deep products, odd depths.
        let shapes = [
            (13, 301, 33),
            (100, 513, 70),
            (25, 64, 1100),
            (200, 41, 48),
            (16, 3001, 70),
            (300, 200, 8),
            (33, 1025, 47),
            (290, 700, 530),
            (64, 64, 64),
        ];
        for path in paths {
            for &(m, k, n) in &shapes {
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    let av = values(m * k, 7);
                    let bv = values(k * n, 8);
                    let (ar, br) = (round(&av), round(&bv));
                    let a = if ta { MatRef::row_major(&av, k, m).t() } else { MatRef::row_major(&av, m, k) };
                    let b = if tb { MatRef::row_major(&bv, n, k).t() } else { MatRef::row_major(&bv, k, n) };
                    let rounded = path != Bf16Path::F32;
                    let a_r = MatRef { data: if rounded { &ar } else { &av }, ..a };
                    let b_r = MatRef { data: if rounded { &br } else { &bv }, ..b };
                    let want = reference(a_r, b_r);
                    for accumulate in [false, true] {
                        let mut c = vec![0.5f32; m * n];
                        bf16_gemm_on(path, a, b, &mut c, n, accumulate).expect("bf16 gemm");
                        for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                            let w = if accumulate { w + 0.5 } else { w };
                            let tol = 1e-5 * (k as f64).sqrt() * 4.0 + 1e-5 * w.abs();
                            assert!(
                                (got as f64 - w).abs() <= tol,
                                "{path:?} m{m} k{k} n{n} ta{ta} tb{tb} acc{accumulate} at {idx}: {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_product_writes_only_inside_the_output_rows() {
        let (m, k, n, ldc) = (70, 90, 40, 45);
        let (av, bv) = (values(m * k, 11), values(k * n, 12));
        for path in Bf16Path::supported() {
            let mut c = vec![7.0f32; m * ldc];
            bf16_gemm_on(path, MatRef::row_major(&av, m, k), MatRef::row_major(&bv, k, n), &mut c, ldc, false)
                .expect("bf16 gemm");
            for i in 0..m {
                assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 7.0), "{path:?}: row {i} padding written");
            }
        }
    }

    #[test]
    fn narrow_deep_and_serial_products_respect_the_row_stride() {
        // Narrow (n < 16) and deep (k >= 8 max(m, n)) shapes, into rows wider than n, on the pool and serially.
        for &(m, k, n) in &[(300, 200, 8), (20, 2000, 40)] {
            let ldc = n + 5;
            let (av, bv) = (values(m * k, 9), values(k * n, 10));
            let (a, b) = (MatRef::row_major(&av, m, k), MatRef::row_major(&bv, k, n));
            let want = reference(a, b);
            for parallel in [true, false] {
                for accumulate in [false, true] {
                    let mut c = vec![0.25f32; m * ldc];
                    if parallel {
                        sgemm(a, b, &mut c, ldc, accumulate).expect("sgemm");
                    } else {
                        sgemm_serial(a, b, &mut c, ldc, accumulate).expect("sgemm");
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let w = want[i * n + j] + if accumulate { 0.25 } else { 0.0 };
                            let got = c[i * ldc + j] as f64;
                            assert!(
                                (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                "m{m} k{k} n{n} ({i}, {j}): {got} vs {w}"
                            );
                        }
                        assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 0.25), "row {i} padding written");
                    }
                }
            }
        }
    }

    #[test]
    fn writes_only_inside_the_output_rows() {
        // A row stride wider than n: the padding columns must stay untouched.
        let (m, k, n, ldc) = (30, 50, 40, 45);
        let av = values(m * k, 3);
        let bv = values(k * n, 4);
        let mut c = vec![7.0f32; m * ldc];
        sgemm(MatRef::row_major(&av, m, k), MatRef::row_major(&bv, k, n), &mut c, ldc, false).expect("sgemm");
        for i in 0..m {
            assert!(c[i * ldc + n..i * ldc + ldc].iter().all(|&v| v == 7.0), "row {i} padding overwritten");
        }
    }

    #[test]
    fn rejects_mismatched_shapes_and_short_buffers() {
        let v = values(64, 5);
        let a = MatRef::row_major(&v, 8, 8);
        let b = MatRef::row_major(&v[..32], 4, 8);
        assert!(sgemm(a, b, &mut [0.0; 64], 8, false).is_err());
        let too_long = MatRef { data: &v, rows: 9, cols: 8, row_stride: 8, col_stride: 1 };
        assert!(sgemm(too_long, a, &mut [0.0; 72], 8, false).is_err());
        assert!(sgemm(a, a, &mut [0.0; 63], 8, false).is_err());
    }
}
