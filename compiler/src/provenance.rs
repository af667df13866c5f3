//! What ties an artifact to its inputs, so nothing downstream mixes parts that do not belong
//! together: a fingerprint of the source model's weights, the artifact's identity (adapter
//! settings, hypergradient mode, head, fingerprint) as recorded in `manifest.json`, and the
//! check that an output path does not overlap an input.
//!
//! The fingerprint is FNV-1a 64 over every initializer's name, element type, dims and bytes,
//! in name order, with the initializer count and the total byte count beside it. It is one
//! pass over the weights (about 1 GB/s; mapped weights are released behind it, so the pass
//! holds one tensor at a time), and node order (which export keeps and the compiler sorts)
//! does not enter it.

use std::hash::Hasher;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ir::{Model, TensorData};

/// The first non-finite value among the model's floating-point weights: (tensor, index,
/// value as text). A NaN or infinity there would train a model whose every output is NaN.
pub fn non_finite_weight(model: &Model) -> Option<(String, usize, String)> {
    use crate::ir::DataType;
    for (name, t) in &model.graph.initializers {
        let TensorData::Raw(b) = &t.data else {
            continue;
        };
        let found = match t.dtype {
            DataType::Float => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .position(|v| !v.is_finite())
                .map(|i| {
                    (
                        i,
                        f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()).to_string(),
                    )
                }),
            DataType::Double => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .position(|v| !v.is_finite())
                .map(|i| {
                    (
                        i,
                        f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap()).to_string(),
                    )
                }),
            // Exponent bits all set: infinity or NaN.
            DataType::Float16 => b
                .chunks_exact(2)
                .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00)
                .map(|i| (i, "inf or NaN".to_string())),
            DataType::Bfloat16 => b
                .chunks_exact(2)
                .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80)
                .map(|i| (i, "inf or NaN".to_string())),
            _ => None,
        };
        crate::onnx_io::mapped::release(b);
        if let Some((i, v)) = found {
            return Some((name.clone(), i, v));
        }
    }
    None
}

/// The manifest key of the fingerprint.
pub const FINGERPRINT_KEY: &str = "source_fingerprint";
/// The safetensors metadata key under which trained tensors carry their artifact's identity.
pub const IDENTITY_KEY: &str = "bidora.artifact";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// How it was computed (for a later change of method).
    pub method: String,
    pub initializers: usize,
    pub bytes: u64,
    pub hash: String,
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} weights, {} bytes, {} {}",
            self.initializers, self.bytes, self.method, self.hash
        )
    }
}

/// The fingerprint of `model`'s weights (see the module doc).
pub fn fingerprint(model: &Model) -> Fingerprint {
    let mut names: Vec<&String> = model.graph.initializers.keys().collect();
    names.sort();
    let mut h = fnv::FnvHasher::default();
    let mut bytes = 0u64;
    for name in &names {
        let t = &model.graph.initializers[*name];
        h.write(name.as_bytes());
        h.write_u8(0);
        h.write(&(t.dtype as i32).to_le_bytes());
        h.write(&(t.dims.len() as u64).to_le_bytes());
        for d in &t.dims {
            h.write(&d.to_le_bytes());
        }
        match &t.data {
            TensorData::Raw(b) => {
                h.write(b);
                crate::onnx_io::mapped::release(b);
                bytes += b.len() as u64;
            }
            TensorData::Strings(s) => {
                for v in s {
                    h.write(&(v.len() as u64).to_le_bytes());
                    h.write(v);
                    bytes += v.len() as u64;
                }
            }
        }
    }
    Fingerprint {
        method: "fnv1a64".into(),
        initializers: names.len(),
        bytes,
        hash: format!("{:016x}", h.finish()),
    }
}

/// The parts of a manifest (as JSON) that decide what trained tensors mean: the adapter
/// settings, the hypergradient mode and regulariser, the head and the source fingerprint.
/// Keys absent from the manifest (older compilers) are absent here.
pub fn identity(manifest: &serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    let mut put = |key: &str, v: Option<&serde_json::Value>| {
        if let Some(v) = v.filter(|v| !v.is_null()) {
            out.insert(key.to_string(), v.clone());
        }
    };
    let config = manifest.get("config");
    for k in ["method", "rank", "alpha", "rslora", "detach_norm", "seed"] {
        put(k, config.and_then(|c| c.get(k)));
    }
    let bilevel = manifest.get("bilevel");
    put("hypergrad", bilevel.and_then(|b| b.get("hypergrad")));
    put("regularizer", bilevel.and_then(|b| b.get("regularizer")));
    put("task", manifest.get("task").and_then(|t| t.get("task")));
    put(FINGERPRINT_KEY, manifest.get(FINGERPRINT_KEY));
    out
}

