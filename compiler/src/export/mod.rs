//! `bidora export`: trained adapters out of bidora, in the two forms other tools read.
//!
//! - [`merge`]: the input model with every adapter folded into its base weight (and trained
//!   head parameters written in): the same graph, only initializer values changed, so any
//!   ONNX runtime serves it with no adapter cost.
//! - [`peft`]: a folder that Hugging Face peft loads with `PeftModel.from_pretrained`
//!   (`adapter_config.json` + `adapter_model.safetensors`).
//!
//! Both start from [`resolve`], which reads the artifact's manifest, the trained tensors and
//! the input model, checks that they belong together (every tensor present, every shape as
//! the manifest says, every base weight in the model with its recorded shape) and hands out
//! the values in one layout (`W0: [in, out]`, `A: [in, r]`, `B: [r, out]`, in f64). Nothing is
//! written before everything has been checked and computed.

pub mod manifest;
pub mod merge;
pub mod peft;
pub mod resolve;
pub mod trained;

use std::path::{Path, PathBuf};

pub use crate::artifact::ManifestFile;
pub use peft::PeftOptions;
pub use resolve::{load_source, resolve, Resolved};
pub use trained::Trained;

/// One export: which artifact and tensors, and what to write.
pub struct ExportJob<'a> {
    pub artifact: &'a Path,
    pub tensors: &'a Path,
    /// The source model, instead of the path the manifest recorded.
    pub model: Option<&'a Path>,
    pub merged: Option<&'a Path>,
    pub peft: Option<&'a Path>,
    pub peft_options: PeftOptions,
    /// Replace existing outputs.
    pub force: bool,
}

/// What an export did, for the caller to report.
#[derive(Debug)]
pub struct ExportReport {
    pub model: PathBuf,
    pub adapters: usize,
    pub heads: usize,
    /// What could not be checked (printed by the caller).
    pub warnings: Vec<String>,
}

/// Checks everything, computes both outputs in memory, then writes them (each atomically).
pub fn run(job: &ExportJob) -> Result<ExportReport> {
    for out in job.merged.iter().chain(job.peft.iter()) {
        if out.exists() && !job.force {
            return Err(ExportError::Write {
                path: out.to_path_buf(),
                msg: "it exists (pass --force to replace it)".into(),
            });
        }
    }
    let manifest = manifest::read(job.artifact)?;
    let model_path = manifest::model_path(&manifest, job.model)?;
    refuse_overlaps(job, &model_path)?;
    let model = load_source(&model_path)?;
    let mut warnings = vec![];
    let found = crate::provenance::fingerprint(&model);
    match &manifest.source_fingerprint {
        Some(f) if *f != found => {
            return Err(ExportError::ModelMismatch {
                model: model_path,
                msg: format!(
                    "its weights are not those the artifact was compiled from (compiled from: \
                     {f}; this model: {found}); a merged model, or another checkpoint of the \
                     same architecture, would have the adapters folded into the wrong weights"
                ),
            });
        }
        Some(_) => {}
        None => warnings.push(format!(
            "{} records no fingerprint of its source model (an older bidora-compile), so \
             {} is not checked to be that model: compile again to have it checked",
            manifest.path.display(),
            model_path.display()
        )),
    }
    let trained = Trained::read(job.tensors, &manifest.trainable_names())?;
    if let Some(theirs) = &trained.identity {
        let diff = crate::provenance::differences(theirs, &manifest.identity);
        if !diff.is_empty() {
            return Err(ExportError::Tensors {
                path: job.tensors.to_path_buf(),
                msg: format!(
                    "trained with an artifact of other settings ({}; the tensors' artifact vs \
                     {}): export them with the artifact they were trained with",
                    diff.join(", "),
                    job.artifact.display()
                ),
            });
        }
    }
    let resolved = resolve(&manifest, &model, &model_path, &trained)?;
    let merged = job
        .merged
        .map(|_| merge::merge(&model, &resolved))
        .transpose()?;
    let adapter = job
        .peft
        .map(|_| peft::peft_adapter(&manifest, &model, &resolved, &job.peft_options))
        .transpose()?;
    if let (Some(m), Some(path)) = (&merged, job.merged) {
        merge::write_merged(m, path)?;
    }
    if let (Some(a), Some(dir)) = (&adapter, job.peft) {
        peft::write_peft(a, dir, job.force)?;
    }
    Ok(ExportReport {
        model: model_path,
        adapters: resolved.adapters.len(),
        heads: resolved.heads.len(),
        warnings,
    })
}

/// Refuses outputs that would overwrite an input: `--merged` onto the source model (every
/// later export would then fold the adapters in twice) or the tensors, into the artifact
/// folder, and a `--peft` folder that is or holds any of them.
fn refuse_overlaps(job: &ExportJob, model: &Path) -> Result<()> {
    use crate::provenance::{refuse_overlap, resolved};
    let inputs = [
        ("source model", model),
        ("tensors file", job.tensors),
        ("artifact folder", job.artifact),
    ];
    let refuse = |flag: &str, out: &Path, msg: String| ExportError::Write {
        path: out.to_path_buf(),
        msg: format!("{flag}: {msg}"),
    };
    if let Some(m) = job.merged {
        refuse_overlap("--merged", m, &inputs).map_err(|e| refuse("--merged", m, e))?;
        if resolved(m).starts_with(resolved(job.artifact)) {
            return Err(refuse(
                "--merged",
                m,
                "it is inside the artifact folder, which bidora-compile owns: write it elsewhere"
                    .into(),
            ));
        }
    }
    if let Some(p) = job.peft {
        refuse_overlap("--peft", p, &inputs).map_err(|e| refuse("--peft", p, e))?;
        if resolved(p).starts_with(resolved(job.artifact)) {
            return Err(refuse(
                "--peft",
                p,
                "it is inside the artifact folder, which bidora-compile owns: write it elsewhere"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// What can go wrong in an export; every message names the file and the tensor or module.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {msg}")]
    Manifest { path: PathBuf, msg: String },

    #[error("{path}: {msg}")]
    Tensors { path: PathBuf, msg: String },

    #[error("{path}: no tensor '{name}' ({what}); is this file from a run of this artifact?")]
    MissingTensor {
        path: PathBuf,
        name: String,
        what: String,
    },

    #[error("{path}: tensor '{name}' has shape {found:?}, the artifact expects {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: tensor '{name}' is not in the artifact (its trainable tensors are: {known})")]
    UnknownTensor {
        path: PathBuf,
        name: String,
        known: String,
    },

    #[error("{path}: tensor '{name}' holds a non-finite value ({value}) at index {index}")]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
        value: f64,
    },

    /// The model is not the one the artifact was compiled from.
    #[error("{model}: {msg} (was the artifact compiled from this model?)")]
    ModelMismatch { model: PathBuf, msg: String },

    #[error("the manifest does not record where the source model '{name}' is; pass --model PATH")]
    NoModelPath { name: String },

    #[error("cannot load the source model {path}: {source}")]
    Model {
        path: PathBuf,
        #[source]
        source: Box<crate::Error>,
    },

    /// DoRA divides by the norm of each column of `W0 + s·A·B`.
    #[error("adapter '{module}': output feature {column} of W0 + s·A·B has norm 0, DoRA is undefined there")]
    ZeroNorm { module: String, column: usize },

    #[error("cannot write {path}: {msg}")]
    Write { path: PathBuf, msg: String },

    /// Writing the merged model failed (the message names the file).
    #[error(transparent)]
    Output(Box<crate::Error>),
}

pub type Result<T, E = ExportError> = std::result::Result<T, E>;
