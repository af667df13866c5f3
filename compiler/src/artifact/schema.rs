//! The artifact's `manifest.json`: its one typed definition. The compiler writes it
//! ([`super::write`]), and the runtime (`bidora train`, `check`, `sweep`), `bidora export` and
//! `bidora analyze` read it back through [`Manifest::read`], so a format change is made here
//! once and a misspelt key or role does not compile.
//!
//! Versioning: [`FORMAT_VERSION`] is raised whenever a reader of the previous version would
//! misread a new manifest (a field whose meaning changes, a new role a runtime must bind).
//! Fields added with a default that old readers may ignore do not raise it. A reader refuses
//! a newer version with a message saying which, rather than guessing.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::bilevel::{Groups, Hypergrad};
use crate::heads::Head;
use crate::provenance::Fingerprint;
use crate::regularizer::RegVariant;
use crate::rewrite::{AdapterConfig, AdapterRecord, Method};

/// The manifest's `format` value.
pub const FORMAT: &str = "bidora-artifact";
/// The newest manifest version this build writes and reads.
/// v2: the upper program's two phases for data-parallel runs (`upper_val`, `upper_mixed`)
/// and their roles (`val_gradient`, `mixed_term`).
pub const FORMAT_VERSION: u32 = 2;

pub const MANIFEST: &str = "manifest.json";
/// The external data file every program's tensors of 1 KiB or more live in, each stored once
/// however many programs use it (ONNX external data: location, offset, length).
pub const WEIGHTS: &str = "weights.bin";
/// The trainable tensors' initial values (f32 safetensors, [`crate::tensor_file`]).
pub const INIT: &str = "init.safetensors";

/// The programs an artifact may hold, in the order they are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgramKey {
    /// Adapted model: data in, logits out (no loss).
    Forward,
    /// Single-level training step: loss and the gradient of every trainable tensor.
    TrainStep,
    /// Loss and logits for scoring, no gradients.
    Eval,
    /// BiDoRA's lower level: loss + regulariser, gradients of A, B (and the head).
    Lower,
    /// BiDoRA's upper level: the magnitudes' hypergradient.
    Upper,
    /// The upper level's first phase for data-parallel runs: `h`, `v` and the validation
    /// loss at the virtual step (`crate::bilevel::upper_phases`).
    UpperVal,
    /// The upper level's second phase: the mixed term `H·v` at the global `v` (absent in
    /// `first-order`).
    UpperMixed,
}

impl ProgramKey {
    pub const ALL: [ProgramKey; 7] = [
        ProgramKey::Forward,
        ProgramKey::TrainStep,
        ProgramKey::Eval,
        ProgramKey::Lower,
        ProgramKey::Upper,
        ProgramKey::UpperVal,
        ProgramKey::UpperMixed,
    ];

    /// The manifest's key (`train_step`).
    pub fn name(self) -> &'static str {
        match self {
            ProgramKey::Forward => "forward",
            ProgramKey::TrainStep => "train_step",
            ProgramKey::Eval => "eval",
            ProgramKey::Lower => "lower",
            ProgramKey::Upper => "upper",
            ProgramKey::UpperVal => "upper_val",
            ProgramKey::UpperMixed => "upper_mixed",
        }
    }

    /// The ONNX file the compiler writes it to.
    pub fn file(self) -> &'static str {
        match self {
            ProgramKey::Forward => "forward.onnx",
            ProgramKey::TrainStep => "train_step.onnx",
            ProgramKey::Eval => "eval.onnx",
            ProgramKey::Lower => "lower.onnx",
            ProgramKey::Upper => "upper.onnx",
            ProgramKey::UpperVal => "upper_val.onnx",
            ProgramKey::UpperMixed => "upper_mixed.onnx",
        }
    }
}

