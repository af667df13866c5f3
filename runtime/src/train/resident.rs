//! Resident mode: the trainable tensors, their gradients and both AdamW moments stay in the
//! backend's memory between program runs (on the GPU under ONNX Runtime's CUDA provider), and
//! the optimiser runs there too, as the compiler's AdamW program (`bidora_compiler::optim`).
//! Per step only the batch goes to the device and the losses come back.
//!
//! The host copies in the `Trainer` (tensors, `AdamW` moments) are brought up to date before
//! anything reads them (evaluation, checkpoints, saved tensors) and uploaded again after the
//! host changes them (the retrain phase's re-initialisation). A non-finite loss still stops
//! the run; gradients are not inspected on the host (that would copy them back every step).

use std::collections::HashMap;
use std::path::Path;

use ndarray::ArrayD;

use super::TrainError;
use crate::backend::{Arg, Backend, HostTensor, Output, Program, Resident};
use crate::optim::AdamW;
use bidora_compiler::optim as prog;

/// Which AdamW (and parameter group) a step updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    Lower,
    Upper,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Lower => "lower",
            Level::Upper => "upper",
        }
    }
}

pub struct State {
    pub params: HashMap<String, Resident>,
    m: HashMap<String, Resident>,
    v: HashMap<String, Resident>,
    adamw: HashMap<Level, (Vec<String>, Box<dyn Program>)>,
}

fn run_err(what: &str, e: impl std::fmt::Display) -> TrainError {
    TrainError::Run {
        program: what.to_string(),
        message: e.to_string(),
    }
}

