//! The artifact folder the compiler writes: ONNX programs, the adapters' initial values in
//! `init.safetensors`, and `manifest.json` describing both ([`schema`]: its one typed
//! definition, which every reader uses).
//!
//! The folder appears whole or not at all: everything is written into a temporary sibling
//! folder that is renamed into place at the end, so a failure never leaves a partial artifact.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use crate::error::{Error, Result};
use crate::ir::{convert, DataType, Dim, Graph, Model, Tensor, ValueType};
use crate::onnx_io;

pub mod schema;

pub use schema::{
    BilevelDefaults, BilevelManifest, Hyperparameter, Manifest, ManifestError, ManifestFile,
    ProgramKey, ProgramSig, Role, SigDim, TensorSig, FORMAT, FORMAT_VERSION, INIT, MANIFEST,
    WEIGHTS,
};

/// The vocabulary size of a model: the row count of the 2-D initializer that a `Gather` on
/// axis 0 indexes with `input_ids`, directly or through ops that only reshape or retype it
/// (GPT-2's exports flatten the ids with a Reshape first). `None` when there is no such
/// Gather (a model without token ids, or a rewritten embedding).
pub fn vocab_size(graph: &Graph) -> Option<i64> {
    let mut ids: std::collections::HashSet<&str> = ["input_ids"].into();
    for n in &graph.nodes {
        if !n.domain.is_empty() || n.inputs.is_empty() {
            continue;
        }
        let reads_ids = |k: usize| n.inputs.get(k).is_some_and(|i| ids.contains(i.as_str()));
        match n.op_type.as_str() {
            "Reshape" | "Cast" | "Identity" | "Squeeze" | "Unsqueeze" | "Flatten"
                if reads_ids(0) =>
            {
                ids.extend(n.outputs.iter().map(String::as_str));
            }
            "Gather" if reads_ids(1) => {
                let axis0 = n
                    .attributes
                    .iter()
                    .find(|a| a.name == "axis")
                    .is_none_or(|a| matches!(a.value, crate::ir::AttrValue::Int(0)));
                let w = graph.initializers.get(&n.inputs[0]);
                if let Some(w) = w.filter(|w| axis0 && w.dims.len() == 2) {
                    return Some(w.dims[0]);
                }
            }
            _ => {}
        }
    }
    None
}

fn sig_dims(t: &Option<ValueType>) -> (String, Option<Vec<SigDim>>) {
    match t {
        Some(ValueType::Tensor { elem, shape, .. }) => (
            elem.short_name().to_string(),
            shape.as_ref().map(|dims| {
                dims.iter()
                    .map(|d| match d {
                        Dim::Known(v) => SigDim::Known(*v),
                        Dim::Sym(s) => SigDim::Sym(s.clone()),
                        Dim::Unknown => SigDim::Unknown,
                    })
                    .collect()
            }),
        ),
        _ => ("?".into(), None),
    }
}

/// The role of every named program input and output that is not plain data or output.
pub type Roles = std::collections::HashMap<String, (Role, Option<String>)>;

/// The signature of a program graph; names absent from `roles` are data (inputs) or plain
/// outputs (outputs).
pub fn program_sig(file: &str, graph: &Graph, roles: &Roles) -> ProgramSig {
    let sig = |v: &crate::ir::ValueInfo, default: Role| {
        let (dtype, shape) = sig_dims(&v.ty);
        let (role, of) = roles.get(&v.name).cloned().unwrap_or((default, None));
        TensorSig {
            name: v.name.clone(),
            dtype,
            shape,
            role,
            of,
        }
    };
    ProgramSig {
        file: file.to_string(),
        inputs: graph.inputs.iter().map(|v| sig(v, Role::Data)).collect(),
        outputs: graph.outputs.iter().map(|v| sig(v, Role::Output)).collect(),
    }
}

/// Serialises f32 (or f64) tensors to safetensors bytes, in the given order.
pub fn safetensors_bytes(tensors: &IndexMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut entries = vec![];
    for (name, t) in tensors {
        let dtype = match t.dtype {
            DataType::Float => crate::tensor_file::Dtype::F32,
            DataType::Double => crate::tensor_file::Dtype::F64,
            other => {
                return Err(Error::Other(format!(
                    "tensor '{name}' is {}, not f32 or f64",
                    other.short_name()
                )))
            }
        };
        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        entries.push(crate::tensor_file::RawEntry {
            name,
            dtype,
            shape,
            bytes: t.raw().expect("float tensors are raw"),
        });
    }
    crate::tensor_file::to_bytes(&entries, None).map_err(|e| Error::Other(e.to_string()))
}

/// Everything the compiler writes into one artifact folder.
pub struct Artifact {
    pub manifest: Manifest,
    /// File name → program model.
    pub programs: Vec<(String, Model)>,
    pub init: IndexMap<String, Tensor>,
}

