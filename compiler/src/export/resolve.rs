//! Checks that an artifact's manifest, a trained tensors file and a model belong together,
//! and gathers every value an export needs in one layout.

use std::path::{Path, PathBuf};

use super::{ExportError, ManifestFile, Result, Trained};
use crate::ir::Model;
use crate::rewrite::head::{head_tensors, HeadTensor};
use crate::rewrite::{AdapterRecord, Method};
use crate::targets::Layout;

/// One adapter with its base weight and trained tensors, all in f64.
pub struct ResolvedAdapter {
    pub record: AdapterRecord,
    /// The model initializer holding `W0`: the weight itself, or the fused weight whose
    /// column block (output features `col_offset..col_offset + dout`) this adapter adapts.
    pub target: String,
    pub col_offset: usize,
    /// Output features of `target` (`3·dout` for a block of a fused q|k|v projection).
    pub target_out: usize,
    pub layout: Layout,
    pub din: usize,
    pub dout: usize,
    pub rank: usize,
    pub scaling: f64,
    /// `[in, out]`, whatever the storage layout.
    pub w0: Vec<f64>,
    /// `[in, r]`.
    pub a: Vec<f64>,
    /// `[r, out]`.
    pub b: Vec<f64>,
    /// DoRA's magnitude, `[out]`.
    pub m: Option<Vec<f64>>,
}

/// A trained classifier-head tensor (`--train-head`), in the model's own layout.
pub struct ResolvedHead {
    pub tensor: HeadTensor,
    pub dims: Vec<usize>,
    pub values: Vec<f64>,
}

pub struct Resolved {
    pub method: Method,
    pub model_path: PathBuf,
    pub adapters: Vec<ResolvedAdapter>,
    pub heads: Vec<ResolvedHead>,
}

/// Loads the source model for an export: decoded and checked like the compiler's input, but
/// not re-sorted, so the merged model keeps the node order of the file.
pub fn load_source(path: &Path) -> Result<Model> {
    let wrap = |source: crate::Error| ExportError::Model {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let proto = crate::onnx_io::read_model(path).map_err(|e| wrap(e.into()))?;
    let model = crate::ir::convert::model_from_proto(proto).map_err(wrap)?;
    crate::import_check::model(&model).map_err(wrap)?;
    Ok(model)
}

pub fn resolve(
    manifest: &ManifestFile,
    model: &Model,
    model_path: &Path,
    trained: &Trained,
) -> Result<Resolved> {
    let mismatch = |msg: String| ExportError::ModelMismatch {
        model: model_path.to_path_buf(),
        msg,
    };
    let g = &model.graph;
    let mut heads = vec![];
    if !manifest.head_params.is_empty() {
        let all = head_tensors(g).map_err(|e| mismatch(e.to_string()))?;
        for name in &manifest.head_params {
            let tensor = all.iter().find(|t| &t.name == name).ok_or_else(|| {
                mismatch(format!(
                    "head parameter '{name}' is not a weight or bias of a classifier linear op"
                ))
            })?;
            let init = &g.initializers[name];
            let dims: Vec<usize> = init.dims.iter().map(|&d| d as usize).collect();
            let values = trained
                .get(name, &dims, "a trained head parameter")?
                .to_vec();
            heads.push(ResolvedHead {
                tensor: tensor.clone(),
                dims,
                values,
            });
        }
    }
    let mut adapters = vec![];
    for rec in &manifest.adapters {
        let (din, dout, rank) = (
            rec.in_features as usize,
            rec.out_features as usize,
            rec.rank,
        );
        let what = |t: &str| format!("{t} of adapter '{}'", label(rec));
        let a = trained.get(&rec.lora_a, &[din, rank], &what("A"))?.to_vec();
        let b = trained
            .get(&rec.lora_b, &[rank, dout], &what("B"))?
            .to_vec();
        let m = match &rec.magnitude {
            Some(name) => Some(trained.get(name, &[dout], &what("the magnitude"))?.to_vec()),
            None => None,
        };
        let (target, col_offset, target_out) = match (&rec.fused_weight, rec.block) {
            (Some(w), Some(block)) => (
                w.clone(),
                rec.block_offset
                    .map_or(block.index() * dout, |o| o as usize),
                rec.fused_out_features.map_or(3 * dout, |n| n as usize),
            ),
            _ => (rec.weight.clone(), 0, dout),
        };
        let t = g.initializers.get(&target).ok_or_else(|| {
            mismatch(format!(
                "adapter '{}': the model has no initializer '{target}'",
                label(rec)
            ))
        })?;
        let want: Vec<i64> = match rec.layout {
            Layout::InOut => vec![din as i64, target_out as i64],
            Layout::OutIn => vec![target_out as i64, din as i64],
        };
        if t.dims != want {
            return Err(mismatch(format!(
                "adapter '{}': weight '{target}' has shape {:?}, the artifact recorded {want:?}",
                label(rec),
                t.dims
            )));
        }
        // A trained head weight that is also adapted is the base the adapter builds on.
        let stored: Vec<f64> = match heads.iter().find(|h| h.tensor.name == target) {
            Some(h) => h.values.clone(),
            None => if t.dtype.is_float() {
                t.to_f64_vec()
            } else {
                None
            }
            .ok_or_else(|| {
                mismatch(format!(
                    "adapter '{}': weight '{target}' is {}, not a float type",
                    label(rec),
                    t.dtype.short_name()
                ))
            })?,
        };
        if stored.len() != din * target_out {
            return Err(mismatch(format!(
                "weight '{target}' holds {} values for shape {:?}",
                stored.len(),
                t.dims
            )));
        }
        let w0 = (0..din * dout)
            .map(|k| {
                let (i, j) = (k / dout, k % dout);
                match rec.layout {
                    Layout::InOut => stored[i * target_out + col_offset + j],
                    Layout::OutIn => stored[(col_offset + j) * din + i],
                }
            })
            .collect();
        adapters.push(ResolvedAdapter {
            record: rec.clone(),
            target,
            col_offset,
            target_out,
            layout: rec.layout,
            din,
            dout,
            rank,
            scaling: rec.scaling as f64,
            w0,
            a,
            b,
            m,
        });
    }
    Ok(Resolved {
        method: manifest.config.method,
        model_path: model_path.to_path_buf(),
        adapters,
        heads,
    })
}

/// `module` or `module:block`, as users named the target.
pub fn label(rec: &AdapterRecord) -> String {
    match rec.block {
        Some(b) => format!("{}:{}", rec.module, b.name()),
        None => rec.module.clone(),
    }
}
