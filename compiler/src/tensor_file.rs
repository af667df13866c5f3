//! Safetensors files of float tensors: the one reader and writer for every file bidora
//! writes or reads back (an artifact's `init.safetensors`, a run's `final.safetensors` and
//! checkpoints, the tensors `bidora export` merges). Frozen model weights never pass through
//! here: they stay in the programs' external data.
//!
//! Values come back as f64 whatever the file's float type (f32 → f64 is exact), so a reader
//! that needs f32 narrows once and a reader that merges (export) keeps the precision.
//! [`TensorFile::check_finite`] reports a non-finite value by tensor and index for readers
//! that must not pass one on (export: a NaN would silently poison the merged model); the
//! trainer checks its own, with its own message and fallback (checkpoint.rs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
}

impl Dtype {
    fn safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F64 => safetensors::Dtype::F64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a safetensors file: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("{}: tensor '{name}' is {dtype}; expected F32 or F64", path.display())]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{}: tensor '{name}' has the non-finite value {value} at flat index {index}", path.display())]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
        value: f64,
    },
    #[error("safetensors: {0}")]
    Encode(String),
}

impl TensorFileError {
    /// The message without the file's path (for callers whose own error names the file).
    pub fn detail(&self) -> String {
        let full = self.to_string();
        match self {
            TensorFileError::Read { path, .. }
            | TensorFileError::Write { path, .. }
            | TensorFileError::Format { path, .. }
            | TensorFileError::Dtype { path, .. }
            | TensorFileError::NonFinite { path, .. } => full
                .strip_prefix(&format!("{}: ", path.display()))
                .map(str::to_string)
                .unwrap_or(full),
            TensorFileError::Encode(_) => full,
        }
    }
}

/// One tensor as read: its name, shape, the file's float type and the values.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub values: Vec<f64>,
}

impl Entry {
    /// The values as f32 (what the programs take).
    pub fn f32_values(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }
}

/// A whole file: its tensors sorted by name, and its string metadata.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    pub tensors: Vec<Entry>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// The first non-finite value, as an error naming `path`, the tensor and its index.
    pub fn check_finite(&self, path: &Path) -> Result<(), TensorFileError> {
        for e in &self.tensors {
            if let Some((index, &value)) = e.values.iter().enumerate().find(|(_, v)| !v.is_finite())
            {
                return Err(TensorFileError::NonFinite {
                    path: path.to_path_buf(),
                    name: e.name.clone(),
                    index,
                    value,
                });
            }
        }
        Ok(())
    }
}