/// Writes the artifact to `dir` atomically. An existing folder is an error unless `force`,
/// in which case it is replaced only once the new one is complete.
pub fn write(artifact: &Artifact, dir: &Path, force: bool) -> Result<()> {
    write_with_fingerprint(artifact, dir, force, None)
}

/// [`write`], recording in the manifest the fingerprint of the source model's weights
/// (`crate::provenance`), which `bidora export` and `bidora train --resume` check.
pub fn write_with_fingerprint(
    artifact: &Artifact,
    dir: &Path,
    force: bool,
    fingerprint: Option<&crate::provenance::Fingerprint>,
) -> Result<()> {
    if dir.file_name().is_none() {
        return Err(Error::Other(format!(
            "output folder {} names no folder (it ends in `.` or `..`): give the folder's name",
            dir.display()
        )));
    }
    if dir.exists() && !force {
        return Err(Error::Other(format!(
            "output folder {} already exists (pass --force to replace it)",
            dir.display()
        )));
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::Write {
        path: parent.clone(),
        source: e,
    })?;
    // Held until the new folder is in place: a second compile to the same folder would
    // otherwise swap its folder in under this one's backup.
    let _lock = crate::lock::FolderLock::output_folder(dir, "bidora-compile")
        .map_err(|e| Error::Other(e.to_string()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".bidora-artifact-")
        .tempdir_in(&parent)
        .map_err(|e| Error::Write {
            path: parent.clone(),
            source: e,
        })?;
    // Every program refers to the same frozen weights: stored once, in WEIGHTS.
    let programs: Vec<(&str, &Model)> = artifact
        .programs
        .iter()
        .map(|(file, model)| (file.as_str(), model))
        .collect();
    convert::write_models_sharing_data(
        tmp.path(),
        &programs,
        WEIGHTS,
        onnx_io::AUTO_EXTERNAL_THRESHOLD,
    )?;
    let init = safetensors_bytes(&artifact.init)?;
    let write_file = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::Write { path: p, source: e })
    };
    write_file(INIT, &init)?;
    let mut manifest = artifact.manifest.clone();
    if let Some(f) = fingerprint {
        manifest.source_fingerprint = Some(f.clone());
    }
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?;
    write_file(MANIFEST, &json)?;
    swap_into_place(tmp, dir, &parent).map_err(|e| Error::Write {
        path: dir.to_path_buf(),
        source: e,
    })?;
    Ok(())
}

/// Moves the staged folder `tmp` (in `parent`) to `dir`, replacing whatever is there: the old
/// entry is moved aside first and removed last. On every failure the old entry is put back
/// and the staged folder removed (dropping `tmp` does it), so no `.bidora-*` folder is left.
pub fn swap_into_place(tmp: tempfile::TempDir, dir: &Path, parent: &Path) -> std::io::Result<()> {
    let backup = match dir.symlink_metadata() {
        Ok(_) => {
            let name = dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let b = parent.join(format!(".bidora-old-{name}-{}", std::process::id()));
            remove_entry(&b);
            std::fs::rename(dir, &b)?;
            Some(b)
        }
        Err(_) => None,
    };
    if let Err(e) = std::fs::rename(tmp.path(), dir) {
        if let Some(b) = &backup {
            let _ = std::fs::rename(b, dir);
        }
        return Err(e);
    }
    // Renamed away: nothing is left for the guard to remove.
    let _ = tmp.keep();
    if let Some(b) = backup {
        remove_entry(&b);
    }
    Ok(())
}

/// Removes a folder with its contents, or a file or link (what `--force` may replace).
fn remove_entry(p: &Path) {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod swap_tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".bidora-"))
            .collect()
    }

    #[test]
    fn replacing_a_file_or_failing_leaves_no_staging_or_backup_behind() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        std::fs::write(&out, "a plain file").unwrap();
        let tmp = tempfile::Builder::new()
            .prefix(".bidora-artifact-")
            .tempdir_in(d.path())
            .unwrap();
        std::fs::write(tmp.path().join("manifest.json"), "{}").unwrap();
        swap_into_place(tmp, &out, d.path()).unwrap();
        assert!(out.join("manifest.json").exists());
        assert_eq!(leftovers(d.path()), Vec::<String>::new());

        // The final rename fails (no such parent): the staged folder goes, the old stays.
        let tmp = tempfile::Builder::new()
            .prefix(".bidora-artifact-")
            .tempdir_in(d.path())
            .unwrap();
        assert!(swap_into_place(tmp, &d.path().join("missing/out"), d.path()).is_err());
        assert_eq!(leftovers(d.path()), Vec::<String>::new());
    }
}
