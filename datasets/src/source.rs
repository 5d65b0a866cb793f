//! Reading rows from Parquet and JSON-lines files.
//!
//! Parquet is read in record batches of the needed columns only (projection); any string flavour (Utf8,
//! LargeUtf8, Utf8View, dictionary-encoded), List / LargeList / FixedSizeList, structs and nulls are accepted. Each
//! needed column is converted batch-wise into [`Json`] values, then each row is handed to the caller with its
//! [`Origin`]. JSON-lines files (`.jsonl`, `.ndjson`, and `.json` holding lines or one array) go through the same
//! path, one object per line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, OffsetSizeTrait};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::config::{Columns, Format};
use crate::error::{Error, Origin, Problem, Result};
use crate::json::Json;
use crate::record::{ColumnKind, Layout};

/// Rows per Parquet record batch.
const BATCH_ROWS: usize = 4096;

/// The kind of a data file, from its extension (or its first bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Apache Parquet.
    Parquet,
    /// JSON lines (or a JSON array of objects).
    Json,
}

impl FileKind {
    /// Guesses from the extension; `None` for other extensions.
    pub fn from_path(path: &Path) -> Option<FileKind> {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("parquet") | Some("pq") => Some(FileKind::Parquet),
            Some("jsonl") | Some("ndjson") | Some("json") => Some(FileKind::Json),
            _ => None,
        }
    }
}

/// Expands entries (files or directories) into the list of data files, in order. A directory contributes its
/// `.parquet`, `.pq`, `.jsonl`, `.ndjson` and `.json` files sorted by name (not recursively).
pub fn expand_files(entries: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in entries {
        let meta = std::fs::metadata(entry).map_err(|e| Error::io(entry, e))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(entry)
                .map_err(|e| Error::io(entry, e))?
                .filter_map(|d| d.ok().map(|d| d.path()))
                .filter(|p| p.is_file() && FileKind::from_path(p).is_some())
                .collect();
            if found.is_empty() {
                return Err(Error::Empty(format!(
                    "{}: the directory holds no .parquet, .jsonl or .json files",
                    entry.display()
                )));
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(entry.clone());
        }
    }
    Ok(out)
}

/// One row: where it came from, and the values of the layout's columns (in [`Layout::columns`] order).
#[derive(Debug)]
pub struct RawRow {
    /// Where the row came from.
    pub origin: Origin,
    /// The file's column layout (per file for Parquet, per row for JSON lines).
    pub layout: Arc<Layout>,
    /// One value per column of the layout; null for null cells.
    pub values: Result<Vec<Json>, Problem>,
}

/// Reads every row of `files` for `format`, calling `on_row` for each until it returns `Ok(false)`.
///
/// Schema problems (missing column, wrong column type, unreadable file) are errors; problems inside one row are
/// handed to `on_row` (in [`RawRow::values`]) so the caller can skip or stop.
pub fn for_each_row(
    files: &[PathBuf],
    format: Format,
    columns: &Columns,
    mut on_row: impl FnMut(RawRow) -> Result<bool>,
) -> Result<()> {
    for path in files {
        let kind = match FileKind::from_path(path) {
            Some(k) => k,
            None => sniff(path)?,
        };
        let go_on = match kind {
            FileKind::Parquet => read_parquet(path, format, columns, &mut on_row)?,
            FileKind::Json => read_json(path, format, columns, &mut on_row)?,
        };
        if !go_on {
            break;
        }
    }
    Ok(())
}

fn sniff(path: &Path) -> Result<FileKind> {
    let mut head = [0u8; 4];
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
    if n == 4 && &head == b"PAR1" {
        Ok(FileKind::Parquet)
    } else if n > 0 && (head[0] == b'{' || head[0] == b'[') {
        Ok(FileKind::Json)
    } else {
        Err(Error::Parquet {
            path: path.to_path_buf(),
            message: "unknown file type (expected .parquet, .jsonl or .json)".into(),
        })
    }
}

fn parquet_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Parquet { path: path.to_path_buf(), message: e.to_string() }
}