impl std::fmt::Display for ProgramKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a program input or output is for, so runtimes can bind it without guessing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A model input supplied per batch (token ids, masks).
    Data,
    /// A low-rank factor (A or B): the lower level's variables.
    Adapter,
    /// A DoRA magnitude vector: the upper level's variables.
    Magnitude,
    /// A classifier-head weight or bias trained with the adapters (`--train-head`).
    Head,
    /// A model output (logits).
    Output,
    /// Labels read by the loss head.
    Label,
    /// The scalar loss.
    Loss,
    /// The gradient of the loss w.r.t. the trainable tensor named in `of`.
    Gradient,
    /// The hypergradient of the magnitude named in `of` (upper program).
    Hypergradient,
    /// The regulariser's value R(V) (lower program).
    Regularizer,
    /// A scalar knob fed per run (see [`Hyperparameter`]; defaults in the manifest).
    Hyperparameter,
    /// The gradient of the validation loss at the virtual step w.r.t. the tensor named in
    /// `of` (`upper_val`'s outputs: `h` for a magnitude, `v` for an adapter or head tensor;
    /// `upper_mixed` reads `v` back under the same name).
    ValGradient,
    /// The mixed term `H·v` of the magnitude named in `of` (`upper_mixed`); its
    /// hypergradient is `h − ξ·H·v`.
    MixedTerm,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Data => "data",
            Role::Adapter => "adapter",
            Role::Magnitude => "magnitude",
            Role::Head => "head",
            Role::Output => "output",
            Role::Label => "label",
            Role::Loss => "loss",
            Role::Gradient => "gradient",
            Role::Hypergradient => "hypergradient",
            Role::Regularizer => "regularizer",
            Role::Hyperparameter => "hyperparameter",
            Role::ValGradient => "val_gradient",
            Role::MixedTerm => "mixed_term",
        }
    }
}

/// The scalar inputs with [`Role::Hyperparameter`], by their program input names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hyperparameter {
    /// γ, the orthogonality regulariser's weight (lower program).
    Gamma,
    /// ξ, the virtual step's learning rate (upper program).
    Xi,
    /// α of the finite-difference estimator's ε = α/‖v‖ (upper program).
    AlphaFd,
}

impl Hyperparameter {
    pub const ALL: [Hyperparameter; 3] = [
        Hyperparameter::Gamma,
        Hyperparameter::Xi,
        Hyperparameter::AlphaFd,
    ];

    /// The program input's name.
    pub fn input_name(self) -> &'static str {
        match self {
            Hyperparameter::Gamma => crate::bilevel::GAMMA,
            Hyperparameter::Xi => crate::bilevel::XI,
            Hyperparameter::AlphaFd => crate::bilevel::ALPHA_FD,
        }
    }

    pub fn from_input_name(name: &str) -> Option<Hyperparameter> {
        Self::ALL.into_iter().find(|h| h.input_name() == name)
    }
}

/// One dimension of a signature: a size, a symbol (`batch`, `seq`) or unknown (`null`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SigDim {
    Known(i64),
    Sym(String),
    Unknown,
}

impl SigDim {
    /// The size, when known.
    pub fn known(&self) -> Option<i64> {
        match self {
            SigDim::Known(v) => Some(*v),
            _ => None,
        }
    }
}

impl std::fmt::Display for SigDim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SigDim::Known(v) => write!(f, "{v}"),
            SigDim::Sym(s) => f.write_str(s),
            SigDim::Unknown => f.write_str("?"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorSig {
    pub name: String,
    /// The element type's short name (`f32`, `i64`; `crate::ir::DataType::short_name`).
    pub dtype: String,
    /// `None` when the rank is unknown.
    pub shape: Option<Vec<SigDim>>,
    pub role: Role,
    /// For a gradient or hypergradient: the trainable tensor it belongs to; for a batch input
    /// of the upper program: the model input it feeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgramSig {
    pub file: String,
    pub inputs: Vec<TensorSig>,
    pub outputs: Vec<TensorSig>,
}

impl ProgramSig {
    /// The outputs with `role`, in order.
    pub fn outputs_with(&self, role: Role) -> impl Iterator<Item = &TensorSig> {
        self.outputs.iter().filter(move |o| o.role == role)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] of the compiler that wrote it.
    pub format_version: u32,
    pub compiler_version: String,
    /// The input model's file name (no directories: artifacts move between machines).
    pub source_model: String,
    /// Where the input model was when the artifact was compiled (absolute), for `bidora
    /// export` on the same machine; elsewhere it passes `--model`.
    #[serde(default)]
    pub source_model_path: Option<String>,
    #[serde(default)]
    pub opset: i64,
    /// Rows of the token embedding that `input_ids` index (see [`super::vocab_size`]), so the
    /// runtime can refuse token ids from a tokenizer that does not belong to the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<i64>,
    pub config: AdapterConfig,
    /// Classifier-head tensors made trainable (`--train-head`), with the adapters in
    /// `init.safetensors`.
    #[serde(default)]
    pub head_params: Vec<String>,
    /// The loss head, when the artifact has training programs.
    #[serde(default)]
    pub task: Option<Head>,
    #[serde(default)]
    pub adapters: Vec<AdapterRecord>,
    /// BiDoRA's levels, when the lower and upper programs were emitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bilevel: Option<BilevelManifest>,
    pub programs: IndexMap<ProgramKey, ProgramSig>,
    /// The source model's weights when compiled (`crate::provenance`), which `bidora export`
    /// and `bidora train --resume` check. Absent from older compilers' manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_fingerprint: Option<Fingerprint>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BilevelManifest {
    pub hypergrad: Hypergrad,
    pub regularizer: RegVariant,
    /// Which tensors each level trains.
    pub groups: Groups,
    pub defaults: BilevelDefaults,
}

/// Defaults for the hyperparameter inputs (docs/design.md; the paper's appendix B).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BilevelDefaults {
    pub gamma: f64,
    pub alpha_fd: f64,
    /// ξ is the lower level's learning rate unless set.
    pub xi: String,
}

