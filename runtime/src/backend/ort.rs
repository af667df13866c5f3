//! ONNX Runtime through the `ort` crate, loaded at run time (`load-dynamic`).
//!
//! One library and one ONNX Runtime environment per process (the library cannot be unloaded
//! and ONNX Runtime allows one environment), shared by every [`OrtBackend`]; a session per
//! program, with all graph optimisations and the backend's intra-op thread count.
//!
//! CUDA: `Device::Cuda` registers the CUDA execution provider with `error_on_failure`, so a
//! library without it (the CPU wheel) or missing CUDA/cuDNN libraries is an error rather than
//! a silent fall back to the CPU. [`Program::run`] takes and returns host tensors (copied to
//! the device and back on each run); [`Program::run_resident`] runs through an `IoBinding`
//! whose kept outputs are allocated on the session's device and can be bound as the next
//! run's inputs, which is how the trainer's resident mode keeps trainable tensors, gradients
//! and AdamW moments on the GPU. On the CPU provider the same path runs (device = host
//! memory) and is what the tests check; none of the CUDA path has run on a GPU: the
//! project's machines have none.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue, SessionInputs};
use ort::value::{DynTensor, PrimitiveTensorElementType, Tensor, TensorElementType, TensorRef};

use super::locate::{self, Located};
use super::ort_shared::SharedWeights;
use super::{match_inputs, program_label, Backend, BackendError, BackendOptions, Device};
use super::{Arg, HostTensor, Output, Program, Resident, ResidentValue};
use bidora_compiler::legalize::Upcast;

pub struct OrtBackend {
    lib: Located,
    env: Environment,
    device: Device,
    threads: usize,
    why: Option<String>,
    /// Frozen weights in memory once for every session of this backend.
    shared: SharedWeights,
    /// Upcast copies of half programs (CPU), one folder per artifact folder.
    scratch: Mutex<HashMap<PathBuf, Scratch>>,
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
    share_cpu_arena(&env).map_err(load_err)?;
    *loaded = Some((canonical, env.clone()));
    Ok(env)
}

/// Registers one CPU arena on the environment, which every session then allocates its
/// activations from (`session.use_env_allocators`). With an arena per session each program
/// keeps the peak of its own runs for the life of the run, so a trainer holding five to seven
/// programs holds the sum of their peaks; one arena holds their maximum (0.84 B Llama,
/// BiDoRA at batch 1 x 128: 6.19 GB of peak RSS with an arena per session, 4.96 GB with one and
/// memory patterns off: BENCHMARKS.md).
fn share_cpu_arena(env: &Environment) -> Result<(), String> {
    use ort::AsPointer;
    let info = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Arena,
        MemoryType::Default,
    )
    .map_err(|e| format!("describing the shared CPU arena: {e}"))?;
    // SAFETY: both pointers are live for the call (`env` and `info` are borrowed), a null
    // arena configuration asks for ONNX Runtime's defaults, and ONNX Runtime copies what it
    // keeps; the returned status is owned and released here.
    let status = unsafe {
        (ort::api().CreateAndRegisterAllocator)(env.ptr().cast_mut(), info.ptr(), std::ptr::null())
    };
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status is an OrtStatus that this caller owns.
    let message = unsafe {
        let text = (ort::api().GetErrorMessage)(status.0);
        let m = std::ffi::CStr::from_ptr(text)
            .to_string_lossy()
            .into_owned();
        (ort::api().ReleaseStatus)(status.0);
        m
    };
    Err(format!("registering the shared CPU arena: {message}"))
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
            shared: SharedWeights::new(),
            scratch: Mutex::new(HashMap::new()),
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
            .map_err(|e| err(e.to_string()))?
            // Activations come from the environment's one arena (`share_cpu_arena`). Memory
            // patterns are off: a pattern is one contiguous block per input shape, which the
            // shared arena cannot carve from the blocks other programs freed, so every new
            // batch length grew it (quickstart on ORT: 594 MB with patterns, 394 MB without,
            // the same step time; BENCHMARKS.md).
            .with_env_allocators()
            .map_err(|e| err(e.to_string()))?
            .with_memory_pattern(false)
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
        // ONNX Runtime's CPU provider has no bf16 kernels for most ops, and runs f16 by casting
        // around each kernel it lacks, which folds an f32 copy of every weight into every
        // session (0.84 B f16 Llama, `bidora check`: 9.5 GB). So a half program on the CPU is
        // upcast once (`legalize::upcast_half`), its weights converted once and shared by
        // every session like f32 weights.
        if self.device == Device::Cpu && has_half(path).map_err(err)? {
            let (legal, up) = self.upcast_program(path).map_err(err)?;
            super::note_upcast("ONNX Runtime's CPU provider", path, up);
            for (name, value) in self.shared.for_program_as(path, true).map_err(err)? {
                b = b
                    .with_initializer(&name, value)
                    .map_err(|e| err(format!("sharing weight '{name}': {e}")))?;
            }
            b = b
                .with_config_entry("session.disable_prepacking", "1")
                .map_err(|e| err(e.to_string()))?;
            return b.commit_from_file(&legal).map_err(|e| err(e.to_string()));
        }
        // The artifact's frozen weights: one value each, shared by every session (on CUDA
        // each session still copies them to the device).
        for (name, value) in self.shared.for_program(path).map_err(err)? {
            b = b
                .with_initializer(&name, value)
                .map_err(|e| err(format!("sharing weight '{name}': {e}")))?;
        }
        // MLAS prepacking keeps a packed copy of every constant MatMul weight per session: with
        // five programs over one model that is several copies of the weights (0.84 B Llama,
        // batch 1 x 128: `bidora check` peaks at 13.0 GB with it, 7.4 GB without). Packing per
        // call instead costs no measurable time on the quickstart's MiniLM (BENCHMARKS.md).
        b = b
            .with_config_entry("session.disable_prepacking", "1")
            .map_err(|e| err(e.to_string()))?;
        b.commit_from_file(path).map_err(|e| err(e.to_string()))
    }
}