fn read_parquet(
    path: &Path,
    format: Format,
    columns: &Columns,
    on_row: &mut impl FnMut(RawRow) -> Result<bool>,
) -> Result<bool> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_err(path, e))?;
    let schema = builder.schema().clone();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let layout = Layout::resolve(format, columns, |c| names.contains(&c)).map_err(|m| Error::MissingColumn {
        path: path.to_path_buf(),
        column: m.column.clone(),
        format: format.name().to_string(),
        hint: format!("; set {} to use another column", m.key),
        found: if names.is_empty() { "none".into() } else { names.join(", ") },
    })?;
    let wanted = layout.columns();
    let mut indices = Vec::with_capacity(wanted.len());
    for (name, kind) in &wanted {
        let idx = names.iter().position(|n| n == name).unwrap_or_default();
        let dt = schema.field(idx).data_type();
        if !type_fits(dt, *kind) {
            return Err(Error::ColumnType {
                path: path.to_path_buf(),
                column: name.to_string(),
                expected: kind.expected().to_string(),
                found: format!("{dt}"),
            });
        }
        indices.push(idx);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices.iter().copied());
    let reader = builder.with_projection(mask).with_batch_size(BATCH_ROWS).build().map_err(|e| parquet_err(path, e))?;
    let file_arc = Arc::new(path.to_path_buf());
    let layout = Arc::new(layout.clone());
    let mut row: u64 = 0;
    for batch in reader {
        let batch = batch.map_err(|e| parquet_err(path, e))?;
        let mut cols: Vec<Vec<Json>> = Vec::with_capacity(wanted.len());
        for (name, _) in &wanted {
            let array = batch
                .column_by_name(name)
                .ok_or_else(|| parquet_err(path, format!("column `{name}` vanished from a record batch")))?;
            cols.push(to_json_column(array.as_ref()));
        }
        let mut iters: Vec<_> = cols.into_iter().map(|c| c.into_iter()).collect();
        for _ in 0..batch.num_rows() {
            let values: Vec<Json> = iters.iter_mut().map(|it| it.next().unwrap_or(Json::Null)).collect();
            let origin = Origin { file: file_arc.clone(), row, is_line: false };
            row += 1;
            if !on_row(RawRow { origin, layout: layout.clone(), values: Ok(values) })? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn is_string(dt: &DataType) -> bool {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null => true,
        DataType::Dictionary(_, v) => is_string(v),
        _ => false,
    }
}

fn list_item(dt: &DataType) -> Option<&DataType> {
    match dt {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => Some(f.data_type()),
        _ => None,
    }
}

fn type_fits(dt: &DataType, kind: ColumnKind) -> bool {
    if matches!(dt, DataType::Null) {
        return true;
    }
    match kind {
        ColumnKind::Text => is_string(dt),
        ColumnKind::Messages => is_string(dt) || list_item(dt).is_some_and(|t| matches!(t, DataType::Struct(_))),
        ColumnKind::Tools => {
            is_string(dt) || list_item(dt).is_some_and(|t| is_string(t) || matches!(t, DataType::Struct(_)))
        }
        ColumnKind::Ids => list_item(dt).is_some_and(|t| t.is_integer()),
        ColumnKind::Mask => list_item(dt).is_some_and(|t| t.is_integer() || matches!(t, DataType::Boolean)),
        ColumnKind::TextOrMessages => {
            is_string(dt)
                || matches!(dt, DataType::Struct(_))
                || list_item(dt).is_some_and(|t| matches!(t, DataType::Struct(_)))
        }
    }
}

/// Converts an Arrow array (any supported type, nested) to one [`Json`] per row. Types with no JSON meaning here
/// (dates, decimals, binary...) become null: they can only appear in fields tramontane does not read, since the
/// columns it reads are type-checked first.
pub fn to_json_column(array: &dyn Array) -> Vec<Json> {
    let n = array.len();
    let valid = |i: usize| array.is_valid(i);
    macro_rules! prim {
        ($t:ty, $conv:expr) => {{
            let a = array.as_primitive::<$t>();
            (0..n).map(|i| if valid(i) { $conv(a.value(i)) } else { Json::Null }).collect()
        }};
    }
    match array.data_type() {
        DataType::Null => vec![Json::Null; n],
        DataType::Boolean => {
            let a = array.as_boolean();
            (0..n).map(|i| if valid(i) { Json::Bool(a.value(i)) } else { Json::Null }).collect()
        }
        DataType::Int8 => prim!(Int8Type, |v: i8| Json::Int(v.into())),
        DataType::Int16 => prim!(Int16Type, |v: i16| Json::Int(v.into())),
        DataType::Int32 => prim!(Int32Type, |v: i32| Json::Int(v.into())),
        DataType::Int64 => prim!(Int64Type, Json::Int),
        DataType::UInt8 => prim!(UInt8Type, |v: u8| Json::Int(v.into())),
        DataType::UInt16 => prim!(UInt16Type, |v: u16| Json::Int(v.into())),
        DataType::UInt32 => prim!(UInt32Type, |v: u32| Json::Int(v.into())),
        DataType::UInt64 => prim!(UInt64Type, |v: u64| i64::try_from(v).map(Json::Int).unwrap_or(Json::UInt(v))),
        DataType::Float16 => prim!(Float16Type, |v: F16| Json::Float(v.to_f64())),
        DataType::Float32 => prim!(Float32Type, |v: f32| Json::Float(v.into())),
        DataType::Float64 => prim!(Float64Type, Json::Float),
        DataType::Utf8 => strings(array.as_string::<i32>().iter(), n),
        DataType::LargeUtf8 => strings(array.as_string::<i64>().iter(), n),
        DataType::Utf8View => strings(array.as_string_view().iter(), n),
        DataType::List(_) => lists(array.as_list::<i32>()),
        DataType::LargeList(_) => lists(array.as_list::<i64>()),
        DataType::FixedSizeList(_, size) => {
            let a = array.as_fixed_size_list();
            let size = (*size).max(0) as usize;
            let mut child = to_json_column(a.values().as_ref()).into_iter();
            let skip = a.offset() * size;
            for _ in 0..skip {
                child.next();
            }
            (0..n)
                .map(|i| {
                    let items: Vec<Json> = child.by_ref().take(size).collect();
                    if valid(i) {
                        Json::Array(items)
                    } else {
                        Json::Null
                    }
                })
                .collect()
        }
        DataType::Struct(fields) => {
            let a = array.as_struct();
            let mut cols: Vec<std::vec::IntoIter<Json>> =
                a.columns().iter().map(|c| to_json_column(c.as_ref()).into_iter()).collect();
            (0..n)
                .map(|i| {
                    let obj: Vec<(String, Json)> = fields
                        .iter()
                        .zip(cols.iter_mut())
                        .map(|(f, c)| (f.name().clone(), c.next().unwrap_or(Json::Null)))
                        .collect();
                    if valid(i) {
                        Json::Object(obj)
                    } else {
                        Json::Null
                    }
                })
                .collect()
        }
        DataType::Dictionary(_, _) => match array.as_any_dictionary_opt() {
            Some(d) => {
                let values = to_json_column(d.values().as_ref());
                let keys = d.normalized_keys();
                (0..n)
                    .map(|i| {
                        if valid(i) {
                            keys.get(i).and_then(|&k| values.get(k)).cloned().unwrap_or(Json::Null)
                        } else {
                            Json::Null
                        }
                    })
                    .collect()
            }
            None => vec![Json::Null; n],
        },
        _ => vec![Json::Null; n],
    }
}

type F16 = <Float16Type as arrow_array::ArrowPrimitiveType>::Native;

fn strings<'a>(iter: impl Iterator<Item = Option<&'a str>>, n: usize) -> Vec<Json> {
    let mut out = Vec::with_capacity(n);
    out.extend(iter.map(|s| s.map(|s| Json::Str(s.to_owned())).unwrap_or(Json::Null)));
    out
}

