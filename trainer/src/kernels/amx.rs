//! The bf16 matrix product on Intel AMX tiles (Sapphire Rapids and later Xeons): `C (+)= A B` with both
//! operands rounded to bf16 and f32 accumulation, the numbers of the AVX-512 BF16 tile
//! ([`super::sgemm::bf16_gemm`]) at several times its throughput.
//!
//! One `tdpbf16ps` multiplies a 16 x 32 bf16 tile of A by a 32 x 16 tile of B (pairs along the depth, the
//! layout [`super::pack::pack_bf16`] already produces for B) into a 16 x 16 f32 tile. The register tile
//! here is 32 x 32: four accumulators, two A tiles and two B tiles (all eight tile registers), so every
//! tile load feeds two products. Around it, the classic blocked loops (Goto/BLIS): a `KC x NC` block of B
//! packed once and kept in L2 while `MC x KC` blocks of A pass by, each A block packed row-major (the
//! A-tile layout). Partial tiles at the edges go through a zero-padded staging tile.
//!
//! Rust's AMX intrinsics are unstable, so the instructions are written with `asm!` (stable). Linux
//! hands out the tile state only on request: the first [`available`] asks once per process
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), and the path stays off if the kernel says no.

use super::pack::{pack_bf16, pack_bf16_lines, Lines};
use super::sgemm::MatRef;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Rows of C per register tile (two A tiles).
pub(crate) const TILE_ROWS: usize = 32;
/// Columns of C per register tile (two B tiles).
pub(crate) const TILE_COLS: usize = 32;
/// Depth of one packed block, in bf16 values (a multiple of the 32 one tile product consumes).
const KC: usize = 512;
/// Rows of A packed at once (an `MC x KC` block: 256 KiB of bf16 in L2).
const MC: usize = 256;
/// Columns of B packed at once (a `KC x NC` block: 1 MiB of bf16 in L2).
const NC: usize = 1024;
/// 32-bit words (bf16 pairs) per tile row: 64 bytes.
const TILE_WORDS: usize = 16;

/// Whether this CPU and kernel run the AMX tile: AMX-TILE and AMX-BF16 in CPUID, AVX-512 BF16 for the
/// packing, and Linux's permission to use the tile data (requested here, once per process).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| super::pack::bf16_available() && cpu_has_amx_bf16() && request_tile_permission())
}

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (EDX bit 24).
fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 7 exists when the maximum leaf allows it.
        if std::arch::x86_64::__cpuid(0).eax < 7 {
            return false;
        }
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Asks Linux for the AMX tile data state for this process (every thread); false if refused.
fn request_tile_permission() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with this request only changes which XSAVE features the process may use.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

thread_local! {
    /// Per-thread packing buffers (A block, B block, one A half-panel in pack order), kept between calls.
    static PACK: RefCell<[Vec<u32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// The tile configuration: palette 1, tiles 0-7 all 16 rows of 64 bytes (accumulators 0-3, A 4-5, B 6-7).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for t in 0..8 {
            cfg[16 + 2 * t] = (TILE_WORDS * 4) as u8;
            cfg[48 + t] = 16;
        }
        TileConfig(cfg)
    }
}

/// The blocked product on the calling thread: `c [m, n] (stride ldc) (+)= bf16(a) bf16(b)`.
///
/// # Safety
/// The views are in bounds, `c` covers `a.rows` rows of `b.cols` values at stride `ldc`, and
/// [`available`] returned true.
pub(crate) unsafe fn blocked(a: MatRef<'_>, b: MatRef<'_>, c: *mut f32, ldc: usize, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let config = TileConfig::new();
    load_config(&config);
    PACK.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let [apack, bpack, half] = &mut *bufs;
        let words_max = KC / 2;
        // Grown, never shrunk; resizing up zero-fills.
        for (buf, need) in [
            (&mut *apack, MC.next_multiple_of(TILE_ROWS) * words_max),
            (&mut *bpack, NC.next_multiple_of(TILE_COLS) * words_max),
            (&mut *half, 16 * words_max),
        ] {
            if buf.len() < need {
                buf.resize(need, 0);
            }
        }
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                // Words per packed line, padded to whole tile rows with zeros.
                let w = kc.div_ceil(2).next_multiple_of(TILE_WORDS);
                for (panel, j0) in (0..nc).step_by(TILE_COLS).enumerate() {
                    let out = &mut bpack[panel * TILE_COLS * w..(panel + 1) * TILE_COLS * w];
                    let src = Lines {
                        data: b.data,
                        base: pc * b.row_stride + (jc + j0) * b.col_stride,
                        index_stride: b.col_stride,
                        depth_stride: b.row_stride,
                    };
                    pack_bf16(src, TILE_COLS.min(nc - j0), TILE_COLS, kc, out);
                    out[kc.div_ceil(2) * TILE_COLS..].fill(0);
                }
                let acc = accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    for (half_panel, i0) in (0..mc).step_by(16).enumerate() {
                        let out = &mut apack[half_panel * 16 * w..(half_panel + 1) * 16 * w];
                        let src = Lines {
                            data: a.data,
                            base: (ic + i0) * a.row_stride + pc * a.col_stride,
                            index_stride: a.row_stride,
                            depth_stride: a.col_stride,
                        };
                        pack_rows(src, 16.min(mc - i0), kc, w, half, out);
                    }
                    // A half panel past `mc` (an odd count of 16-row halves) reads zeros.
                    let halves = mc.div_ceil(16);
                    if halves % 2 == 1 {
                        apack[halves * 16 * w..(halves + 1) * 16 * w].fill(0);
                    }
                    for jr in (0..nc).step_by(TILE_COLS) {
                        let nr = TILE_COLS.min(nc - jr);
                        let bp = bpack.as_ptr().add(jr * w);
                        for ir in (0..mc).step_by(TILE_ROWS) {
                            let mr = TILE_ROWS.min(mc - ir);
                            let dst = c.add((ic + ir) * ldc + jc + jr);
                            tile(w, apack.as_ptr().add(ir * w), bp, dst, ldc, acc, mr, nr);
                        }
                    }
                }
            }
        }
    });
    release_tiles();
}