/// The folder where half programs of one artifact are upcast for the CPU provider, with
/// one f32 data file. ONNX Runtime reads external data only from the program's own folder
/// and constant-folds from the file before the shared values replace the initializers, so
/// the file holds real values: every external tensor the programs name, once, half ones
/// upcast (on disk: the model's f32 size). The sessions' unfolded weights are the shared
/// values (one copy in memory).
struct Scratch {
    dir: tempfile::TempDir,
    file: std::fs::File,
    end: u64,
    /// (location, offset, length) in the artifact → (offset, length) in `DATA`.
    placed: HashMap<(String, u64, u64), (u64, u64)>,
}

impl Scratch {
    const DATA: &'static str = "weights.f32.bin";
    const ALIGN: u64 = 1 << 16;

    fn new() -> Result<Scratch, String> {
        let dir = tempfile::Builder::new()
            .prefix("bidora-ort-upcast-")
            .tempdir()
            .map_err(|e| format!("a scratch folder for upcast programs: {e}"))?;
        let path = dir.path().join(Self::DATA);
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Scratch {
            dir,
            file,
            end: 0,
            placed: HashMap::new(),
        })
    }

    /// Points the external tensor `t` at its values in `DATA`, writing them there (upcast
    /// from `half`, the tensor's type in the artifact) the first time a program names them.
    fn place(
        &mut self,
        artifact: &Path,
        t: &mut bidora_compiler::proto::onnx::TensorProto,
        half: Option<bidora_compiler::proto::onnx::tensor_proto::DataType>,
    ) -> Result<(), String> {
        use bidora_compiler::proto::onnx::tensor_proto::DataType as D;
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        let name = t.name.clone().unwrap_or_default();
        let get = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key.as_deref() == Some(k))
                .and_then(|e| e.value.clone())
        };
        let loc =
            get("location").ok_or_else(|| format!("'{name}': external data without a location"))?;
        if loc.contains(['/', '\\']) || loc == ".." {
            return Err(format!(
                "'{name}': external data location '{loc}' is not a plain file name"
            ));
        }
        let offset: u64 = get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
        let length: u64 = get("length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("'{name}': external data without a length"))?;
        let k = (loc, offset, length);
        if !self.placed.contains_key(&k) {
            let src = artifact.join(&k.0);
            let f = std::fs::File::open(&src).map_err(|e| format!("{}: {e}", src.display()))?;
            let mut raw = vec![0u8; length as usize];
            f.read_exact_at(&mut raw, offset)
                .map_err(|e| format!("{} ('{name}'): {e}", src.display()))?;
            let widen = |f: fn([u8; 2]) -> f32| -> Vec<u8> {
                raw.chunks_exact(2)
                    .flat_map(|c| f([c[0], c[1]]).to_le_bytes())
                    .collect()
            };
            let raw = match half {
                Some(D::Float16) => widen(|b| half::f16::from_le_bytes(b).to_f32()),
                Some(D::Bfloat16) => widen(|b| half::bf16::from_le_bytes(b).to_f32()),
                _ => raw,
            };
            // ONNX Runtime maps external data only at offsets aligned to the allocation
            // granularity (64 KiB covers every platform) and otherwise reads each tensor into
            // a heap buffer per session: unaligned, the 0.84 B f16 Llama's `bidora check`
            // held a second f32 copy of the weights (7.7 GB against 4.5 GB for f32).
            let pad = (Self::ALIGN - self.end % Self::ALIGN) % Self::ALIGN;
            let data = self.dir.path().join(Self::DATA);
            self.file
                .write_all(&vec![0u8; pad as usize])
                .and_then(|_| self.file.write_all(&raw))
                .map_err(|e| format!("{}: {e}", data.display()))?;
            self.end += pad;
            self.placed.insert(k.clone(), (self.end, raw.len() as u64));
            self.end += raw.len() as u64;
        }
        let (o, l) = self.placed[&k];
        t.external_data.retain(|e| {
            !matches!(
                e.key.as_deref(),
                Some("location") | Some("offset") | Some("length")
            )
        });
        for (key, value) in [
            ("location", Self::DATA.to_string()),
            ("offset", o.to_string()),
            ("length", l.to_string()),
        ] {
            t.external_data
                .push(bidora_compiler::proto::onnx::StringStringEntryProto {
                    key: Some(key.into()),
                    value: Some(value),
                });
        }
        Ok(())
    }
}

