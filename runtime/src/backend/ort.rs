//! ONNX Runtime through the `ort` crate, loaded at run time (`load-dynamic`).
//!
//! One library and one ONNX Runtime environment per process (the library cannot be unloaded
//! and ONNX Runtime allows one environment), shared by every [`OrtBackend`]; a session per
//! program, with all graph optimisations and the backend's intra-op thread count.
//!
//! CUDA: `Device::Cuda` registers the CUDA execution provider with `error_on_failure`, so a
//! library without it (the CPU wheel) or missing CUDA/cuDNN libraries is an error rather than
//! a silent fall back to the CPU. Values still travel through host memory on every run:
//! inputs are copied to the device and outputs back. Keeping the trainable tensors and the
//! optimiser state on the device between runs (an `IoBinding` with device-allocated outputs
//! fed back as the next step's inputs) is not implemented yet, and none of the CUDA path has
//! run on a GPU: the project's machines have none.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue, SessionInputs};
use ort::value::{PrimitiveTensorElementType, Tensor, TensorElementType, TensorRef};

use super::locate::{self, Located};
use super::{match_inputs, program_label, Backend, BackendError, BackendOptions, Device};
use super::{HostTensor, Program};

pub struct OrtBackend {
    lib: Located,
    env: Environment,
    device: Device,
    threads: usize,
    why: Option<String>,
}

/// The process's library (canonical path) and environment, once loaded.
static LOADED: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

fn environment(lib: &Located) -> Result<Environment, BackendError> {
    let canonical = std::fs::canonicalize(&lib.path).unwrap_or_else(|_| lib.path.clone());
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((path, env)) = loaded.as_ref() {
        if *path != canonical {
            return Err(BackendError::OrtConflict {
                loaded: path.clone(),
                requested: lib.path.clone(),
            });
        }
        return Ok(env.clone());
    }
    let load_err = |message: String| BackendError::OrtLoad {
        path: lib.path.clone(),
        message,
    };
    let env = ort::init_from(&lib.path)
        .map_err(|e| load_err(e.to_string()))?
        .with_name("bidora")
        .with_telemetry(false)
        .build()
        .map_err(|e| load_err(e.to_string()))?;
    *loaded = Some((canonical, env.clone()));
    Ok(env)
}

impl OrtBackend {
    /// Finds and loads the library ([`locate::find_ort`]) and checks the device's execution
    /// provider is in it. `why` is appended to the description (how `auto` chose ort).
    pub fn new(opts: &BackendOptions, why: Option<String>) -> Result<OrtBackend, BackendError> {
        let lib = locate::find_ort(opts.ort_lib.as_deref())?;
        let env = environment(&lib)?;
        if let Device::Cuda(_) = opts.device {
            let available =
                ep::CUDA::is_available().map_err(|e| BackendError::DeviceUnavailable {
                    device: opts.device,
                    reason: e.to_string(),
                })?;
            if !available {
                return Err(BackendError::DeviceUnavailable {
                    device: opts.device,
                    reason: format!(
                        "the ONNX Runtime library `{}` has no CUDA execution provider (the CPU \
                         `onnxruntime` wheel?); install `onnxruntime-gpu` and the NVIDIA CUDA \
                         library wheels (README, \"GPU servers\")",
                        lib.path.display()
                    ),
                });
            }
        }
        Ok(OrtBackend {
            lib,
            env,
            device: opts.device,
            threads: opts.thread_count(),
            why,
        })
    }

    /// The library in use.
    pub fn library(&self) -> &Path {
        &self.lib.path
    }

    /// A session for `path` with this backend's settings.
    pub fn session(&self, path: &Path) -> Result<Session, BackendError> {
        let err = |message: String| BackendError::Load {
            backend: "ort",
            path: path.to_path_buf(),
            message,
        };
        // ort's builder errors carry the builder back for recovery; only the message matters.
        let mut b = Session::builder(&self.env)
            .map_err(|e| err(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| err(e.to_string()))?
            .with_intra_threads(self.threads)
            .map_err(|e| err(e.to_string()))?;
        if let Device::Cuda(id) = self.device {
            let cuda = ep::CUDA::default()
                .with_device_id(id)
                .build()
                .error_on_failure();
            b = b.with_execution_providers([cuda]).map_err(|e| {
                BackendError::DeviceUnavailable {
                    device: self.device,
                    reason: format!("the CUDA execution provider did not register: {e}"),
                }
            })?;
        }
        b.commit_from_file(path).map_err(|e| err(e.to_string()))
    }
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        "ort"
    }

