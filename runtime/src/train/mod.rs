//! The training loop: BiDoRA's schedule (search phase with lower and upper steps, then the
//! retrain phase) and the single-level baselines (DoRA, LoRA), over the artifact's programs.
//!
//! One iteration of the search phase (docs/design.md, "The two levels"):
//! 1. `unroll_steps` lower steps: `lower.onnx` on a training batch gives `g = ∇_V(L_tr + γR)`
//!    (and `∇_M L_tr`); AdamW moves V.
//! 2. Before the last lower step's update, `upper.onnx` takes that step's training batch, a
//!    validation batch and the same `g` (so the virtual step starts where the lower step
//!    does, and g is computed once), and gives the hypergradient of every magnitude; AdamW
//!    moves M.
//!
//! The retrain phase re-initialises A, B and the head (or keeps them, `retrain_from =
//! "search"`), freezes M and trains on train ∪ validation with the regulariser.
//!
//! Everything the loop does is a function of the config, the artifact and the data, so a run
//! is reproducible bit for bit on the same backend, and a resumed run (from any checkpoint)
//! equals the uninterrupted one: the checkpoint holds the tensors, both optimisers' moments,
//! the data streams' positions, the step counters and the metrics log's length.
//!
//! Data parallelism ([`Trainer::new_distributed`], `shard.rs`): every rank draws the same
//! global batches, runs the programs on its rows of them and the ranks sum their weighted
//! gradients before either optimiser steps, so every rank applies the same update to the
//! same tensors: the single process's run on the global batch, up to the order of the sums.
//! The upper level runs as its two phases (`upper_val`, reduce `h` and `v`, `upper_mixed`,
//! reduce `H·v`) because ε needs the global `v`. Every rank evaluates (so the best-tensor
//! choice is the same everywhere); only rank 0 writes the run folder.

pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod eval;
pub mod generation;
pub mod log;
pub mod plot;
pub mod resident;
pub mod resources;
pub mod schedule;
pub mod shard;
pub mod stream;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::artifact::{Artifact, Hyperparameter, ProgramKey, Role};
use crate::backend::{Arg, Backend, HostTensor, Output, Program, Resident};
use crate::distributed::{Communicator, Single};
use crate::optim::AdamW;
pub use config::{Method, RetrainFrom, TrainConfig};
use stream::{Stream, StreamState};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{origin}: {message}")]
    Config { origin: String, message: String },
    #[error("the artifact cannot run this configuration: {0}")]
    Artifact(String),
    #[error("{program}: {message}")]
    Run { program: String, message: String },
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("{0}")]
    Data(String),
    /// A collective failed, or the ranks disagree.
    #[error("distributed: {0}")]
    Distributed(String),
    /// Another process writes the run folder.
    #[error(transparent)]
    Locked(#[from] bidora_compiler::lock::LockError),
    #[error(
        "{what} became non-finite at {phase} step {step}; stopped. {}",
        match last_good {
            Some(p) => format!("The last good checkpoint is {}.", p.display()),
            None => "No checkpoint had been written yet.".to_string(),
        }
    )]
    NonFinite {
        what: String,
        phase: String,
        step: usize,
        last_good: Option<PathBuf>,
    },
}

/// The run folder's record of the artifact it trains (its identity), written at the first
/// start and checked by `--resume`.
pub const ARTIFACT_RECORD: &str = "artifact.json";

/// Refuses to resume a run with an artifact other than the one it started with: other
/// adapter settings, hypergradient mode, head or source weights would continue the run on
/// different programs from tensors that mean something else.
fn same_artifact(record: &Path, art: &Artifact) -> Result<(), TrainError> {
    let text = match std::fs::read_to_string(record) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "warning: {} is missing (a run started by an older bidora), so the artifact is \
                 not checked to be the one the run started with",
                record.display()
            );
            return Ok(());
        }
        Err(e) => {
            return Err(TrainError::Checkpoint {
                path: record.to_path_buf(),
                message: e.to_string(),
            })
        }
    };
    let started: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: record.to_path_buf(),
            message: format!("not the artifact record bidora train writes: {e}"),
        })?;
    let diff = bidora_compiler::provenance::differences(&started, &art.identity);
    if diff.is_empty() {
        return Ok(());
    }
    Err(TrainError::Checkpoint {
        path: record.to_path_buf(),
        message: format!(
            "--resume: the run started with another artifact ({}; the run's vs {}): resume \
             it with the artifact it started with",
            diff.join(", "),
            art.dir.display()
        ),
    })
}

/// A dataset the loop draws batches from: the training file, or the test file.
pub trait Examples {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Program inputs for these examples: the model's inputs (`input_ids`, ...) and `labels`,
    /// padded to the longest example of the batch.
    fn batch(&self, idx: &[usize]) -> Result<Vec<(String, HostTensor)>, TrainError>;
    /// Data-to-text sets: every prompt's human references, for scoring generations.
    fn references(&self) -> Option<&crate::data::References> {
        None
    }
    /// The class or tag names in id order, when the set knows them (read from the config or
    /// collected from the training file): evaluation names entities by them.
    fn label_names(&self) -> Option<&[String]> {
        None
    }
    /// Data-to-text sets: how generated ids become text.
    fn text_codec(&self) -> Option<&crate::data::tokenize::TextCodec> {
        None
    }
    /// Causal-lm sets: example `i`'s prompt, the tokens before its first scored one (None
    /// when every token is scored).
    fn prompt(&self, _i: usize) -> Option<Vec<i64>> {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// BiDoRA's bi-level search, or the single-level methods' only phase.
    Search,
    Retrain,
    Done,
}

impl Phase {
    fn name(self, method: Method) -> &'static str {
        match (self, method) {
            (Phase::Search, Method::Bidora) => "search",
            (Phase::Search, _) => "train",
            (Phase::Retrain, _) => "retrain",
            (Phase::Done, _) => "done",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Best {
    pub metric: f64,
    pub phase: Phase,
    pub step: usize,
}

/// The loop's position: everything besides tensors that a checkpoint restores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    pub phase: Phase,
    /// Steps done in the current phase.
    pub step: usize,
    /// Upper steps done in the search phase.
    pub upper_step: usize,
    pub train: StreamState,
    pub val: StreamState,
    pub all: StreamState,
    pub best: Option<Best>,
    /// Length of `metrics.jsonl` when the checkpoint was written.
    pub log_len: u64,
    /// The ranks the run trains on (1: one process); a resume needs the same number.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub method: Method,
    pub metric_name: String,
    pub final_val: Option<eval::Scores>,
    pub final_test: Option<eval::Scores>,
    pub best: Option<Best>,
    pub seconds: f64,
    pub run_dir: PathBuf,
}

/// The data a run needs, already split: indices into `data` for the two splits.
pub struct RunData {
    pub data: Box<dyn Examples>,
    pub train_idx: Vec<usize>,
    pub val_idx: Vec<usize>,
    pub test: Option<Box<dyn Examples>>,
}

/// A seeded split of `n` examples into (train, validation) with `val_ratio` held out.
pub fn split(n: usize, val_ratio: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let n_val = ((n as f64) * val_ratio).round() as usize;
    let val = idx.split_off(n - n_val.min(n));
    (idx, val)
}

struct Programs {
    step: Option<Box<dyn Program>>,
    lower: Option<Box<dyn Program>>,
    upper: Option<Box<dyn Program>>,
    /// The upper level's two phases, for data-parallel runs.
    upper_val: Option<Box<dyn Program>>,
    upper_mixed: Option<Box<dyn Program>>,
    eval: Box<dyn Program>,
    /// `forward.onnx`, for generating text at evaluation (causal-lm on data-to-text sets).
    forward: Option<Box<dyn Program>>,
}

/// Indices of named outputs of a program.
fn outputs(p: &dyn Program) -> HashMap<String, usize> {
    p.output_names()
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i))
        .collect()
}