impl OrtBackend {
    /// Writes `path` upcast to f32 into this backend's scratch folder for its artifact and
    /// returns the copy's path. External initializers stay external, retyped f32 and pointed
    /// at the scratch data file; sessions get them as shared values
    /// ([`SharedWeights::for_program_as`] with `upcast`).
    fn upcast_program(&self, path: &Path) -> Result<(PathBuf, Upcast), String> {
        use bidora_compiler::proto::onnx::tensor_proto::{DataLocation, DataType as D};
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut proto = bidora_compiler::onnx_io::decode_model_shared(bytes.into(), path)
            .map_err(|e| e.to_string())?;
        let graph = proto.graph.as_mut().ok_or("the program has no graph")?;
        let (external, inline): (Vec<_>, Vec<_>) = std::mem::take(&mut graph.initializer)
            .into_iter()
            .partition(|t| t.data_location == Some(DataLocation::External as i32));
        graph.initializer = inline;
        let ir =
            bidora_compiler::ir::convert::model_from_proto(proto).map_err(|e| e.to_string())?;
        let (ir, mut up) = bidora_compiler::legalize::upcast_half(&ir);
        let mut out = bidora_compiler::ir::convert::model_to_proto(&ir);
        let g = out.graph.as_mut().ok_or("the program has no graph")?;
        let folder = path.parent().unwrap_or(Path::new("."));
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let key = std::fs::canonicalize(folder).unwrap_or_else(|_| folder.to_path_buf());
        if !scratch.contains_key(&key) {
            scratch.insert(key.clone(), Scratch::new()?);
        }
        let sc = scratch.get_mut(&key).expect("inserted above");
        let dir = sc.dir.path().to_path_buf();
        for mut t in external {
            let was = t.data_type.and_then(|d| D::try_from(d).ok());
            let half = matches!(was, Some(D::Float16) | Some(D::Bfloat16));
            if half {
                t.data_type = Some(D::Float as i32);
                up.tensors += 1;
                up.bytes += 4 * t.dims.iter().product::<i64>().max(0) as usize;
            }
            sc.place(&key, &mut t, was.filter(|_| half))?;
            g.initializer.push(t);
        }
        let name = path
            .file_name()
            .ok_or("the program path has no file name")?;
        let legal = dir.join(name);
        std::fs::write(&legal, bidora_compiler::onnx_io::encode_model(&out))
            .map_err(|e| format!("{}: {e}", legal.display()))?;
        Ok((legal, up))
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
        let mut p = OrtProgram::new(self.session(path)?, path);
        p.device = self.device;
        Ok(Box::new(p))
    }
}

