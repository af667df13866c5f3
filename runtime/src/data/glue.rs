//! GLUE-style TSV (`glue-tsv`): tab-separated, quoting off (GLUE's loaders read with
//! `csv.QUOTE_NONE`; RTE's sentences contain bare `"`), an optional header (MRPC's starts with
//! a UTF-8 BOM), columns by name or 0-based index.

use std::path::Path;

use super::{at, file_error, find_column, read_bytes, DataError, Record, Records};

/// Which columns hold what.
pub struct Columns<'a> {
    pub text_a: &'a str,
    pub text_b: Option<&'a str>,
    pub label: &'a str,
}

/// Reads the first `limit` (0: all) non-blank rows of `path`.
pub fn read(path: &Path, header: bool, cols: &Columns, limit: usize) -> Result<Records, DataError> {
    let bytes = read_bytes(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    let names: Vec<String> = if header {
        let (_, h) = lines
            .next()
            .ok_or_else(|| file_error(path, "the file is empty"))?;
        h.trim_start_matches('\u{feff}')
            .split('\t')
            .map(|c| c.trim().to_string())
            .collect()
    } else {
        vec![]
    };
    let ca = find_column(path, &names, cols.text_a)?;
    let cb = cols
        .text_b
        .map(|b| find_column(path, &names, b))
        .transpose()?;
    let cl = find_column(path, &names, cols.label)?;
    let mut rows = vec![];
    for (line, l) in lines.take(if limit == 0 { usize::MAX } else { limit }) {
        let fields: Vec<&str> = l.split('\t').collect();
        let field = |c: usize, name: &str| {
            fields.get(c).map(|s| s.trim().to_string()).ok_or_else(|| {
                at(
                    path,
                    line,
                    format!(
                        "the row has {} fields, column '{name}' is field {}",
                        fields.len(),
                        c + 1
                    ),
                )
            })
        };
        rows.push(Record {
            line,
            text_a: field(ca, cols.text_a)?,
            text_b: match (cb, cols.text_b) {
                (Some(c), Some(n)) => Some(field(c, n)?),
                _ => None,
            },
            label: field(cl, cols.label)?,
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