impl State {
    /// Builds the AdamW program of each non-empty group (written to `run_dir/programs/`),
    /// loads it with `backend` and uploads the tensors and moments.
    pub fn new(
        backend: &dyn Backend,
        run_dir: &Path,
        params: &[(String, ArrayD<f32>)],
        groups: &[(Level, &[String])],
        opts: [&AdamW; 2],
    ) -> Result<State, TrainError> {
        let mut adamw = HashMap::new();
        for &(level, group) in groups {
            if group.is_empty() {
                continue;
            }
            let shapes: Vec<(String, Vec<usize>)> = params
                .iter()
                .filter(|(n, _)| group.contains(n))
                .map(|(n, a)| (n.clone(), a.shape().to_vec()))
                .collect();
            let model = prog::adamw_program(&shapes);
            let path = run_dir
                .join("programs")
                .join(format!("adamw-{}.onnx", level.name()));
            let dir = path.parent().expect("has a parent");
            std::fs::create_dir_all(dir).map_err(|e| TrainError::Checkpoint {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })?;
            let proto = bidora_compiler::ir::convert::model_to_proto(&model);
            bidora_compiler::onnx_io::write_model_auto(&proto, &path).map_err(|e| {
                TrainError::Checkpoint {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            let p = backend
                .load(&path)
                .map_err(|e| run_err(&path.display().to_string(), e))?;
            adamw.insert(level, (shapes.into_iter().map(|s| s.0).collect(), p));
        }
        let mut s = State {
            params: HashMap::new(),
            m: HashMap::new(),
            v: HashMap::new(),
            adamw,
        };
        s.upload(params, opts)?;
        Ok(s)
    }

    fn uploader(&self) -> &dyn Program {
        &*self
            .adamw
            .values()
            .next()
            .expect("a run trains at least one group")
            .1
    }

    /// Replaces every resident value by the host's: tensors, and each group's moments (zeros
    /// where its AdamW has none yet).
    pub fn upload(
        &mut self,
        params: &[(String, ArrayD<f32>)],
        opts: [&AdamW; 2],
    ) -> Result<(), TrainError> {
        let up = |t: HostTensor| {
            self.uploader()
                .upload(&t)
                .map_err(|e| run_err("uploading", e))
        };
        let mut res = HashMap::new();
        for (n, a) in params {
            res.insert(n.clone(), up(HostTensor::F32(a.clone()))?);
        }
        let (mut m, mut v) = (HashMap::new(), HashMap::new());
        for (level, opt) in [(Level::Lower, opts[0]), (Level::Upper, opts[1])] {
            let Some((names, _)) = self.adamw.get(&level) else {
                continue;
            };
            let (om, ov) = opt.moments();
            for n in names {
                let a = &params
                    .iter()
                    .find(|(p, _)| p == n)
                    .expect("a group member")
                    .1;
                let zeros = || ArrayD::zeros(a.raw_dim());
                let mm = om.get(n).cloned().unwrap_or_else(zeros);
                let vv = ov.get(n).cloned().unwrap_or_else(zeros);
                m.insert(n.clone(), up(HostTensor::F32(mm))?);
                v.insert(n.clone(), up(HostTensor::F32(vv))?);
            }
        }
        (self.params, self.m, self.v) = (res, m, v);
        Ok(())
    }

    /// Copies the resident tensors and moments into the host's.
    pub fn download(
        &self,
        params: &mut [(String, ArrayD<f32>)],
        opts: [&mut AdamW; 2],
    ) -> Result<(), TrainError> {
        let host = |r: &Resident| -> Result<ArrayD<f32>, TrainError> {
            match r.to_host().map_err(|e| run_err("downloading", e))? {
                HostTensor::F32(a) => Ok(a),
                other => Err(run_err(
                    "downloading",
                    format!("a {} tensor where f32 was kept", other.dtype()),
                )),
            }
        };
        for (n, a) in params.iter_mut() {
            if let Some(r) = self.params.get(n) {
                *a = host(r)?;
            }
        }
        for (level, opt) in [Level::Lower, Level::Upper].into_iter().zip(opts) {
            let Some((names, _)) = self.adamw.get(&level) else {
                continue;
            };
            let (mut m, mut v) = (HashMap::new(), HashMap::new());
            for n in names {
                m.insert(n.clone(), host(&self.m[n])?);
                v.insert(n.clone(), host(&self.v[n])?);
            }
            let step = opt.steps();
            opt.restore(step, m, v);
        }
        Ok(())
    }

    /// One AdamW step of `level`'s group on the resident values with `grads` (resident, by
    /// parameter name) at learning rate `lr`; `opt` counts the step.
    pub fn step(
        &mut self,
        level: Level,
        opt: &mut AdamW,
        grads: &HashMap<String, &Resident>,
        lr: f32,
    ) -> Result<(), TrainError> {
        let scalars: Vec<(&str, HostTensor)> = opt
            .program_scalars(lr)
            .into_iter()
            .map(|(n, v)| (n, HostTensor::F32(ndarray::arr0(v).into_dyn())))
            .collect();
        let (names, program) = self
            .adamw
            .get_mut(&level)
            .ok_or_else(|| run_err("adamw", format!("no {} group", level.name())))?;
        let mut args: Vec<(String, Arg<'_>)> = scalars
            .iter()
            .map(|(n, t)| (n.to_string(), Arg::Host(t)))
            .collect();
        for n in names.iter() {
            let g = grads.get(n).ok_or_else(|| {
                run_err("adamw", format!("no gradient of '{n}' was kept resident"))
            })?;
            args.push((n.clone(), Arg::Resident(&self.params[n])));
            args.push((prog::grad_name(n), Arg::Resident(g)));
            args.push((prog::m_name(n), Arg::Resident(&self.m[n])));
            args.push((prog::v_name(n), Arg::Resident(&self.v[n])));
        }
        let what = format!("adamw-{}.onnx", level.name());
        let outs = program
            .run_resident(&args, &|_| true)
            .map_err(|e| run_err(&what, e))?;
        let mut named: HashMap<String, Resident> = program
            .output_names()
            .iter()
            .cloned()
            .zip(outs)
            .filter_map(|(n, o)| match o {
                Output::Resident(r) => Some((n, r)),
                Output::Host(_) => None,
            })
            .collect();
        for n in names.iter() {
            let mut take = |slot: String| {
                named
                    .remove(&prog::next_name(&slot))
                    .ok_or_else(|| run_err(&what, format!("no output for '{slot}'")))
            };
            let p = take(n.clone())?;
            let m = take(prog::m_name(n))?;
            let v = take(prog::v_name(n))?;
            self.params.insert(n.clone(), p);
            self.m.insert(n.clone(), m);
            self.v.insert(n.clone(), v);
        }
        Ok(())
    }
}