/// A program in an ONNX Runtime session.
pub struct OrtProgram {
    session: Session,
    label: String,
    input_names: Vec<String>,
    output_names: Vec<String>,
    /// Where resident values live.
    device: Device,
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
            device: Device::Cpu,
        }
    }

    fn err(&self, message: String) -> BackendError {
        BackendError::Run {
            backend: "ort",
            program: self.label.clone(),
            message,
        }
    }

    /// The memory resident values are allocated in.
    fn resident_memory(&self) -> ort::Result<MemoryInfo<'static>> {
        match self.device {
            Device::Cpu => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            ),
            Device::Cuda(id) => MemoryInfo::new(
                AllocationDevice::CUDA,
                id,
                AllocatorType::Device,
                MemoryType::Default,
            ),
        }
    }
}

/// An ONNX Runtime value kept between runs (on the session's device).
struct OrtResident(DynTensor);

impl ResidentValue for OrtResident {
    fn to_host(&self) -> Result<HostTensor, BackendError> {
        let err = |e: ort::Error| BackendError::Run {
            backend: "ort",
            program: "(resident value)".into(),
            message: format!("copying to the host: {e}"),
        };
        let copied;
        let v = if self.0.memory_info().is_cpu_accessible() {
            &self.0
        } else {
            copied = self.0.to(AllocationDevice::CPU, 0).map_err(err)?;
            &copied
        };
        host_of(v).map_err(|e| e.into_backend("(resident value)", "value"))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

enum HostError {
    Ort(ort::Error),
    Type(String),
}

impl HostError {
    /// The error for output `what` of `program`.
    fn into_backend(self, program: &str, what: &str) -> BackendError {
        match self {
            HostError::Ort(e) => BackendError::Run {
                backend: "ort",
                program: program.to_string(),
                message: format!("output '{what}': {e}"),
            },
            HostError::Type(dtype) => BackendError::UnsupportedType {
                program: program.to_string(),
                what: format!("output '{what}'"),
                dtype,
            },
        }
    }
}

/// A host copy of a CPU-accessible value.
fn host_of<T: ort::value::TensorValueTypeMarker + ?Sized>(
    v: &ort::value::Value<T>,
) -> Result<HostTensor, HostError> {
    Ok(match v.dtype().tensor_type() {
        Some(TensorElementType::Float32) => HostTensor::F32(
            v.try_extract_array::<f32>()
                .map_err(HostError::Ort)?
                .to_owned(),
        ),
        Some(TensorElementType::Float64) => HostTensor::F64(
            v.try_extract_array::<f64>()
                .map_err(HostError::Ort)?
                .to_owned(),
        ),
        Some(TensorElementType::Int64) => HostTensor::I64(
            v.try_extract_array::<i64>()
                .map_err(HostError::Ort)?
                .to_owned(),
        ),
        // Half outputs of f16/bf16 programs (logits on CUDA or ORT's CPU provider): widened,
        // exactly, so the host side stays f32.
        Some(TensorElementType::Float16) => HostTensor::F32(
            v.try_extract_array::<half::f16>()
                .map_err(HostError::Ort)?
                .mapv(f32::from),
        ),
        Some(TensorElementType::Bfloat16) => HostTensor::F32(
            v.try_extract_array::<half::bf16>()
                .map_err(HostError::Ort)?
                .mapv(f32::from),
        ),
        other => return Err(HostError::Type(format!("{other:?}"))),
    })
}

/// An owned ONNX Runtime tensor holding a copy of `t` in host memory.
fn owned_value(t: &HostTensor) -> ort::Result<DynTensor> {
    Ok(match t {
        HostTensor::F32(a) => Tensor::from_array(a.as_standard_layout().into_owned())?.upcast(),
        HostTensor::F64(a) => Tensor::from_array(a.as_standard_layout().into_owned())?.upcast(),
        HostTensor::I64(a) => Tensor::from_array(a.as_standard_layout().into_owned())?.upcast(),
    })
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
            let t = host_of(v).map_err(|e| e.into_backend(label, name))?;
            result.push(t);
        }
        Ok(result)
    }

