//! Running one training program: its inputs from the batches, the trainable tensors and an
//! earlier program's outputs (host or resident), the gradients it gives per level, their
//! reduction across ranks, and the AdamW step that applies them.

use std::collections::HashMap;
use std::time::Instant;

use ndarray::{ArrayD, IxDyn};

use super::state::Source;
use super::{bind, resident, shard, TrainError, Trainer};
use crate::artifact::{Hyperparameter, ProgramKey, Role};
use crate::backend::{Arg, HostTensor, Output, Program, Resident};

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

/// Gradients from a program run: host arrays, or values kept resident.
pub(super) enum Grads<'o> {
    Host(HashMap<String, ArrayD<f32>>),
    Resident(HashMap<String, &'o Resident>),
}

impl Trainer<'_> {
    /// Program inputs: `batch` (under `prefix`), the trainable tensors, and `extra`, keeping
    /// only names the program has.
    pub(super) fn feed(
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

    pub(super) fn loss_output(&self, key: ProgramKey) -> Result<String, TrainError> {
        let sig = &self.art.manifest.programs[&key];
        sig.outputs_with(Role::Loss)
            .next()
            .map(|o| o.name.clone())
            .ok_or_else(|| TrainError::Artifact(format!("{} has no loss output", sig.file)))
    }

    /// Names of `key`'s outputs with this role: what resident mode keeps on the device.
    pub(super) fn role_outputs(
        &self,
        key: ProgramKey,
        role: Role,
    ) -> std::collections::HashSet<String> {
        self.art.manifest.programs[&key]
            .outputs_with(role)
            .map(|o| o.name.clone())
            .collect()
    }

    /// Runs program `key` (taken out of its slot and put back: feeding it reads `self`) on
    /// the batches, the trainable tensors, `extra` host values and `prev` (an earlier
    /// program's outputs, read by name). In resident mode the tensors are the resident ones
    /// and the outputs `keep` names stay resident; otherwise everything is on the host.
    pub(super) fn exec(
        &mut self,
        key: ProgramKey,
        batches: &[(&str, &[(String, HostTensor)])],
        extra: Vec<(String, HostTensor)>,
        prev: &[(String, Output)],
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Output)>, TrainError> {
        let mut p = self
            .progs
            .slot(key)
            .take()
            .ok_or_else(|| bind::missing(self.art, key))?;
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
                ProgramKey::TrainStep => "train_step",
                ProgramKey::Eval => "eval",
                ProgramKey::Forward => "forward",
            },
            t,
        );
        let names = p.output_names().to_vec();
        *self.progs.slot(key) = Some(p);
        let outs = r.map_err(|e| TrainError::Run {
            program: self.art.manifest.programs[&key].file.clone(),
            message: e.to_string(),
        })?;
        Ok(names.into_iter().zip(outs).collect())
    }

    /// The sum of a host output (a loss).
    pub(super) fn host_sum(
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
    pub(super) fn grads<'o>(
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
