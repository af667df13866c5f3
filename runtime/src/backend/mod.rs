//! Executing ONNX programs: one small trait, two engines.
//!
//! - [`tract`]: pure Rust, embedded, CPU only; the default, needs nothing installed.
//! - [`ort`]: ONNX Runtime through the `ort` crate with `load-dynamic`: the shared library is
//!   found on the machine at run time ([`locate`]), CPU or CUDA execution provider.
//!
//! A caller picks an engine once with [`select`], loads each program file with
//! [`Backend::load`] and runs it step by step with [`Program::run`]; values go in and come out
//! as [`HostTensor`]s named by graph input / in graph output order. Both engines accept any
//! input shape: tract optimises and caches one plan per shape signature, ONNX Runtime handles
//! dynamic shapes itself.
//!
//! ```no_run
//! use bidora_runtime::backend::{select, BackendKind, BackendOptions};
//! # fn main() -> Result<(), bidora_runtime::backend::BackendError> {
//! let backend = select(BackendKind::Auto, &BackendOptions::default())?;
//! println!("backend: {}", backend.description());
//! let mut step = backend.load(std::path::Path::new("artifact/train_step.onnx"))?;
//! # let inputs = vec![];
//! let outputs = step.run(&inputs)?; // in step.output_names() order
//! # Ok(()) }
//! ```

pub mod locate;
pub mod ort;
mod ort_shared;
pub mod tract;
pub mod tract_consts;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A tensor in host memory, passed to or returned from a program.
#[derive(Clone, Debug, PartialEq)]
pub enum HostTensor {
    F32(ndarray::ArrayD<f32>),
    F64(ndarray::ArrayD<f64>),
    I64(ndarray::ArrayD<i64>),
}

impl HostTensor {
    pub fn as_f32(&self) -> Option<&ndarray::ArrayD<f32>> {
        match self {
            HostTensor::F32(a) => Some(a),
            _ => None,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32(a) => a.shape(),
            HostTensor::F64(a) => a.shape(),
            HostTensor::I64(a) => a.shape(),
        }
    }

    /// `f32`, `f64` or `i64`, as the manifest spells element types.
    pub fn dtype(&self) -> &'static str {
        match self {
            HostTensor::F32(_) => "f32",
            HostTensor::F64(_) => "f64",
            HostTensor::I64(_) => "i64",
        }
    }
}

/// A tensor kept in a backend's own memory between runs: with ONNX Runtime an `OrtValue` on
/// the session's device (GPU memory under CUDA), so trainable tensors, gradients and optimiser
/// moments go from one program to the next without crossing to the host. tract has no device:
/// its resident values are host tensors.
pub struct Resident(Box<dyn ResidentValue>);

/// What a backend keeps behind a [`Resident`].
pub trait ResidentValue: Send {
    /// A host copy (device → host for a GPU value).
    fn to_host(&self) -> Result<HostTensor, BackendError>;
    fn as_any(&self) -> &dyn std::any::Any;
}

impl ResidentValue for HostTensor {
    fn to_host(&self) -> Result<HostTensor, BackendError> {
        Ok(self.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Resident {
    pub fn new(v: impl ResidentValue + 'static) -> Resident {
        Resident(Box::new(v))
    }
    pub fn to_host(&self) -> Result<HostTensor, BackendError> {
        self.0.to_host()
    }
    /// The backend's own value (for the backend that made it).
    pub fn downcast_ref<T: 'static>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref()
    }
}

impl fmt::Debug for Resident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resident(..)")
    }
}

