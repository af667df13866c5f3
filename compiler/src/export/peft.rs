//! A Hugging Face peft adapter folder: `adapter_config.json` (a `LoraConfig`) and
//! `adapter_model.safetensors`.
//!
//! Names and layouts are peft's (checked against peft 0.21.2's `save_pretrained`):
//! `base_model.model.{module}.lora_A.weight` `[r, in]`, `….lora_B.weight` `[out, r]`, DoRA's
//! `….lora_magnitude_vector` `[out]`, and a trained head (`modules_to_save`) as
//! `base_model.model.{module}.weight` / `.bias` in PyTorch's layout. Ours are the transposes:
//! `A: [in, r]`, `B: [r, out]`.
//!
//! **Fused projections.** peft adapts GPT-2's `c_attn` whole; bidora can adapt some of its
//! q|k|v blocks (`c_attn:q,v`). These are written as one peft adapter of rank `k·r` for `k`
//! adapted blocks, exactly: `lora_A` stacks the blocks' `Aᵀ`, `lora_B` places each block's
//! `Bᵀ` in its rows and columns and is zero elsewhere, so `B·A` is the blocks' own updates and
//! zero on unadapted blocks. The rank and `lora_alpha` of such modules go in peft's
//! `rank_pattern` / `alpha_pattern` so the scaling stays `s`. For DoRA the magnitude of an
//! unadapted column is its own norm `‖W0[:, j]‖`, which makes DoRA the identity there (as peft
//! computes the norm from the f32 weight, up to one rounding).

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde_json::{json, Value};

use super::resolve::ResolvedAdapter;
use super::{ExportError, ManifestFile, Resolved, Result};
use crate::heads::Task;
use crate::ir::Model;
use crate::rewrite::head::{head_tensors, HeadTensor};
use crate::rewrite::Method;
use crate::targets::{self, Layout};

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix peft's `PeftModel` puts before the base model's module paths.
const PREFIX: &str = "base_model.model.";

/// The folder's two files, in memory.
pub struct PeftAdapter {
    pub config: Value,
    /// Key → (shape, values), in the order written.
    pub tensors: IndexMap<String, (Vec<usize>, Vec<f32>)>,
}

#[derive(Clone, Debug, Default)]
pub struct PeftOptions {
    /// `base_model_name_or_path` (a hub id or folder); bidora only knows the ONNX file.
    pub base_model: Option<String>,
}

fn task_type(task: Task) -> &'static str {
    match task {
        Task::SeqCls | Task::Regression | Task::MultiLabel => "SEQ_CLS",
        Task::TokenCls => "TOKEN_CLS",
        Task::CausalLm => "CAUSAL_LM",
    }
}

/// A weight that PyTorch stores `[in, out]` (transformers' `Conv1D`, GPT-2): named after its
/// module and used as is by the ONNX graph. Exporters keep an `nn.Linear`'s `[out, in]`
/// (Transpose, `Gemm(transB=1)`) or store an anonymous transposed copy.
fn is_conv1d(module: &str, weight: &str, layout: Layout) -> bool {
    layout == Layout::InOut && weight == format!("{module}.weight")
}

/// Escapes a module path for peft's pattern keys (regular expressions).
fn pattern_key(module: &str) -> String {
    module.replace('.', "\\.")
}

