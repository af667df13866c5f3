//! The artifact's programs as the trainer holds them: loaded once at the start, each refused
//! by name (with what to compile) when the configuration needs it and the artifact lacks it.

use super::{generation, Method, RunData, TrainConfig, TrainError, Trainer};
use std::collections::HashMap;

use crate::artifact::{Artifact, ProgramKey, Role};
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
    /// Every loaded program's inputs bound to their sources (eval and the training ones).
    pub(super) bindings: HashMap<ProgramKey, Binding>,
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
        let mut p = Programs {
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
            bindings: HashMap::new(),
        };
        for key in [
            ProgramKey::TrainStep,
            ProgramKey::Lower,
            ProgramKey::Upper,
            ProgramKey::Eval,
        ] {
            p.bind(art, key)?;
        }
        Ok(p)
    }

    /// Binds `key`'s inputs, if it is loaded.
    pub(super) fn bind(&mut self, art: &Artifact, key: ProgramKey) -> Result<(), TrainError> {
        let prog = match key {
            ProgramKey::Eval => Some(&self.eval),
            ProgramKey::Forward => self.forward.as_ref(),
            k => self.slot(k).as_ref(),
        };
        if let Some(prog) = prog {
            let b = Binding::new(art, key, &**prog)?;
            self.bindings.insert(key, b);
        }
        Ok(())
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
            self.progs.bind(self.art, key)?;
        }
        Ok(())
    }
}

/// Where one program input comes from, decided once at load from its role in the manifest.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Feed {
    /// Field `field` of the batch fed under `prefix` (`""`, or the upper program's `train.`
    /// and `val.`).
    Batch { prefix: String, field: String },
    /// A trainable tensor (an adapter factor, a magnitude or a head tensor): its index in
    /// `init.safetensors`' order, which the trainer's tensors keep.
    Param(usize),
    /// A hyperparameter or an earlier program's output, passed by name at each step.
    Named,
}

/// What one program output is, from the manifest: its role and, for a gradient-like role,
/// the tensor it belongs to (`of`).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Out {
    pub(super) name: String,
    pub(super) role: Role,
    pub(super) of: Option<String>,
}

/// A program's inputs and outputs, in its order, each bound to its source or role. Built once
/// at load, so a step walks lists and indexes outputs instead of matching names, and an input
/// or output the manifest does not describe is refused before the first step.
#[derive(Clone, Debug)]
pub(super) struct Binding {
    pub(super) inputs: Vec<(String, Feed)>,
    pub(super) outputs: Vec<Out>,
    /// The output logged as the step's loss: the manifest's first loss (the lower program's
    /// is the task loss plus γ·R).
    pub(super) loss: Option<usize>,
    /// The regulariser's value R(V), logged beside the loss (lower program).
    pub(super) regularizer: Option<usize>,
}

impl Binding {
    /// (index, tensor it belongs to) of the outputs with `role`.
    pub(super) fn with_role(&self, role: Role) -> impl Iterator<Item = (usize, &str)> {
        self.outputs
            .iter()
            .enumerate()
            .filter(move |(_, o)| o.role == role)
            .filter_map(|(i, o)| Some((i, o.of.as_deref()?)))
    }

    /// Whether resident mode keeps output `i` on the device: the gradients and
    /// hypergradients the optimiser consumes there.
    pub(super) fn resident(&self, i: usize) -> bool {
        self.outputs
            .get(i)
            .is_some_and(|o| matches!(o.role, Role::Gradient | Role::Hypergradient))
    }
}

impl Binding {
    pub(super) fn new(
        art: &Artifact,
        key: ProgramKey,
        prog: &dyn Program,
    ) -> Result<Binding, TrainError> {
        let sig = art
            .program(key)
            .map_err(|e| TrainError::Artifact(e.to_string()))?;
        let mut inputs = vec![];
        for name in prog.input_names() {
            let Some(s) = sig.inputs.iter().find(|s| s.name == *name) else {
                return Err(TrainError::Artifact(format!(
                    "{}: input '{name}' is not in manifest.json's signature of the program (the \
                     two were not written together); compile the artifact again",
                    sig.file
                )));
            };
            let feed = match s.role {
                Role::Data | Role::Label => {
                    let field = s.of.clone().unwrap_or_else(|| name.clone());
                    let Some(prefix) = name.strip_suffix(field.as_str()) else {
                        return Err(TrainError::Artifact(format!(
                            "{}: batch input '{name}' does not end in the model input it \
                             feeds ('{field}'); compile the artifact again",
                            sig.file
                        )));
                    };
                    Feed::Batch {
                        prefix: prefix.to_string(),
                        field,
                    }
                }
                Role::Adapter | Role::Magnitude | Role::Head => {
                    match art.init.iter().position(|(n, _)| n == name) {
                        Some(i) => Feed::Param(i),
                        None => {
                            return Err(TrainError::Artifact(format!(
                                "{}: trainable input '{name}' has no initial value in \
                                 init.safetensors; compile the artifact again",
                                sig.file
                            )))
                        }
                    }
                }
                _ => Feed::Named,
            };
            inputs.push((name.clone(), feed));
        }
        let mut outputs = vec![];
        for name in prog.output_names() {
            let Some(s) = sig.outputs.iter().find(|s| s.name == *name) else {
                return Err(TrainError::Artifact(format!(
                    "{}: output '{name}' is not in manifest.json's signature of the program \
                     (the two were not written together); compile the artifact again",
                    sig.file
                )));
            };
            outputs.push(Out {
                name: name.clone(),
                role: s.role,
                of: s.of.clone(),
            });
        }
        let first = |role: Role| {
            let name = &sig.outputs_with(role).next()?.name;
            outputs.iter().position(|o| o.name == *name)
        };
        let (loss, regularizer) = (first(Role::Loss), first(Role::Regularizer));
        Ok(Binding {
            inputs,
            outputs,
            loss,
            regularizer,
        })
    }
}