    fn description(&self) -> String {
        let mut s = format!(
            "ort (ONNX Runtime `{}`, found via {}; device {}, {} thread(s))",
            self.lib.path.display(),
            self.lib.via,
            self.device,
            self.threads
        );
        if let Some(why) = &self.why {
            s.push_str(&format!(" [{why}]"));
        }
        s
    }

    fn load(&self, path: &Path) -> Result<Box<dyn Program>, BackendError> {
        Ok(Box::new(OrtProgram::new(self.session(path)?, path)))
    }
}

/// A program in an ONNX Runtime session.
pub struct OrtProgram {
    session: Session,
    label: String,
    input_names: Vec<String>,
    output_names: Vec<String>,
}

impl OrtProgram {
    /// Wraps a session. Its inputs are the graph inputs that are not initializers; an
    /// initializer also listed as an input (overridable) stays a constant, as in tract.
    pub fn new(session: Session, path: &Path) -> OrtProgram {
        let input_names = session
            .inputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let output_names = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        OrtProgram {
            session,
            label: program_label(path),
            input_names,
            output_names,
        }
    }
}

/// A view of `a` when its memory is in standard order (no copy), a standard-order copy
/// otherwise (ONNX Runtime reads dense row-major buffers).
fn input_value<T>(a: &ndarray::ArrayD<T>) -> ort::Result<SessionInputValue<'_>>
where
    T: PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
{
    if a.is_standard_layout() {
        Ok(TensorRef::from_array_view(a.view())?.into())
    } else {
        Ok(Tensor::from_array(a.as_standard_layout().into_owned())?.into())
    }
}

impl Program for OrtProgram {
    fn input_names(&self) -> &[String] {
        &self.input_names
    }

    fn output_names(&self) -> &[String] {
        &self.output_names
    }

    fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<HostTensor>, BackendError> {
        let order = match_inputs(&self.label, &self.input_names, inputs, false)?;
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(order.len());
        for (name, &i) in self.input_names.iter().zip(&order) {
            let v = match &inputs[i].1 {
                HostTensor::F32(a) => input_value(a),
                HostTensor::F64(a) => input_value(a),
                HostTensor::I64(a) => input_value(a),
            }
            .map_err(|e| BackendError::Run {
                backend: "ort",
                program: self.label.clone(),
                message: format!("input '{name}': {e}"),
            })?;
            values.push((Cow::Borrowed(name.as_str()), v));
        }
        let label = &self.label;
        let run_err = |message: String| BackendError::Run {
            backend: "ort",
            program: label.clone(),
            message,
        };
        let outs = self
            .session
            .run(SessionInputs::<'_, '_, 0>::ValueMap(values))
            .map_err(|e| run_err(e.to_string()))?;
        let mut result = Vec::with_capacity(self.output_names.len());
        for name in &self.output_names {
            let v = outs
                .get(name)
                .ok_or_else(|| run_err(format!("output '{name}' is missing")))?;
            let conv = |e: ort::Error| run_err(format!("output '{name}': {e}"));
            let t = match v.dtype().tensor_type() {
                Some(TensorElementType::Float32) => {
                    HostTensor::F32(v.try_extract_array::<f32>().map_err(conv)?.to_owned())
                }
                Some(TensorElementType::Float64) => {
                    HostTensor::F64(v.try_extract_array::<f64>().map_err(conv)?.to_owned())
                }
                Some(TensorElementType::Int64) => {
                    HostTensor::I64(v.try_extract_array::<i64>().map_err(conv)?.to_owned())
                }
                other => {
                    return Err(BackendError::UnsupportedType {
                        program: label.clone(),
                        what: format!("output '{name}'"),
                        dtype: format!("{other:?}"),
                    })
                }
            };
            result.push(t);
        }
        Ok(result)
    }
}
