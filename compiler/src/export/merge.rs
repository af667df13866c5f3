//! Folding adapters into the base weights: the input model, same graph, new weight values.
//!
//! With `V = W0 + s·A·B` (`[in, out]`): LoRA's weight is `V`; DoRA's is
//! `m_j · V[:, j] / ‖V[:, j]‖` per output feature `j`, which is what the adapted forward
//! program computes with `x·W0 + s·(x·A)·B` scaled by `m / ‖V‖_col`. Values are computed in
//! f64 and stored in the weight's own type. A block of a fused projection is written back into
//! its columns of the fused weight; trained head parameters replace the model's.

use std::path::Path;

use indexmap::IndexMap;

use super::resolve::{label, ResolvedAdapter};
use super::{ExportError, Resolved, Result};
use crate::ir::{Model, Tensor};
use crate::targets::Layout;

/// The folded weight of one adapter, `[in, out]`.
pub fn fold(ad: &ResolvedAdapter) -> Result<Vec<f64>> {
    let (din, dout, r, s) = (ad.din, ad.dout, ad.rank, ad.scaling);
    let mut v = ad.w0.clone();
    for i in 0..din {
        for k in 0..r {
            let sa = s * ad.a[i * r + k];
            if sa == 0.0 {
                continue;
            }
            let brow = &ad.b[k * dout..(k + 1) * dout];
            for (x, &bkj) in v[i * dout..(i + 1) * dout].iter_mut().zip(brow) {
                *x += sa * bkj;
            }
        }
    }
    if let Some(m) = &ad.m {
        for (j, &mj) in m.iter().enumerate() {
            let norm = (0..din)
                .map(|i| v[i * dout + j].powi(2))
                .sum::<f64>()
                .sqrt();
            if norm == 0.0 {
                return Err(ExportError::ZeroNorm {
                    module: label(&ad.record),
                    column: j,
                });
            }
            for i in 0..din {
                v[i * dout + j] *= mj / norm;
            }
        }
    }
    Ok(v)
}

/// The merged model: `model` with every adapter folded and every trained head parameter
/// written in. Nodes, inputs, outputs, opsets and metadata are untouched.
pub fn merge(model: &Model, r: &Resolved) -> Result<Model> {
    let g = &model.graph;
    let consumers = g.consumers();
    let mut updated: IndexMap<String, Vec<f64>> = IndexMap::new();
    for h in &r.heads {
        updated.insert(h.tensor.name.clone(), h.values.clone());
    }
    for ad in &r.adapters {
        // Folding changes the initializer for every reader; a second reader would silently
        // compute something else than the adapted model did.
        let users = consumers.get(ad.target.as_str()).map_or(0, Vec::len);
        if users != 1 || g.outputs.iter().any(|o| o.name == ad.target) {
            return Err(ExportError::ModelMismatch {
                model: r.model_path.clone(),
                msg: format!(
                    "adapter '{}': weight '{}' is read by {users} nodes; a merge needs it read by \
                     its linear op alone",
                    label(&ad.record),
                    ad.target
                ),
            });
        }
        let folded = fold(ad)?;
        if !updated.contains_key(&ad.target) {
            let t = &g.initializers[&ad.target];
            let v = t
                .to_f64_vec()
                .expect("resolve checked the weight is f32 or f64");
            updated.insert(ad.target.clone(), v);
        }
        let stored = updated.get_mut(&ad.target).expect("inserted above");
        for i in 0..ad.din {
            for j in 0..ad.dout {
                let at = match ad.layout {
                    Layout::InOut => i * ad.target_out + ad.col_offset + j,
                    Layout::OutIn => (ad.col_offset + j) * ad.din + i,
                };
                stored[at] = folded[i * ad.dout + j];
            }
        }
    }
    let mut out = model.clone();
    for (name, values) in updated {
        let t = out
            .graph
            .initializers
            .get_mut(&name)
            .expect("resolved names are initializers");
        // Only the payload changes: name, dims, doc string and metadata stay.
        t.data = Tensor::from_f64_as(t.dtype, name.clone(), t.dims.clone(), &values).data;
    }
    Ok(out)
}

/// Writes the merged model atomically (a temporary file in the same folder, then a rename);
/// above protobuf's 2 GiB the weights go to `<stem>.data` beside it.
pub fn write_merged(model: &Model, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ExportError::Write {
            path: dir.to_path_buf(),
            msg: e.to_string(),
        })?;
    }
    let proto = crate::ir::convert::model_to_proto(model);
    // onnx_io's errors name the file already.
    crate::onnx_io::write_model_auto(&proto, path)
        .map_err(|e| ExportError::Output(Box::new(e.into())))?;
    Ok(())
}
