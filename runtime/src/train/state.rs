//! The loop's position between steps and what moves it across a checkpoint: the run state a
//! checkpoint records, the data streams it positions, saving and restoring both with the
//! tensors, and handing rank 0's copy to the other ranks.

use std::path::Path;

use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

use super::stream::{Stream, StreamState};
use super::{checkpoint, log, shard, Method, RunData, TrainError, Trainer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// BiDoRA's bi-level search, or the single-level methods' only phase.
    Search,
    Retrain,
    Done,
}

impl Phase {
    pub(super) fn name(self, method: Method) -> &'static str {
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

/// Which of the loop's streams a batch is drawn from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// The training split: the search phase's lower steps, the single-level methods' steps.
    Train,
    /// The validation split: the upper steps.
    Val,
    /// Training then validation indices: BiDoRA's retrain phase.
    All,
}

/// The loop's index streams. Each has its own seed (the run's, xor 0, 1, 2) so that the
/// splits are not drawn in lockstep; the seeds are part of the checkpoint format's meaning.
pub(super) struct Streams {
    pub train: Stream,
    pub val: Stream,
    pub all: Stream,
}

impl Streams {
    /// The streams at the positions `st` records (a new run's are all at the start).
    pub(super) fn at(data: &RunData, seed: u64, st: &RunState) -> Streams {
        let (n_train, n_val) = (data.train_idx.len(), data.val_idx.len());
        Streams {
            train: Stream::new(n_train, seed, st.train),
            val: Stream::new(n_val, seed ^ 1, st.val),
            all: Stream::new(n_train + n_val, seed ^ 2, st.all),
        }
    }

    /// Restarts train ∪ validation: the retrain phase reads it from its first batch.
    pub(super) fn restart_all(&mut self, data: &RunData, seed: u64) {
        let n = data.train_idx.len() + data.val_idx.len();
        self.all = Stream::new(n, seed ^ 2, StreamState::default());
    }

    pub(super) fn get(&mut self, source: Source) -> &mut Stream {
        match source {
            Source::Train => &mut self.train,
            Source::Val => &mut self.val,
            Source::All => &mut self.all,
        }
    }

    /// Copies the positions into the state a checkpoint writes.
    pub(super) fn record(&self, st: &mut RunState) {
        st.train = self.train.state;
        st.val = self.val.state;
        st.all = self.all.state;
    }
}

impl RunState {
    /// A run's state before its first step.
    pub(super) fn start(world_size: usize) -> RunState {
        RunState {
            phase: Phase::Search,
            step: 0,
            upper_step: 0,
            train: StreamState::default(),
            val: StreamState::default(),
            all: StreamState::default(),
            best: None,
            log_len: 0,
            world_size,
        }
    }
}

impl Trainer<'_> {
    /// Gives every rank rank 0's tensors, optimiser moments and loop state: a resumed run's
    /// (only rank 0 reads the folder, so it need not be shared between machines) or the
    /// artifact's initial values.
    pub(super) fn share_state(&mut self) -> Result<(), TrainError> {
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
            self.streams = Streams::at(&self.data, self.cfg.seed, &self.st);
        }
        Ok(())
    }

    /// Proves every rank holds rank 0's tensors: each compares its digest with rank 0's and
    /// a rank that differs ends the job.
    pub(super) fn check_in_step(&mut self) -> Result<(), TrainError> {
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

    /// Continues from checkpoint `dir`, or leaves the trainer untouched when it does not
    /// belong to this run: a tensor not of this artifact or of another shape, a non-finite
    /// value, or a log that is not the one the checkpoint was written with.
    pub(super) fn restore(&mut self, dir: &Path) -> Result<(), TrainError> {
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
        self.streams = Streams::at(&self.data, self.cfg.seed, &st);
        self.log = log;
        self.st = st;
        self.last_checkpoint = Some(dir.to_path_buf());
        Ok(())
    }

    /// Restores the newest checkpoint that loads, falling back past unusable newer ones
    /// (saying which and why); an error when none does.
    pub(super) fn restore_newest(&mut self, newest: &Path) -> Result<(), TrainError> {
        let mut refused: Vec<String> = vec![];
        let candidates =
            std::iter::once(newest.to_path_buf()).chain(checkpoint::older(&self.run_dir, newest));
        for d in candidates {
            match self.restore(&d) {
                Ok(()) => {
                    if self.writer {
                        eprintln!("resumed from {}", d.display());
                    }
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

    pub(super) fn checkpoint(&mut self) -> Result<(), TrainError> {
        self.sync_host()?;
        self.check_in_step()?;
        if !self.writer {
            return Ok(());
        }
        self.streams.record(&mut self.st);
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
}