/// Builds the adapter folder's contents.
pub fn peft_adapter(
    manifest: &ManifestFile,
    model: &Model,
    r: &Resolved,
    opts: &PeftOptions,
) -> Result<PeftAdapter> {
    let cfg = &manifest.config;
    let mut tensors: IndexMap<String, (Vec<usize>, Vec<f32>)> = IndexMap::new();
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    let mut fan_in_fan_out = false;
    // Adapters by peft module, in manifest order: one each, or the blocks of a fused one.
    let mut groups: IndexMap<&str, Vec<&ResolvedAdapter>> = IndexMap::new();
    for ad in &r.adapters {
        groups
            .entry(ad.record.module.as_str())
            .or_default()
            .push(ad);
    }
    for (module, mut ads) in groups {
        ads.sort_by_key(|a| a.col_offset);
        let first = ads[0];
        fan_in_fan_out |= is_conv1d(module, &first.target, first.layout);
        let (din, out) = (first.din, first.target_out);
        let rank: usize = ads.iter().map(|a| a.rank).sum();
        // lora_A [rank, in]: each adapter's Aᵀ in its rows.
        let mut a = vec![0f32; rank * din];
        // lora_B [out, rank]: each adapter's Bᵀ in its output rows and rank columns.
        let mut b = vec![0f32; out * rank];
        let mut row0 = 0;
        for ad in &ads {
            for k in 0..ad.rank {
                for i in 0..din {
                    a[(row0 + k) * din + i] = ad.a[i * ad.rank + k] as f32;
                }
                for j in 0..ad.dout {
                    b[(ad.col_offset + j) * rank + row0 + k] = ad.b[k * ad.dout + j] as f32;
                }
            }
            row0 += ad.rank;
        }
        let key = format!("{PREFIX}{module}");
        tensors.insert(format!("{key}.lora_A.weight"), (vec![rank, din], a));
        tensors.insert(format!("{key}.lora_B.weight"), (vec![out, rank], b));
        if cfg.method == Method::Dora {
            // Unadapted columns (other blocks of a fused weight) keep their own norm.
            let mut m = column_norms(model, first)?;
            for ad in &ads {
                let mv = ad.m.as_ref().expect("DoRA adapters have magnitudes");
                for (j, &v) in mv.iter().enumerate() {
                    m[ad.col_offset + j] = v as f32;
                }
            }
            tensors.insert(format!("{key}.lora_magnitude_vector"), (vec![out], m));
        }
        if rank != cfg.rank {
            let s = first.scaling;
            let alpha = if cfg.rslora {
                s * (rank as f64).sqrt()
            } else {
                s * rank as f64
            };
            rank_pattern.insert(pattern_key(module), json!(rank));
            alpha_pattern.insert(pattern_key(module), json!(alpha));
        }
    }

    let mut heads: Vec<(HeadTensor, Vec<usize>, Vec<f64>)> = r
        .heads
        .iter()
        .map(|h| (h.tensor.clone(), h.dims.clone(), h.values.clone()))
        .collect();
    let classifies = matches!(
        manifest.task.as_ref().map(|t| task_type(t.task)),
        Some("SEQ_CLS" | "TOKEN_CLS")
    );
    if heads.is_empty() && classifies {
        // peft puts a classifier's head in `modules_to_save` by itself for these task types
        // and then requires its tensors in the file: the model's own values, untrained.
        for t in head_tensors(&model.graph).unwrap_or_default() {
            let init = &model.graph.initializers[&t.name];
            let dims = init.dims.iter().map(|&d| d as usize).collect();
            let values = init.to_f64_vec().unwrap_or_default();
            heads.push((t, dims, values));
        }
    }
    let mut modules_to_save: Vec<String> = vec![];
    for (t, dims, values) in heads {
        // peft wraps the whole `classifier` (or `score`) module.
        let comps: Vec<&str> = t.module.split('.').collect();
        let cut = comps
            .iter()
            .position(|c| *c == "classifier" || *c == "score")
            .map_or(comps.len(), |p| p + 1);
        let wrapped = comps[..cut].join(".");
        if !modules_to_save.contains(&wrapped) {
            modules_to_save.push(wrapped);
        }
        let (suffix, dims, values) = match t.weight_layout {
            None => ("bias", dims, values),
            Some(layout) if layout == Layout::OutIn || is_conv1d(&t.module, &t.name, layout) => {
                ("weight", dims, values)
            }
            Some(_) => {
                // An anonymous [in, out] copy of an nn.Linear weight: back to [out, in].
                let (rows, cols) = (dims[0], dims[1]);
                let tv = (0..rows * cols)
                    .map(|k| values[(k % rows) * cols + k / rows])
                    .collect();
                ("weight", vec![cols, rows], tv)
            }
        };
        tensors.insert(
            format!("{PREFIX}{}.{suffix}", t.module),
            (dims, values.into_iter().map(|v| v as f32).collect()),
        );
    }

    let config = json!({
        "peft_type": "LORA",
        "task_type": manifest.task.as_ref().map(|t| task_type(t.task)),
        "base_model_name_or_path": opts.base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.method == Method::Dora,
        "target_modules": target_modules(model, r),
        "modules_to_save": (!modules_to_save.is_empty()).then_some(modules_to_save),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": true,
        "inference_mode": true,
    });
    Ok(PeftAdapter { config, tensors })
}

