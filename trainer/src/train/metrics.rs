//! Where training metrics go: a JSON-lines file and TensorBoard event files, behind one trait so
//! the loop does not care (and a broken sink cannot take the run down silently).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One set of scalars at a step (`kind` is `train` or `eval`).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRecord {
    /// `train` or `eval`.
    pub kind: String,
    /// Optimizer step.
    pub step: u64,
    /// Named values, e.g. `loss`, `lr`, `grad_norm`, `tokens_per_second`, `expert_load/0/3`.
    pub scalars: Vec<(String, f64)>,
}

/// A destination for metrics.
pub trait MetricsSink {
    /// Records one set of scalars.
    fn record(&mut self, record: &MetricRecord) -> Result<()>;
    /// Makes everything recorded so far durable.
    fn flush(&mut self) -> Result<()>;
}

/// `metrics.jsonl`: one JSON object per record (`{"kind":..,"step":..,name: value, ...}`).
pub struct JsonlSink {
    path: PathBuf,
    file: File,
}

/// Prepares a run's JSON-lines record file (`metrics.jsonl`, `samples.jsonl`: one object with a
/// `"step"` per line) for appending. A fresh run (`resume_step` `None`) starts it over; a run resumed
/// from the checkpoint of step `resume_step` keeps only the lines of steps up to it, dropping those
/// written after that checkpoint by a run that was then killed (the resumed run writes them again)
/// and a torn last line, so the file reads as if the run had never stopped.
pub fn rewind_jsonl(path: &Path, resume_step: Option<u64>) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let Some(resume) = resume_step else {
        return std::fs::remove_file(path).map_err(|e| Error::io(path, e));
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut kept = String::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| Error::io(path, e))?;
        let step = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["step"].as_u64());
        // A torn last line (killed mid-write) has no step: drop it too.
        if step.is_some_and(|s| s <= resume) {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    std::fs::write(path, kept).map_err(|e| Error::io(path, e))
}

impl JsonlSink {
    /// Opens (appending to) `path`, after [`rewind_jsonl`]: a fresh run starts the file over, a run
    /// resumed from step `resume_step` drops the records of later steps first.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        rewind_jsonl(path, resume_step)?;
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(JsonlSink { path: path.to_path_buf(), file })
    }
}

impl MetricsSink for JsonlSink {
    fn record(&mut self, record: &MetricRecord) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("kind".into(), record.kind.clone().into());
        obj.insert("step".into(), record.step.into());
        for (k, v) in &record.scalars {
            obj.insert(k.clone(), serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into));
        }
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(self.file, "{line}").map_err(|e| Error::io(&self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.path, e))?;
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

/// TensorBoard event files (tensorboard-rs); tags are `kind/name`.
pub struct TensorBoardSink {
    writer: tensorboard_rs::summary_writer::SummaryWriter,
}

impl TensorBoardSink {
    /// Writes event files into `dir` (created if needed).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(TensorBoardSink { writer: tensorboard_rs::summary_writer::SummaryWriter::new(dir) })
    }
}

impl MetricsSink for TensorBoardSink {
    fn record(&mut self, record: &MetricRecord) -> Result<()> {
        for (k, v) in &record.scalars {
            self.writer.add_scalar(&format!("{}/{k}", record.kind), *v as f32, record.step as usize);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.writer.flush();
        Ok(())
    }
}

/// CRC-32C (Castagnoli), as TFRecord framing uses it.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

/// Reads back the scalars of a TensorBoard event file, checking every record's CRCs:
/// `(tag, step, value)` in file order.
pub fn read_tensorboard_scalars(path: &Path) -> Result<Vec<(String, i64, f32)>> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: &str| Error::format(path, m.to_string());
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let header = data.get(pos..pos + 12).ok_or_else(|| bad("truncated record header"))?;
        let len = u64::from_le_bytes(header[..8].try_into().map_err(|_| bad("header"))?) as usize;
        if u32::from_le_bytes(header[8..12].try_into().map_err(|_| bad("header"))?) != masked_crc(&header[..8]) {
            return Err(bad("record length CRC mismatch"));
        }
        let body = data.get(pos + 12..pos + 12 + len).ok_or_else(|| bad("truncated record"))?;
        let crc = data.get(pos + 12 + len..pos + 16 + len).ok_or_else(|| bad("truncated record CRC"))?;
        if u32::from_le_bytes(crc.try_into().map_err(|_| bad("crc"))?) != masked_crc(body) {
            return Err(bad("record data CRC mismatch"));
        }
        pos += 16 + len;
        parse_event(body, &mut out).ok_or_else(|| bad("malformed Event protobuf"))?;
    }
    Ok(out)
}

