//! NF4 storage, bit-exact with bitsandbytes 0.50.2 on CPU (`quantize_4bit(..., quant_type="nf4",
//! blocksize=64)` and `dequantize_4bit`).
//!
//! Quantization (bitsandbytes' `default` `quantize_4bit` kernel, which the CPU backend uses):
//! - the weight is flattened; blocks of `blocksize` consecutive values, the last one possibly partial;
//! - full blocks: `absmax = max |a|` (stored as is, 0 for an all-zero block) and
//!   `s = clamp(a * (1 / max(absmax, 1e-38)), -1, 1)` (a reciprocal, then a multiply);
//! - the partial block: `absmax = max(max |a|, 1e-38)` (stored clamped) and `s = clamp(a / absmax, -1, 1)`
//!   (a true division);
//! - the code is `bucketize(s, midpoints)`: the number of midpoints `(code[i] + code[i+1]) / 2` (f32) that
//!   are strictly below `s`, so a value exactly on a midpoint takes the lower code;
//! - two codes per byte, the first element in the high nibble; an odd count is padded with the code of
//!   0.0 (7).
//!
//! Double quantization (`compress_statistics=True`): `offset = absmax.mean()` (PyTorch's f32 sum, see
//! [`super::torch_mean`]), then `absmax - offset` is 8-bit quantized with the dynamic map in blocks of
//! 256 ([`super::dynamic_map`]).
//!
//! Dequantization: `absmax = map[code] * nested_absmax[block / 256]`, then `absmax + offset` (f32), then
//! `nf4[code] * absmax` (f32): each value is one rounding of one product, as in bitsandbytes' kernels.
//! Blocks are flat, as bitsandbytes' quantizer writes them and its CUDA and torch dequantizers read
//! them. (Its C++ CPU dequantizer on AVX-512 machines reads absmax per row when the last dimension is a
//! multiple of 16 but not of the block size, e.g. 96: it then disagrees with its own quantizer. Shapes
//! that are multiples of 64, i.e. every Mistral/Mixtral linear, are unaffected.)

use super::dynamic_map;
use super::torch_mean::torch_mean;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// The NF4 code book (`bitsandbytes.functional.get_4bit_type("nf4")`), index 0..15. The literals are
/// bitsandbytes' own (f64 digits); as f32 they are the values its table holds.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' default NF4 block size (values per absmax).
pub const NF4_BLOCKSIZE: usize = 64;
/// bitsandbytes' block size for the double-quantized absmax.
pub const NESTED_BLOCKSIZE: usize = 256;
/// Block sizes bitsandbytes accepts for 4-bit quantization.
pub const VALID_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// The NF4 code of 0.0, used to pad an odd number of values.
const ZERO_CODE: u8 = 7;
/// The floor bitsandbytes puts under a block's absmax before dividing by it.
const ABSMAX_FLOOR: f32 = 1e-38;

/// Midpoints between consecutive NF4 codes, computed in f32 as bitsandbytes does.
fn midpoints() -> [f32; 15] {
    let mut m = [0f32; 15];
    for (i, v) in m.iter_mut().enumerate() {
        *v = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
    }
    m
}

/// The NF4 codes of both nibbles of every byte: `[code[byte >> 4], code[byte & 15]]`.
fn code_pairs() -> &'static [[f32; 2]; 256] {
    static PAIRS: std::sync::OnceLock<[[f32; 2]; 256]> = std::sync::OnceLock::new();
    PAIRS.get_or_init(|| std::array::from_fn(|b| [NF4_CODE[b >> 4], NF4_CODE[b & 15]]))
}

/// How a quantized weight's block scales are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum AbsmaxStorage {
    /// One f32 absmax per block (`compress_statistics=False`).
    Plain(Vec<f32>),
    /// Double quantization (`compress_statistics=True`).
    DoubleQuant(DoubleQuantAbsmax),
}

/// Double-quantized block scales: `absmax[b] = map[codes[b]] * nested_absmax[b / nested_blocksize] + offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuantAbsmax {
    /// One 8-bit code per NF4 block.
    pub codes: Vec<u8>,
    /// One f32 scale per `nested_blocksize` codes.
    pub nested_absmax: Vec<f32>,
    /// The mean that was subtracted before quantizing (`nested_offset`).
    pub offset: f32,
    /// Codes per nested scale (256 in bitsandbytes).
    pub nested_blocksize: usize,
    /// The 8-bit map the codes index (`nested_quant_map`; bitsandbytes' dynamic map).
    pub map: Arc<[f32; 256]>,
}