/// `‖W0[:, j]‖` for every output feature of the adapter's (possibly fused) weight, in f32.
fn column_norms(model: &Model, ad: &ResolvedAdapter) -> Result<Vec<f32>> {
    let t = &model.graph.initializers[&ad.target];
    let v = t
        .to_f64_vec()
        .expect("resolve checked the weight is f32 or f64");
    let (din, out) = (ad.din, ad.target_out);
    Ok((0..out)
        .map(|j| {
            (0..din)
                .map(|i| match ad.layout {
                    Layout::InOut => v[i * out + j],
                    Layout::OutIn => v[j * din + i],
                })
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect())
}

/// The adapted modules' own names (`query`, `value`) when peft's suffix match of those names
/// selects exactly the adapted modules in this model; else every module path in full.
fn target_modules(model: &Model, r: &Resolved) -> Vec<String> {
    let adapted: Vec<&str> = r
        .adapters
        .iter()
        .map(|a| a.record.module.as_str())
        .collect();
    let mut leaves: Vec<String> = vec![];
    for m in &adapted {
        let leaf = m.rsplit('.').next().unwrap_or(m).to_string();
        if !leaves.contains(&leaf) {
            leaves.push(leaf);
        }
    }
    let matches =
        |module: &str, name: &str| module == name || module.ends_with(&format!(".{name}"));
    let exact = targets::candidates(&model.graph).iter().all(|c| {
        !leaves.iter().any(|l| matches(&c.module, l)) || adapted.contains(&c.module.as_str())
    });
    if exact {
        leaves
    } else {
        let mut full: Vec<String> = vec![];
        for m in adapted {
            if !full.iter().any(|f| f == m) {
                full.push(m.to_string());
            }
        }
        full
    }
}

/// Serialises the tensors as f32 safetensors (with `format: pt`, as transformers writes).
pub fn safetensors_bytes(adapter: &PeftAdapter, path: &Path) -> Result<Vec<u8>> {
    let err = |msg: String| ExportError::Write {
        path: path.to_path_buf(),
        msg,
    };
    let bytes: Vec<(&String, Vec<u8>, &Vec<usize>)> = adapter
        .tensors
        .iter()
        .map(|(k, (dims, v))| (k, v.iter().flat_map(|x| x.to_le_bytes()).collect(), dims))
        .collect();
    let mut views = vec![];
    for (k, b, dims) in &bytes {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, dims.to_vec(), b)
            .map_err(|e| err(format!("tensor '{k}': {e}")))?;
        views.push((k.to_string(), view));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))
}

/// Writes the folder atomically: both files into a temporary sibling folder, renamed into
/// place. An existing folder is replaced only with `force`, and only once the new one is whole.
pub fn write_peft(adapter: &PeftAdapter, dir: &Path, force: bool) -> Result<()> {
    let werr = |path: &Path, msg: String| ExportError::Write {
        path: path.to_path_buf(),
        msg,
    };
    if dir.exists() && !force {
        return Err(werr(
            dir,
            "the folder exists (pass --force to replace it)".into(),
        ));
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| werr(&parent, e.to_string()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".bidora-peft-")
        .tempdir_in(&parent)
        .map_err(|e| werr(&parent, e.to_string()))?;
    let weights = tmp.path().join(WEIGHTS);
    let bytes = safetensors_bytes(adapter, &weights)?;
    std::fs::write(&weights, bytes).map_err(|e| werr(&weights, e.to_string()))?;
    let config = tmp.path().join(CONFIG);
    let text = serde_json::to_string_pretty(&adapter.config).expect("JSON values serialise");
    std::fs::write(&config, text).map_err(|e| werr(&config, e.to_string()))?;
    crate::artifact::swap_into_place(tmp, dir, &parent).map_err(|e| werr(dir, e.to_string()))?;
    Ok(())
}
