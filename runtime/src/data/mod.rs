//! Training data: one module per file format, each turning a file into plain records, and
//! [`tokenize`] turning records into token ids. `train::dataset` joins them to the config.
//!
//! | format | module | records | head |
//! |---|---|---|---|
//! | `glue-tsv` | [`glue`] | text (pair) + label | seq-cls, regression |
//! | `csv`, `jsonl` | [`csvjson`] | text (pair) + label | seq-cls, regression |
//! | `peptides` | [`peptides`] | amino-acid sequence + class | seq-cls |
//! | `conll` | [`conll`] | words + tags | token-cls |
//! | `reuters-sgml` | [`reuters`] | title + body + topics | multi-label |
//! | `e2e` | [`e2e`] | meaning representation + reference | causal-lm |
//!
//! Every error names the file and, for a bad row, its 1-based line; nothing here panics on
//! file contents.

pub mod batch;
pub mod conll;
pub mod csvjson;
pub mod e2e;
pub mod examples;
pub mod glue;
pub mod peptides;
pub mod reuters;
pub mod tokenize;

use std::path::{Path, PathBuf};

pub use batch::{Encoded, EncodedSet, References, Target};
pub use examples::Examples;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A bad row (or token, or document) at a line of a file.
    #[error("{}:{line}: {message}", file.display())]
    Line {
        file: PathBuf,
        line: usize,
        message: String,
    },
    /// A file as a whole: unreadable, empty, a missing column in its header.
    #[error("{}: {message}", file.display())]
    File { file: PathBuf, message: String },
    /// The `[data]` section does not fit the format or the model.
    #[error("data: {0}")]
    Config(String),
    /// A batch the loop asked for cannot be built (an index out of range, mixed labels).
    #[error("{0}")]
    Batch(String),
}

pub(crate) fn at(file: &Path, line: usize, message: impl Into<String>) -> DataError {
    DataError::Line {
        file: file.to_path_buf(),
        line,
        message: message.into(),
    }
}

pub(crate) fn file_error(file: &Path, message: impl Into<String>) -> DataError {
    DataError::File {
        file: file.to_path_buf(),
        message: message.into(),
    }
}

/// The file's bytes; a read error names the file.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(file_error(path, "the file is empty"));
    }
    Ok(bytes)
}

/// A labelled sentence (or pair) before encoding: what the sentence-level formats produce.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// 1-based line in the file (for a CSV record spanning lines: where it starts).
    pub line: usize,
    pub text_a: String,
    pub text_b: Option<String>,
    /// The label as written: a class name, or a number for regression.
    pub label: String,
}

/// The records of one file.
#[derive(Clone, Debug)]
pub struct Records {
    pub file: PathBuf,
    pub rows: Vec<Record>,
}

/// Where a column is: by header name, else a 0-based index written as a number.
pub(crate) fn find_column(file: &Path, header: &[String], spec: &str) -> Result<usize, DataError> {
    if let Some(i) = header.iter().position(|c| c == spec) {
        return Ok(i);
    }
    if let Ok(i) = spec.parse::<usize>() {
        return Ok(i);
    }
    Err(file_error(
        file,
        format!(
            "no column '{spec}' (columns: {})",
            if header.is_empty() {
                "none named: the file has no header, give 0-based indices".to_string()
            } else {
                header.join(", ")
            }
        ),
    ))
}

/// The class id of `raw` in `names`; an unknown label is an error at the row's line.
pub fn class_id(file: &Path, line: usize, raw: &str, names: &[String]) -> Result<i64, DataError> {
    names
        .iter()
        .position(|n| n == raw)
        .map(|i| i as i64)
        .ok_or_else(|| {
            at(
                file,
                line,
                format!(
                    "unknown label '{}' (labels: {})",
                    printable(raw),
                    names
                        .iter()
                        .map(|n| printable(n))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
}

/// The sorted set of `labels`: the default label order (ids stable across runs and files).
pub fn label_set<'a>(labels: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut set: Vec<String> = labels.into_iter().map(str::to_string).collect();
    set.sort();
    set.dedup();
    set
}

pub use bidora_compiler::printable;
