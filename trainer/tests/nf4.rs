//! NF4 storage against bitsandbytes 0.50.2 (CPU) golden fixtures: tests/fixtures/nf4 (see its README).
//!
//! The fixture inputs are regenerated here bit for bit (`gen_weights`, the twin of `weights()` in
//! generate.py); bitsandbytes' outputs are stored raw (codes, scales) or as checksums (large
//! dequantized tensors).

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use serde_json::Value;
use trainer::quant::bnb_format::{BnbParts, RawTensor, QUANT_STATE_SUFFIX};
use trainer::quant::dynamic_map::dynamic_map;
use trainer::quant::torch_mean::torch_mean;
use trainer::quant::{AbsmaxStorage, Nf4Weight, QuantizeOptions, NF4_CODE};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nf4")
}

fn meta() -> Value {
    let text = std::fs::read_to_string(fixtures().join("meta.json")).expect("meta.json");
    serde_json::from_str(&text).expect("meta.json is JSON")
}

fn read_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn read_f32(name: &str) -> Vec<f32> {
    read_bytes(name).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Asserts bitwise equality, reporting the first difference (not the whole vectors).
fn assert_same_bits(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    let diff: Vec<usize> = (0..ours.len()).filter(|&i| ours[i].to_bits() != theirs[i].to_bits()).collect();
    if let Some(&i) = diff.first() {
        panic!("{what}: {} values differ, first at {i}: ours {} vs bitsandbytes {}", diff.len(), ours[i], theirs[i]);
    }
}

/// `sum_i bits_i * (2i + 1) mod 2^64`, as generate.py's `checksum`.
fn checksum_f32(v: &[f32]) -> u64 {
    v.iter().enumerate().fold(0u64, |acc, (i, x)| acc.wrapping_add((x.to_bits() as u64).wrapping_mul(2 * i as u64 + 1)))
}

fn json_u64(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().expect("decimal string"),
        other => other.as_u64().expect("integer"),
    }
}