/// A program input for [`Program::run_resident`]: host memory or resident.
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a> {
    Host(&'a HostTensor),
    Resident(&'a Resident),
}

/// A program output of [`Program::run_resident`].
#[derive(Debug)]
pub enum Output {
    Host(HostTensor),
    Resident(Resident),
}

impl Output {
    /// The host tensor of an output that was not kept resident.
    pub fn host(&self) -> Option<&HostTensor> {
        match self {
            Output::Host(t) => Some(t),
            Output::Resident(_) => None,
        }
    }
}

/// An execution engine. Object-safe, so callers hold a `Box<dyn Backend>` chosen at run time.
pub trait Backend: Send + Sync {
    /// `tract` or `ort`.
    fn name(&self) -> &'static str;
    /// What runs and where, for people: engine, library path, device, threads, and for `auto`
    /// why this engine was taken.
    fn description(&self) -> String;
    /// Reads an ONNX program file (external data beside it) and prepares it to run.
    fn load(&self, path: &Path) -> Result<Box<dyn Program>, BackendError>;
}

/// One loaded program.
pub trait Program: Send {
    /// The graph inputs that [`Program::run`] needs, in graph order.
    fn input_names(&self) -> &[String];
    /// The graph outputs, in the order [`Program::run`] returns them.
    fn output_names(&self) -> &[String];
    /// Runs once. Every graph input must be given by name (any order); a name the graph does
    /// not have is an error, so a misspelt input is not silently ignored.
    fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<HostTensor>, BackendError>;

    /// Runs once with inputs in host memory or resident, keeping output `i` resident where
    /// `keep(i)` (`i` in [`Program::output_names`]' order; the others come back to the host). The default, for backends without a
    /// device, moves everything through [`Program::run`].
    fn run_resident(
        &mut self,
        inputs: &[(String, Arg<'_>)],
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Output>, BackendError> {
        let host = inputs
            .iter()
            .map(|(n, a)| {
                Ok((
                    n.clone(),
                    match a {
                        Arg::Host(t) => (*t).clone(),
                        Arg::Resident(r) => r.to_host()?,
                    },
                ))
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        let outs = self.run(&host)?;
        Ok(outs
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if keep(i) {
                    Output::Resident(Resident::new(t))
                } else {
                    Output::Host(t)
                }
            })
            .collect())
    }

    /// A resident copy of `t` where this program runs (host → device under CUDA).
    fn upload(&self, t: &HostTensor) -> Result<Resident, BackendError> {
        Ok(Resident::new(t.clone()))
    }
}

/// `--backend`: which engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// ort when an ONNX Runtime library is found, tract otherwise.
    Auto,
    /// The embedded engine: needs nothing installed.
    #[default]
    Tract,
    Ort,
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "tract" => Ok(BackendKind::Tract),
            "ort" => Ok(BackendKind::Ort),
            other => Err(format!(
                "unknown backend `{other}` (expected auto, tract or ort)"
            )),
        }
    }
}

/// `--device`: where ONNX Runtime runs the programs. tract runs on the CPU only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA execution provider on the GPU with this index.
    Cuda(i32),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown device `{s}` (expected cpu, cuda or cuda:N)");
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .ok()
                    .filter(|&n| n >= 0)
                    .map(Device::Cuda)
                    .ok_or_else(bad),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Settings for [`select`]; the defaults are what `bidora` uses without flags.
#[derive(Clone, Debug, Default)]
pub struct BackendOptions {
    /// Threads per program run; 0 = every core the process may use.
    pub threads: usize,
    pub device: Device,
    /// The ONNX Runtime library to load (`--ort-lib`); otherwise [`locate::find_ort`] searches.
    pub ort_lib: Option<PathBuf>,
}

impl BackendOptions {
    pub(crate) fn thread_count(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Why a backend could not be chosen, a program not loaded, or a run not done.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no ONNX Runtime library found; tried: {}", tried.join("; "))]
    OrtNotFound { tried: Vec<String> },

    #[error("cannot load ONNX Runtime from `{}`: {message}", path.display())]
    OrtLoad { path: PathBuf, message: String },

    /// A process can hold one ONNX Runtime library; a second, different path is refused.
    #[error(
        "ONNX Runtime is already loaded from `{}` in this process; cannot also load `{}`",
        loaded.display(),
        requested.display()
    )]
    OrtConflict { loaded: PathBuf, requested: PathBuf },

    #[error("device {device} is unavailable: {reason}")]
    DeviceUnavailable { device: Device, reason: String },

    #[error("{backend} cannot load `{}`: {message}", path.display())]
    Load {
        backend: &'static str,
        path: PathBuf,
        message: String,
    },

    #[error("{program}: no value given for input(s) {}", names.join(", "))]
    MissingInputs { program: String, names: Vec<String> },

    #[error(
        "{program}: value(s) given for {}, which the program has no input of (its inputs: {})",
        names.join(", "),
        expected.join(", ")
    )]
    UnknownInputs {
        program: String,
        names: Vec<String>,
        expected: Vec<String>,
    },

    #[error("{program}: {what} has unsupported element type {dtype}")]
    UnsupportedType {
        program: String,
        what: String,
        dtype: String,
    },

    #[error("{backend} run of {program} failed: {message}")]
    Run {
        backend: &'static str,
        program: String,
        message: String,
    },
}

