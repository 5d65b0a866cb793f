//! bitsandbytes' signed dynamic 8-bit map and the blockwise 8-bit quantizer that double quantization
//! applies to the NF4 block scales (`quantize_blockwise(absmax - offset, blocksize=256)` on CPU).
//!
//! bitsandbytes 0.50.2's CPU kernel (`quantize_cpu_impl<float>` in `csrc/cpu_ops.cpp`, checked against
//! the shipped `libbitsandbytes_cpu.so`) does not search the map: it builds a 65536-entry lookup table
//! over `[-1, 1]` and indexes it. Per block of 256 values:
//! 1. `absmax = max(0, max |a_i|)`; a block whose absmax is 0 gets code 0 everywhere;
//! 2. `inv = 1 / absmax` (f32), `v = clamp(a_i * inv, -1, 1)`;
//! 3. `k = trunc(fma((v + 1) * 0.5, 65535, 0.5))` (the multiply-add is fused in the binary);
//! 4. `code = lut[k]`, where `lut[k]` counts the midpoints `0.5 * (map[j] + map[j + 1])` that are
//!    strictly below `(k + k) / 65535 - 1` (capped at 255).
//!
//! The result is the nearest map entry up to the 1/65535 grid, not the exact nearest: matching it bit
//! for bit requires the same table, which is what this module builds.
//! Dequantization is `map[code] * absmax[block]`, one f32 multiply.

use rayon::prelude::*;
use std::sync::OnceLock;

/// Bit patterns of `bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)` as f32 (sorted ascending; entry 0 is -0.99296875, entry 255 is 1.0).
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// Number of bins of bitsandbytes' CPU lookup table over `[-1, 1]`.
const LUT_SIZE: usize = 65536;

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map()`), 256 ascending f32 values.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| DYNAMIC_MAP_BITS.map(f32::from_bits))
}

/// The lookup table bitsandbytes' CPU kernel builds for `map` (`build_quantize_lut`).
fn build_lut(map: &[f32; 256]) -> Vec<u8> {
    let mut mids = [0f32; 255];
    for (i, m) in mids.iter_mut().enumerate() {
        *m = (map[i] + map[i + 1]) * 0.5;
    }
    let mut lut = vec![0u8; LUT_SIZE];
    let mut code = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let fi = i as f32;
        let val = (fi + fi) / (LUT_SIZE - 1) as f32 - 1.0;
        while code < 255 && mids[code] < val {
            code += 1;
        }
        *slot = code as u8;
    }
    lut
}

/// The lookup table for the dynamic map, built once.
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| build_lut(dynamic_map()))
}

/// The table index of a normalized value, as `norm_to_lut_index` computes it (fused multiply-add).
#[inline]
fn lut_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    let x = (v + 1.0) * 0.5;
    // `x * 65535 + 0.5` lies in [0.5, 65535.5]: the truncation fits in 16 bits.
    (x.mul_add((LUT_SIZE - 1) as f32, 0.5) as u32 & 0xFFFF) as usize
}

/// Quantizes one block with the dynamic map: writes the codes, returns the block's absmax.
fn quantize_block(values: &[f32], lut: &[u8], codes: &mut [u8]) -> f32 {
    let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    if absmax == 0.0 {
        codes.fill(0);
        return absmax;
    }
    let inv = 1.0 / absmax;
    for (c, &v) in codes.iter_mut().zip(values) {
        *c = lut[lut_index(v * inv)];
    }
    absmax
}

/// Blockwise 8-bit quantization with the dynamic map, bit-exact with bitsandbytes 0.50.2 on CPU
/// (`quantize_blockwise(values, blocksize=blocksize)` for f32 input). Returns one code per value
/// and one f32 absmax per block (the last block may be partial). `blocksize` must be positive.
pub fn quantize_blockwise(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(blocksize > 0, "blocksize must be positive");
    let lut = dynamic_lut();
    let mut codes = vec![0u8; values.len()];
    let mut absmax = vec![0f32; values.len().div_ceil(blocksize)];
    values
        .par_chunks(blocksize)
        .zip(codes.par_chunks_mut(blocksize))
        .zip(absmax.par_iter_mut())
        .for_each(|((v, c), a)| *a = quantize_block(v, lut, c));
    (codes, absmax)
}

/// Dequantizes one value: `map[code] * absmax` in f32, as bitsandbytes' CPU kernel does.
#[inline]
pub fn dequantize_value(map: &[f32; 256], code: u8, absmax: f32) -> f32 {
    map[code as usize] * absmax
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_is_sorted_and_spans_the_unit_interval() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(m[255], 1.0);
        assert_eq!(m[0].to_bits(), 0xbf7e3333);
        assert!(m.contains(&0.0));
    }

    #[test]
    fn extremes_and_zero_blocks() {
        let (codes, absmax) = quantize_blockwise(&[1.0, -1.0, 0.0, 0.5, 0.0, 0.0], 4);
        assert_eq!(absmax, vec![1.0, 0.0]);
        assert_eq!(codes[0], 255);
        assert_eq!(codes[1], 0);
        // bitsandbytes' 65536-bin grid maps 0.0 to the smallest positive entry (2.125e-5), not to 0.
        assert_eq!(dynamic_map()[codes[2] as usize], 2.1249998e-5);
        assert_eq!(&codes[4..], &[0, 0]);
    }
}