/// A manifest that cannot be used, with the file it came from.
#[derive(Debug, thiserror::Error)]
#[error("{}: {msg}", path.display())]
pub struct ManifestError {
    pub path: PathBuf,
    pub msg: String,
}

/// A manifest as read from an artifact folder.
#[derive(Clone, Debug)]
pub struct ManifestFile {
    pub manifest: Manifest,
    /// `ARTIFACT/manifest.json`, for messages.
    pub path: PathBuf,
    /// What decides what trained tensors mean (`crate::provenance::identity` of the file's
    /// JSON as written, so unknown fields of a same-version writer count too).
    pub identity: serde_json::Map<String, serde_json::Value>,
}

impl std::ops::Deref for ManifestFile {
    type Target = Manifest;
    fn deref(&self) -> &Manifest {
        &self.manifest
    }
}

impl Manifest {
    /// Reads and checks `ARTIFACT/manifest.json`.
    pub fn read(artifact: &Path) -> Result<ManifestFile, ManifestError> {
        let path = artifact.join(MANIFEST);
        let err = |msg: String| ManifestError {
            path: path.clone(),
            msg,
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| err(format!("cannot read the artifact's manifest: {e}")))?;
        let manifest = Manifest::parse(&text).map_err(err)?;
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        Ok(ManifestFile {
            manifest,
            identity: crate::provenance::identity(&json),
            path,
        })
    }

