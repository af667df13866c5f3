//! The trainer: what a run holds (the programs, the tensors of both levels, their
//! optimisers, the data streams, the log, the ranks), how it is set up or resumed, and the
//! loop over the phases that calls the step, evaluates and checkpoints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::ArrayD;
use serde_json::json;

use super::bind::Programs;
use super::checks::{self, ARTIFACT_RECORD};
use super::state::{Phase, RunState, Streams};
use super::{
    checkpoint, eval, log, resident, Method, RetrainFrom, RunData, Summary, TrainConfig, TrainError,
};
use crate::artifact::Artifact;
use crate::backend::Backend;
use crate::distributed::{Communicator, Single};
use crate::optim::AdamW;

pub struct Trainer<'a> {
    pub cfg: TrainConfig,
    pub(super) art: &'a Artifact,
    pub(super) run_dir: PathBuf,
    pub(super) data: RunData,
    pub(super) progs: Programs,
    /// Every trainable tensor: adapters, head parameters, magnitudes.
    pub(super) params: Vec<(String, ArrayD<f32>)>,
    pub(super) init: Vec<(String, ArrayD<f32>)>,
    pub(super) lower_group: Vec<String>,
    pub(super) upper_group: Vec<String>,
    pub(super) opt_lower: AdamW,
    pub(super) opt_upper: AdamW,
    pub(super) st: RunState,
    pub(super) streams: Streams,
    pub(super) log: log::MetricsLog,
    pub(super) last_checkpoint: Option<PathBuf>,
    /// Step-log extra: whether the progress bar draws (off in tests).
    pub progress: bool,
    /// Seconds spent in this step per part (programs by key, "optim", "data"), logged with
    /// the step so the slowest part of an iteration is visible.
    pub(super) secs: Vec<(&'static str, f64)>,
    /// The last phase-end evaluation (global step, val, test): the final summary reuses it
    /// rather than evaluating (and generating) the same tensors again.
    pub(super) last_eval: Option<(usize, Option<eval::Scores>, Option<eval::Scores>)>,
    /// Resident mode's device-side tensors (see [`Trainer::resident`]).
    pub(super) res: Option<resident::State>,
    /// Whether the resident tensors have moved since the host copies were taken.
    pub(super) host_stale: bool,
    /// The run folder's lock, held for the trainer's life: one writer per run folder (rank
    /// 0's; the other ranks never touch the folder).
    pub(super) _lock: Option<bidora_compiler::lock::FolderLock>,
    /// The other ranks ([`Single`] in one process).
    pub(super) comm: &'a dyn Communicator,
    /// Whether this process writes the run folder: rank 0.
    pub(super) writer: bool,
    /// Whether the upper level runs as its two phases with reductions between them (several
    /// ranks, or [`Trainer::phased`] in one).
    pub(super) phased: bool,
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
        let (size, writer) = (comm.size(), comm.rank() == 0);
        checks::ranks(&cfg, size)?;
        checks::task(&cfg, art)?;
        let (lower_group, upper_group) = checks::groups(&cfg, art)?;
        let progs = Programs::load(&cfg, art, backend, &data, size)?;
        checks::generation_metric(&cfg, art, &data)?;
        checks::splits(&cfg, &data)?;
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
        // Decided before touching anything in the folder.
        let existing = if writer {
            checkpoint::latest(run_dir)?
        } else {
            None
        };
        checks::start_or_resume(run_dir, existing.as_deref(), resume && writer)?;
        let init: Vec<(String, ArrayD<f32>)> = art.init.clone();
        let st = RunState::start(size);
        let streams = Streams::at(&data, cfg.seed, &st);
        let mut t = Trainer {
            opt_lower: AdamW::new(cfg.lower.adamw()),
            opt_upper: AdamW::new(cfg.upper.adamw()),
            cfg,
            art,
            run_dir: run_dir.to_path_buf(),
            data,
            progs,
            params: init.clone(),
            init,
            lower_group,
            upper_group,
            streams,
            st,
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
            checks::same_artifact(&record, art)?;
            t.restore_newest(&dir)?;
            checks::same_world_size(&dir, t.st.world_size, size)?;
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

    /// The communicator's view: this rank and the number of ranks.
    pub fn rank_and_size(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.size())
    }

    pub(super) fn phase_steps(&self, phase: Phase) -> usize {
        match phase {
            Phase::Search => self.cfg.steps,
            Phase::Retrain => self.cfg.retrain_steps,
            Phase::Done => 0,
        }
    }

    pub(super) fn global_step(&self) -> usize {
        match self.st.phase {
            Phase::Search => self.st.step,
            Phase::Retrain => self.cfg.steps + self.st.step,
            Phase::Done => self.cfg.steps + self.cfg.retrain_steps,
        }
    }

    pub(super) fn gamma(&self) -> f64 {
        self.cfg.gamma.unwrap_or_else(|| {
            self.art
                .manifest
                .bilevel
                .as_ref()
                .map_or(0.0, |b| b.defaults.gamma)
        })
    }

    pub(super) fn non_finite(&self, what: &str) -> TrainError {
        TrainError::NonFinite {
            what: what.into(),
            phase: self.st.phase.name(self.cfg.method).into(),
            step: self.st.step,
            last_good: self.last_checkpoint.clone(),
        }
    }

    /// Adds the time since `since` to this step's `part`.
    pub(super) fn time(&mut self, part: &'static str, since: Instant) {
        let dt = since.elapsed().as_secs_f64();
        match self.secs.iter_mut().find(|(p, _)| *p == part) {
            Some((_, s)) => *s += dt,
            None => self.secs.push((part, dt)),
        }
    }

    /// Brings the host tensors and AdamW moments up to date with the resident ones.
    pub(super) fn sync_host(&mut self) -> Result<(), TrainError> {
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

    pub(super) fn enter_retrain(&mut self) -> Result<(), TrainError> {
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
        self.streams.restart_all(&self.data, self.cfg.seed);
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