/// Reads every tensor of `path` (f32 or f64). Values are not checked: see
/// [`TensorFile::check_finite`].
pub fn read(path: &Path) -> Result<TensorFile, TensorFileError> {
    let bytes = std::fs::read(path).map_err(|source| TensorFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_bytes(path, &bytes)
}

/// [`read`] on bytes already in memory; `path` names them in messages.
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<TensorFile, TensorFileError> {
    let format = |msg: String| TensorFileError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format(e.to_string()))?;
    let metadata = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format(e.to_string()))?
        .1
        .metadata()
        .clone()
        .unwrap_or_default();
    let mut tensors = vec![];
    // By name: safetensors stores tensors sorted by dtype and name and iterates a hash map,
    // so no writer's order survives; sorted, every reader sees the same order.
    let mut views: Vec<_> = st.iter().collect();
    views.sort_by(|a, b| a.0.cmp(b.0));
    for (name, view) in views {
        let (dtype, values): (Dtype, Vec<f64>) = match view.dtype() {
            safetensors::Dtype::F32 => (
                Dtype::F32,
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
            ),
            safetensors::Dtype::F64 => (
                Dtype::F64,
                view.data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            other => {
                return Err(TensorFileError::Dtype {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        tensors.push(Entry {
            name: name.to_string(),
            shape: view.shape().to_vec(),
            dtype,
            values,
        });
    }
    Ok(TensorFile { tensors, metadata })
}

/// A tensor to write, as little-endian bytes of its dtype.
pub struct RawEntry<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

/// Safetensors bytes of `entries`, in their order, with optional metadata.
pub fn to_bytes(
    entries: &[RawEntry<'_>],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, TensorFileError> {
    let mut views = vec![];
    for e in entries {
        let view =
            safetensors::tensor::TensorView::new(e.dtype.safetensors(), e.shape.clone(), e.bytes)
                .map_err(|err| TensorFileError::Encode(format!("tensor '{}': {err}", e.name)))?;
        views.push((e.name.to_string(), view));
    }
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| TensorFileError::Encode(e.to_string()))?;
    Ok(sorted_header(bytes))
}

/// `bytes` with its header's keys in sorted order. safetensors takes the metadata as a
/// `HashMap` and writes it in the map's iteration order, which differs between processes:
/// the same tensors and metadata would give different files, and a rerun or a resumed run
/// could not be compared byte for byte. Reordering keeps the header's length (same keys and
/// values), so the data offsets and the alignment stay as safetensors wrote them.
fn sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    use std::collections::BTreeMap;
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + n) else {
        return bytes;
    };
    let Ok(mut map) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header) else {
        return bytes;
    };
    if let Some(meta) = map.get_mut("__metadata__") {
        if let Ok(m) = serde_json::from_value::<BTreeMap<String, String>>(meta.clone()) {
            *meta = serde_json::to_value(m).expect("strings serialise");
        }
    }
    let Ok(sorted) = serde_json::to_vec(&map) else {
        return bytes;
    };
    if sorted.len() <= n {
        bytes[8..8 + sorted.len()].copy_from_slice(&sorted);
        // safetensors pads its header with spaces; any slack becomes padding too.
        bytes[8 + sorted.len()..8 + n].fill(b' ');
    }
    bytes
}

/// Writes f32 tensors `(name, shape, values)` to `path` atomically: a temporary file in the
/// same folder, renamed over `path` once complete, so a crash never leaves half a file.
pub fn write_f32(
    path: &Path,
    tensors: &[(&str, &[usize], &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), TensorFileError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let entries: Vec<RawEntry> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| RawEntry {
            name,
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: b,
        })
        .collect();
    let data = to_bytes(&entries, metadata)?;
    let werr = |source| TensorFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".bidora-tensors-")
        .tempfile_in(dir)
        .map_err(werr)?;
    std::io::Write::write_all(&mut tmp, &data).map_err(werr)?;
    tmp.as_file().sync_all().map_err(werr)?;
    tmp.persist(path).map_err(|e| werr(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_with_metadata_sorted_by_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.safetensors");
        let meta: HashMap<String, String> = [("k".to_string(), "v".to_string())].into();
        write_f32(
            &p,
            &[
                ("z", &[2], &[1.5, -2.0]),
                ("a", &[1, 1], &[f32::MIN_POSITIVE]),
            ],
            Some(meta.clone()),
        )
        .unwrap();
        let f = read(&p).unwrap();
        assert_eq!(f.metadata, meta);
        let names: Vec<&str> = f.tensors.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "z"]);
        assert_eq!(f.tensors[1].values, [1.5, -2.0]);
        assert_eq!(f.tensors[0].f32_values(), [f32::MIN_POSITIVE]);
        assert_eq!(f.tensors[0].shape, [1, 1]);
        assert_eq!(f.tensors[1].dtype, Dtype::F32);
    }

    /// Each `HashMap` iterates in its own order; the bytes must not follow it.
    #[test]
    fn equal_tensors_and_metadata_give_equal_bytes() {
        let entries = [RawEntry {
            name: "w",
            dtype: Dtype::F32,
            shape: vec![2],
            bytes: &[0, 0, 128, 63, 0, 0, 0, 64],
        }];
        let meta = || -> HashMap<String, String> {
            (0..12)
                .map(|i| (format!("key{i}"), format!("v{i}")))
                .collect()
        };
        let first = to_bytes(&entries, Some(meta())).unwrap();
        for _ in 0..20 {
            assert_eq!(to_bytes(&entries, Some(meta())).unwrap(), first);
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        std::fs::write(&p, &first).unwrap();
        let f = read(&p).unwrap();
        assert_eq!(f.metadata, meta());
        assert_eq!(f.tensors[0].values, [1.0, 2.0]);
        assert_eq!((first.len() - 8) % 8, 0, "the data stays 8-byte aligned");
    }

    #[test]
    fn bad_files_name_the_file_and_tensor() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nan.safetensors");
        write_f32(&p, &[("w", &[3], &[0.0, f32::NAN, 1.0])], None).unwrap();
        let f = read(&p).unwrap();
        assert!(
            f.tensors[0].values[1].is_nan(),
            "read passes values through"
        );
        let e = f.check_finite(&p).unwrap_err().to_string();
        assert!(
            e.contains("nan.safetensors") && e.contains("'w'") && e.contains("index 1"),
            "{e}"
        );
        std::fs::write(&p, b"not a safetensors file").unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        let i = to_bytes(
            &[RawEntry {
                name: "i",
                dtype: Dtype::F32,
                shape: vec![1],
                bytes: &[0, 0, 0, 0],
            }],
            None,
        )
        .unwrap();
        // Re-tag the header's dtype as I32: refused by name.
        let text = String::from_utf8_lossy(&i).replace("\"F32\"", "\"I32\"");
        std::fs::write(&p, text.as_bytes()).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("'i'") && e.contains("I32"), "{e}");
    }
}
