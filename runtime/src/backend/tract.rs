//! tract, the embedded CPU engine.
//!
//! tract cannot always type exported graphs with several symbolic dims (MiniLM's legacy export
//! with batch and sequence both symbolic fails at a Flatten after a Cast in the mask path), so
//! every plan is optimised for concrete input shapes. A program keeps the parsed model and
//! caches one optimised plan per input-shape signature; optimising costs tens of milliseconds
//! on a MiniLM-size graph, so a few plans per program (batch × length buckets) are cheap, and
//! the cache is bounded so varying sequence lengths do not grow memory without limit.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

use super::tract_consts::ConstPool;
use super::{match_inputs, program_label, Backend, BackendError, BackendOptions, Device};
use super::{HostTensor, Program};

/// Optimised plans kept per program; the least recently used goes first. BiDoRA's upper
/// program takes a training and a validation batch whose lengths vary independently, so its
/// signatures are pairs of length buckets: 4 buckets (e.g. max_len 64 padded to multiples of
/// 16) make 16 pairs. With a cache of 4 the quickstart re-optimised the upper plan on most
/// iterations (median upper run 0.92 s, mean 1.18 s).
pub const PLAN_CACHE: usize = 16;

pub struct TractBackend {
    threads: usize,
    /// Shared by every program this backend loads: one copy of each weight, however many
    /// programs and plans use it.
    pool: ConstPool,
    executor: Executor,
    why: Option<String>,
}

impl TractBackend {
    /// `why` is appended to the description (how `auto` came to choose tract).
    pub fn new(opts: &BackendOptions, why: Option<String>) -> Result<TractBackend, BackendError> {
        if opts.device != Device::Cpu {
            return Err(BackendError::DeviceUnavailable {
                device: opts.device,
                reason:
                    "tract runs on the CPU only; use --backend ort (or auto) with onnxruntime-gpu"
                        .into(),
            });
        }
        let threads = opts.thread_count();
        Ok(TractBackend {
            threads,
            executor: executor(threads),
            pool: ConstPool::default(),
            why,
        })
    }
}

fn executor(threads: usize) -> Executor {
    if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn description(&self) -> String {
        let mut s = format!("tract 0.23 (embedded, cpu, {} thread(s))", self.threads);
        if let Some(why) = &self.why {
            s.push_str(&format!(" [{why}]"));
        }
        s
    }

    fn load(&self, path: &Path) -> Result<Box<dyn Program>, BackendError> {
        let mut p = TractProgram::open_pooled(path, self.pool.clone())?;
        p.executor = self.executor.clone();
        Ok(Box::new(p))
    }
}

/// One timed run of a plan ([`TractProgram::profile`]).
pub struct Profile {
    /// Per tract op, most expensive first.
    pub ops: Vec<OpTime>,
    /// Nodes in the optimised plan.
    pub nodes: usize,
}

pub struct OpTime {
    pub op: String,
    pub seconds: f64,
    pub nodes: usize,
}

/// Element type and shape of every input, in graph order: the key of a plan.
type Signature = Vec<(DatumType, Vec<usize>)>;

/// A program in tract: the parsed model and its optimised plans, one per input signature.
pub struct TractProgram {
    path: PathBuf,
    label: String,
    model: InferenceModel,
    input_names: Vec<String>,
    output_names: Vec<String>,
    pool: ConstPool,
    executor: Executor,
    /// Most recently used last. A mutex so that `run` can take `&self` (existing callers share
    /// programs by reference); runs of one program are serialised anyway.
    plans: Mutex<Vec<(Signature, Arc<TypedRunnableModel>)>>,
}

fn load_err(path: &Path, message: String) -> BackendError {
    BackendError::Load {
        backend: "tract",
        path: path.to_path_buf(),
        message,
    }
}

impl TractProgram {
    /// Reads the program; no plan is made until the first run (or [`TractProgram::load`]).
    /// Runs on one thread; [`TractBackend::load`] gives the backend's thread pool.
    pub fn open(path: &Path) -> Result<TractProgram, BackendError> {
        TractProgram::open_pooled(path, ConstPool::default())
    }

    /// As [`TractProgram::open`], sharing constants with the other programs of `pool`.
    pub fn open_pooled(path: &Path, pool: ConstPool) -> Result<TractProgram, BackendError> {
        crate::allocator::loading(|| TractProgram::read(path, pool))
    }

