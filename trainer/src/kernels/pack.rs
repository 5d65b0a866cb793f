//! Packing the operands of a blocked matrix product into the panels its register tile reads.
//!
//! A panel of `width` lines (rows of A or columns of B) by `kc` depths is stored depth-major: the
//! `width` values of one depth side by side, so the tile loads them with one vector load (B) or
//! broadcasts them one at a time (A). f32 panels hold one value per word; bf16 panels hold two
//! consecutive depths per word (even depth in the low half), the operand layout of `vdpbf16ps`.
//!
//! Packing reads every operand value once per product, so on small products it costs nearly as much
//! as the arithmetic: with AVX-512 the two common layouts are packed sixteen lines at a time, lines
//! contiguous along the depth through a 16 x 16 transpose in registers, lines contiguous across
//! the index with plain vector copies (bf16 pairs interleaved by one permute). Other layouts and the
//! ragged ends go through the scalar path, which defines the result.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The lines being packed: element `(i, p)` (line `i`, depth `p`) is
/// `data[base + i * index_stride + p * depth_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Lines<'a> {
    /// The operand's values.
    pub data: &'a [f32],
    /// Offset of element `(0, 0)`.
    pub base: usize,
    /// Distance between consecutive lines.
    pub index_stride: usize,
    /// Distance between consecutive depths of one line.
    pub depth_stride: usize,
}

impl Lines<'_> {
    /// Element `(i, p)`.
    #[inline]
    fn at(&self, i: usize, p: usize) -> f32 {
        self.data[self.base + i * self.index_stride + p * self.depth_stride]
    }

    /// The same lines starting at depth `p`.
    fn starting_at_depth(self, p: usize) -> Self {
        Self { base: self.base + p * self.depth_stride, ..self }
    }
}

