//! CSV (RFC 4180 quoting, the `csv` crate) and JSON Lines (one object per line, serde_json)
//! with named columns: `text_a`, optional `text_b`, `label`.

use std::path::Path;

use super::glue::Columns;
use super::{at, file_error, find_column, read_bytes, DataError, Record, Records};

/// A CSV file's header (empty without one) and its (line, fields) rows, fields decoded as
/// UTF-8 with replacement: shared with the E2E and peptide readers.
pub(crate) struct CsvTable {
    pub header: Vec<String>,
    pub rows: Vec<(usize, Vec<String>)>,
}

pub(crate) fn read_table(path: &Path, header: bool, limit: usize) -> Result<CsvTable, DataError> {
    let bytes = read_bytes(path)?;
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(header)
        .flexible(true)
        .from_reader(bytes.as_slice());
    let csv_error = |e: csv::Error| match e.position() {
        Some(p) => at(path, p.line() as usize, e.to_string()),
        None => file_error(path, e.to_string()),
    };
    let names: Vec<String> = if header {
        rdr.byte_headers()
            .map_err(csv_error)?
            .iter()
            .map(|f| {
                String::from_utf8_lossy(f)
                    .trim_start_matches('\u{feff}')
                    .trim()
                    .to_string()
            })
            .collect()
    } else {
        vec![]
    };
    let mut rows = vec![];
    // Lines from byte offsets: a record's position can sit on the previous record's line
    // terminator, so terminators at the offset are skipped before counting.
    let (mut counted_to, mut newlines) = (0usize, 0usize);
    for rec in rdr.byte_records() {
        let rec = rec.map_err(csv_error)?;
        if rec.iter().all(|f| f.iter().all(u8::is_ascii_whitespace)) {
            continue;
        }
        if limit != 0 && rows.len() == limit {
            break;
        }
        let mut at_byte = rec
            .position()
            .map_or(0, |p| p.byte() as usize)
            .min(bytes.len());
        while matches!(bytes.get(at_byte), Some(b'\r' | b'\n')) {
            at_byte += 1;
        }
        let from = counted_to.min(at_byte);
        newlines += bytes[from..at_byte].iter().filter(|&&b| b == b'\n').count();
        counted_to = at_byte;
        let line = newlines + 1;
        rows.push((
            line,
            rec.iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect(),
        ));
    }
    Ok(CsvTable {
        header: names,
        rows,
    })
}

/// Field `c` (column `name`) of a row, trimmed; a short row is an error at its line.
pub(crate) fn field(
    path: &Path,
    line: usize,
    fields: &[String],
    c: usize,
    name: &str,
) -> Result<String, DataError> {
    fields.get(c).map(|s| s.trim().to_string()).ok_or_else(|| {
        at(
            path,
            line,
            format!(
                "missing column '{name}': the row has {} fields, it is field {}",
                fields.len(),
                c + 1
            ),
        )
    })
}

pub fn read_csv(
    path: &Path,
    header: bool,
    cols: &Columns,
    limit: usize,
) -> Result<Records, DataError> {
    let t = read_table(path, header, limit)?;
    let ca = find_column(path, &t.header, cols.text_a)?;
    let cb = cols
        .text_b
        .map(|b| find_column(path, &t.header, b))
        .transpose()?;
    let cl = find_column(path, &t.header, cols.label)?;
    let mut rows = vec![];
    for (line, f) in &t.rows {
        rows.push(Record {
            line: *line,
            text_a: field(path, *line, f, ca, cols.text_a)?,
            text_b: match (cb, cols.text_b) {
                (Some(c), Some(n)) => Some(field(path, *line, f, c, n)?),
                _ => None,
            },
            label: field(path, *line, f, cl, cols.label)?,
        });
    }
    if rows.is_empty() {
        return Err(file_error(path, "no examples in the file"));
    }
    Ok(Records {
        file: path.to_path_buf(),
        rows,
    })
}

/// A JSON value as label or text: strings as they are, numbers and booleans as written.
fn as_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub fn read_jsonl(path: &Path, cols: &Columns, limit: usize) -> Result<Records, DataError> {
    let bytes = read_bytes(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut rows = vec![];
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        if limit != 0 && rows.len() == limit {
            break;
        }
        let v: serde_json::Value =
            serde_json::from_str(l).map_err(|e| at(path, line, format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| at(path, line, "the line is not a JSON object"))?;
        let get = |key: &str| -> Result<String, DataError> {
            let v = obj.get(key).ok_or_else(|| {
                at(
                    path,
                    line,
                    format!(
                        "missing column '{key}' (keys: {})",
                        obj.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            })?;
            as_text(v).ok_or_else(|| {
                at(
                    path,
                    line,
                    format!("'{key}' is {v}, not a string, number or boolean"),
                )
            })
        };
        rows.push(Record {
            line,
            text_a: get(cols.text_a)?,
            text_b: cols.text_b.map(get).transpose()?,
            label: get(cols.label)?,
        });
    }
    if rows.is_empty() {
        return Err(file_error(path, "no examples in the file"));
    }
    Ok(Records {
        file: path.to_path_buf(),
        rows,
    })
}