/// A hyperparameter input and its value.
fn hyper(h: Hyperparameter, v: f64) -> (String, HostTensor) {
    (h.input_name().to_string(), scalar(v))
}

fn scalar(v: f64) -> HostTensor {
    HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v as f32))
}

fn f32_of(t: &HostTensor, what: &str) -> Result<ArrayD<f32>, TrainError> {
    t.as_f32().cloned().ok_or_else(|| TrainError::Run {
        program: what.into(),
        message: "expected an f32 output".into(),
    })
}

/// The Euclidean norm of the tensors of `group` together, in f64 and in the group's order
/// (so a rerun or a resumed run logs the same bits); logged: the hypergradient's size per
/// upper step.
fn norm(tensors: &HashMap<String, ArrayD<f32>>, group: &[String]) -> f64 {
    group
        .iter()
        .filter_map(|n| tensors.get(n))
        .flat_map(|a| a.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// Gradients from a program run: host arrays, or values kept resident.
enum Grads<'o> {
    Host(HashMap<String, ArrayD<f32>>),
    Resident(HashMap<String, &'o Resident>),
}

pub struct Trainer<'a> {
    pub cfg: TrainConfig,
    art: &'a Artifact,
    run_dir: PathBuf,
    data: RunData,
    progs: Programs,
    /// Every trainable tensor: adapters, head parameters, magnitudes.
    params: Vec<(String, ArrayD<f32>)>,
    init: Vec<(String, ArrayD<f32>)>,
    lower_group: Vec<String>,
    upper_group: Vec<String>,
    opt_lower: AdamW,
    opt_upper: AdamW,
    st: RunState,
    streams: [Stream; 3],
    log: log::MetricsLog,
    last_checkpoint: Option<PathBuf>,
    /// Step-log extra: whether the progress bar draws (off in tests).
    pub progress: bool,
    /// Seconds spent in this step per part (programs by key, "optim", "data"), logged with
    /// the step so the slowest part of an iteration is visible.
    secs: Vec<(&'static str, f64)>,
    /// The last phase-end evaluation (global step, val, test): the final summary reuses it
    /// rather than evaluating (and generating) the same tensors again.
    last_eval: Option<(usize, Option<eval::Scores>, Option<eval::Scores>)>,
    /// Resident mode's device-side tensors (see [`Trainer::resident`]).
    res: Option<resident::State>,
    /// Whether the resident tensors have moved since the host copies were taken.
    host_stale: bool,
    /// The run folder's lock, held for the trainer's life: one writer per run folder (rank
    /// 0's; the other ranks never touch the folder).
    _lock: Option<bidora_compiler::lock::FolderLock>,
    /// The other ranks ([`Single`] in one process).
    comm: &'a dyn Communicator,
    /// Whether this process writes the run folder: rank 0.
    writer: bool,
    /// Whether the upper level runs as its two phases with reductions between them (several
    /// ranks, or [`Trainer::phased`] in one).
    phased: bool,
}

impl<'a> Trainer<'a> {
    /// Prepares a run in `run_dir`: a new one, or with `resume` the continuation of the
    /// newest checkpoint there.
    pub fn new(
        cfg: TrainConfig,
        art: &'a Artifact,
        backend: &dyn Backend,
        data: RunData,
        run_dir: &Path,
        resume: bool,
    ) -> Result<Trainer<'a>, TrainError> {
        Self::new_distributed(cfg, art, backend, data, run_dir, resume, &Single)
    }

    /// As [`Trainer::new`], as one rank of a data-parallel run: `cfg`, the artifact and the
    /// data are the same on every rank; rank 0 prepares (or resumes) the run folder and
    /// every rank starts from its tensors, optimiser moments and loop state.
    pub fn new_distributed(
        cfg: TrainConfig,
        art: &'a Artifact,
        backend: &dyn Backend,
        data: RunData,
        run_dir: &Path,
        resume: bool,
        comm: &'a dyn Communicator,
    ) -> Result<Trainer<'a>, TrainError> {
        let m = &art.manifest;
        let (size, writer) = (comm.size(), comm.rank() == 0);
        if size > 1 && cfg.batch_size < size {
            return Err(TrainError::Config {
                origin: "batch_size".into(),
                message: format!(
                    "{} is smaller than the {size} ranks: each rank needs at least one example \
                     of every global batch",
                    cfg.batch_size
                ),
            });
        }
        let Some(task) = &m.task else {
            return Err(TrainError::Artifact(
                "it has no training programs: compile it with --task".into(),
            ));
        };
        eval::check_metric(task.task.name(), cfg.metric.as_deref())?;
        let has = |k: ProgramKey| m.programs.contains_key(&k);
        let (lower_group, upper_group) = match cfg.method {
            Method::Bidora => {
                let b = m.bilevel.as_ref().filter(|_| has(ProgramKey::Lower) && has(ProgramKey::Upper)).ok_or_else(|| {
                    TrainError::Artifact(
                        "method = \"bidora\" needs lower.onnx and upper.onnx: compile a DoRA artifact with --task (without --no-bilevel)".into(),
                    )
                })?;
                (b.groups.lower.clone(), b.groups.upper.clone())
            }
            Method::Dora | Method::Lora => {
                if !has(ProgramKey::TrainStep) {
                    return Err(TrainError::Artifact("it has no train_step.onnx".into()));
                }
                let dora = m.adapters.iter().any(|a| a.magnitude.is_some());
                if (cfg.method == Method::Dora) != dora {
                    return Err(TrainError::Artifact(format!(
                        "method = \"{:?}\" but the artifact's adapters are {:?}",
                        cfg.method, m.config.method
                    )));
                }
                (art.init.iter().map(|(n, _)| n.clone()).collect(), vec![])
            }
        };
        let load = |key: ProgramKey| -> Result<Box<dyn Program>, TrainError> {
            let sig = art
                .program(key)
                .map_err(|e| TrainError::Artifact(e.to_string()))?;
            backend
                .load(&art.dir.join(&sig.file))
                .map_err(|e| TrainError::Run {
                    program: sig.file.clone(),
                    message: e.to_string(),
                })
        };
        let progs = Programs {
            step: if cfg.method == Method::Bidora {
                None
            } else {
                Some(load(ProgramKey::TrainStep)?)
            },
            lower: if cfg.method == Method::Bidora {
                Some(load(ProgramKey::Lower)?)
            } else {
                None
            },
            // Several ranks run the upper level as its phases instead (`load_phases`).
            upper: if cfg.method == Method::Bidora && size == 1 {
                Some(load(ProgramKey::Upper)?)
            } else {
                None
            },
            upper_val: None,
            upper_mixed: None,
            eval: load(ProgramKey::Eval)?,
            forward: if task.task == bidora_compiler::heads::Task::CausalLm
                && cfg.generation.max_new_tokens > 0
                && generation::unavailable(&*data.data).is_none()
                && has(ProgramKey::Forward)
            {
                Some(load(ProgramKey::Forward)?)
            } else {
                None
            },
        };
        if let Some(metric) = cfg
            .metric
            .as_deref()
            .filter(|m| generation::is_generation_metric(m))
        {
            let why = if cfg.generation.max_new_tokens == 0 {
                Some("generation.max_new_tokens is 0")
            } else if let Some(why) = generation::unavailable(&*data.data) {
                Some(why)
            } else if !has(ProgramKey::Forward) {
                Some("the artifact has no forward.onnx")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(TrainError::Config {
                    origin: "metric".into(),
                    message: format!("'{metric}' scores generated text, but {why}"),
                });
            }
        }
        if data.train_idx.is_empty() {
            return Err(TrainError::Data("the training split is empty".into()));
        }
        if cfg.method == Method::Bidora && data.val_idx.is_empty() {
            return Err(TrainError::Data("the validation split is empty".into()));
        }
        if writer {
            std::fs::create_dir_all(run_dir).map_err(|e| TrainError::Checkpoint {
                path: run_dir.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        // Before anything in the folder is read or written: a second `bidora train` (or
        // `--resume`) on it would interleave the log and mix two runs' files.
        let lock = if writer {
            Some(bidora_compiler::lock::FolderLock::run_folder(
                run_dir,
                if resume {
                    "bidora train --resume"
                } else {
                    "bidora train"
                },
            )?)
        } else {
            None
        };
        // Decide before touching anything in the folder: a run there is only continued on
        // request, never overwritten.
        let existing = if writer {
            checkpoint::latest(run_dir)?
        } else {
            None
        };
        match (&existing, resume && writer) {
            (None, true) => {
                return Err(TrainError::Checkpoint {
                    path: checkpoint::dir(run_dir),
                    message: "--resume: no checkpoint to resume from".into(),
                })
            }
            (Some(_), false) => return Err(TrainError::Checkpoint {
                path: run_dir.to_path_buf(),
                message:
                    "holds a run already: pass --resume to continue it, or choose another folder"
                        .into(),
            }),
            _ => {}
        }
        let init: Vec<(String, ArrayD<f32>)> = art.init.clone();
        let mut t = Trainer {
            opt_lower: AdamW::new(cfg.lower.adamw()),
            opt_upper: AdamW::new(cfg.upper.adamw()),
            streams: [
                Stream::new(data.train_idx.len(), cfg.seed, StreamState::default()),
                Stream::new(data.val_idx.len(), cfg.seed ^ 1, StreamState::default()),
                Stream::new(
                    data.train_idx.len() + data.val_idx.len(),
                    cfg.seed ^ 2,
                    StreamState::default(),
                ),
            ],
            cfg,
            art,
            run_dir: run_dir.to_path_buf(),
            data,
            progs,
            params: init.clone(),
            init,
            lower_group,
            upper_group,
            st: RunState {
                phase: Phase::Search,
                step: 0,
                upper_step: 0,
                train: StreamState::default(),
                val: StreamState::default(),
                all: StreamState::default(),
                best: None,
                log_len: 0,
                world_size: size,
            },
            // A resumed run cuts the log back to its checkpoint's length in `restore`.
            log: if writer {
                log::MetricsLog::open(
                    &run_dir.join("metrics.jsonl"),
                    if resume {
                        std::fs::metadata(run_dir.join("metrics.jsonl")).map_or(0, |m| m.len())
                    } else {
                        0
                    },
                )?
            } else {
                log::MetricsLog::discard(&run_dir.join("metrics.jsonl"))
            },
            last_checkpoint: None,
            progress: true,
            secs: vec![],
            last_eval: None,
            res: None,
            host_stale: false,
            _lock: lock,
            comm,
            writer,
            phased: false,
        };
        if !writer {
            t.progress = false;
        }
        let record = run_dir.join(ARTIFACT_RECORD);
        if let Some(dir) = existing {
            same_artifact(&record, art)?;
            t.restore_newest(&dir)?;
            if t.st.world_size != size {
                return Err(TrainError::Checkpoint {
                    path: dir,
                    message: format!(
                        "--resume: the run was trained on {} rank(s), and this job has {size}: \
                         resume it with {} (`mpirun -np {}` …, or without mpirun for 1); each \
                         rank's share of the batches, and so the rounding of every sum, \
                         depends on the number of ranks",
                        t.st.world_size,
                        if t.st.world_size == 1 {
                            "one process".to_string()
                        } else {
                            format!("{} ranks", t.st.world_size)
                        },
                        t.st.world_size
                    ),
                });
            }
        } else if writer {
            let body = serde_json::to_vec_pretty(&serde_json::Value::Object(art.identity.clone()))
                .expect("JSON values serialise");
            checkpoint::write_atomic(&record, &body)?;
        }
        if writer {
            // Atomic: a resume reads it back as the run's config.
            checkpoint::write_atomic(&run_dir.join("config.toml"), t.cfg.to_toml().as_bytes())?;
        }
        if size > 1 {
            t.phased = true;
            t.load_phases(backend)?;
            t.share_state()?;
        }
        Ok(t)
    }

    /// One process running the upper level as a data-parallel run does, in two phases: the
    /// same hypergradient as the one program up to rounding, for testing the phases without
    /// launching ranks.
    pub fn phased(mut self, backend: &dyn Backend) -> Result<Self, TrainError> {
        self.phased = true;
        self.load_phases(backend)?;
        Ok(self)
    }

    fn load_phases(&mut self, backend: &dyn Backend) -> Result<(), TrainError> {
        if self.cfg.method != Method::Bidora {
            return Ok(());
        }
        let m = &self.art.manifest;
        let first_order = m
            .bilevel
            .as_ref()
            .is_some_and(|b| b.hypergrad == bidora_compiler::bilevel::Hypergrad::FirstOrder);
        let mut keys = vec![ProgramKey::UpperVal];
        if !first_order {
            keys.push(ProgramKey::UpperMixed);
        }
        for key in keys {
            let Ok(sig) = self.art.program(key) else {
                return Err(TrainError::Artifact(format!(
                    "a data-parallel BiDoRA run needs {} (the upper program's phases), which \
                     this artifact lacks: compile it again with this bidora-compile",
                    key.file()
                )));
            };
            let p = backend
                .load(&self.art.dir.join(&sig.file))
                .map_err(|e| TrainError::Run {
                    program: sig.file.clone(),
                    message: e.to_string(),
                })?;
            *self.slot(key) = Some(p);
        }
        Ok(())
    }

    /// Gives every rank rank 0's tensors, optimiser moments and loop state: a resumed run's
    /// (only rank 0 reads the folder, so it need not be shared between machines) or the
    /// artifact's initial values.
    fn share_state(&mut self) -> Result<(), TrainError> {
        let mut bytes = if self.writer {
            let st = serde_json::to_value(&self.st).expect("the loop state serialises");
            shard::pack(&self.params, [&self.opt_lower, &self.opt_upper], &st)
        } else {
            vec![]
        };
        self.comm
            .broadcast(&mut bytes)
            .map_err(|e| TrainError::Distributed(e.to_string()))?;
        if !self.writer {
            let st = shard::unpack(
                &bytes,
                &mut self.params,
                [&mut self.opt_lower, &mut self.opt_upper],
            )?;
            self.st = serde_json::from_value(st)
                .map_err(|e| TrainError::Distributed(format!("rank 0's loop state: {e}")))?;
            self.streams[0] = Stream::new(self.data.train_idx.len(), self.cfg.seed, self.st.train);
            self.streams[1] = Stream::new(self.data.val_idx.len(), self.cfg.seed ^ 1, self.st.val);
            let phase_all = self.data.train_idx.len() + self.data.val_idx.len();
            self.streams[2] = Stream::new(phase_all, self.cfg.seed ^ 2, self.st.all);
        }
        Ok(())
    }

    /// Proves every rank holds rank 0's tensors: each compares its digest with rank 0's and
    /// a rank that differs ends the job.
    fn check_in_step(&mut self) -> Result<(), TrainError> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let mine = shard::digest(&self.params);
        let mut bytes = mine.to_le_bytes().to_vec();
        self.comm
            .broadcast(&mut bytes)
            .map_err(|e| TrainError::Distributed(e.to_string()))?;
        if bytes != mine.to_le_bytes() {
            return Err(TrainError::Distributed(format!(
                "rank {}'s tensors differ from rank 0's at global step {}: the ranks' \
                 reductions disagree",
                self.comm.rank(),
                self.global_step()
            )));
        }
        Ok(())
    }

    /// The communicator's view: this rank and the number of ranks.
    pub fn rank_and_size(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.size())
    }

    /// Continues from checkpoint `dir`, or leaves the trainer untouched when it does not
    /// belong to this run: a tensor not of this artifact or of another shape, a non-finite
    /// value, or a log that is not the one the checkpoint was written with.
    fn restore(&mut self, dir: &Path) -> Result<(), TrainError> {
        let (tensors, st): (checkpoint::Tensors, RunState) = checkpoint::load(dir)?;
        let bad = |message: String| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message,
        };
        let finite = |what: &str, a: &ArrayD<f32>| match a.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(bad(format!(
                "{what} holds a non-finite value ({}) at index {i}",
                a.iter().nth(i).copied().unwrap_or(f32::NAN)
            ))),
            None => Ok(()),
        };
        let shape_of = |n: &str| {
            self.params
                .iter()
                .find(|(p, _)| p == n)
                .map(|(_, a)| a.shape())
        };
        for (n, a) in &tensors.params {
            match shape_of(n) {
                Some(s) if s == a.shape() => finite(&format!("tensor '{n}'"), a)?,
                Some(s) => {
                    return Err(bad(format!(
                        "tensor '{n}' has shape {:?}, the artifact's has {s:?}",
                        a.shape()
                    )))
                }
                None => {
                    return Err(bad(format!(
                        "tensor '{n}' does not belong to this artifact"
                    )))
                }
            }
        }
        if let Some((n, _)) = self
            .params
            .iter()
            .find(|(n, _)| !tensors.params.iter().any(|(p, _)| p == n))
        {
            return Err(bad(format!("tensor '{n}' of the artifact is missing")));
        }
        for (opt, _, m, v) in &tensors.optims {
            for (kind, moments) in [("m", m), ("v", v)] {
                for (n, a) in moments {
                    let what = format!("optimiser moment '{opt}/{kind}/{n}'");
                    if shape_of(n) != Some(a.shape()) {
                        return Err(bad(format!(
                            "{what} does not match a tensor of this artifact"
                        )));
                    }
                    finite(&what, a)?;
                }
            }
        }
        // Checked before anything changes; it truncates only once the checks pass.
        let log = log::MetricsLog::open(&self.run_dir.join("metrics.jsonl"), st.log_len)?;
        for (n, a) in tensors.params {
            if let Some(slot) = self.params.iter_mut().find(|(p, _)| *p == n) {
                slot.1 = a;
            }
        }
        for (name, step, m, v) in tensors.optims {
            match name.as_str() {
                "lower" => self.opt_lower.restore(step, m, v),
                "upper" => self.opt_upper.restore(step, m, v),
                _ => {}
            }
        }
        self.streams[0] = Stream::new(self.data.train_idx.len(), self.cfg.seed, st.train);
        self.streams[1] = Stream::new(self.data.val_idx.len(), self.cfg.seed ^ 1, st.val);
        self.streams[2] = Stream::new(
            self.data.train_idx.len() + self.data.val_idx.len(),
            self.cfg.seed ^ 2,
            st.all,
        );
        self.log = log;
        self.st = st;
        self.last_checkpoint = Some(dir.to_path_buf());
        Ok(())
    }

    /// Restores the newest checkpoint that loads, falling back past unusable newer ones
    /// (saying which and why); an error when none does.
    fn restore_newest(&mut self, newest: &Path) -> Result<(), TrainError> {
        let mut refused: Vec<String> = vec![];
        let candidates =
            std::iter::once(newest.to_path_buf()).chain(checkpoint::older(&self.run_dir, newest));
        for d in candidates {
            match self.restore(&d) {
                Ok(()) => {
                    if !refused.is_empty() {
                        eprintln!(
                            "warning: not resuming from the newer checkpoint(s), which cannot \
                             be used: {}; resuming from {} instead",
                            refused.join("; "),
                            d.display()
                        );
                    }
                    return Ok(());
                }
                Err(e) => refused.push(e.to_string()),
            }
        }
        Err(TrainError::Checkpoint {
            path: checkpoint::dir(&self.run_dir),
            message: format!(
                "--resume: no checkpoint can be used: {}",
                refused.join("; ")
            ),
        })
    }

    fn checkpoint(&mut self) -> Result<(), TrainError> {
        self.sync_host()?;
        self.check_in_step()?;
        if !self.writer {
            return Ok(());
        }
        self.st.train = self.streams[0].state;
        self.st.val = self.streams[1].state;
        self.st.all = self.streams[2].state;
        self.st.log_len = self.log.len();
        let (ml, vl) = self.opt_lower.moments();
        let (mu, vu) = self.opt_upper.moments();
        let t = checkpoint::Tensors {
            params: self.params.clone(),
            optims: vec![
                (
                    "lower".into(),
                    self.opt_lower.steps(),
                    ml.clone(),
                    vl.clone(),
                ),
                (
                    "upper".into(),
                    self.opt_upper.steps(),
                    mu.clone(),
                    vu.clone(),
                ),
            ],
        };
        let name = format!(
            "step-{:07}-{}",
            self.global_step(),
            self.st.phase.name(self.cfg.method)
        );
        self.last_checkpoint = Some(checkpoint::save(&self.run_dir, &name, &t, &self.st)?);
        Ok(())
    }

    fn phase_steps(&self, phase: Phase) -> usize {
        match phase {
            Phase::Search => self.cfg.steps,
            Phase::Retrain => self.cfg.retrain_steps,
            Phase::Done => 0,
        }
    }

    fn global_step(&self) -> usize {
        match self.st.phase {
            Phase::Search => self.st.step,
            Phase::Retrain => self.cfg.steps + self.st.step,
            Phase::Done => self.cfg.steps + self.cfg.retrain_steps,
        }
    }

    fn gamma(&self) -> f64 {
        self.cfg.gamma.unwrap_or_else(|| {
            self.art
                .manifest
                .bilevel
                .as_ref()
                .map_or(0.0, |b| b.defaults.gamma)
        })
    }

    /// Program inputs: `batch` (under `prefix`), the trainable tensors, and `extra`, keeping
    /// only names the program has.
    fn feed(
        &self,
        p: &dyn Program,
        batches: &[(&str, &[(String, HostTensor)])],
        extra: Vec<(String, HostTensor)>,
    ) -> Vec<(String, HostTensor)> {
        let want: std::collections::HashSet<&str> =
            p.input_names().iter().map(String::as_str).collect();
        let mut v: Vec<(String, HostTensor)> = vec![];
        for (prefix, b) in batches {
            for (n, t) in b.iter() {
                let name = format!("{prefix}{n}");
                if want.contains(name.as_str()) {
                    v.push((name, t.clone()));
                }
            }
        }
        for (n, a) in &self.params {
            if want.contains(n.as_str()) {
                v.push((n.clone(), HostTensor::F32(a.clone())));
            }
        }
        v.extend(extra.into_iter().filter(|(n, _)| want.contains(n.as_str())));
        v
    }

    /// The next batch of stream `which` (0: training, 1: validation, 2: both) and the weight
    /// of this rank's means in the global batch's (1 in one process): this rank's rows of
    /// the global batch, which is padded as one process pads it.
    fn batch(&mut self, which: usize) -> Result<(Vec<(String, HostTensor)>, f64), TrainError> {
        let pos = self.streams[which].next_batch(self.cfg.batch_size);
        let idx: Vec<usize> = match which {
            0 => pos.iter().map(|&i| self.data.train_idx[i]).collect(),
            1 => pos.iter().map(|&i| self.data.val_idx[i]).collect(),
            _ => pos
                .iter()
                .map(|&i| {
                    let n = self.data.train_idx.len();
                    if i < n {
                        self.data.train_idx[i]
                    } else {
                        self.data.val_idx[i - n]
                    }
                })
                .collect(),
        };
        let t = Instant::now();
        let b = self.data.data.batch(&idx)?;
        let out = if self.comm.size() == 1 {
            (b, 1.0)
        } else {
            let head = self.art.manifest.task.as_ref().expect("checked in new");
            shard::take(head, b, self.comm.rank(), self.comm.size())?
        };
        self.time("data", t);
        Ok(out)
    }

    /// Global means from this rank's: gradients (host arrays, by tensor name, in `names`'
    /// order so every rank packs alike) and scalars, weighted by `weight`.
    fn reduce(
        &mut self,
        grads: &mut Grads<'_>,
        names: &[String],
        scalars: &mut [f64],
        weight: f64,
    ) -> Result<(), TrainError> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let t = Instant::now();
        let Grads::Host(map) = grads else {
            return Err(TrainError::Config {
                origin: "--resident".into(),
                message: "data-parallel runs reduce host gradients; resident mode is not \
                          distributed yet"
                    .into(),
            });
        };
        let mut parts: Vec<(&String, &mut ArrayD<f32>)> = map.iter_mut().collect();
        parts.sort_by_key(|(n, _)| names.iter().position(|m| m == *n).unwrap_or(usize::MAX));
        let mut arrays: Vec<&mut ArrayD<f32>> = parts.into_iter().map(|(_, a)| a).collect();
        shard::reduce(self.comm, &mut arrays, scalars, weight)?;
        self.time("all_reduce", t);
        Ok(())
    }

    fn non_finite(&self, what: &str) -> TrainError {
        TrainError::NonFinite {
            what: what.into(),
            phase: self.st.phase.name(self.cfg.method).into(),
            step: self.st.step,
            last_good: self.last_checkpoint.clone(),
        }
    }

    fn loss_output(&self, key: ProgramKey) -> Result<String, TrainError> {
        let sig = &self.art.manifest.programs[&key];
        sig.outputs_with(Role::Loss)
            .next()
            .map(|o| o.name.clone())
            .ok_or_else(|| TrainError::Artifact(format!("{} has no loss output", sig.file)))
    }

    /// One step of the current phase; returns what it logs.
    fn time(&mut self, part: &'static str, since: Instant) {
        let dt = since.elapsed().as_secs_f64();
        match self.secs.iter_mut().find(|(p, _)| *p == part) {
            Some((_, s)) => *s += dt,
            None => self.secs.push((part, dt)),
        }
    }

    fn step(&mut self) -> Result<serde_json::Value, TrainError> {
        let t_step = Instant::now();
        self.secs.clear();
        let mut rec = self.step_inner()?;
        self.time("total", t_step);
        let secs: serde_json::Map<String, serde_json::Value> = self
            .secs
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        rec["secs"] = serde_json::Value::Object(secs);
        Ok(rec)
    }

    fn step_inner(&mut self) -> Result<serde_json::Value, TrainError> {
        let phase = self.st.phase;
        let total = self.phase_steps(phase);
        let k = self.st.step;
        let lr = self.cfg.lower.lr as f64
            * schedule::linear_warmup_decay(k, total, self.cfg.lower.warmup_ratio) as f64;
        let mut rec = json!({"kind": "step", "phase": phase.name(self.cfg.method),
            "step": k, "global_step": self.global_step(), "lr": lr});
        let lower_group = self.lower_group.clone();
        match (self.cfg.method, phase) {
            (Method::Bidora, Phase::Search) => {
                let (b_tr, w_tr) = self.batch(0)?;
                let gamma = self.gamma();
                let keep = self.role_outputs(ProgramKey::Lower, Role::Gradient);
                let res = self.exec(
                    ProgramKey::Lower,
                    &[("", &b_tr)],
                    vec![hyper(Hyperparameter::Gamma, gamma)],
                    &[],
                    &|n| keep.contains(n),
                )?;
                let mut g = self.grads(ProgramKey::Lower, &res, Role::Gradient, &lower_group)?;
                let mut sums = vec![self.host_sum(
                    ProgramKey::Lower,
                    &res,
                    &self.loss_output(ProgramKey::Lower)?,
                )?];
                let reg = self.art.manifest.programs[&ProgramKey::Lower]
                    .outputs_with(Role::Regularizer)
                    .next()
                    .map(|r| r.name.clone());
                if let Some(r) = &reg {
                    sums.push(self.host_sum(ProgramKey::Lower, &res, r)?);
                }
                // The global g: the virtual step and the lower update both need it.
                self.reduce(&mut g, &lower_group, &mut sums, w_tr)?;
                let loss = sums[0];
                rec["loss"] = json!(loss);
                if reg.is_some() {
                    rec["reg"] = json!(sums[1]);
                }
                if !loss.is_finite() {
                    return Err(self.non_finite("the training loss"));
                }
                let last_of_unroll =
                    (k + 1).is_multiple_of(self.cfg.unroll_steps) || k + 1 == total;
                if last_of_unroll {
                    let (b_val, w_val) = self.batch(1)?;
                    let upper_total = total.div_ceil(self.cfg.unroll_steps);
                    let u = self.st.upper_step;
                    let lr_u = self.cfg.upper.lr as f64
                        * schedule::linear_warmup_decay(u, upper_total, self.cfg.upper.warmup_ratio)
                            as f64;
                    let xi = self.cfg.xi.unwrap_or(lr);
                    let alpha = self.cfg.alpha_fd.unwrap_or_else(|| {
                        self.art
                            .manifest
                            .default_of(Hyperparameter::AlphaFd)
                            .unwrap_or(0.01)
                    });
                    if self.phased {
                        let (h, val_loss) = self.phased_upper(
                            &res,
                            &g,
                            [(&b_tr, w_tr), (&b_val, w_val)],
                            xi,
                            alpha,
                        )?;
                        rec["upper_val_loss"] = json!(val_loss);
                        rec["lr_upper"] = json!(lr_u);
                        rec["hypergrad_norm"] = json!(norm(&h, &self.upper_group));
                        self.optimize(resident::Level::Upper, Grads::Host(h), lr_u as f32)?;
                    } else {
                        // The upper program reads the lower step's outputs by name: g (and,
                        // in fd-forward, ∇_M L_tr).
                        let keep = self.role_outputs(ProgramKey::Upper, Role::Hypergradient);
                        let ures = self.exec(
                            ProgramKey::Upper,
                            &[("train.", &b_tr), ("val.", &b_val)],
                            vec![
                                hyper(Hyperparameter::Xi, xi),
                                hyper(Hyperparameter::AlphaFd, alpha),
                            ],
                            &res,
                            &|n| keep.contains(n),
                        )?;
                        let h = self.grads(
                            ProgramKey::Upper,
                            &ures,
                            Role::Hypergradient,
                            &self.upper_group,
                        )?;
                        let val_loss = bidora_compiler::bilevel::VAL_LOSS;
                        rec["upper_val_loss"] =
                            json!(self.host_sum(ProgramKey::Upper, &ures, val_loss)?);
                        rec["lr_upper"] = json!(lr_u);
                        if let Grads::Host(h) = &h {
                            rec["hypergrad_norm"] = json!(norm(h, &self.upper_group));
                        }
                        self.optimize(resident::Level::Upper, h, lr_u as f32)?;
                    }
                    self.st.upper_step += 1;
                }
                self.optimize(resident::Level::Lower, g, lr as f32)?;
            }
            (method, phase) => {
                // BiDoRA's retrain (the lower program on train ∪ val, M frozen) or a
                // single-level method's train_step.
                let (key, stream) = match (method, phase) {
                    (Method::Bidora, _) => (ProgramKey::Lower, 2),
                    _ => (ProgramKey::TrainStep, 0),
                };
                let (b, w) = self.batch(stream)?;
                let extra = match key {
                    ProgramKey::Lower => vec![hyper(Hyperparameter::Gamma, self.gamma())],
                    _ => vec![],
                };
                let keep = self.role_outputs(key, Role::Gradient);
                let res = self.exec(key, &[("", &b)], extra, &[], &|n| keep.contains(n))?;
                let mut g = self.grads(key, &res, Role::Gradient, &lower_group)?;
                let mut sums = [self.host_sum(key, &res, &self.loss_output(key)?)?];
                self.reduce(&mut g, &lower_group, &mut sums, w)?;
                let loss = sums[0];
                if !loss.is_finite() {
                    return Err(self.non_finite("the training loss"));
                }
                rec["loss"] = json!(loss);
                self.optimize(resident::Level::Lower, g, lr as f32)?;
            }
        }
        self.st.step += 1;
        Ok(rec)
    }

    /// The upper level as its two phases with the ranks' reductions between them
    /// (`bidora_compiler::bilevel::upper_phases`): `upper_val` at the global `g`, reduce `h`,
    /// `v` and the validation loss; `upper_mixed` at the global `v`, reduce `H·v`; then
    /// `∇M = h − ξ·H·v`. Returns the hypergradients and the validation loss.
    fn phased_upper(
        &mut self,
        lower_out: &[(String, Output)],
        g: &Grads<'_>,
        batches: [(&[(String, HostTensor)], f64); 2],
        xi: f64,
        alpha: f64,
    ) -> Result<(HashMap<String, ArrayD<f32>>, f64), TrainError> {
        let resident = || TrainError::Config {
            origin: "--resident".into(),
            message: "the upper level's phases run on host values; resident mode is not \
                      distributed yet"
                .into(),
        };
        let Grads::Host(g) = g else {
            return Err(resident());
        };
        let [(b_tr, w_tr), (b_val, w_val)] = batches;
        let programs = &self.art.manifest.programs;
        // The lower step's outputs with its V gradients replaced by the global g; its
        // ∇_M L_tr stays this rank's (fd-forward differences it with this rank's pass at V⁺).
        let lower_sig = &programs[&ProgramKey::Lower];
        let mut prev: Vec<(String, Output)> = vec![];
        for (n, o) in lower_out {
            let global = lower_sig
                .outputs_with(Role::Gradient)
                .find(|s| s.name == *n)
                .and_then(|s| s.of.as_ref())
                .and_then(|of| g.get(of));
            let t = match (global, o) {
                (Some(a), _) => HostTensor::F32(a.clone()),
                (None, Output::Host(t)) => t.clone(),
                (None, Output::Resident(_)) => return Err(resident()),
            };
            prev.push((n.clone(), Output::Host(t)));
        }
        let upper: Vec<String> = self.upper_group.clone();
        let both: Vec<String> = upper.iter().chain(&self.lower_group).cloned().collect();
        let vres = self.exec(
            ProgramKey::UpperVal,
            &[("val.", b_val)],
            vec![hyper(Hyperparameter::Xi, xi)],
            &prev,
            &|_| false,
        )?;
        let mut hv = self.grads(ProgramKey::UpperVal, &vres, Role::ValGradient, &both)?;
        let mut sums = [self.host_sum(
            ProgramKey::UpperVal,
            &vres,
            bidora_compiler::bilevel::VAL_LOSS,
        )?];
        self.reduce(&mut hv, &both, &mut sums, w_val)?;
        let Grads::Host(mut hv) = hv else {
            return Err(resident());
        };
        let mut h: HashMap<String, ArrayD<f32>> =
            upper.iter().filter_map(|m| hv.remove_entry(m)).collect();
        if self.progs.upper_mixed.is_none() {
            // first-order: no mixed term, the hypergradient is h.
            return Ok((h, sums[0]));
        }
        // upper_mixed reads v under upper_val's output names.
        for o in self.art.manifest.programs[&ProgramKey::UpperVal].outputs_with(Role::ValGradient) {
            if let Some(a) = o.of.as_ref().and_then(|of| hv.get(of)) {
                prev.push((o.name.clone(), Output::Host(HostTensor::F32(a.clone()))));
            }
        }
        let mres = self.exec(
            ProgramKey::UpperMixed,
            &[("train.", b_tr)],
            vec![hyper(Hyperparameter::AlphaFd, alpha)],
            &prev,
            &|_| false,
        )?;
        let mut mx = self.grads(ProgramKey::UpperMixed, &mres, Role::MixedTerm, &upper)?;
        self.reduce(&mut mx, &upper, &mut [], w_tr)?;
        let Grads::Host(mx) = mx else {
            return Err(resident());
        };
        // The single program's last two operations, in f32 as there: Mul(ξ, H·v), then Sub.
        let xi = xi as f32;
        for (m, hm) in h.iter_mut() {
            let Some(t) = mx.get(m) else {
                return Err(TrainError::Run {
                    program: ProgramKey::UpperMixed.file().into(),
                    message: format!("no mixed term for '{m}'"),
                });
            };
            hm.zip_mut_with(t, |a, &b| *a -= xi * b);
        }
        Ok((h, sums[0]))
    }

    /// Names of `key`'s outputs with this role: what resident mode keeps on the device.
    fn role_outputs(&self, key: ProgramKey, role: Role) -> std::collections::HashSet<String> {
        self.art.manifest.programs[&key]
            .outputs_with(role)
            .map(|o| o.name.clone())
            .collect()
    }

    /// Runs program `key` (taken out of its slot and put back: feeding it reads `self`) on
    /// the batches, the trainable tensors, `extra` host values and `prev` (an earlier
    /// program's outputs, read by name). In resident mode the tensors are the resident ones
    /// and the outputs `keep` names stay resident; otherwise everything is on the host.
    fn exec(
        &mut self,
        key: ProgramKey,
        batches: &[(&str, &[(String, HostTensor)])],
        extra: Vec<(String, HostTensor)>,
        prev: &[(String, Output)],
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Output)>, TrainError> {
        let mut p = self.slot(key).take().expect("loaded");
        let t = Instant::now();
        let r = match &self.res {
            None => {
                let mut extra = extra;
                extra.extend(
                    prev.iter()
                        .filter_map(|(n, o)| o.host().map(|t| (n.clone(), t.clone()))),
                );
                let inputs = self.feed(&*p, batches, extra);
                p.run(&inputs)
                    .map(|o| o.into_iter().map(Output::Host).collect::<Vec<_>>())
            }
            Some(res) => {
                let want: std::collections::HashSet<&str> =
                    p.input_names().iter().map(String::as_str).collect();
                let mut args: Vec<(String, Arg<'_>)> = vec![];
                for (prefix, b) in batches {
                    for (n, t) in b.iter() {
                        let name = format!("{prefix}{n}");
                        if want.contains(name.as_str()) {
                            args.push((name, Arg::Host(t)));
                        }
                    }
                }
                for (n, r) in &res.params {
                    if want.contains(n.as_str()) {
                        args.push((n.clone(), Arg::Resident(r)));
                    }
                }
                for (n, t) in &extra {
                    if want.contains(n.as_str()) {
                        args.push((n.clone(), Arg::Host(t)));
                    }
                }
                for (n, o) in prev {
                    if want.contains(n.as_str()) {
                        args.push((
                            n.clone(),
                            match o {
                                Output::Host(t) => Arg::Host(t),
                                Output::Resident(r) => Arg::Resident(r),
                            },
                        ));
                    }
                }
                p.run_resident(&args, keep)
            }
        };
        self.time(
            match key {
                ProgramKey::Lower => "lower",
                ProgramKey::Upper => "upper",
                ProgramKey::UpperVal => "upper_val",
                ProgramKey::UpperMixed => "upper_mixed",
                _ => "train_step",
            },
            t,
        );
        let names = p.output_names().to_vec();
        *self.slot(key) = Some(p);
        let outs = r.map_err(|e| TrainError::Run {
            program: self.art.manifest.programs[&key].file.clone(),
            message: e.to_string(),
        })?;
        Ok(names.into_iter().zip(outs).collect())
    }

    /// The sum of a host output (a loss).
    fn host_sum(
        &self,
        key: ProgramKey,
        outs: &[(String, Output)],
        name: &str,
    ) -> Result<f64, TrainError> {
        let file = &self.art.manifest.programs[&key].file;
        let t = outs
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, o)| o.host())
            .ok_or_else(|| TrainError::Run {
                program: file.clone(),
                message: format!("no host output '{name}'"),
            })?;
        Ok(f32_of(t, file)?.sum() as f64)
    }

    /// The gradients of `group` among `key`'s outputs of this role (names from the
    /// manifest's `of`): host arrays, checked finite, or resident values.
    fn grads<'o>(
        &self,
        key: ProgramKey,
        outs: &'o [(String, Output)],
        role: Role,
        group: &[String],
    ) -> Result<Grads<'o>, TrainError> {
        let sig = &self.art.manifest.programs[&key];
        let mut host = HashMap::new();
        let mut res = HashMap::new();
        for o in sig.outputs_with(role) {
            let Some(of) = &o.of else { continue };
            if !group.contains(of) {
                continue;
            }
            match outs.iter().find(|(n, _)| *n == o.name).map(|(_, v)| v) {
                Some(Output::Host(t)) => {
                    let a = f32_of(t, &sig.file)?;
                    if a.iter().any(|x| !x.is_finite()) {
                        return Err(self.non_finite(&format!("the {} of {of}", role.name())));
                    }
                    host.insert(of.clone(), a);
                }
                Some(Output::Resident(r)) => {
                    res.insert(of.clone(), r);
                }
                None => {
                    return Err(TrainError::Run {
                        program: sig.file.clone(),
                        message: format!("no output '{}'", o.name),
                    })
                }
            }
        }
        Ok(if res.is_empty() {
            Grads::Host(host)
        } else {
            Grads::Resident(res)
        })
    }

    /// One AdamW step of a level's group, where the gradients are.
    fn optimize(
        &mut self,
        level: resident::Level,
        grads: Grads<'_>,
        lr: f32,
    ) -> Result<(), TrainError> {
        let t = Instant::now();
        let opt = match level {
            resident::Level::Lower => &mut self.opt_lower,
            resident::Level::Upper => &mut self.opt_upper,
        };
        match (grads, self.res.as_mut()) {
            (Grads::Host(g), _) => opt.step(&mut self.params, &g, lr),
            (Grads::Resident(g), Some(res)) => {
                res.step(level, opt, &g, lr)?;
                self.host_stale = true;
            }
            (Grads::Resident(_), None) => unreachable!("resident outputs only in resident mode"),
        }
        self.time("optim", t);
        Ok(())
    }

    /// Brings the host tensors and AdamW moments up to date with the resident ones.
    fn sync_host(&mut self) -> Result<(), TrainError> {
        if let (Some(res), true) = (&self.res, self.host_stale) {
            res.download(&mut self.params, [&mut self.opt_lower, &mut self.opt_upper])?;
            self.host_stale = false;
        }
        Ok(())
    }

    /// Resident mode: from here on the trainable tensors, gradients and AdamW moments stay
    /// in `backend`'s memory (the GPU under ONNX Runtime's CUDA provider) and the optimiser
    /// runs there as an ONNX program; `backend` must be the one the programs were loaded
    /// with. See `resident.rs`.
    pub fn resident(mut self, backend: &dyn Backend) -> Result<Self, TrainError> {
        let groups = [
            (resident::Level::Lower, self.lower_group.as_slice()),
            (resident::Level::Upper, self.upper_group.as_slice()),
        ];
        self.res = Some(resident::State::new(
            backend,
            &self.run_dir,
            &self.params,
            &groups,
            [&self.opt_lower, &self.opt_upper],
        )?);
        Ok(self)
    }

    /// The loaded program of a training key (eval and forward run outside [`Self::exec`]).
    fn slot(&mut self, key: ProgramKey) -> &mut Option<Box<dyn Program>> {
        match key {
            ProgramKey::Lower => &mut self.progs.lower,
            ProgramKey::Upper => &mut self.progs.upper,
            ProgramKey::TrainStep => &mut self.progs.step,
            ProgramKey::UpperVal => &mut self.progs.upper_val,
            ProgramKey::UpperMixed => &mut self.progs.upper_mixed,
            ProgramKey::Eval | ProgramKey::Forward => {
                unreachable!("exec runs only training programs, not {key}")
            }
        }
    }

    /// Evaluates the current tensors on a split; logs and returns the scores. `generate`:
    /// also generate text and score it, where the head and data allow (causal-lm, e2e).
    fn evaluate(
        &mut self,
        split: &str,
        log: bool,
        generate: bool,
    ) -> Result<Option<eval::Scores>, TrainError> {
        self.sync_host()?;
        let idx: Vec<usize> = match split {
            "val" => self.data.val_idx.clone(),
            "train" => self.data.train_idx.clone(),
            _ => match &self.data.test {
                Some(t) => (0..t.len()).collect(),
                None => return Ok(None),
            },
        };
        if idx.is_empty() {
            return Ok(None);
        }
        let task = self.art.manifest.task.clone().expect("checked in new");
        let eval_sig = &self.art.manifest.programs[&ProgramKey::Eval];
        let logits_name = task.logits.clone();
        let loss_name = task.loss.clone();
        let labels = self
            .cfg
            .data
            .labels
            .as_deref()
            .or_else(|| self.data.data.label_names());
        let mut acc = eval::Accumulator::new(task.task.name(), labels, self.cfg.metric.as_deref())?;
        for chunk in idx.chunks(self.cfg.eval_batch_size) {
            let b = match split {
                "test" => self.data.test.as_ref().unwrap().batch(chunk)?,
                _ => self.data.data.batch(chunk)?,
            };
            let inputs = self.feed(&*self.progs.eval, &[("", &b)], vec![]);
            let out = self.progs.eval.run(&inputs).map_err(|e| TrainError::Run {
                program: eval_sig.file.clone(),
                message: e.to_string(),
            })?;
            let oi = outputs(&*self.progs.eval);
            let logits = f32_of(&out[oi[&logits_name]], &eval_sig.file)?;
            let loss = f32_of(&out[oi[&loss_name]], &eval_sig.file)?.sum() as f64;
            let labels = b
                .iter()
                .find(|(n, _)| n == "labels")
                .map(|(_, t)| t.clone());
            acc.add(&logits, labels.as_ref(), loss, chunk.len())?;
        }
        let mut generation_secs = None;
        if let (true, Some(fwd)) = (generate, self.progs.forward.as_mut()) {
            let set: &dyn Examples = match split {
                "test" => &**self.data.test.as_ref().expect("checked above"),
                _ => &*self.data.data,
            };
            if generation::unavailable(set).is_none() {
                let t = Instant::now();
                let want: std::collections::HashSet<&str> =
                    fwd.input_names().iter().map(String::as_str).collect();
                let fixed = self
                    .params
                    .iter()
                    .filter(|(n, _)| want.contains(n.as_str()))
                    .map(|(n, a)| (n.clone(), HostTensor::F32(a.clone())))
                    .collect();
                let logits = fwd
                    .output_names()
                    .iter()
                    .find(|n| **n == task.logits)
                    .or(fwd.output_names().first())
                    .cloned()
                    .unwrap_or_default();
                let file = self.art.manifest.programs[&ProgramKey::Forward]
                    .file
                    .clone();
                let model = generation::Model {
                    program: &mut **fwd,
                    file: &file,
                    logits: &logits,
                    fixed,
                    pad_to_multiple_of: self.cfg.data.pad_to_multiple_of,
                };
                let (g, texts) = generation::generate_and_score(
                    model,
                    set,
                    &idx,
                    &self.cfg.generation,
                    self.cfg.eval_batch_size,
                )?;
                acc.add_generation(g);
                if log && self.writer {
                    let mut jsonl = String::new();
                    for t in &texts {
                        jsonl.push_str(&serde_json::to_string(t).expect("strings serialise"));
                        jsonl.push('\n');
                    }
                    let path = self
                        .run_dir
                        .join("generations")
                        .join(format!("{split}-step{:06}.jsonl", self.global_step()));
                    checkpoint::write_atomic(&path, jsonl.as_bytes())?;
                }
                generation_secs = Some(t.elapsed().as_secs_f64());
            }
        }
        let scores = acc.finish()?;
        let mut rec = json!({"kind": "eval", "split": split,
            "phase": self.st.phase.name(self.cfg.method), "step": self.st.step,
            "global_step": self.global_step(), "loss": scores.loss, "metric": scores.main().1});
        for (k, v) in &scores.metrics {
            rec[k.as_str()] = json!(v);
        }
        if let Some(t) = generation_secs {
            rec["generation_secs"] = json!(t);
        }
        if log {
            self.log.write(rec)?;
        }
        Ok(Some(scores))
    }

    /// Evaluates on validation and test, and keeps the best tensors. `phase_end`: the end of
    /// a phase, where generation runs even when not configured for every evaluation.
    fn eval_and_select(
        &mut self,
        phase_end: bool,
    ) -> Result<(Option<eval::Scores>, Option<eval::Scores>), TrainError> {
        let generate = phase_end
            || self.cfg.generation.every_eval
            || self
                .cfg
                .metric
                .as_deref()
                .is_some_and(generation::is_generation_metric);
        let val = self.evaluate("val", true, generate)?;
        let test = self.evaluate("test", true, generate)?;
        if phase_end {
            self.last_eval = Some((self.global_step(), val.clone(), test.clone()));
        }
        if let Some(v) = &val {
            let (_, metric) = v.main();
            let better = match &self.st.best {
                None => true,
                Some(b) => b.phase != self.st.phase || v.better(metric, b.metric),
            };
            if better && metric.is_finite() {
                self.st.best = Some(Best {
                    metric,
                    phase: self.st.phase,
                    step: self.st.step,
                });
                self.save_params("best")?;
            }
        }
        if self.writer {
            let _ = plot::curves(
                self.log.path(),
                &self.run_dir.join("curves.svg"),
                &eval::main_metric_name(
                    self.art.manifest.task.as_ref().unwrap().task.name(),
                    self.cfg.metric.as_deref(),
                ),
            );
        }
        Ok((val, test))
    }

    /// The trained tensors under their artifact names (what `bidora export --weights` reads).
    fn save_params(&mut self, name: &str) -> Result<(), TrainError> {
        self.sync_host()?;
        if !self.writer {
            return Ok(());
        }
        let t: Vec<(String, &ArrayD<f32>)> =
            self.params.iter().map(|(n, a)| (n.clone(), a)).collect();
        let mut meta = HashMap::new();
        meta.insert(
            "phase".to_string(),
            self.st.phase.name(self.cfg.method).to_string(),
        );
        meta.insert("step".to_string(), self.st.step.to_string());
        meta.insert(
            bidora_compiler::provenance::IDENTITY_KEY.to_string(),
            serde_json::Value::Object(self.art.identity.clone()).to_string(),
        );
        checkpoint::write_safetensors(
            &self.run_dir.join(format!("{name}.safetensors")),
            &t,
            Some(meta),
        )
    }

    fn enter_retrain(&mut self) -> Result<(), TrainError> {
        self.sync_host()?;
        if self.cfg.retrain_from == RetrainFrom::Init {
            for (n, a) in self.params.iter_mut() {
                if self.lower_group.contains(n) {
                    if let Some((_, i)) = self.init.iter().find(|(m, _)| m == n) {
                        *a = i.clone();
                    }
                }
            }
        }
        self.opt_lower = AdamW::new(self.cfg.lower.adamw());
        self.streams[2] = Stream::new(
            self.data.train_idx.len() + self.data.val_idx.len(),
            self.cfg.seed ^ 2,
            StreamState::default(),
        );
        self.st.phase = Phase::Retrain;
        self.st.step = 0;
        // The host changed the tensors (and the lower moments): resident copies follow.
        if let Some(res) = self.res.as_mut() {
            res.upload(&self.params, [&self.opt_lower, &self.opt_upper])?;
        }
        Ok(())
    }

    /// Runs to the end (or to `stop_after` more steps, for tests that simulate a kill).
    pub fn run_to_end(&mut self, stop_after: Option<usize>) -> Result<Option<Summary>, TrainError> {
        let start = Instant::now();
        let total = self.cfg.steps
            + if self.cfg.method == Method::Bidora {
                self.cfg.retrain_steps
            } else {
                0
            };
        let bar = if self.progress {
            indicatif::ProgressBar::new(total as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        bar.set_position(self.global_step() as u64);
        let mut done_now = 0usize;
        let mut examples = 0usize;
        let mut busy = 0.0f64;
        loop {
            let phase = self.st.phase;
            if phase == Phase::Done {
                break;
            }
            let total_phase = self.phase_steps(phase);
            if self.st.step >= total_phase {
                // End of the phase: evaluate, checkpoint, move on.
                self.eval_and_select(true)?;
                let next = match (self.cfg.method, phase) {
                    (Method::Bidora, Phase::Search) if self.cfg.retrain_steps > 0 => Phase::Retrain,
                    _ => Phase::Done,
                };
                if next == Phase::Retrain {
                    self.save_params("search")?;
                    self.enter_retrain()?;
                } else {
                    self.st.phase = Phase::Done;
                }
                self.checkpoint()?;
                continue;
            }
            if stop_after == Some(done_now) {
                bar.abandon();
                return Ok(None);
            }
            bar.set_prefix(phase.name(self.cfg.method));
            let mut rec = self.step()?;
            done_now += 1;
            examples += self.cfg.batch_size;
            // Throughput of the steps themselves: evaluation and checkpoints are not in it.
            busy += rec["secs"]["total"].as_f64().unwrap_or(0.0);
            let rate = examples as f64 / busy.max(1e-9);
            rec["examples_per_s"] = json!(rate);
            if let Some(l) = rec["loss"].as_f64() {
                bar.set_message(format!("loss {l:.4}, {rate:.1} ex/s"));
            }
            self.log.write(rec)?;
            bar.inc(1);
            let s = self.st.step;
            if self.cfg.eval_every > 0 && s.is_multiple_of(self.cfg.eval_every) && s < total_phase {
                self.eval_and_select(false)?;
            }
            if self.cfg.checkpoint_every > 0
                && s.is_multiple_of(self.cfg.checkpoint_every)
                && s < total_phase
            {
                self.checkpoint()?;
            }
        }
        bar.finish_and_clear();
        self.save_params("final")?;
        // The tensors of the last phase-end evaluation, unless the run resumed after it.
        let (val, test) = match self.last_eval.take() {
            Some((step, val, test)) if step == self.global_step() => (val, test),
            _ => (
                self.evaluate("val", false, true)?,
                self.evaluate("test", false, true)?,
            ),
        };
        let summary = Summary {
            method: self.cfg.method,
            metric_name: eval::main_metric_name(
                self.art.manifest.task.as_ref().unwrap().task.name(),
                self.cfg.metric.as_deref(),
            ),
            final_val: val,
            final_test: test,
            best: self.st.best.clone(),
            seconds: start.elapsed().as_secs_f64(),
            run_dir: self.run_dir.clone(),
        };
        self.check_in_step()?;
        if self.writer {
            checkpoint::write_atomic(
                &self.run_dir.join("summary.json"),
                &serde_json::to_vec_pretty(&summary).unwrap(),
            )?;
        }
        Ok(Some(summary))
    }

    /// The current trainable tensors.
    pub fn params(&self) -> &[(String, ArrayD<f32>)] {
        &self.params
    }
}