fn lists<O: OffsetSizeTrait>(a: &arrow_array::GenericListArray<O>) -> Vec<Json> {
    let mut child = to_json_column(a.values().as_ref());
    let offsets = a.value_offsets();
    (0..a.len())
        .map(|i| {
            if a.is_null(i) {
                return Json::Null;
            }
            let start = offsets[i].as_usize().min(child.len());
            let end = offsets[i + 1].as_usize().min(child.len()).max(start);
            Json::Array(child[start..end].iter_mut().map(|v| std::mem::replace(v, Json::Null)).collect())
        })
        .collect()
}

fn read_json(
    path: &Path,
    format: Format,
    columns: &Columns,
    on_row: &mut impl FnMut(RawRow) -> Result<bool>,
) -> Result<bool> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let file_arc = Arc::new(path.to_path_buf());
    // A `.json` file may hold one array of objects instead of lines.
    let first = {
        let buf = reader.fill_buf().map_err(|e| Error::io(path, e))?;
        buf.iter().copied().find(|b| !b.is_ascii_whitespace())
    };
    let mut rows: Box<dyn Iterator<Item = Result<(u64, Json)>>> = if first == Some(b'[') {
        let mut text = String::new();
        reader.read_to_string(&mut text).map_err(|e| Error::io(path, e))?;
        let items = match Json::parse(&text) {
            Ok(Json::Array(items)) => items,
            Ok(other) => {
                return Err(Error::Json {
                    path: path.to_path_buf(),
                    line: 1,
                    message: format!("expected a JSON array of objects, found {}", other.type_name()),
                })
            }
            Err(e) => {
                return Err(Error::Json {
                    path: path.to_path_buf(),
                    line: e.line() as u64,
                    message: format!("invalid JSON: {e}"),
                })
            }
        };
        // Rows of a JSON array are numbered from 0, like Parquet rows.
        Box::new(items.into_iter().enumerate().map(|(i, v)| Ok((i as u64, v))))
    } else {
        let p = path.to_path_buf();
        Box::new(reader.lines().enumerate().filter_map(move |(i, line)| {
            let line_no = i as u64 + 1;
            match line {
                Err(e) => Some(Err(Error::io(&p, e))),
                Ok(l) if l.trim().is_empty() => None,
                Ok(l) => Some(Json::parse(&l).map(|v| (line_no, v)).map_err(|e| Error::Json {
                    path: p.clone(),
                    line: line_no,
                    message: format!("invalid JSON: {e}"),
                })),
            }
        }))
    };
    let is_line = first != Some(b'[');
    let mut first_row = true;
    let mut last_layout: Option<Arc<Layout>> = None;
    for item in &mut rows {
        let (row, value) = item?;
        let origin = Origin { file: file_arc.clone(), row, is_line };
        let Json::Object(fields) = value else {
            let what = if is_line { "line" } else { "row" };
            return Err(Error::Json {
                path: path.to_path_buf(),
                line: row,
                message: format!("{what} {row}: expected a JSON object, found {}", value.type_name()),
            });
        };
        let has = |c: &str| fields.iter().any(|(k, _)| k == c);
        let layout = match Layout::resolve(format, columns, has) {
            Ok(l) => l,
            Err(m) => {
                let found: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
                if first_row {
                    return Err(Error::MissingColumn {
                        path: path.to_path_buf(),
                        column: m.column,
                        format: format.name().to_string(),
                        hint: format!("; set {} to use another key", m.key),
                        found: if found.is_empty() { "none".into() } else { found.join(", ") },
                    });
                }
                let problem = Problem::invalid(format!(
                    "no key `{}` (needed by format `{}`); keys found: {}",
                    m.column,
                    format.name(),
                    found.join(", ")
                ));
                let layout = last_layout.clone().unwrap_or_else(|| Arc::new(Layout::Text { text: String::new() }));
                if !on_row(RawRow { origin, layout, values: Err(problem) })? {
                    return Ok(false);
                }
                continue;
            }
        };
        first_row = false;
        let layout = match &last_layout {
            Some(l) if **l == layout => l.clone(),
            _ => {
                let l = Arc::new(layout);
                last_layout = Some(l.clone());
                l
            }
        };
        let mut fields = fields;
        let values: Vec<Json> = layout
            .columns()
            .iter()
            .map(|(name, _)| {
                fields
                    .iter_mut()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| std::mem::replace(v, Json::Null))
                    .unwrap_or(Json::Null)
            })
            .collect();
        if !on_row(RawRow { origin, layout, values: Ok(values) })? {
            return Ok(false);
        }
    }
    Ok(true)
}