    /// Parses and checks a manifest's text; the message says what is wrong and what to do.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        // The version first, so a newer manifest is reported as newer rather than as a field
        // this build does not know.
        #[derive(Deserialize)]
        struct Header {
            format: String,
            format_version: u32,
        }
        let h: Header = serde_json::from_str(text).map_err(|e| {
            format!("not a bidora manifest ({e}): compile the model with bidora-compile")
        })?;
        if h.format != FORMAT {
            return Err(format!(
                "format '{}' is not '{FORMAT}': this is not a bidora artifact",
                h.format
            ));
        }
        if h.format_version > FORMAT_VERSION {
            return Err(format!(
                "written by a newer bidora-compile (artifact format v{}; this build reads up to \
                 v{FORMAT_VERSION}): update bidora, or compile the model again with this version",
                h.format_version
            ));
        }
        if h.format_version < 1 {
            return Err(format!(
                "artifact format v{} is not one this build reads (v1 to v{FORMAT_VERSION})",
                h.format_version
            ));
        }
        let m: Manifest = serde_json::from_str(text)
            .map_err(|e| format!("not a valid v{} manifest: {e}", h.format_version))?;
        m.validate()?;
        Ok(m)
    }

    /// Cross-field rules serde cannot express.
    fn validate(&self) -> Result<(), String> {
        for a in &self.adapters {
            if (self.config.method == Method::Dora) != a.magnitude.is_some() {
                return Err(format!(
                    "adapter '{}' has {} magnitude but the method is {:?}",
                    a.module,
                    if a.magnitude.is_some() { "a" } else { "no" },
                    self.config.method
                ));
            }
            if a.block.is_some() != a.fused_weight.is_some() {
                return Err(format!(
                    "adapter '{}' adapts a block of a fused projection but does not name the \
                     fused weight (compiled by an older bidora-compile: compile it again)",
                    a.module
                ));
            }
        }
        for (key, p) in &self.programs {
            for sig in p.outputs.iter().chain(&p.inputs) {
                let needs_of = matches!(sig.role, Role::Gradient | Role::Hypergradient);
                if needs_of && sig.of.is_none() {
                    return Err(format!(
                        "program '{key}': {} '{}' does not say which tensor it belongs to \
                         (`of`)",
                        sig.role.name(),
                        sig.name
                    ));
                }
                if sig.role == Role::Hyperparameter
                    && Hyperparameter::from_input_name(&sig.name).is_none()
                {
                    return Err(format!(
                        "program '{key}': hyperparameter input '{}' is not gamma, xi or alpha_fd",
                        sig.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// The program's signature, when the artifact has it.
    pub fn program(&self, key: ProgramKey) -> Option<&ProgramSig> {
        self.programs.get(&key)
    }

    /// The source model: `override_` when given, else the path recorded at compile time.
    pub fn model_path(&self, override_: Option<&Path>) -> Option<PathBuf> {
        match (override_, &self.source_model_path) {
            (Some(p), _) => Some(p.to_path_buf()),
            (None, Some(p)) => Some(PathBuf::from(p)),
            (None, None) => None,
        }
    }

    /// Every trainable tensor of the artifact: adapters (A, B, m) then head parameters.
    pub fn trainable_names(&self) -> Vec<String> {
        let mut v = vec![];
        for a in &self.adapters {
            v.push(a.lora_a.clone());
            v.push(a.lora_b.clone());
            v.extend(a.magnitude.clone());
        }
        v.extend(self.head_params.iter().cloned());
        v
    }

    /// The default of a hyperparameter input (`None` for ξ: the lower learning rate).
    pub fn default_of(&self, h: Hyperparameter) -> Option<f64> {
        let d = &self.bilevel.as_ref()?.defaults;
        match h {
            Hyperparameter::Gamma => Some(d.gamma),
            Hyperparameter::AlphaFd => Some(d.alpha_fd),
            Hyperparameter::Xi => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(version: u32) -> String {
        format!(
            r#"{{"format": "bidora-artifact", "format_version": {version},
               "compiler_version": "0.1.0", "source_model": "m.onnx",
               "config": {{"method": "dora", "rank": 4, "alpha": 8.0, "seed": 0}},
               "programs": {{"forward": {{"file": "forward.onnx", "inputs": [
                   {{"name": "input_ids", "dtype": "i64", "shape": ["batch", "seq"],
                     "role": "data"}}],
                 "outputs": [{{"name": "logits", "dtype": "f32",
                               "shape": ["batch", 2, null], "role": "output"}}]}}}}}}"#
        )
    }

    #[test]
    fn a_manifest_round_trips_and_dims_keep_their_kind() {
        let m = match Manifest::parse(&minimal(1)) {
            Ok(m) => m,
            // The adapter config's fields are the compiler's; show what is missing.
            Err(e) => panic!("{e}"),
        };
        let out = &m.programs[&ProgramKey::Forward].outputs[0];
        assert_eq!(
            out.shape.as_deref().unwrap(),
            [
                SigDim::Sym("batch".into()),
                SigDim::Known(2),
                SigDim::Unknown
            ]
        );
        let again = Manifest::parse(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn a_newer_format_is_refused_with_what_to_do() {
        let e = Manifest::parse(&minimal(FORMAT_VERSION + 1)).unwrap_err();
        assert!(
            e.contains("newer bidora-compile") && e.contains("update bidora"),
            "{e}"
        );
        let e = Manifest::parse(&minimal(0)).unwrap_err();
        assert!(e.contains("v0"), "{e}");
        let e = Manifest::parse(&minimal(1).replace("\"data\"", "\"dta\"")).unwrap_err();
        assert!(e.contains("unknown variant `dta`"), "{e}");
        let e = Manifest::parse(&minimal(1).replace("\"forward\":", "\"forwrd\":")).unwrap_err();
        assert!(e.contains("forwrd"), "{e}");
    }
}