impl DoubleQuantAbsmax {
    /// The reconstructed absmax of NF4 block `b`, in bitsandbytes' order of operations.
    #[inline]
    pub fn absmax(&self, b: usize) -> f32 {
        dynamic_map::dequantize_value(&self.map, self.codes[b], self.nested_absmax[b / self.nested_blocksize])
            + self.offset
    }
}

impl AbsmaxStorage {
    /// The absmax of NF4 block `b` as dequantization uses it.
    #[inline]
    pub fn absmax(&self, b: usize) -> f32 {
        match self {
            AbsmaxStorage::Plain(a) => a[b],
            AbsmaxStorage::DoubleQuant(d) => d.absmax(b),
        }
    }

    /// Number of NF4 blocks described.
    pub fn len(&self) -> usize {
        match self {
            AbsmaxStorage::Plain(a) => a.len(),
            AbsmaxStorage::DoubleQuant(d) => d.codes.len(),
        }
    }

    /// True when no block is described.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the scales (codes, nested scales, offset and the 8-bit map).
    pub fn memory_bytes(&self) -> usize {
        match self {
            AbsmaxStorage::Plain(a) => a.len() * 4,
            AbsmaxStorage::DoubleQuant(d) => d.codes.len() + d.nested_absmax.len() * 4 + 4 + 256 * 4,
        }
    }
}

/// Options of [`Nf4Weight::quantize_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// Double-quantize the block scales (`compress_statistics`).
    pub double_quant: bool,
    /// Values per NF4 block (one of [`VALID_BLOCKSIZES`]; 64 by default).
    pub blocksize: usize,
    /// PyTorch intra-op thread count to reproduce in the mean of the absmax (it decides the summation
    /// order for 32768 blocks or more, i.e. from 2M parameters). 1 by default.
    pub torch_threads: usize,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions { double_quant: true, blocksize: NF4_BLOCKSIZE, torch_threads: 1 }
    }
}

/// A weight stored in NF4 (4-bit NormalFloat codes with per-block scales), laid out exactly as
/// bitsandbytes stores it. Viewed as a matrix `[rows, cols]` where `cols` is the last dimension of
/// `shape` (for a linear weight `[out, in]`: rows = out, cols = in).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    shape: Vec<usize>,
    blocksize: usize,
    packed: Vec<u8>,
    absmax: AbsmaxStorage,
    dtype: DType,
}

/// Writes the codes of `values` (scaled by `scale`, clamped, bucketized) two per byte. Works on
/// 64-value chunks so that the comparisons against the 15 midpoints vectorize.
#[inline]
fn pack_codes(values: &[f32], mids: &[f32; 15], packed: &mut [u8], scale: impl Fn(f32) -> f32) {
    const CHUNK: usize = 64;
    let mut scaled = [0f32; CHUNK];
    let mut codes = [0u8; CHUNK];
    for (vals, bytes) in values.chunks(CHUNK).zip(packed.chunks_mut(CHUNK / 2)) {
        let len = vals.len();
        for (s, &a) in scaled.iter_mut().zip(vals) {
            *s = scale(a).clamp(-1.0, 1.0);
        }
        // `torch.bucketize(s, mids, right=False)`: the number of midpoints strictly below s.
        codes[..len].fill(0);
        for &m in mids {
            for (c, &s) in codes[..len].iter_mut().zip(&scaled[..len]) {
                *c += (m < s) as u8;
            }
        }
        for (i, byte) in bytes.iter_mut().enumerate() {
            let lo = if 2 * i + 1 < len { codes[2 * i + 1] } else { ZERO_CODE };
            *byte = (codes[2 * i] << 4) | lo;
        }
    }
}

/// Largest |value| of a block, or `None` when the block holds a NaN or an infinity. Works on the bit
/// patterns: for finite non-negative floats their order is the integer order.
#[inline]
fn block_absmax(values: &[f32]) -> Option<f32> {
    let bits = values.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF));
    (bits < 0x7F80_0000).then(|| f32::from_bits(bits))
}

