//! Reading an artifact folder written by `bidora-compile`: the manifest's program signatures
//! and the initial values of the trainable tensors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use serde::Deserialize;

use crate::tract_exec::HostTensor;

#[derive(Debug, Deserialize)]
pub struct TensorSig {
    pub name: String,
    pub dtype: String,
    pub shape: Option<Vec<serde_json::Value>>,
    pub role: String,
    /// For gradients and hypergradients: the tensor they belong to; for the upper program's
    /// batch inputs: the model input they feed.
    #[serde(default)]
    pub of: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ProgramSig {
    pub file: String,
    pub inputs: Vec<TensorSig>,
    pub outputs: Vec<TensorSig>,
}

#[derive(Debug, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub source_model: String,
    /// The token embedding's row count (absent in artifacts from older compilers).
    #[serde(default)]
    pub vocab_size: Option<i64>,
    pub programs: indexmap::IndexMap<String, ProgramSig>,
    #[serde(default)]
    pub task: Option<HeadInfo>,
    #[serde(default)]
    pub head_params: Vec<String>,
    #[serde(default)]
    pub adapters: Vec<AdapterInfo>,
    #[serde(default)]
    pub bilevel: Option<BilevelInfo>,
    pub config: AdapterConfigInfo,
}

/// The loss head (compiler `heads::Head`).
#[derive(Debug, Clone, Deserialize)]
pub struct HeadInfo {
    pub task: String,
    pub logits: String,
    pub loss: String,
    pub labels: Vec<String>,
}

/// What the runtime needs of an adapter record (compiler `rewrite::AdapterRecord`).
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterInfo {
    pub module: String,
    pub lora_a: String,
    pub lora_b: String,
    pub magnitude: Option<String>,
    pub in_features: i64,
    pub out_features: i64,
    pub rank: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfigInfo {
    pub method: String,
    pub rank: usize,
    pub alpha: f32,
    pub seed: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BilevelInfo {
    pub hypergrad: String,
    pub regularizer: String,
    pub groups: Groups,
    pub defaults: BilevelDefaults,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Groups {
    pub lower: Vec<String>,
    pub upper: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BilevelDefaults {
    pub gamma: f64,
    pub alpha_fd: f64,
}

pub struct Artifact {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// What decides what its trained tensors mean (`bidora_compiler::provenance::identity`):
    /// recorded with a run and with its tensors, checked by `--resume` and `bidora export`.
    pub identity: serde_json::Map<String, serde_json::Value>,
    /// Initial values of the trainable tensors, looked up by name.
    pub init: Vec<(String, ArrayD<f32>)>,
}

impl Artifact {
    pub fn open(dir: &Path) -> Result<Artifact> {
        let mpath = dir.join("manifest.json");
        let text = std::fs::read_to_string(&mpath)
            .with_context(|| format!("cannot read {}", mpath.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bidora manifest", mpath.display()))?;
        if manifest.format != "bidora-artifact" || manifest.format_version != 1 {
            bail!(
                "{}: unsupported artifact format {} v{}",
                mpath.display(),
                manifest.format,
                manifest.format_version
            );
        }
        let ipath = dir.join("init.safetensors");
        let bytes =
            std::fs::read(&ipath).with_context(|| format!("cannot read {}", ipath.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a safetensors file", ipath.display()))?;
        let mut init = vec![];
        for (name, view) in st.iter() {
            if view.dtype() != safetensors::Dtype::F32 {
                bail!(
                    "{}: tensor '{name}' is {:?}, expected F32",
                    ipath.display(),
                    view.dtype()
                );
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            init.push((
                name.to_string(),
                ArrayD::from_shape_vec(IxDyn(view.shape()), data)?,
            ));
        }
        let identity =
            bidora_compiler::provenance::identity(&serde_json::from_str(&text).unwrap_or_default());
        Ok(Artifact {
            dir: dir.to_path_buf(),
            manifest,
            identity,
            init,
        })
    }

    /// Inputs for one run of `program` on a synthetic batch: token ids and masks of
    /// `batch × seq`, zero labels, and the trainable tensors' initial values. Each symbolic
    /// dimension name gets its own size: the first name seen at an axis takes `batch` (axis 0)
    /// or `seq`, the next one a size smaller, and so on (at least 1), so the upper program's
    /// validation batch differs from its training batch as in a real run.
    pub fn example_inputs(
        &self,
        program: &ProgramSig,
        batch: usize,
        seq: usize,
    ) -> Result<Vec<(String, HostTensor)>> {
        let mut out = vec![];
        let mut sizes: std::collections::HashMap<String, usize> = Default::default();
        let mut seen_at: std::collections::HashMap<usize, usize> = Default::default();
        for sig in &program.inputs {
            if let Some((_, a)) = self.init.iter().find(|(n, _)| *n == sig.name) {
                out.push((sig.name.clone(), HostTensor::F32(a.clone())));
                continue;
            }
            let dims: Vec<usize> = sig
                .shape
                .as_deref()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let base = if i == 0 { batch } else { seq };
                    match (d.as_u64(), d.as_str()) {
                        (Some(v), _) => v as usize,
                        (None, Some(name)) => *sizes.entry(name.to_string()).or_insert_with(|| {
                            let k = seen_at.entry(i).or_default();
                            *k += 1;
                            base.saturating_sub(*k - 1).max(1)
                        }),
                        (None, None) => base,
                    }
                })
                .collect();
            let n: usize = dims.iter().product();
            if sig.role == "hyperparameter" {
                let d = self.manifest.bilevel.as_ref().map(|b| &b.defaults);
                let v = match sig.name.as_str() {
                    "gamma" => d.map_or(0.0, |d| d.gamma),
                    "alpha_fd" => d.map_or(0.01, |d| d.alpha_fd),
                    _ => 1e-4,
                };
                out.push((
                    sig.name.clone(),
                    HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v as f32)),
                ));
                continue;
            }
            let t = match (sig.dtype.as_str(), sig.name.as_str()) {
                ("i64", name) if name.contains("mask") => vec![1i64; n],
                ("i64", _) if sig.role == "label" => vec![0i64; n],
                ("i64", _) => (0..n).map(|k| 3 + (k as i64 * 7) % 20).collect(),
                ("f32", _) => {
                    out.push((
                        sig.name.clone(),
                        HostTensor::F32(ArrayD::zeros(IxDyn(&dims))),
                    ));
                    continue;
                }
                (other, name) => bail!("input '{name}' has unsupported type {other}"),
            };
            out.push((
                sig.name.clone(),
                HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&dims), t)?),
            ));
        }
        Ok(out)
    }
}