    fn run_resident(
        &mut self,
        inputs: &[(String, Arg<'_>)],
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Output>, BackendError> {
        let order = match_inputs(&self.label, &self.input_names, inputs, false)?;
        let memory = self
            .resident_memory()
            .map_err(|e| self.err(format!("device memory: {e}")))?;
        let host_memory = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(|e| self.err(format!("host memory: {e}")))?;
        let mut binding = self
            .session
            .create_binding()
            .map_err(|e| self.err(format!("binding: {e}")))?;
        for (name, &i) in self.input_names.iter().zip(&order) {
            let bound = match inputs[i].1 {
                Arg::Host(t) => owned_value(t).and_then(|v| binding.bind_input(name, &v)),
                Arg::Resident(r) => match r.downcast_ref::<OrtResident>() {
                    Some(v) => binding.bind_input(name, &v.0),
                    None => {
                        return Err(self.err(format!(
                            "input '{name}': a resident value of another backend"
                        )))
                    }
                },
            };
            bound.map_err(|e| self.err(format!("input '{name}': {e}")))?;
        }
        for (i, name) in self.output_names.iter().enumerate() {
            let mem = if keep(i) { &memory } else { &host_memory };
            binding
                .bind_output_to_device(name, mem)
                .map_err(|e| self.err(format!("output '{name}': {e}")))?;
        }
        let label = self.label.clone();
        let run_err = |message: String| BackendError::Run {
            backend: "ort",
            program: label.clone(),
            message,
        };
        let mut outs = self
            .session
            .run_binding(&binding)
            .map_err(|e| run_err(e.to_string()))?;
        let mut result = Vec::with_capacity(self.output_names.len());
        for (i, name) in self.output_names.iter().enumerate() {
            let v = outs
                .remove(name.as_str())
                .ok_or_else(|| run_err(format!("output '{name}' is missing")))?;
            let t: DynTensor = v
                .downcast()
                .map_err(|e| run_err(format!("output '{name}' is not a tensor: {e}")))?;
            result.push(if keep(i) {
                Output::Resident(Resident::new(OrtResident(t)))
            } else {
                Output::Host(host_of(&t).map_err(|e| e.into_backend(&label, name))?)
            });
        }
        Ok(result)
    }

    fn upload(&self, t: &HostTensor) -> Result<Resident, BackendError> {
        let v = owned_value(t).map_err(|e| self.err(format!("upload: {e}")))?;
        let v = match self.device {
            Device::Cpu => v,
            Device::Cuda(id) => v
                .to(AllocationDevice::CUDA, id)
                .map_err(|e| self.err(format!("upload to {}: {e}", self.device)))?,
        };
        Ok(Resident::new(OrtResident(v)))
    }
}

/// Whether the program at `path` holds or declares any f16 or bf16 value (read from the
/// program file alone: weights are external, their types are in it).
fn has_half(path: &Path) -> Result<bool, String> {
    use bidora_compiler::proto::onnx::tensor_proto::DataType as D;
    use bidora_compiler::proto::onnx::{type_proto, TypeProto};
    let half = |t: i32| t == D::Float16 as i32 || t == D::Bfloat16 as i32;
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let model = bidora_compiler::onnx_io::decode_model_shared(bytes.into(), path)
        .map_err(|e| e.to_string())?;
    let Some(g) = model.graph else {
        return Ok(false);
    };
    let declared = |t: &Option<TypeProto>| {
        matches!(
            t.as_ref().and_then(|t| t.value.as_ref()),
            Some(type_proto::Value::TensorType(tt)) if tt.elem_type.is_some_and(half)
        )
    };
    Ok(g.initializer.iter().any(|t| t.data_type.is_some_and(half))
        || g.input
            .iter()
            .chain(&g.output)
            .chain(&g.value_info)
            .any(|v| declared(&v.r#type))
        || g.node.iter().any(|n| {
            n.attribute
                .iter()
                .any(|a| a.name.as_deref() == Some("to") && a.i.is_some_and(|i| half(i as i32)))
        }))
}