/// Quantizes one block: writes `ceil(len / 2)` bytes (the last nibble padded when `len` is odd),
/// returns the stored absmax (`None` for a non-finite value). `full` selects bitsandbytes'
/// full-block arithmetic (reciprocal then multiply, absmax stored unclamped) over its partial-block
/// arithmetic (division, absmax clamped).
fn quantize_block(values: &[f32], full: bool, mids: &[f32; 15], packed: &mut [u8]) -> Option<f32> {
    let max = block_absmax(values)?;
    Some(if full {
        let inv = 1.0 / max.max(ABSMAX_FLOOR);
        pack_codes(values, mids, packed, |a| a * inv);
        max
    } else {
        let am = max.max(ABSMAX_FLOOR);
        pack_codes(values, mids, packed, |a| a / am);
        am
    })
}

/// Quantizes `values` blockwise; returns the packed codes and the per-block absmax, or the index of a
/// block holding a non-finite value.
fn quantize_nf4(values: &[f32], blocksize: usize) -> std::result::Result<(Vec<u8>, Vec<f32>), usize> {
    let mids = midpoints();
    let n = values.len();
    let full_blocks = n / blocksize;
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(blocksize)];
    let full_bytes = full_blocks * blocksize / 2;
    let (full_packed, tail_packed) = packed.split_at_mut(full_bytes);
    let (full_absmax, tail_absmax) = absmax.split_at_mut(full_blocks);
    // Blocksizes are even, so full blocks own whole bytes; group blocks to amortize rayon's overhead.
    const GROUP: usize = 64;
    values[..full_blocks * blocksize]
        .par_chunks(blocksize * GROUP)
        .zip(full_packed.par_chunks_mut(blocksize / 2 * GROUP))
        .zip(full_absmax.par_chunks_mut(GROUP))
        .enumerate()
        .try_for_each(|(g, ((v, p), a))| {
            for (b, ((vb, pb), ab)) in
                v.chunks(blocksize).zip(p.chunks_mut(blocksize / 2)).zip(a.iter_mut()).enumerate()
            {
                *ab = quantize_block(vb, true, &mids, pb).ok_or(g * GROUP + b)?;
            }
            Ok::<(), usize>(())
        })?;
    if let Some(last) = tail_absmax.first_mut() {
        *last = quantize_block(&values[full_blocks * blocksize..], false, &mids, tail_packed).ok_or(full_blocks)?;
    }
    Ok((packed, absmax))
}

/// Double-quantizes block scales as bitsandbytes does (`offset = mean`, 8-bit blocks of 256).
fn double_quantize(absmax: &[f32], torch_threads: usize) -> DoubleQuantAbsmax {
    let offset = torch_mean(absmax, torch_threads);
    let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (codes, nested_absmax) = dynamic_map::quantize_blockwise(&centered, NESTED_BLOCKSIZE);
    DoubleQuantAbsmax {
        codes,
        nested_absmax,
        offset,
        nested_blocksize: NESTED_BLOCKSIZE,
        map: Arc::new(*dynamic_map::dynamic_map()),
    }
}

impl Nf4Weight {
    /// Quantizes `data` (row-major, `shape`) to NF4 with blocks of 64, optionally double-quantizing the
    /// scales, exactly as `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4",
    /// compress_statistics=double_quant)` does on CPU with one PyTorch thread.
    pub fn quantize(data: &[f32], shape: &[usize], double_quant: bool) -> Result<Self> {
        Self::quantize_with(data, shape, &QuantizeOptions { double_quant, ..Default::default() })
    }