    fn read(path: &Path, pool: ConstPool) -> Result<TractProgram, BackendError> {
        // Read through the compiler's importer (path-safe external data, clear errors) and
        // legalise for tract's known gaps before handing tract the bytes.
        let ir = bidora_compiler::load_model(path).map_err(|e| load_err(path, e.to_string()))?;
        let ir = bidora_compiler::legalize::for_tract(&ir);
        let (ir, up) = bidora_compiler::legalize::upcast_half(&ir);
        super::note_upcast("tract", path, up);
        let bytes = bidora_compiler::onnx_io::encode_model(
            &bidora_compiler::ir::convert::model_to_proto(&ir),
        );
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| load_err(path, format!("{e:?}")))?;
        drop((bytes, ir));
        pool.share_inference(&mut model)
            .map_err(|e| load_err(path, format!("{e:?}")))?;
        let names = || -> TractResult<(Vec<String>, Vec<String>)> {
            let inputs = model
                .input_outlets()?
                .iter()
                .map(|o| model.node(o.node).name.clone())
                .collect();
            let outputs = model
                .output_outlets()?
                .iter()
                .map(|o| {
                    model
                        .outlet_label(*o)
                        .map(str::to_string)
                        .unwrap_or_else(|| model.node(o.node).name.clone())
                })
                .collect();
            Ok((inputs, outputs))
        };
        let (input_names, output_names) = names().map_err(|e| load_err(path, format!("{e:?}")))?;
        Ok(TractProgram {
            path: path.to_path_buf(),
            label: program_label(path),
            model,
            input_names,
            output_names,
            pool,
            executor: Executor::SingleThread,
            plans: Mutex::new(vec![]),
        })
    }

    /// Reads the program and optimises a plan for the shapes and types of `example` (every
    /// graph input named), so that type errors surface here rather than at the first run.
    pub fn load(
        path: &Path,
        example: &[(String, HostTensor)],
    ) -> Result<TractProgram, BackendError> {
        let p = TractProgram::open(path)?;
        // The example may carry values for other programs (a shared batch).
        let order = match_inputs(&p.label, &p.input_names, example, true)?;
        p.plan_for(&signature(example, &order))?;
        Ok(p)
    }

    pub fn input_names(&self) -> &[String] {
        &self.input_names
    }

    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// How many optimised plans the cache holds now.
    pub fn plans(&self) -> usize {
        self.plans.lock().map_or(0, |p| p.len())
    }

    /// Runs with inputs given by name; returns outputs in graph order. Values for names the
    /// program lacks are skipped (callers share one batch between programs);
    /// [`Program::run`] refuses them.
    pub fn run(&self, inputs: &[(String, HostTensor)]) -> Result<Vec<HostTensor>, BackendError> {
        self.run_matched(inputs, true)
    }

    /// The plan for these inputs' shapes and the inputs in its order.
    fn prepare(
        &self,
        inputs: &[(String, HostTensor)],
        allow_extra: bool,
    ) -> Result<(Arc<TypedRunnableModel>, TVec<TValue>), BackendError> {
        let order = match_inputs(&self.label, &self.input_names, inputs, allow_extra)?;
        let plan = self.plan_for(&signature(inputs, &order))?;
        let values = order
            .iter()
            .map(|&i| to_tract(&inputs[i].1).into_tvalue())
            .collect();
        Ok((plan, values))
    }

    fn run_matched(
        &self,
        inputs: &[(String, HostTensor)],
        allow_extra: bool,
    ) -> Result<Vec<HostTensor>, BackendError> {
        let (plan, values) = self.prepare(inputs, allow_extra)?;
        let outs = self
            .catching(|| multithread_tract_scope(self.executor.clone(), || plan.run(values)))?
            .map_err(|e| self.run_err(format!("{e:?}")))?;
        outs.into_iter()
            .zip(&self.output_names)
            .map(|(t, name)| {
                let t = t.into_tensor();
                let unsupported = |dt: DatumType| BackendError::UnsupportedType {
                    program: self.label.clone(),
                    what: format!("output '{name}'"),
                    dtype: format!("{dt:?}"),
                };
                let dt = t.datum_type();
                let conv = |e: TractError| self.run_err(format!("output '{name}': {e:?}"));
                Ok(match dt {
                    DatumType::F32 => HostTensor::F32(t.into_plain_array::<f32>().map_err(conv)?),
                    DatumType::F64 => HostTensor::F64(t.into_plain_array::<f64>().map_err(conv)?),
                    DatumType::I64 => HostTensor::I64(t.into_plain_array::<i64>().map_err(conv)?),
                    // Shape arithmetic may come back as tract's symbolic-dim type.
                    DatumType::TDim => HostTensor::I64(
                        t.cast_to::<i64>()
                            .map_err(conv)?
                            .into_owned()
                            .into_plain_array::<i64>()
                            .map_err(conv)?,
                    ),
                    other => return Err(unsupported(other)),
                })
            })
            .collect()
    }

    /// Runs `f`, turning a panic into this program's run error. Some kernels assert on bad
    /// data instead of returning an error (a Gather index past the table: token ids from
    /// another model's tokenizer, or positions past the model's position table), in a run or
    /// while optimising a plan, whose constant folding evaluates such Gathers too.
    fn catching<T>(&self, f: impl FnOnce() -> T) -> Result<T, BackendError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown cause".into());
            self.run_err(format!(
                "tract panicked: {why} (are the inputs valid for this model: token ids within \
                 its vocabulary, sequences within its positions?)"
            ))
        })
    }

    /// Runs once with every node timed: seconds and node count per tract op (`OptMatMul`,
    /// `Softmax`, ...), most expensive first, and the plan's node count.
    pub fn profile(&self, inputs: &[(String, HostTensor)]) -> Result<Profile, BackendError> {
        let (plan, values) = self.prepare(inputs, true)?;
        let mut per_op: std::collections::HashMap<String, (f64, usize)> = Default::default();
        let mut state = plan.spawn().map_err(|e| self.run_err(format!("{e:?}")))?;
        let run = self.catching(|| {
            multithread_tract_scope(self.executor.clone(), || {
                state.run_plan_with_eval(values, |cx, st, node, ins| {
                    let t = std::time::Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(cx, st, node, ins);
                    let e = per_op.entry(node.op().name().to_string()).or_default();
                    e.0 += t.elapsed().as_secs_f64();
                    e.1 += 1;
                    r
                })
            })
        })?;
        run.map_err(|e| self.run_err(format!("{e:?}")))?;
        let mut rows: Vec<OpTime> = per_op
            .into_iter()
            .map(|(op, (seconds, nodes))| OpTime { op, seconds, nodes })
            .collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        Ok(Profile {
            ops: rows,
            nodes: plan.model().nodes().len(),
        })
    }

    fn run_err(&self, message: String) -> BackendError {
        BackendError::Run {
            backend: "tract",
            program: self.label.clone(),
            message,
        }
    }

    /// The cached plan for `sig`, or a new one (evicting the least recently used).
    fn plan_for(&self, sig: &Signature) -> Result<Arc<TypedRunnableModel>, BackendError> {
        {
            let mut plans = self
                .plans
                .lock()
                .map_err(|_| self.run_err("poisoned".into()))?;
            if let Some(i) = plans.iter().position(|(s, _)| s == sig) {
                let hit = plans.remove(i);
                let plan = hit.1.clone();
                plans.push(hit);
                return Ok(plan);
            }
        }
        // Optimised outside the lock: a slow optimisation does not block runs of cached plans.
        let plan = self
            .catching(|| self.optimise(sig))?
            .map_err(|e| load_err(&self.path, format!("{e:?}")))?;
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| self.run_err("poisoned".into()))?;
        if plans.len() >= PLAN_CACHE {
            plans.remove(0);
        }
        plans.push((sig.clone(), plan.clone()));
        Ok(plan)
    }

    fn optimise(&self, sig: &Signature) -> TractResult<Arc<TypedRunnableModel>> {
        let mut model = self.model.clone();
        for (i, (dt, shape)) in sig.iter().enumerate() {
            model.set_input_fact(i, InferenceFact::dt_shape(*dt, shape.clone()))?;
        }
        // Exporters annotate intermediate values with symbolic shapes (`value_info`); with the
        // inputs pinned to concrete shapes those symbols no longer unify, so let tract infer
        // every non-input fact itself.
        let inputs: Vec<OutletId> = model.input_outlets()?.to_vec();
        for node in 0..model.nodes().len() {
            for slot in 0..model.node(node).outputs.len() {
                let outlet = OutletId::new(node, slot);
                if !inputs.contains(&outlet) {
                    model.set_outlet_fact(outlet, InferenceFact::default())?;
                }
            }
        }
        crate::allocator::loading(|| {
            let mut model = model.into_optimized()?;
            self.pool.share_typed(&mut model)?;
            model.into_runnable()
        })
    }
}

fn signature(inputs: &[(String, HostTensor)], order: &[usize]) -> Signature {
    order
        .iter()
        .map(|&i| {
            let t = &inputs[i].1;
            let dt = match t {
                HostTensor::F32(_) => f32::datum_type(),
                HostTensor::F64(_) => f64::datum_type(),
                HostTensor::I64(_) => i64::datum_type(),
            };
            (dt, t.shape().to_vec())
        })
        .collect()
}

fn to_tract(t: &HostTensor) -> Tensor {
    match t {
        HostTensor::F32(a) => a.clone().into_tensor(),
        HostTensor::F64(a) => a.clone().into_tensor(),
        HostTensor::I64(a) => a.clone().into_tensor(),
    }
}

impl Program for TractProgram {
    fn input_names(&self) -> &[String] {
        &self.input_names
    }

    fn output_names(&self) -> &[String] {
        &self.output_names
    }

    fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<HostTensor>, BackendError> {
        self.run_matched(inputs, false)
    }
}