/// The bf16 bits of `v` as the low half of a word, as `vcvtne2ps2bf16` computes them: round to nearest
/// even, NaN kept (quiet), subnormal inputs flushed to a zero of the same sign.
#[inline]
pub(crate) fn bf16_bits(v: f32) -> u32 {
    let bits = v.to_bits();
    if v.is_nan() {
        return (bits >> 16) | 0x40;
    }
    if v.is_subnormal() {
        return (bits >> 16) & 0x8000;
    }
    (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
}

/// Packs `rows` lines (at most `width`) of depth `kc` as f32 words: `out[p * width + i] = src(i, p)`,
/// zero for `rows <= i < width`.
pub(crate) fn pack_f32(src: Lines<'_>, rows: usize, width: usize, kc: usize, out: &mut [u32]) {
    let out = &mut out[..kc * width];
    if rows < width {
        out.fill(0);
    }
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if avx512_available() {
        if src.depth_stride == 1 {
            done = kc - kc % 16;
            // SAFETY: AVX-512F is present; the lines hold `done` depths (`src` is in bounds for `kc`) and
            // `out` holds `kc * width` words.
            unsafe { transpose_f32(src, rows, width, done / 16, out) };
        } else if src.index_stride == 1 {
            done = kc;
            // SAFETY: as above; each depth's `rows` values are contiguous.
            unsafe { copy_depths(src, rows, width, kc, out) };
        }
    }
    scalar_f32(src.starting_at_depth(done), rows, width, kc - done, &mut out[done * width..]);
}

/// Packs `rows` lines (at most `width`) of depth `kc` as bf16 pairs:
/// `out[q * width + i] = bf16(src(i, 2q)) | bf16(src(i, 2q + 1)) << 16`, zero past the lines and the depth.
/// Only called where [`bf16_available`] holds.
pub(crate) fn pack_bf16(src: Lines<'_>, rows: usize, width: usize, kc: usize, out: &mut [u32]) {
    let words = kc.div_ceil(2);
    let out = &mut out[..words * width];
    if rows < width || !kc.is_multiple_of(2) {
        out.fill(0);
    }
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if bf16_available() {
        if src.depth_stride == 1 {
            done = kc - kc % 32;
            // SAFETY: AVX-512F/BW/BF16 are present; the lines hold `done` depths and `out` holds
            // `words * width` words.
            unsafe { transpose_bf16(src, rows, width, done / 32, out) };
        } else if src.index_stride == 1 {
            done = kc - kc % 2;
            // SAFETY: as above; each depth's `rows` values are contiguous.
            unsafe { interleave_depths(src, rows, width, done / 2, out) };
        }
    }
    scalar_bf16(src.starting_at_depth(done), rows, width, kc - done, &mut out[done / 2 * width..]);
}

/// Packs `rows` lines of depth `kc` line-major as bf16 pairs, `stride` words per line:
/// `out[i * stride + q] = bf16(src(i, 2q)) | bf16(src(i, 2q + 1)) << 16` for `q < kc.div_ceil(2)`, zero
/// past the depth up to `stride` (the layout of an AMX A tile). Only called where [`bf16_available`] holds.
pub(crate) fn pack_bf16_lines(src: Lines<'_>, rows: usize, kc: usize, stride: usize, out: &mut [u32]) {
    let words = kc.div_ceil(2);
    assert!(words <= stride && out.len() >= rows * stride, "pack_bf16_lines: {rows} lines of {words} words");
    for (i, line) in out[..rows * stride].chunks_exact_mut(stride).enumerate() {
        let src = Lines { base: src.base + i * src.index_stride, ..src };
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if src.depth_stride == 1 && bf16_available() {
            done = kc - kc % 32;
            assert!(src.base + kc <= src.data.len());
            // SAFETY: AVX-512F/BF16 are present; the line holds `kc` contiguous values, `line` `words` words.
            unsafe { convert_line(src.data.as_ptr().add(src.base), done / 32, line.as_mut_ptr()) };
        }
        for (q, word) in line[..words].iter_mut().enumerate().skip(done / 2) {
            let lo = bf16_bits(src.at(0, 2 * q));
            let hi = if 2 * q + 1 < kc { bf16_bits(src.at(0, 2 * q + 1)) } else { 0 };
            *word = lo | hi << 16;
        }
        line[words..].fill(0);
    }
}

/// Converts `chunks` blocks of 32 contiguous f32 values to bf16, in order (16 words per block).
///
/// # Safety
/// AVX-512F and BF16 are present; `src` holds `32 * chunks` values and `dst` `16 * chunks` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_line(src: *const f32, chunks: usize, dst: *mut u32) {
    for c in 0..chunks {
        let (lo, hi) = (_mm512_loadu_ps(src.add(32 * c)), _mm512_loadu_ps(src.add(32 * c + 16)));
        let pairs = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(dst.add(16 * c) as *mut _, std::mem::transmute::<__m512bh, __m512i>(pairs));
    }
}

/// Whether the AVX-512 f32 packing runs on this CPU.
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

/// Whether this CPU has AVX-512 with BF16 conversions and dot products (and the BW permutes).
pub(crate) fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512_available() && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The scalar f32 packing (the reference for the vector paths), walking memory in the order it runs.
fn scalar_f32(src: Lines<'_>, rows: usize, width: usize, kc: usize, out: &mut [u32]) {
    if src.depth_stride == 1 {
        // Contiguous lines: read them side by side so the packed output is written in order.
        let lines: Vec<&[f32]> = (0..rows).map(|i| &src.data[src.base + i * src.index_stride..][..kc]).collect();
        for p in 0..kc {
            for (o, line) in out[p * width..p * width + rows].iter_mut().zip(&lines) {
                *o = line[p].to_bits();
            }
        }
    } else if src.index_stride == 1 {
        for p in 0..kc {
            let seg = &src.data[src.base + p * src.depth_stride..][..rows];
            for (o, &v) in out[p * width..p * width + rows].iter_mut().zip(seg) {
                *o = v.to_bits();
            }
        }
    } else {
        for p in 0..kc {
            for (i, o) in out[p * width..p * width + rows].iter_mut().enumerate() {
                *o = src.at(i, p).to_bits();
            }
        }
    }
}

/// The scalar bf16 packing (the reference for the vector paths); `out` is zeroed where `kc` is odd.
fn scalar_bf16(src: Lines<'_>, rows: usize, width: usize, kc: usize, out: &mut [u32]) {
    for q in 0..kc / 2 {
        for (i, o) in out[q * width..q * width + rows].iter_mut().enumerate() {
            *o = bf16_bits(src.at(i, 2 * q)) | bf16_bits(src.at(i, 2 * q + 1)) << 16;
        }
    }
    if !kc.is_multiple_of(2) {
        let q = kc / 2;
        for (i, o) in out[q * width..q * width + rows].iter_mut().enumerate() {
            *o = bf16_bits(src.at(i, kc - 1));
        }
    }
}