fn splitmix(seed: u64, counter: u64) -> u64 {
    let mut z = (seed.wrapping_mul(1 << 40).wrapping_add(counter).wrapping_add(1)).wrapping_mul(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

fn nf4_midpoints() -> Vec<f32> {
    (0..15).map(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0).collect()
}

fn next_up(x: f32) -> f32 {
    if x > 0.0 {
        f32::from_bits(x.to_bits() + 1)
    } else {
        f32::from_bits(x.to_bits() - 1)
    }
}

fn next_down(x: f32) -> f32 {
    if x > 0.0 {
        f32::from_bits(x.to_bits() - 1)
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

/// The fixture inputs: approximately normal weights, every step exact in f32 (see the README).
fn gen_weights(seed: u64, rows: usize, cols: usize, specials: bool, zero_tail: bool) -> Vec<f32> {
    let n = rows * cols;
    const M22: u64 = (1 << 22) - 1;
    let mut v: Vec<f32> = (0..n)
        .map(|i| {
            let z0 = splitmix(seed, 2 * i as u64);
            let z1 = splitmix(seed, 2 * i as u64 + 1);
            let s = (z0 & M22) + ((z0 >> 22) & M22) + (z1 & M22) + ((z1 >> 22) & M22);
            let e = 28 + ((i / cols) % 3) as i32;
            let x = (s as i64 - (1 << 23)) as f32 * 2f32.powi(-e);
            if z1 >> 56 == 255 {
                x * 16.0
            } else {
                x
            }
        })
        .collect();
    if specials {
        let mids = nf4_midpoints();
        v[0..64].fill(0.0);
        v[64] = 0.25;
        for j in 0..15 {
            v[65 + j] = mids[j] * 0.25;
            v[80 + j] = next_up(mids[j]) * 0.25;
            v[95 + j] = next_down(mids[j]) * 0.25;
        }
        for k in 0..18 {
            v[110 + k] = -(k as f32) * (1.0 / 256.0);
        }
        v[128] = -0.5;
    }
    if zero_tail {
        let rem = n % 64;
        v[n - rem..].fill(0.0);
    }
    v
}

struct Case {
    meta: Value,
    shape: Vec<usize>,
    input: Vec<f32>,
}

fn cases() -> Vec<Case> {
    meta()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let shape: Vec<usize> =
                c["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let input = gen_weights(
                c["seed"].as_u64().unwrap(),
                shape[0],
                shape[1],
                c["specials"].as_bool().unwrap(),
                c["zero_tail"].as_bool().unwrap(),
            );
            Case { meta: c.clone(), shape, input }
        })
        .collect()
}

fn name(c: &Case) -> &str {
    c.meta["name"].as_str().unwrap()
}

/// The generator here and generate.py produce the same f32 bits.
#[test]
fn generator_reproduces_the_fixture_inputs() {
    for c in cases() {
        assert_eq!(checksum_f32(&c.input), json_u64(&c.meta["input_checksum"]), "{}", name(&c));
    }
}

/// Packed codes and absmax (plain storage) equal bitsandbytes' bit for bit, on every case (sizes not
/// divisible by 64, odd sizes, zero blocks, values exactly on code midpoints, a zero partial block).
#[test]
fn plain_quantization_matches_bitsandbytes_bit_for_bit() {
    for c in cases() {
        let w = Nf4Weight::quantize(&c.input, &c.shape, false).unwrap();
        let n = name(&c);
        assert_eq!(w.packed(), read_bytes(c.meta["packed"].as_str().unwrap()).as_slice(), "{n}: packed codes");
        let AbsmaxStorage::Plain(absmax) = w.absmax() else { panic!("plain storage expected") };
        assert_same_bits(absmax, &read_f32(c.meta["absmax"].as_str().unwrap()), &format!("{n}: absmax"));
    }
}

/// Double quantization: packed codes, 8-bit absmax codes, nested absmax and offset equal bitsandbytes'
/// bit for bit; the nested map is bitsandbytes' dynamic map.
#[test]
fn double_quantization_matches_bitsandbytes_bit_for_bit() {
    for c in cases() {
        let w = Nf4Weight::quantize(&c.input, &c.shape, true).unwrap();
        let n = name(&c);
        assert_eq!(w.packed(), read_bytes(c.meta["packed"].as_str().unwrap()).as_slice(), "{n}: packed codes");
        let AbsmaxStorage::DoubleQuant(d) = w.absmax() else { panic!("double quantization expected") };
        assert_eq!(d.offset.to_bits() as u64, c.meta["dq_offset_bits"].as_u64().unwrap(), "{n}: offset");
        assert_eq!(d.codes, read_bytes(c.meta["dq_codes"].as_str().unwrap()), "{n}: absmax codes");
        assert_same_bits(
            &d.nested_absmax,
            &read_f32(c.meta["dq_nested_absmax"].as_str().unwrap()),
            &format!("{n}: nested absmax"),
        );
        assert_eq!(d.nested_blocksize, 256);
    }
}

/// Our dequantization equals `dequantize_4bit`'s output exactly (checksums over every value, raw values
/// for the small cases), for both storages; and tiles from `dequantize_rows` (any row range) equal the
/// corresponding slices.
#[test]
fn dequantization_matches_bitsandbytes_exactly() {
    for c in cases() {
        let n = name(&c).to_string();
        for (dq, key) in [(false, "plain"), (true, "dq")] {
            let w = Nf4Weight::quantize(&c.input, &c.shape, dq).unwrap();
            let full = w.dequantize();
            assert_eq!(checksum_f32(&full), json_u64(&c.meta[format!("deq_{key}_checksum")]), "{n} {key}: checksum");
            if let Some(file) = c.meta.get(format!("deq_{key}")).and_then(Value::as_str) {
                assert_same_bits(&full, &read_f32(file), &format!("{n} {key}: values"));
            }
            let (rows, cols) = (w.rows(), w.cols());
            for range in [0..1, 0..rows, rows / 3..rows / 3 + 1, rows / 2..rows, 1..rows.min(4)] {
                let mut tile = vec![f32::NAN; range.len() * cols];
                w.dequantize_rows(range.clone(), &mut tile).unwrap();
                assert_same_bits(
                    &tile,
                    &full[range.start * cols..range.end * cols],
                    &format!("{n} {key}: rows {range:?}"),
                );
            }
        }
    }
}

/// Dequantizing bitsandbytes' own stored state (not our quantization of it) also gives its values.
#[test]
fn dequantization_of_bitsandbytes_state_matches() {
    for c in cases() {
        let n = name(&c).to_string();
        let packed = read_bytes(c.meta["packed"].as_str().unwrap());
        let dq = Nf4Weight::quantize(&c.input, &c.shape, true).unwrap();
        let AbsmaxStorage::DoubleQuant(mut d) = dq.absmax().clone() else { unreachable!() };
        d.codes = read_bytes(c.meta["dq_codes"].as_str().unwrap());
        d.nested_absmax = read_f32(c.meta["dq_nested_absmax"].as_str().unwrap());
        d.offset = f32::from_bits(c.meta["dq_offset_bits"].as_u64().unwrap() as u32);
        let w = Nf4Weight::from_parts(c.shape.clone(), 64, packed.clone(), AbsmaxStorage::DoubleQuant(d), dq.dtype())
            .unwrap();
        assert_eq!(checksum_f32(&w.dequantize()), json_u64(&c.meta["deq_dq_checksum"]), "{n}");
        let plain = AbsmaxStorage::Plain(read_f32(c.meta["absmax"].as_str().unwrap()));
        let w = Nf4Weight::from_parts(c.shape.clone(), 64, packed, plain, dq.dtype()).unwrap();
        assert_eq!(checksum_f32(&w.dequantize()), json_u64(&c.meta["deq_plain_checksum"]), "{n}");
    }
}

#[test]
fn dynamic_map_is_bitsandbytes() {
    assert_eq!(bits(dynamic_map()), bits(&read_f32(meta()["dynamic_map"].as_str().unwrap())));
}

/// The double-quantization offset is `absmax.mean()`: our emulation of PyTorch's f32 sum matches it
/// with 1 and 2 threads (the split happens from 32768 values on).
#[test]
fn torch_mean_matches_pytorch_with_one_and_two_threads() {
    for m in meta()["means"].as_array().unwrap() {
        let len = m["len"].as_u64().unwrap() as usize;
        let a: Vec<f32> =
            gen_weights(m["seed"].as_u64().unwrap(), 1, len, false, false).iter().map(|x| x.abs()).collect();
        assert_eq!(checksum_f32(&a), json_u64(&m["input_checksum"]));
        for t in [1usize, 2] {
            let want = m[format!("mean_bits_{t}t")].as_u64().unwrap() as u32;
            assert_eq!(torch_mean(&a, t).to_bits(), want, "len {len}, {t} threads");
        }
    }
}

/// `torch_threads` changes the offset only as PyTorch would (from 32768 blocks).
#[test]
fn quantize_with_two_torch_threads() {
    let input = gen_weights(5, 512, 4160, false, false); // 33280 blocks
    let opts = QuantizeOptions { torch_threads: 2, ..Default::default() };
    let w2 = Nf4Weight::quantize_with(&input, &[512, 4160], &opts).unwrap();
    let w1 = Nf4Weight::quantize(&input, &[512, 4160], true).unwrap();
    let absmax = Nf4Weight::quantize(&input, &[512, 4160], false).unwrap().block_absmax();
    let (AbsmaxStorage::DoubleQuant(d1), AbsmaxStorage::DoubleQuant(d2)) = (w1.absmax(), w2.absmax()) else {
        unreachable!()
    };
    assert_eq!(d1.offset, torch_mean(&absmax, 1));
    assert_eq!(d2.offset, torch_mean(&absmax, 2));
}

fn checkpoint() -> (Vec<u8>, PathBuf) {
    let path = fixtures().join("linear4bit.safetensors");
    (std::fs::read(&path).unwrap(), path)
}

/// A real bitsandbytes `Linear4bit` state dict (nested, nested with odd sizes, plain) loads and
/// dequantizes exactly to bitsandbytes' reference dequantization (its flat-block torch implementation;
/// for the plain 40x96 layer bitsandbytes' own CPU kernel on AVX-512 disagrees with it, see the README).
#[test]
fn bitsandbytes_checkpoint_loads_and_dequantizes_exactly() {
    let (bytes, path) = checkpoint();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let expected_bytes = std::fs::read(fixtures().join("linear4bit_dequantized.safetensors")).unwrap();
    let expected = SafeTensors::deserialize(&expected_bytes).unwrap();
    for layer in meta()["checkpoint"]["layers"].as_array().unwrap() {
        let name = layer["name"].as_str().unwrap();
        let w = Nf4Weight::from_safetensors(&st, name, &path).unwrap();
        let shape: Vec<usize> =
            layer["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(w.shape(), shape.as_slice());
        assert_eq!(matches!(w.absmax(), AbsmaxStorage::DoubleQuant(_)), layer["nested"].as_bool().unwrap());
        let want: Vec<f32> = expected
            .tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_same_bits(&w.dequantize(), &want, name);
    }
}

/// Quantizing the same inputs ourselves and serializing gives bitsandbytes' tensors byte for byte
/// (names, dtypes, shapes, data, and the JSON state).
#[test]
fn our_serialization_is_byte_identical_to_bitsandbytes() {
    let (bytes, _) = checkpoint();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names_seen = 0;
    for layer in meta()["checkpoint"]["layers"].as_array().unwrap() {
        let name = layer["name"].as_str().unwrap();
        let shape: Vec<usize> =
            layer["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let input = gen_weights(layer["seed"].as_u64().unwrap(), shape[0], shape[1], false, false);
        let w = Nf4Weight::quantize(&input, &shape, layer["nested"].as_bool().unwrap()).unwrap();
        for (tensor_name, t) in w.to_bnb_tensors(name) {
            let theirs = st.tensor(&tensor_name).unwrap_or_else(|_| panic!("{tensor_name} absent from the checkpoint"));
            assert_eq!(RawTensor::from(theirs), t, "{tensor_name}");
            names_seen += 1;
        }
    }
    assert_eq!(names_seen, st.names().len(), "every checkpoint tensor is produced");
}

/// Malformed inputs give errors that name the tensor and say what was expected.
#[test]
fn malformed_bitsandbytes_parts_are_rejected_clearly() {
    let (bytes, path) = checkpoint();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let good = BnbParts::from_safetensors(&st, "0.weight", &path).unwrap();
    let check = |parts: BnbParts<'_>, needles: &[&str]| {
        let err = Nf4Weight::from_bnb_parts(&parts, "0.weight", &path).expect_err("must fail").to_string();
        for n in needles {
            assert!(err.contains(n), "error `{err}` lacks `{n}`");
        }
        assert!(err.contains("linear4bit.safetensors"), "error `{err}` lacks the file");
    };
    let json =
        |s: &str| RawTensor { dtype: safetensors::Dtype::U8, shape: vec![s.len()], data: s.as_bytes().to_vec().into() };
    let state = std::str::from_utf8(&good.quant_state.data).unwrap().to_string();

    let mut p = good.clone();
    p.absmax.shape = vec![79];
    p.absmax.data = p.absmax.data[..79].to_vec().into();
    check(p, &["0.weight.absmax", "expected U8 with 80 elements"]);

    let mut p = good.clone();
    p.weight.data = p.weight.data[..100].to_vec().into();
    check(p, &["`0.weight`", "2560 bytes"]);

    let mut p = good.clone();
    p.nested_absmax = None;
    check(p, &["0.weight.nested_absmax"]);

    let mut p = good.clone();
    p.quant_map.dtype = safetensors::Dtype::F16;
    check(p, &["0.weight.quant_map", "expected F32"]);

    let mut p = good.clone();
    p.quant_state = json(&state.replace("\"nf4\"", "\"fp4\""));
    check(p, &[QUANT_STATE_SUFFIX, "quant_type"]);

    let mut p = good.clone();
    p.quant_state = json(&state.replace("[40, 128]", "[40, 129]"));
    check(p, &["`0.weight`", "packed 4-bit codes"]);

    let mut p = good.clone();
    p.quant_state = json("{not json");
    check(p, &[QUANT_STATE_SUFFIX, "JSON"]);

    let mut p = good.clone();
    p.quant_state = json(&state.replace("\"blocksize\": 64", "\"blocksize\": 48"));
    check(p, &["blocksize"]);

    let mut p = good;
    p.quant_state = json(&state.replace("\"nested_offset\": ", "\"nested_offset\": \"x\", \"o\": "));
    check(p, &["nested_offset"]);

    let err = Nf4Weight::from_safetensors(&st, "9.weight", &path).unwrap_err().to_string();
    assert!(err.contains("9.weight"), "{err}");
}

#[test]
fn invalid_quantize_arguments_are_errors() {
    assert!(Nf4Weight::quantize(&[1.0, 2.0], &[3], true).is_err());
    assert!(Nf4Weight::quantize(&[], &[0], true).is_err());
    assert!(Nf4Weight::quantize(&[1.0, f32::NAN], &[2], true).is_err());
    let opts = QuantizeOptions { blocksize: 48, ..Default::default() };
    assert!(Nf4Weight::quantize_with(&[1.0; 96], &[96], &opts).is_err());
    let w = Nf4Weight::quantize(&[1.0; 128], &[2, 64], true).unwrap();
    assert!(w.dequantize_rows(1..3, &mut [0.0; 128]).is_err());
    assert!(w.dequantize_rows(0..1, &mut [0.0; 63]).is_err());
}

/// A 4096x4096 weight with double quantization takes at most 4.2 bits per parameter, counted from the
/// storage actually held: 4 (codes) + 8/64 (absmax codes) + 32/(64*256) (nested scales) + the offset
/// and the 256-entry map.
#[test]
fn nf4_double_quant_bits_per_param() {
    let n = 4096 * 4096;
    let input = gen_weights(7, 4096, 4096, false, false);
    let w = Nf4Weight::quantize(&input, &[4096, 4096], true).unwrap();
    let AbsmaxStorage::DoubleQuant(d) = w.absmax() else { unreachable!() };
    let held = w.packed().len() + d.codes.len() + 4 * d.nested_absmax.len() + 4 + 4 * d.map.len();
    assert_eq!(w.memory_bytes(), held);
    assert_eq!(held, n / 2 + n / 64 + 4 * (n / 64 / 256) + 4 + 1024);
    let bpp = w.bits_per_param();
    println!("NF4 + double quant, 4096x4096: {bpp:.4} bits/param");
    assert!(bpp <= 4.2, "{bpp}");
    assert!((bpp - 4.127).abs() < 0.001, "{bpp}");
    let plain = Nf4Weight::quantize(&input[..64 * 4096], &[64, 4096], false).unwrap();
    assert_eq!(plain.bits_per_param(), 4.5);
}
