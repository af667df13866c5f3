//! The artifact's programs as the trainer holds them: loaded once at the start, each refused
//! by name (with what to compile) when the configuration needs it and the artifact lacks it.

use super::{generation, Method, RunData, TrainConfig, TrainError, Trainer};
use crate::artifact::{Artifact, ProgramKey};
use crate::backend::{Backend, Program};

pub(super) struct Programs {
    pub(super) step: Option<Box<dyn Program>>,
    pub(super) lower: Option<Box<dyn Program>>,
    pub(super) upper: Option<Box<dyn Program>>,
    /// The upper level's two phases, for data-parallel runs.
    pub(super) upper_val: Option<Box<dyn Program>>,
    pub(super) upper_mixed: Option<Box<dyn Program>>,
    pub(super) eval: Box<dyn Program>,
    /// `forward.onnx`, for generating text at evaluation (causal-lm on data-to-text sets).
    pub(super) forward: Option<Box<dyn Program>>,
}

impl Programs {
    /// The programs `cfg` runs on `size` ranks; `data` decides whether generation can run.
    pub(super) fn load(
        cfg: &TrainConfig,
        art: &Artifact,
        backend: &dyn Backend,
        data: &RunData,
        size: usize,
    ) -> Result<Programs, TrainError> {
        let m = &art.manifest;
        let task = m.task.as_ref().expect("checked before loading");
        let has = |k: ProgramKey| m.programs.contains_key(&k);
        let load = |key: ProgramKey| load(art, backend, key);
        Ok(Programs {
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
        })
    }

    /// The slot of a training program (eval and forward are run outside the step's `exec`).
    pub(super) fn slot(&mut self, key: ProgramKey) -> &mut Option<Box<dyn Program>> {
        match key {
            ProgramKey::Lower => &mut self.lower,
            ProgramKey::Upper => &mut self.upper,
            ProgramKey::TrainStep => &mut self.step,
            ProgramKey::UpperVal => &mut self.upper_val,
            ProgramKey::UpperMixed => &mut self.upper_mixed,
            ProgramKey::Eval | ProgramKey::Forward => {
                unreachable!("exec runs only training programs, not {key}")
            }
        }
    }
}

/// Loads `key`'s program. A file the manifest lists but the folder lacks is refused here, by
/// name, rather than as whatever the backend makes of a missing path.
pub(super) fn load(
    art: &Artifact,
    backend: &dyn Backend,
    key: ProgramKey,
) -> Result<Box<dyn Program>, TrainError> {
    let sig = art
        .program(key)
        .map_err(|e| TrainError::Artifact(e.to_string()))?;
    let path = art.dir.join(&sig.file);
    if !path.is_file() {
        return Err(missing(art, key));
    }
    backend.load(&path).map_err(|e| TrainError::Run {
        program: sig.file.clone(),
        message: e.to_string(),
    })
}

/// The error for a program the run needs and does not have, with how to get it.
pub(super) fn missing(art: &Artifact, key: ProgramKey) -> TrainError {
    let remedy = match key {
        ProgramKey::Lower | ProgramKey::Upper => {
            "BiDoRA needs it: compile the artifact again from a DoRA model with --task (without \
             --no-bilevel)"
        }
        ProgramKey::UpperVal | ProgramKey::UpperMixed => {
            "a data-parallel (or phased) BiDoRA run needs the upper program's phases: compile \
             the artifact again with this bidora-compile"
        }
        ProgramKey::TrainStep | ProgramKey::Eval => {
            "training needs it: compile the artifact again with --task"
        }
        ProgramKey::Forward => {
            "generation needs it: compile the artifact again with --task (a causal-lm head)"
        }
    };
    TrainError::MissingProgram {
        file: art
            .manifest
            .program(key)
            .map_or_else(|| key.file().to_string(), |s| s.file.clone()),
        dir: art.dir.clone(),
        remedy: remedy.into(),
    }
}

impl Trainer<'_> {
    pub(super) fn load_phases(&mut self, backend: &dyn Backend) -> Result<(), TrainError> {
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
            if self.art.program(key).is_err() {
                return Err(TrainError::Artifact(format!(
                    "a data-parallel BiDoRA run needs {} (the upper program's phases), which \
                     this artifact lacks: compile it again with this bidora-compile",
                    key.file()
                )));
            }
            *self.progs.slot(key) = Some(load(self.art, backend, key)?);
        }
        Ok(())
    }
}