/// Chunks ahead that the transposing packer prefetches each line (sixteen lines are read side by side,
/// more streams than the hardware prefetcher follows).
#[cfg(target_arch = "x86_64")]
const PREFETCH_CHUNKS: usize = 4;

/// The lane mask of the first `n` (at most 16) lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// [`transpose_lines`] for f32 words.
///
/// # Safety
/// As [`transpose_lines`], with AVX-512F present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_f32(src: Lines<'_>, rows: usize, width: usize, chunks: usize, out: &mut [u32]) {
    transpose_lines::<false>(src, rows, width, chunks, out)
}

/// [`transpose_lines`] for bf16 pairs.
///
/// # Safety
/// As [`transpose_lines`], with AVX-512F, BW and BF16 present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn transpose_bf16(src: Lines<'_>, rows: usize, width: usize, chunks: usize, out: &mut [u32]) {
    transpose_lines::<true>(src, rows, width, chunks, out)
}

/// Lines contiguous along the depth: `chunks` blocks of 16 words, sixteen lines at a time, each line's
/// words loaded (bf16: converted from 32 values) into a register, then transposed so that each register
/// holds one word of sixteen lines.
///
/// # Safety
/// Inlined only into callers that enable AVX-512F (and BW, BF16 when `BF16`); `src.depth_stride == 1`;
/// `rows <= width` (checked, with the extents of `src` and `out`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose_lines<const BF16: bool>(src: Lines<'_>, rows: usize, width: usize, chunks: usize, out: &mut [u32]) {
    let depth_per_chunk = if BF16 { 32 } else { 16 };
    let reach = rows.saturating_sub(1) * src.index_stride + chunks * depth_per_chunk;
    assert!(src.base + reach <= src.data.len() && out.len() >= chunks * 16 * width && rows <= width);
    let data = src.data.as_ptr().add(src.base);
    let dst = out.as_mut_ptr();
    for chunk in 0..chunks {
        for i0 in (0..rows).step_by(16) {
            let n = (rows - i0).min(16);
            let mut v = [_mm512_setzero_si512(); 16];
            for (r, reg) in v.iter_mut().enumerate().take(n) {
                let line = data.add((i0 + r) * src.index_stride + chunk * depth_per_chunk);
                if chunk + PREFETCH_CHUNKS < chunks {
                    _mm_prefetch::<_MM_HINT_T0>(line.add(PREFETCH_CHUNKS * depth_per_chunk) as *const i8);
                    if BF16 {
                        _mm_prefetch::<_MM_HINT_T0>(line.add(PREFETCH_CHUNKS * depth_per_chunk + 16) as *const i8);
                    }
                }
                *reg = if BF16 {
                    let pairs = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(line.add(16)), _mm512_loadu_ps(line));
                    std::mem::transmute::<__m512bh, __m512i>(pairs)
                } else {
                    _mm512_castps_si512(_mm512_loadu_ps(line))
                };
            }
            transpose16(&mut v);
            let mask = first_lanes(n);
            for (t, reg) in v.iter().enumerate() {
                _mm512_mask_storeu_epi32(dst.add((chunk * 16 + t) * width + i0) as *mut i32, mask, *reg);
            }
        }
    }
}

/// Lines contiguous across the index (f32): each depth's values copied sixteen at a time (the scalar
/// copy of 32 values per depth compiles to a `memcpy` call each).
///
/// # Safety
/// AVX-512F present; `src.index_stride == 1`; depths `0..kc` hold `rows` values each; `out` holds
/// `kc * width` words; `rows <= width`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn copy_depths(src: Lines<'_>, rows: usize, width: usize, kc: usize, out: &mut [u32]) {
    if kc == 0 || rows == 0 {
        return;
    }
    let reach = (kc - 1) * src.depth_stride + rows;
    assert!(src.base + reach <= src.data.len() && out.len() >= kc * width && rows <= width);
    let data = src.data.as_ptr().add(src.base);
    let dst = out.as_mut_ptr();
    for p in 0..kc {
        let line = data.add(p * src.depth_stride);
        for i0 in (0..rows).step_by(16) {
            let mask = first_lanes(rows - i0);
            let v = _mm512_maskz_loadu_ps(mask, line.add(i0));
            _mm512_mask_storeu_ps(dst.add(p * width + i0) as *mut f32, mask, v);
        }
    }
}