/// Packs `rows` (at most 16) lines of A of depth `kc` row-major as bf16 pairs, `w` words per line (the
/// A-tile layout), zero past the lines and the depth. Lines contiguous along the depth are converted in
/// place ([`pack_bf16_lines`]); other layouts are packed in the B layout by [`pack_bf16`] (vectorized
/// for both strides) and transposed through `scratch`.
fn pack_rows(src: Lines<'_>, rows: usize, kc: usize, w: usize, scratch: &mut [u32], out: &mut [u32]) {
    let out = &mut out[..16 * w];
    if src.depth_stride == 1 {
        pack_bf16_lines(src, rows, kc, w, out);
        out[rows * w..].fill(0);
        return;
    }
    let words = kc.div_ceil(2);
    let by_depth = &mut scratch[..words * 16];
    pack_bf16(src, rows, 16, kc, by_depth);
    for (i, line) in out.chunks_exact_mut(w).enumerate() {
        for (q, word) in line[..words].iter_mut().enumerate() {
            *word = by_depth[q * 16 + i];
        }
        line[words..].fill(0);
    }
}

/// Loads the tile configuration on this thread.
///
/// # Safety
/// [`available`] returned true.
#[inline]
unsafe fn load_config(config: &TileConfig) {
    #[cfg(target_arch = "x86_64")]
    std::arch::asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    #[cfg(not(target_arch = "x86_64"))]
    let _ = config;
}

/// Returns the tile registers to their initial state (so the thread's context switches stay cheap).
///
/// # Safety
/// [`available`] returned true.
#[inline]
unsafe fn release_tiles() {
    #[cfg(target_arch = "x86_64")]
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// The 32 x 32 register tile: `c[..mr, ..nr] (+)= A (32 x 2w bf16, row-major pairs) B (2w x 32, pairs)`.
///
/// # Safety
/// `a` holds `32 * w` and `b` `w * 32` words (`w` a multiple of 16); `c` covers `mr` rows of `nr`
/// values at stride `ldc`; the tile configuration of [`blocked`] is loaded.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn tile(w: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize, acc: bool, mr: usize, nr: usize) {
    use std::arch::asm;
    let full = mr == TILE_ROWS && nr == TILE_COLS;
    // Only the edge tiles use (and pay to zero) the staging tile.
    let mut staging = std::mem::MaybeUninit::<Staging>::uninit();
    let (out, out_stride) = if full {
        (c, ldc)
    } else {
        staging.write(Staging([0f32; TILE_ROWS * TILE_COLS]));
        (staging.as_mut_ptr() as *mut f32, TILE_COLS)
    };
    if acc && !full {
        for i in 0..mr {
            std::ptr::copy_nonoverlapping(c.add(i * ldc), out.add(i * TILE_COLS), nr);
        }
    }
    let stride = out_stride * 4;
    let (c00, c01, c10, c11) = (out, out.add(16), out.add(16 * out_stride), out.add(16 * out_stride + 16));
    if acc {
        asm!(
            "tileloadd tmm0, [{c00} + {s}*1]",
            "tileloadd tmm1, [{c01} + {s}*1]",
            "tileloadd tmm2, [{c10} + {s}*1]",
            "tileloadd tmm3, [{c11} + {s}*1]",
            c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, s = in(reg) stride,
            options(nostack, readonly),
        );
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }
    let a_stride = w * 4;
    let b_stride = TILE_COLS * 4;
    for step in 0..w / TILE_WORDS {
        let a0 = a.add(step * TILE_WORDS);
        let a1 = a0.add(16 * w);
        let b0 = b.add(step * TILE_WORDS * TILE_COLS);
        let b1 = b0.add(16);
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
            sa = in(reg) a_stride, sb = in(reg) b_stride,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c00} + {s}*1], tmm0",
        "tilestored [{c01} + {s}*1], tmm1",
        "tilestored [{c10} + {s}*1], tmm2",
        "tilestored [{c11} + {s}*1], tmm3",
        c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, s = in(reg) stride,
        options(nostack),
    );
    if !full {
        for i in 0..mr {
            std::ptr::copy_nonoverlapping(out.add(i * TILE_COLS), c.add(i * ldc), nr);
        }
    }
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(_: usize, _: *const u32, _: *const u32, _: *mut f32, _: usize, _: bool, _: usize, _: usize) {
    unreachable!("the AMX tile is only reached on x86-64")
}

/// A 32 x 32 f32 tile in memory, for the partial tiles at the edges of C.
#[repr(C, align(64))]
struct Staging([f32; TILE_ROWS * TILE_COLS]);