/// Checks `inputs` against a program's input names; returns, for each input in graph order,
/// the index of its value in `inputs`. With `allow_extra`, values for other names are skipped
/// rather than refused.
pub(crate) fn match_inputs<V>(
    program: &str,
    expected: &[String],
    inputs: &[(String, V)],
    allow_extra: bool,
) -> Result<Vec<usize>, BackendError> {
    let unknown: Vec<String> = inputs
        .iter()
        .filter(|(n, _)| !expected.contains(n))
        .map(|(n, _)| n.clone())
        .collect();
    if !unknown.is_empty() && !allow_extra {
        return Err(BackendError::UnknownInputs {
            program: program.to_string(),
            names: unknown,
            expected: expected.to_vec(),
        });
    }
    let mut order = Vec::with_capacity(expected.len());
    let mut missing = vec![];
    for name in expected {
        match inputs.iter().position(|(n, _)| n == name) {
            Some(i) => order.push(i),
            None => missing.push(name.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(BackendError::MissingInputs {
            program: program.to_string(),
            names: missing,
        });
    }
    Ok(order)
}

/// Chooses and initialises an engine. `Auto` takes ort when [`locate::find_ort`] finds a
/// library that loads, and tract otherwise (CPU only); [`Backend::description`] says which
/// and why. An explicit `Ort` or a CUDA device never falls back: a missing library or
/// provider is an error.
pub fn select(kind: BackendKind, opts: &BackendOptions) -> Result<Box<dyn Backend>, BackendError> {
    match kind {
        BackendKind::Tract => Ok(Box::new(tract::TractBackend::new(opts, None)?)),
        BackendKind::Ort => Ok(Box::new(ort::OrtBackend::new(opts, None)?)),
        BackendKind::Auto => {
            if opts.ort_lib.is_some() || opts.device != Device::Cpu {
                return Ok(Box::new(ort::OrtBackend::new(
                    opts,
                    Some("auto: ort was asked for by --ort-lib / the device".into()),
                )?));
            }
            match ort::OrtBackend::new(opts, Some("auto: an ONNX Runtime library was found".into()))
            {
                Ok(b) => Ok(Box::new(b)),
                Err(e) => Ok(Box::new(tract::TractBackend::new(
                    opts,
                    Some(format!("auto: ort unavailable ({e})")),
                )?)),
            }
        }
    }
}

/// A short label for a program in messages: its file name.
pub(crate) fn program_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string())
}

/// Says once per process that a backend runs half-precision programs in f32 (it has no half
/// kernels): users reading memory figures should know the weights doubled in size.
pub(crate) fn note_upcast(backend: &str, path: &Path, up: bidora_compiler::legalize::Upcast) {
    static SAID: std::sync::Once = std::sync::Once::new();
    if up.tensors == 0 {
        return;
    }
    SAID.call_once(|| {
        eprintln!(
            "note: {backend} has no f16/bf16 kernels here: half-precision tensors are upcast to \
             f32 once at load ({}: {} tensors, {:.1} MB as f32; the other programs alike)",
            path.display(),
            up.tensors,
            up.bytes as f64 / 1e6
        );
    });
}