/// Lines contiguous across the index (bf16): word `q` of sixteen lines interleaves depth `2q` and
/// `2q + 1` of those lines, one conversion and one permute.
///
/// # Safety
/// AVX-512F/BW/BF16 present; `src.index_stride == 1`; depths `0..2 * words` hold `rows` values each;
/// `out` holds `words * width` words; `rows <= width`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_depths(src: Lines<'_>, rows: usize, width: usize, words: usize, out: &mut [u32]) {
    if words == 0 || rows == 0 {
        return;
    }
    let reach = (2 * words - 1) * src.depth_stride + rows;
    assert!(src.base + reach <= src.data.len() && out.len() >= words * width && rows <= width);
    // Halfword t of the result takes halfword t/2 of the even depth (t even) or of the odd one.
    let order: [i16; 32] = std::array::from_fn(|t| (t / 2 + if t % 2 == 1 { 16 } else { 0 }) as i16);
    let order = _mm512_loadu_si512(order.as_ptr() as *const _);
    let data = src.data.as_ptr().add(src.base);
    let dst = out.as_mut_ptr();
    for q in 0..words {
        let even = data.add(2 * q * src.depth_stride);
        let odd = even.add(src.depth_stride);
        for i0 in (0..rows).step_by(16) {
            let mask = first_lanes(rows - i0);
            let pairs = _mm512_cvtne2ps_pbh(
                _mm512_maskz_loadu_ps(mask, odd.add(i0)),
                _mm512_maskz_loadu_ps(mask, even.add(i0)),
            );
            let interleaved = _mm512_permutexvar_epi16(order, std::mem::transmute::<__m512bh, __m512i>(pairs));
            _mm512_mask_storeu_epi32(dst.add(q * width + i0) as *mut i32, mask, interleaved);
        }
    }
}

