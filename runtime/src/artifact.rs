//! Reading an artifact folder written by `bidora-compile`: the manifest (the compiler's typed
//! schema, `bidora_compiler::artifact::schema`) and the initial values of the trainable
//! tensors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bidora_compiler::artifact as schema;
use ndarray::{ArrayD, IxDyn};

use crate::tract_exec::HostTensor;

pub use bidora_compiler::artifact::{
    Hyperparameter, Manifest, ProgramKey, ProgramSig, Role, SigDim, TensorSig,
};

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
        let file = Manifest::read(dir)?;
        let ipath = dir.join(schema::INIT);
        let mut init = vec![];
        for e in bidora_compiler::tensor_file::read(&ipath)?.tensors {
            if e.dtype != bidora_compiler::tensor_file::Dtype::F32 {
                bail!(
                    "{}: tensor '{}' is {:?}, expected F32 (compile the model again)",
                    ipath.display(),
                    e.name,
                    e.dtype
                );
            }
            let values = e.f32_values();
            init.push((e.name, ArrayD::from_shape_vec(IxDyn(&e.shape), values)?));
        }
        Ok(Artifact {
            dir: dir.to_path_buf(),
            identity: file.identity,
            manifest: file.manifest,
            init,
        })
    }

    /// The signature of `key`, or an error saying the artifact lacks it and how to get it.
    pub fn program(&self, key: ProgramKey) -> Result<&ProgramSig> {
        self.manifest.program(key).with_context(|| {
            format!(
                "{}: the artifact has no '{key}' program (training programs need --task; \
                 lower and upper need a DoRA artifact compiled without --no-bilevel)",
                self.dir.display()
            )
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
                    match d {
                        SigDim::Known(v) => (*v).max(0) as usize,
                        SigDim::Sym(name) => *sizes.entry(name.to_string()).or_insert_with(|| {
                            let k = seen_at.entry(i).or_default();
                            *k += 1;
                            base.saturating_sub(*k - 1).max(1)
                        }),
                        SigDim::Unknown => base,
                    }
                })
                .collect();
            let n: usize = dims.iter().product();
            if sig.role == Role::Hyperparameter {
                let v = match Hyperparameter::from_input_name(&sig.name) {
                    Some(h @ Hyperparameter::Gamma) => self.manifest.default_of(h).unwrap_or(0.0),
                    Some(h @ Hyperparameter::AlphaFd) => {
                        self.manifest.default_of(h).unwrap_or(0.01)
                    }
                    // ξ: a typical lower learning rate.
                    Some(Hyperparameter::Xi) | None => 1e-4,
                };
                out.push((
                    sig.name.clone(),
                    HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v as f32)),
                ));
                continue;
            }
            let t = match (sig.dtype.as_str(), sig.name.as_str()) {
                ("i64", name) if name.contains("mask") => vec![1i64; n],
                ("i64", _) if sig.role == Role::Label => vec![0i64; n],
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
