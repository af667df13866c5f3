//! Checkpoints: every trainable tensor and both optimisers' moments in one safetensors file,
//! the loop's position (phase, steps, data streams, best metric) in `state.json`.
//!
//! Each checkpoint is a folder `checkpoints/step-NNNNNNN-PHASE` written under a temporary
//! name and renamed into place; `checkpoints/latest` (itself replaced by rename) names the
//! newest. A kill at any moment leaves the previous checkpoint intact and `latest` pointing
//! at a complete folder. The two newest are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use serde::{de::DeserializeOwned, Serialize};

use super::TrainError;
use crate::optim::Moments;

const TENSORS: &str = "tensors.safetensors";
const STATE: &str = "state.json";
const LATEST: &str = "latest";
const KEEP: usize = 2;

/// (optimiser name, steps, first moments, second moments).
pub type OptimState = (String, u32, Moments, Moments);

/// Everything a checkpoint holds besides the state.
pub struct Tensors {
    pub params: Vec<(String, ArrayD<f32>)>,
    pub optims: Vec<OptimState>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes `tensors` as f32 safetensors to `path` atomically (temp file + rename;
/// `bidora_compiler::tensor_file`, the one writer).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, &ArrayD<f32>)],
    meta: Option<HashMap<String, String>>,
) -> Result<(), TrainError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    type Named<'t> = (&'t str, Vec<usize>, std::borrow::Cow<'t, [f32]>);
    let owned: Vec<Named> = tensors
        .iter()
        .map(|(n, a)| {
            let values = match a.as_slice() {
                Some(s) => std::borrow::Cow::Borrowed(s),
                None => std::borrow::Cow::Owned(a.iter().copied().collect()),
            };
            (n.as_str(), a.shape().to_vec(), values)
        })
        .collect();
    let views: Vec<(&str, &[usize], &[f32])> = owned
        .iter()
        .map(|(n, s, v)| (*n, s.as_slice(), v.as_ref()))
        .collect();
    bidora_compiler::tensor_file::write_f32(path, &views, meta).map_err(|e| io(path, e.detail()))
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), TrainError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, data).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Reads every tensor of an f32 safetensors file, sorted by name.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, ArrayD<f32>)>, TrainError> {
    let file = bidora_compiler::tensor_file::read(path).map_err(|e| io(path, e.detail()))?;
    file.tensors
        .into_iter()
        .map(|e| {
            if e.dtype != bidora_compiler::tensor_file::Dtype::F32 {
                return Err(io(
                    path,
                    format!("tensor '{}' is {:?}, expected F32", e.name, e.dtype),
                ));
            }
            let values = e.f32_values();
            let a = ArrayD::from_shape_vec(IxDyn(&e.shape), values).map_err(|err| io(path, err))?;
            Ok((e.name, a))
        })
        .collect()
}