    /// [`Nf4Weight::quantize`] with every option. Errors on an empty shape, a length that does not match
    /// it, an unsupported block size or a non-finite value.
    pub fn quantize_with(data: &[f32], shape: &[usize], options: &QuantizeOptions) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if shape.is_empty() || numel == 0 {
            return Err(Error::Invalid(format!("NF4: cannot quantize a tensor of shape {shape:?}")));
        }
        if data.len() != numel {
            return Err(Error::Invalid(format!(
                "NF4: {} values given for shape {shape:?} ({numel} expected)",
                data.len()
            )));
        }
        if !VALID_BLOCKSIZES.contains(&options.blocksize) {
            return Err(Error::Invalid(format!(
                "NF4: block size {} is not one of {VALID_BLOCKSIZES:?}",
                options.blocksize
            )));
        }
        let (packed, absmax) = quantize_nf4(data, options.blocksize).map_err(|b| {
            let bs = options.blocksize;
            let i = (b * bs..((b + 1) * bs).min(numel)).find(|&i| !data[i].is_finite()).unwrap_or(b * bs);
            Error::Invalid(format!("NF4: value {} at index {i} is not finite", data[i]))
        })?;
        let absmax = if options.double_quant {
            AbsmaxStorage::DoubleQuant(double_quantize(&absmax, options.torch_threads))
        } else {
            AbsmaxStorage::Plain(absmax)
        };
        Ok(Nf4Weight { shape: shape.to_vec(), blocksize: options.blocksize, packed, absmax, dtype: DType::F32 })
    }

    /// Quantizes a float tensor of any device and float dtype (converted to f32 exactly on the CPU, one
    /// tensor at a time). The original dtype is recorded (bitsandbytes' `dtype` field).
    pub fn quantize_tensor(t: &Tensor, double_quant: bool) -> Result<Self> {
        let dtype = t.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::Invalid(format!("NF4: cannot quantize a {dtype:?} tensor")));
        }
        let data = t.flatten_all()?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut w = Self::quantize(&data, t.dims(), double_quant)?;
        w.dtype = dtype;
        Ok(w)
    }

    /// Assembles a weight from its parts, checking that their sizes agree.
    pub fn from_parts(
        shape: Vec<usize>,
        blocksize: usize,
        packed: Vec<u8>,
        absmax: AbsmaxStorage,
        dtype: DType,
    ) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if shape.is_empty() || numel == 0 {
            return Err(Error::Invalid(format!("NF4: invalid shape {shape:?}")));
        }
        if !VALID_BLOCKSIZES.contains(&blocksize) {
            return Err(Error::Invalid(format!("NF4: block size {blocksize} is not one of {VALID_BLOCKSIZES:?}")));
        }
        if packed.len() != numel.div_ceil(2) {
            return Err(Error::Invalid(format!(
                "NF4: {} packed bytes for shape {shape:?} ({} expected)",
                packed.len(),
                numel.div_ceil(2)
            )));
        }
        let blocks = numel.div_ceil(blocksize);
        if absmax.len() != blocks {
            return Err(Error::Invalid(format!("NF4: {} block scales for {blocks} blocks", absmax.len())));
        }
        if let AbsmaxStorage::DoubleQuant(d) = &absmax {
            if d.nested_blocksize == 0 || d.nested_absmax.len() != blocks.div_ceil(d.nested_blocksize) {
                return Err(Error::Invalid(format!(
                    "NF4: {} nested scales for {blocks} codes in blocks of {}",
                    d.nested_absmax.len(),
                    d.nested_blocksize
                )));
            }
        }
        Ok(Nf4Weight { shape, blocksize, packed, absmax, dtype })
    }

    /// The weight's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The last dimension (a linear weight's `in`).
    pub fn cols(&self) -> usize {
        self.shape[self.shape.len() - 1]
    }

    /// The product of the other dimensions (a linear weight's `out`).
    pub fn rows(&self) -> usize {
        self.numel() / self.cols()
    }

    /// Values per NF4 block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// The packed codes: `ceil(numel / 2)` bytes, first value of each pair in the high nibble.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The block scales.
    pub fn absmax(&self) -> &AbsmaxStorage {
        &self.absmax
    }

    /// The dtype of the weight before quantization (bitsandbytes' `dtype`; informative only:
    /// dequantization always gives f32).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Sets the recorded original dtype.
    pub fn set_dtype(&mut self, dtype: DType) {
        self.dtype = dtype;
    }

    /// The absmax of every block as dequantization uses it (double quantization undone).
    pub fn block_absmax(&self) -> Vec<f32> {
        (0..self.absmax.len()).into_par_iter().map(|b| self.absmax.absmax(b)).collect()
    }

    /// Dequantizes the flat values `start .. start + out.len()` (serially).
    fn dequantize_flat(&self, start: usize, out: &mut [f32]) {
        let bs = self.blocksize;
        let mut pos = start;
        let mut written = 0usize;
        while written < out.len() {
            let block = pos / bs;
            let block_end = ((block + 1) * bs).min(start + out.len());
            let scale = self.absmax.absmax(block);
            let table = NF4_CODE.map(|c| c * scale);
            let dst = &mut out[written..written + (block_end - pos)];
            let mut i = 0usize;
            let mut p = pos;
            if p % 2 == 1 {
                dst[0] = table[(self.packed[p / 2] & 0x0F) as usize];
                i = 1;
                p += 1;
            }
            let pairs = (dst.len() - i) / 2;
            let code_pairs = code_pairs();
            for (pair, &byte) in dst[i..i + 2 * pairs].chunks_exact_mut(2).zip(&self.packed[p / 2..p / 2 + pairs]) {
                let [hi, lo] = code_pairs[byte as usize];
                // The same single product `code * scale` as the table lookup, for two values at once.
                pair[0] = hi * scale;
                pair[1] = lo * scale;
            }
            i += 2 * pairs;
            if i < dst.len() {
                dst[i] = table[(self.packed[(pos + i) / 2] >> 4) as usize];
            }
            written += dst.len();
            pos = block_end;
        }
    }

    /// Dequantizes rows `rows` of the `[rows, cols]` view into `out` (row-major, `rows.len() * cols`
    /// values), in parallel, without touching the other rows: the tile primitive of the frozen linear.
    /// Bit-exact with bitsandbytes' dequantization (see the module docs for its CPU kernel's quirk).
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
        let cols = self.cols();
        if rows.start > rows.end || rows.end > self.rows() {
            return Err(Error::Invalid(format!("NF4: rows {rows:?} out of 0..{}", self.rows())));
        }
        if out.len() != rows.len() * cols {
            return Err(Error::Invalid(format!(
                "NF4: output holds {} values, rows {rows:?} x {cols} columns need {}",
                out.len(),
                rows.len() * cols
            )));
        }
        let start = rows.start * cols;
        // Chunks of whole blocks (relative to the flat start) so each chunk computes its scales once.
        let chunk = (self.blocksize * 256).max(cols);
        // On candle's pool (the one the products run on), not rayon's.
        crate::kernels::parallel::for_spans_mut(out, chunk, |at, dst| self.dequantize_flat(start + at, dst));
        Ok(())
    }

    /// Dequantizes the whole weight (row-major f32, `numel` values).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        let chunk = self.blocksize * 256;
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, dst)| self.dequantize_flat(i * chunk, dst));
        out
    }

    /// The dequantized weight as an f32 tensor of the weight's shape.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.dequantize(), self.shape.as_slice(), device)?)
    }

    /// Bytes held: packed codes plus block scales (with, under double quantization, the nested scales,
    /// the offset and the 256-entry map).
    pub fn memory_bytes(&self) -> usize {
        self.packed.len() + self.absmax.memory_bytes()
    }

    /// Storage bits per parameter, from [`Nf4Weight::memory_bytes`] (about 4.127 with double quantization
    /// and blocks of 64, 4.5 without).
    pub fn bits_per_param(&self) -> f64 {
        self.memory_bytes() as f64 * 8.0 / self.numel() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The code of one normalized value, through the production path.
    fn bucketize(s: f32, mids: &[f32; 15]) -> u8 {
        let mut byte = [0u8];
        pack_codes(&[s], mids, &mut byte, |a| a);
        byte[0] >> 4
    }

    #[test]
    fn bucketize_counts_strictly_smaller_midpoints() {
        let mids = midpoints();
        assert_eq!(bucketize(-1.0, &mids), 0);
        assert_eq!(bucketize(1.0, &mids), 15);
        assert_eq!(bucketize(0.0, &mids), ZERO_CODE);
        for (j, &m) in mids.iter().enumerate() {
            assert_eq!(bucketize(m, &mids) as usize, j, "on midpoint {j}");
            let above = f32::from_bits(if m > 0.0 { m.to_bits() + 1 } else { m.to_bits() - 1 });
            assert_eq!(bucketize(above, &mids) as usize, j + 1, "above midpoint {j}");
        }
    }

    #[test]
    fn roundtrip_of_codes_and_padding() {
        let data = [1.0f32, -1.0, 0.0, 0.5, -0.25];
        let w = Nf4Weight::quantize(&data, &[5], false).unwrap();
        assert_eq!(w.packed(), &[0xF0, 0x7C, (4 << 4) | ZERO_CODE]);
        assert_eq!(w.absmax(), &AbsmaxStorage::Plain(vec![1.0]));
        let d = w.dequantize();
        assert_eq!(d[0], 1.0);
        assert_eq!(d[1], -1.0);
        assert_eq!(d[2], 0.0);
    }
}