/// Minimal protobuf walk of `Event { step = 2; summary = 5 { value = 1 { tag = 1; simple_value = 2 } } }`.
fn parse_event(buf: &[u8], out: &mut Vec<(String, i64, f32)>) -> Option<()> {
    let mut step = 0i64;
    let mut values = Vec::new();
    for (field, payload) in proto_fields(buf)? {
        match (field, payload) {
            (2, Payload::Varint(v)) => step = v as i64,
            (5, Payload::Bytes(summary)) => {
                for (f, p) in proto_fields(summary)? {
                    if let (1, Payload::Bytes(value)) = (f, p) {
                        let (mut tag, mut x) = (String::new(), None);
                        for (vf, vp) in proto_fields(value)? {
                            match (vf, vp) {
                                (1, Payload::Bytes(t)) => tag = String::from_utf8_lossy(t).into_owned(),
                                (2, Payload::Fixed32(bits)) => x = Some(f32::from_bits(bits)),
                                _ => {}
                            }
                        }
                        if let Some(x) = x {
                            values.push((tag, x));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out.extend(values.into_iter().map(|(t, x)| (t, step, x)));
    Some(())
}

enum Payload<'a> {
    Varint(u64),
    Fixed64,
    Fixed32(u32),
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn proto_fields(buf: &[u8]) -> Option<Vec<(u64, Payload<'_>)>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let payload = match key & 7 {
            0 => Payload::Varint(varint(buf, &mut pos)?),
            1 => {
                pos += 8;
                Payload::Fixed64
            }
            2 => {
                let len = varint(buf, &mut pos)? as usize;
                let bytes = buf.get(pos..pos + len)?;
                pos += len;
                Payload::Bytes(bytes)
            }
            5 => {
                let bytes = buf.get(pos..pos + 4)?;
                pos += 4;
                Payload::Fixed32(u32::from_le_bytes(bytes.try_into().ok()?))
            }
            _ => return None,
        };
        if pos > buf.len() {
            return None;
        }
        out.push((key >> 3, payload));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // RFC 3720's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn tensorboard_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut sink = TensorBoardSink::open(dir.path()).unwrap();
            for step in 0..5u64 {
                let rec = MetricRecord {
                    kind: "train".into(),
                    step,
                    scalars: vec![("loss".into(), 2.0 - step as f64 * 0.25), ("lr".into(), 1e-3)],
                };
                sink.record(&rec).unwrap();
            }
            sink.flush().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let file = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let scalars = read_tensorboard_scalars(&file).unwrap();
        let losses: Vec<(i64, f32)> =
            scalars.iter().filter(|(t, _, _)| t == "train/loss").map(|(_, s, v)| (*s, *v)).collect();
        assert_eq!(losses, vec![(0, 2.0), (1, 1.75), (2, 1.5), (3, 1.25), (4, 1.0)]);
    }

    #[test]
    fn jsonl_resume_drops_records_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let rec = |step| MetricRecord { kind: "train".into(), step, scalars: vec![("loss".into(), step as f64)] };
        {
            let mut sink = JsonlSink::open(&path, None).unwrap();
            for s in 1..=7 {
                sink.record(&rec(s)).unwrap();
            }
            sink.flush().unwrap();
        }
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"kind\":\"tra").unwrap();
        let mut sink = JsonlSink::open(&path, Some(5)).unwrap();
        sink.record(&rec(6)).unwrap();
        sink.flush().unwrap();
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    }
}