pub fn dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Writes one checkpoint and points `latest` at it.
pub fn save<S: Serialize>(
    run: &Path,
    name: &str,
    t: &Tensors,
    state: &S,
) -> Result<PathBuf, TrainError> {
    let root = dir(run);
    let tmp = root.join(format!(".{name}.tmp"));
    let fin = root.join(name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let mut all: Vec<(String, &ArrayD<f32>)> = t
        .params
        .iter()
        .map(|(n, a)| (format!("param/{n}"), a))
        .collect();
    let mut steps = serde_json::Map::new();
    for (opt, step, m, v) in &t.optims {
        steps.insert(opt.clone(), (*step).into());
        all.extend(m.iter().map(|(n, a)| (format!("{opt}/m/{n}"), a)));
        all.extend(v.iter().map(|(n, a)| (format!("{opt}/v/{n}"), a)));
    }
    write_safetensors(&tmp.join(TENSORS), &all, None)?;
    let body = serde_json::json!({"state": state, "optimizer_steps": steps});
    std::fs::write(tmp.join(STATE), serde_json::to_vec_pretty(&body).unwrap())
        .map_err(|e| io(&tmp, e))?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(|e| io(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| io(&fin, e))?;
    write_atomic(&root.join(LATEST), name.as_bytes())?;
    prune(&root, name)?;
    Ok(fin)
}

fn prune(root: &Path, newest: &str) -> Result<(), TrainError> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| io(root, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    let keep_from = names.len().saturating_sub(KEEP);
    for n in &names[..keep_from] {
        if n != newest {
            let p = root.join(n);
            std::fs::remove_dir_all(&p).map_err(|e| io(&p, e))?;
        }
    }
    Ok(())
}

/// The newest checkpoint's folder, if any. `latest` must name a checkpoint folder inside
/// `checkpoints/` (one `step-*` name, no path): anything else is refused, never followed.
pub fn latest(run: &Path) -> Result<Option<PathBuf>, TrainError> {
    let root = dir(run);
    let p = root.join(LATEST);
    if !p.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
    let name = name.trim();
    let mut parts = Path::new(name).components();
    let single = matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    );
    if !single || !name.starts_with("step-") {
        return Err(io(
            &p,
            format!(
                "names '{}', not a checkpoint folder of this run (step-NNNNNNN-PHASE): \
                 the file was edited or replaced; write the newest checkpoint's name into it",
                bidora_compiler::printable(name)
            ),
        ));
    }
    let d = root.join(name);
    // A `step-*` symlink could still lead out of the run folder.
    let inside = match (std::fs::canonicalize(&d), std::fs::canonicalize(&root)) {
        (Ok(a), Ok(b)) => a.starts_with(b),
        _ => true,
    };
    if !inside {
        return Err(io(
            &d,
            "leads outside the run's checkpoints folder: refused",
        ));
    }
    if !d.join(STATE).exists() {
        return Err(io(
            &d,
            "the checkpoint named by checkpoints/latest is incomplete",
        ));
    }
    Ok(Some(d))
}

/// Every complete checkpoint folder of the run but `except`, newest first: where a resume
/// falls back to when the newest checkpoint does not load.
pub fn older(run: &Path, except: &Path) -> Vec<PathBuf> {
    let root = dir(run);
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("step-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.reverse();
    names
        .into_iter()
        .map(|n| root.join(n))
        .filter(|d| d != except && d.join(STATE).exists())
        .collect()
}

/// Reads a checkpoint folder back.
pub fn load<S: DeserializeOwned>(d: &Path) -> Result<(Tensors, S), TrainError> {
    let sp = d.join(STATE);
    let text = std::fs::read_to_string(&sp).map_err(|e| io(&sp, e))?;
    let body: serde_json::Value = serde_json::from_str(&text).map_err(|e| io(&sp, e))?;
    let state: S = serde_json::from_value(body["state"].clone()).map_err(|e| io(&sp, e))?;
    let tensors = read_safetensors(&d.join(TENSORS))?;
    let mut params = vec![];
    let mut optims: Vec<OptimState> = vec![];
    if let Some(steps) = body["optimizer_steps"].as_object() {
        for (k, v) in steps {
            optims.push((
                k.clone(),
                v.as_u64().unwrap_or(0) as u32,
                HashMap::new(),
                HashMap::new(),
            ));
        }
    }
    for (n, a) in tensors {
        if let Some(p) = n.strip_prefix("param/") {
            params.push((p.to_string(), a));
            continue;
        }
        let mut parts = n.splitn(3, '/');
        let (opt, kind, name) = (parts.next(), parts.next(), parts.next());
        let slot = optims.iter_mut().find(|o| Some(o.0.as_str()) == opt);
        match (slot, kind, name) {
            (Some(o), Some("m"), Some(name)) => {
                o.2.insert(name.to_string(), a);
            }
            (Some(o), Some("v"), Some(name)) => {
                o.3.insert(name.to_string(), a);
            }
            _ => return Err(io(d, format!("unexpected tensor '{n}' in the checkpoint"))),
        }
    }
    Ok((Tensors { params, optims }, state))
}