/// Transposes sixteen registers of sixteen 32-bit lanes: afterwards `v[t]` lane `r` is the former
/// `v[r]` lane `t`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(v: &mut [__m512i; 16]) {
    // Pairs of rows interleaved, then quads: within each 128-bit lane L, u[4g + e] holds element 4L + e
    // of rows 4g..4g + 4.
    let mut t = [_mm512_setzero_si512(); 16];
    for g in 0..8 {
        let (a, b) = (v[2 * g], v[2 * g + 1]);
        t[2 * g] = _mm512_unpacklo_epi32(a, b);
        t[2 * g + 1] = _mm512_unpackhi_epi32(a, b);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let (lo0, hi0, lo1, hi1) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_unpacklo_epi64(lo0, lo1);
        u[4 * g + 1] = _mm512_unpackhi_epi64(lo0, lo1);
        u[4 * g + 2] = _mm512_unpacklo_epi64(hi0, hi1);
        u[4 * g + 3] = _mm512_unpackhi_epi64(hi0, hi1);
    }
    // Then the 128-bit lanes: element e of the four row quads, lanes 0..4 of each, gathered in order.
    for e in 0..4 {
        let (q0, q1, q2, q3) = (u[e], u[4 + e], u[8 + e], u[12 + e]);
        let even01 = _mm512_shuffle_i32x4::<0x88>(q0, q1);
        let odd01 = _mm512_shuffle_i32x4::<0xdd>(q0, q1);
        let even23 = _mm512_shuffle_i32x4::<0x88>(q2, q3);
        let odd23 = _mm512_shuffle_i32x4::<0xdd>(q2, q3);
        v[e] = _mm512_shuffle_i32x4::<0x88>(even01, even23);
        v[8 + e] = _mm512_shuffle_i32x4::<0xdd>(even01, even23);
        v[4 + e] = _mm512_shuffle_i32x4::<0x88>(odd01, odd23);
        v[12 + e] = _mm512_shuffle_i32x4::<0xdd>(odd01, odd23);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) >> 7) % 20011) as f32 / 997.0 - 10.0).collect()
    }

    /// Every layout, line count and depth, against the scalar packing of the same lines.
    #[test]
    fn vector_packing_equals_the_scalar_packing() {
        let data = values(200 * 200);
        for &(rows, width) in &[(12, 12), (5, 12), (32, 32), (17, 32), (1, 32)] {
            for kc in [1, 2, 15, 16, 31, 32, 33, 64, 100, 257] {
                for (index_stride, depth_stride) in [(kc + 3, 1), (1, 40), (2, 90)] {
                    let src = Lines { data: &data, base: 11, index_stride, depth_stride };
                    let mut got = vec![u32::MAX; kc * width];
                    let mut want = vec![u32::MAX; kc * width];
                    pack_f32(src, rows, width, kc, &mut got);
                    want.fill(0);
                    scalar_f32(src, rows, width, kc, &mut want);
                    assert_eq!(
                        got, want,
                        "f32 rows {rows} width {width} kc {kc} strides {index_stride},{depth_stride}"
                    );
                    let words = kc.div_ceil(2);
                    let mut got = vec![u32::MAX; words * width];
                    let mut want = vec![0; words * width];
                    pack_bf16(src, rows, width, kc, &mut got);
                    scalar_bf16(src, rows, width, kc, &mut want);
                    assert_eq!(
                        got, want,
                        "bf16 rows {rows} width {width} kc {kc} strides {index_stride},{depth_stride}"
                    );
                }
            }
        }
    }

    #[test]
    fn packed_layout_is_depth_major_with_bf16_pairs() {
        // 2 lines of depth 3, row-major: line i depth p = 10 i + p + 1.
        let data = [1.0f32, 2.0, 3.0, 11.0, 12.0, 13.0];
        let src = Lines { data: &data, base: 0, index_stride: 3, depth_stride: 1 };
        let mut f = vec![9; 3 * 4];
        pack_f32(src, 2, 4, 3, &mut f);
        let floats: Vec<f32> = f.iter().map(|&w| f32::from_bits(w)).collect();
        assert_eq!(floats, [1.0, 11.0, 0.0, 0.0, 2.0, 12.0, 0.0, 0.0, 3.0, 13.0, 0.0, 0.0]);
        let mut b = vec![9; 2 * 4];
        pack_bf16(src, 2, 4, 3, &mut b);
        let half =
            |w: u32| (half::bf16::from_bits(w as u16).to_f32(), half::bf16::from_bits((w >> 16) as u16).to_f32());
        assert_eq!(half(b[0]), (1.0, 2.0));
        assert_eq!(half(b[1]), (11.0, 12.0));
        assert_eq!(half(b[4]), (3.0, 0.0));
        assert_eq!(half(b[5]), (13.0, 0.0));
        assert_eq!([b[2], b[3], b[6], b[7]], [0; 4]);
    }

    #[test]
    fn bf16_rounding_matches_the_instruction() {
        // Ties between two bf16 values (1 + 2^-8 rounds down to even, 1 + 3 * 2^-8 up), large, infinite
        // and subnormal values.
        let (tie_down, tie_up) = (f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000));
        for v in [1.0f32, -2.5, tie_down, tie_up, 3.0e38, f32::INFINITY, 1e-39, -1e-39] {
            let want =
                if v.is_subnormal() { (v.to_bits() >> 16) & 0x8000 } else { half::bf16::from_f32(v).to_bits() as u32 };
            assert_eq!(bf16_bits(v), want, "{v}");
        }
        assert!(half::bf16::from_bits(bf16_bits(f32::NAN) as u16).is_nan());
        // The vector path rounds the same way (a line long enough to take it, with ties and subnormals).
        if bf16_available() {
            let line: Vec<f32> = (0..32).map(|i| [tie_down, tie_up, -1e-39, 2.0e-3][i % 4]).collect();
            let src = Lines { data: &line, base: 0, index_stride: 32, depth_stride: 1 };
            let mut out = vec![0; 16 * 16];
            pack_bf16(src, 1, 16, 32, &mut out);
            for q in 0..16 {
                assert_eq!(out[q * 16], bf16_bits(line[2 * q]) | bf16_bits(line[2 * q + 1]) << 16);
            }
        }
    }
}
