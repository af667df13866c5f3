//! Running one training program: its inputs from the batches, the trainable tensors and an
//! earlier program's outputs (host or resident), the gradients it gives per level, their
//! reduction across ranks, and the AdamW step that applies them.

use std::collections::HashMap;
use std::time::Instant;

use ndarray::{ArrayD, IxDyn};

use super::bind::{self, Feed};
use super::state::Source;
use super::{resident, shard, TrainError, Trainer};
use crate::artifact::{Hyperparameter, ProgramKey, Role};
use crate::backend::{Arg, HostTensor, Output, Resident};

/// A hyperparameter input and its value.
pub(super) fn hyper(h: Hyperparameter, v: f64) -> (String, HostTensor) {
    (h.input_name().to_string(), scalar(v))
}

pub(super) fn scalar(v: f64) -> HostTensor {
    HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v as f32))
}

pub(super) fn f32_of(t: &HostTensor, what: &str) -> Result<ArrayD<f32>, TrainError> {
    t.as_f32().cloned().ok_or_else(|| TrainError::Run {
        program: what.into(),
        message: "expected an f32 output".into(),
    })
}

/// The Euclidean norm of the tensors of `group` together, in f64 and in the group's order
/// (so a rerun or a resumed run logs the same bits); logged: the hypergradient's size per
/// upper step.
pub(super) fn norm(tensors: &HashMap<String, ArrayD<f32>>, group: &[String]) -> f64 {
    group
        .iter()
        .filter_map(|n| tensors.get(n))
        .flat_map(|a| a.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// One input's value for a step, where it lives.
enum Val<'a> {
    Host(&'a HostTensor),
    Param(&'a ArrayD<f32>),
    Resident(&'a Resident),
}

/// Gradients from a program run: host arrays, or values kept resident.
pub(super) enum Grads<'o> {
    Host(HashMap<String, ArrayD<f32>>),
    Resident(HashMap<String, &'o Resident>),
}

impl Trainer<'_> {
    /// The inputs of program `key` for one step, in the program's order, from its binding:
    /// batch fields from `batches` (by prefix), the trainable tensors (resident ones in
    /// resident mode), and named values from `extra`, then `prev` (an earlier program's
    /// outputs). An input none of them supplies is an error naming it. `resident`: the
    /// trainable tensors are the device-resident ones (a training step in resident mode), not
    /// the host copies (evaluation reads those, synchronised before it runs).
    fn gather<'a>(
        &'a self,
        key: ProgramKey,
        resident: bool,
        batches: &[(&str, &'a [(String, HostTensor)])],
        extra: &'a [(String, HostTensor)],
        prev: &'a [(String, Output)],
    ) -> Result<Vec<(&'a str, Val<'a>)>, TrainError> {
        let binding = &self.progs.bindings[&key];
        let file = &self.art.manifest.programs[&key].file;
        let mut v = Vec::with_capacity(binding.inputs.len());
        for (name, feed) in &binding.inputs {
            let val = match feed {
                Feed::Batch { prefix, field } => batches
                    .iter()
                    .find(|(p, _)| p == prefix)
                    .and_then(|(_, b)| b.iter().find(|(n, _)| n == field))
                    .map(|(_, t)| Val::Host(t)),
                Feed::Param(i) => match self.res.as_ref().filter(|_| resident) {
                    Some(res) => res.params.get(name).map(Val::Resident),
                    None => self.params.get(*i).map(|(n, a)| {
                        debug_assert_eq!(n, name);
                        Val::Param(a)
                    }),
                },
                Feed::Named => extra
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| Val::Host(t))
                    .or_else(|| {
                        prev.iter().find(|(n, _)| n == name).map(|(_, o)| match o {
                            Output::Host(t) => Val::Host(t),
                            Output::Resident(r) => Val::Resident(r),
                        })
                    }),
            };
            let Some(val) = val else {
                return Err(TrainError::Run {
                    program: file.clone(),
                    message: format!(
                        "the step supplies no value for input '{name}' ({feed:?}); this is a \
                         bidora bug, please report it with the artifact's manifest.json"
                    ),
                });
            };
            v.push((name.as_str(), val));
        }
        Ok(v)
    }

    /// [`Self::gather`]'s inputs as host tensors (the trainable ones from the host copies), for
    /// a backend's `run`.
    pub(super) fn host_inputs(
        &self,
        key: ProgramKey,
        batches: &[(&str, &[(String, HostTensor)])],
        extra: &[(String, HostTensor)],
        prev: &[(String, Output)],
    ) -> Result<Vec<(String, HostTensor)>, TrainError> {
        self.gather(key, false, batches, extra, prev)?
            .into_iter()
            .map(|(n, v)| {
                let t = match v {
                    Val::Host(t) => t.clone(),
                    Val::Param(a) => HostTensor::F32(a.clone()),
                    Val::Resident(_) => {
                        return Err(TrainError::Run {
                            program: self.art.manifest.programs[&key].file.clone(),
                            message: format!("input '{n}' is resident, the run is on the host"),
                        })
                    }
                };
                Ok((n.to_string(), t))
            })
            .collect()
    }

    /// The next batch of stream `source` and the weight of this rank's means in the global
    /// batch's (1 in one process): this rank's rows of the global batch, which is padded as
    /// one process pads it.
    pub(super) fn batch(
        &mut self,
        source: Source,
    ) -> Result<(Vec<(String, HostTensor)>, f64), TrainError> {
        let pos = self.streams.get(source).next_batch(self.cfg.batch_size);
        let idx: Vec<usize> = match source {
            Source::Train => pos.iter().map(|&i| self.data.train_idx[i]).collect(),
            Source::Val => pos.iter().map(|&i| self.data.val_idx[i]).collect(),
            Source::All => pos
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
    pub(super) fn reduce(
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

    /// Runs program `key` (taken out of its slot and put back: feeding it reads `self`) on
    /// the batches, the trainable tensors, `extra` host values and `prev` (an earlier
    /// program's outputs, read by name). In resident mode the tensors are the resident ones
    /// and the outputs its binding marks resident stay so; otherwise everything is on the
    /// host. The outputs come back in the program's order, which the binding indexes.
    pub(super) fn exec(
        &mut self,
        key: ProgramKey,
        batches: &[(&str, &[(String, HostTensor)])],
        extra: Vec<(String, HostTensor)>,
        prev: &[(String, Output)],
    ) -> Result<Vec<(String, Output)>, TrainError> {
        let mut p = self
            .progs
            .slot(key)
            .take()
            .ok_or_else(|| bind::missing(self.art, key))?;
        let t = Instant::now();
        let r = if self.res.is_none() {
            let inputs = self.host_inputs(key, batches, &extra, prev);
            inputs.and_then(|i| {
                p.run(&i)
                    .map(|o| o.into_iter().map(Output::Host).collect::<Vec<_>>())
                    .map_err(|e| self.run_err(key, e))
            })
        } else {
            let args = self.gather(key, true, batches, &extra, prev).map(|vals| {
                vals.into_iter()
                    .map(|(n, v)| {
                        let arg = match v {
                            Val::Host(t) => Arg::Host(t),
                            Val::Resident(r) => Arg::Resident(r),
                            Val::Param(_) => unreachable!("resident runs bind resident tensors"),
                        };
                        (n.to_string(), arg)
                    })
                    .collect::<Vec<_>>()
            });
            let binding = &self.progs.bindings[&key];
            args.and_then(|a| {
                p.run_resident(&a, &|i| binding.resident(i))
                    .map_err(|e| self.run_err(key, e))
            })
        };
        self.time(
            match key {
                ProgramKey::Lower => "lower",
                ProgramKey::Upper => "upper",
                ProgramKey::UpperVal => "upper_val",
                ProgramKey::UpperMixed => "upper_mixed",
                ProgramKey::TrainStep => "train_step",
                ProgramKey::Eval => "eval",
                ProgramKey::Forward => "forward",
            },
            t,
        );
        let names = p.output_names().to_vec();
        *self.progs.slot(key) = Some(p);
        Ok(names.into_iter().zip(r?).collect())
    }

    fn run_err(&self, key: ProgramKey, e: impl std::fmt::Display) -> TrainError {
        TrainError::Run {
            program: self.art.manifest.programs[&key].file.clone(),
            message: e.to_string(),
        }
    }

    /// The sum of host output `i` (a loss), or an error naming the program when it lacks one.
    pub(super) fn host_sum(
        &self,
        key: ProgramKey,
        outs: &[(String, Output)],
        i: Option<usize>,
    ) -> Result<f64, TrainError> {
        let file = &self.art.manifest.programs[&key].file;
        let t = i
            .and_then(|i| outs.get(i))
            .and_then(|(_, o)| o.host())
            .ok_or_else(|| TrainError::Run {
                program: file.clone(),
                message: "no host loss output".into(),
            })?;
        Ok(f32_of(t, file)?.sum() as f64)
    }

    /// The gradients of `group` among `key`'s outputs of this role (bound at load to the
    /// tensors they belong to): host arrays, checked finite, or resident values.
    pub(super) fn grads<'o>(
        &self,
        key: ProgramKey,
        outs: &'o [(String, Output)],
        role: Role,
        group: &[String],
    ) -> Result<Grads<'o>, TrainError> {
        let file = &self.art.manifest.programs[&key].file;
        let mut host = HashMap::new();
        let mut res = HashMap::new();
        for (i, of) in self.progs.bindings[&key].with_role(role) {
            if !group.iter().any(|g| g == of) {
                continue;
            }
            match outs.get(i).map(|(_, v)| v) {
                Some(Output::Host(t)) => {
                    let a = f32_of(t, file)?;
                    if a.iter().any(|x| !x.is_finite()) {
                        return Err(self.non_finite(&format!("the {} of {of}", role.name())));
                    }
                    host.insert(of.to_string(), a);
                }
                Some(Output::Resident(r)) => {
                    res.insert(of.to_string(), r);
                }
                None => {
                    return Err(TrainError::Run {
                        program: file.clone(),
                        message: format!("no output {i} (the {} of {of})", role.name()),
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
    pub(super) fn optimize(
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
}