/// What differs between two identities, one `key: a vs b` per key both hold; keys only one
/// holds (an artifact from an older compiler) are not differences.
pub fn differences(
    a: &serde_json::Map<String, serde_json::Value>,
    b: &serde_json::Map<String, serde_json::Value>,
) -> Vec<String> {
    let show = |v: &serde_json::Value| match v {
        serde_json::Value::Object(o) if o.contains_key("hash") => {
            serde_json::from_value::<Fingerprint>(v.clone())
                .map(|f| f.to_string())
                .unwrap_or_else(|_| v.to_string())
        }
        serde_json::Value::Object(_) => v.to_string(),
        _ => v.to_string().trim_matches('"').to_string(),
    };
    a.iter()
        .filter_map(|(k, va)| {
            let vb = b.get(k)?;
            (va != vb).then(|| format!("{k}: {} vs {}", show(va), show(vb)))
        })
        .collect()
}

/// `path` made absolute with symlinks resolved as far as it exists; the missing rest is
/// appended as written (with `.` dropped and `..` applied).
pub fn resolved(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("."))
            .join(path)
    };
    let mut existing = abs.as_path();
    let mut rest = vec![];
    loop {
        if let Ok(c) = std::fs::canonicalize(existing) {
            let mut out = c;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other.as_os_str()),
                }
            }
            return out;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(p), Some(last)) => {
                rest.push(last);
                existing = p;
            }
            _ => return abs,
        }
    }
}

/// Refuses an output (`flag` names it) that is an input or a folder holding one: writing it
/// would destroy the input. `inputs` are (what, path) pairs of files that exist.
pub fn refuse_overlap(flag: &str, output: &Path, inputs: &[(&str, &Path)]) -> Result<(), String> {
    let out = resolved(output);
    for (what, input) in inputs {
        let inp = resolved(input);
        if inp == out {
            return Err(format!(
                "{flag} {} is the {what} itself; writing it would destroy the input: choose \
                 another path",
                output.display()
            ));
        }
        if inp.starts_with(&out) {
            return Err(format!(
                "{flag} {} holds the {what} {}; replacing it would destroy the input: choose \
                 a folder outside it",
                output.display(),
                input.display()
            ));
        }
    }
    if let Ok(cwd) = std::env::current_dir().map(|c| resolved(&c)) {
        if cwd.starts_with(&out) {
            return Err(format!(
                "{flag} {} is the current folder or holds it; choose a folder below it",
                output.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_outputs_are_refused_by_resolved_path() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m");
        std::fs::create_dir(&m).unwrap();
        let model = m.join("model.onnx");
        std::fs::write(&model, b"x").unwrap();
        let inputs = [("input model", model.as_path())];
        let e = refuse_overlap("-o", &m, &inputs).unwrap_err();
        assert!(e.contains("holds the input model"), "{e}");
        let e = refuse_overlap("--merged", &m.join("./model.onnx"), &inputs).unwrap_err();
        assert!(e.contains("is the input model itself"), "{e}");
        let e = refuse_overlap("-o", &m.join("sub/../.."), &inputs).unwrap_err();
        assert!(e.contains("holds"), "{e}");
        refuse_overlap("-o", &m.join("out"), &inputs).unwrap();
        refuse_overlap("-o", &dir.path().join("new/deeper"), &inputs).unwrap();
    }

    #[test]
    fn identities_differ_only_in_keys_both_hold() {
        let a = identity(
            &serde_json::json!({"config": {"method": "dora", "rank": 8, "alpha": 16.0},
            "bilevel": {"hypergrad": "fd"}}),
        );
        let b = identity(
            &serde_json::json!({"config": {"method": "dora", "rank": 8, "alpha": 8.0},
            "bilevel": {"hypergrad": "exact"}, "source_fingerprint": {"method": "fnv1a64",
            "initializers": 1, "bytes": 4, "hash": "00"}}),
        );
        assert_eq!(
            differences(&a, &b),
            ["alpha: 16.0 vs 8.0", "hypergrad: fd vs exact"]
        );
    }
}
