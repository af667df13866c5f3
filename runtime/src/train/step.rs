//! One step of each phase: the search phase's lower step and, at the end of each unroll, the
//! upper step (one program, or its two phases with reductions between them on several
//! ranks); the retrain phase's and the single-level methods' single program.

use std::collections::HashMap;
use std::time::Instant;

use ndarray::ArrayD;
use serde_json::json;

use super::exec::{hyper, norm, Grads};
use super::state::{Phase, Source};
use super::{resident, schedule, Method, TrainError, Trainer};
use crate::artifact::{Hyperparameter, ProgramKey, Role};
use crate::backend::{HostTensor, Output};

impl Trainer<'_> {
    /// One step of the current phase; returns what it logs.
    pub(super) fn step(&mut self) -> Result<serde_json::Value, TrainError> {
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
                let (b_tr, w_tr) = self.batch(Source::Train)?;
                let gamma = self.gamma();
                let res = self.exec(
                    ProgramKey::Lower,
                    &[("", &b_tr)],
                    vec![hyper(Hyperparameter::Gamma, gamma)],
                    &[],
                )?;
                let mut g = self.grads(ProgramKey::Lower, &res, Role::Gradient, &lower_group)?;
                let lower = &self.progs.bindings[&ProgramKey::Lower];
                let (loss_at, reg) = (lower.loss, lower.regularizer);
                let mut sums = vec![self.host_sum(ProgramKey::Lower, &res, loss_at)?];
                if reg.is_some() {
                    sums.push(self.host_sum(ProgramKey::Lower, &res, reg)?);
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
                    let (b_val, w_val) = self.batch(Source::Val)?;
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
                        let ures = self.exec(
                            ProgramKey::Upper,
                            &[("train.", &b_tr), ("val.", &b_val)],
                            vec![
                                hyper(Hyperparameter::Xi, xi),
                                hyper(Hyperparameter::AlphaFd, alpha),
                            ],
                            &res,
                        )?;
                        let h = self.grads(
                            ProgramKey::Upper,
                            &ures,
                            Role::Hypergradient,
                            &self.upper_group,
                        )?;
                        let val_loss = self.progs.bindings[&ProgramKey::Upper].loss;
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
                    (Method::Bidora, _) => (ProgramKey::Lower, Source::All),
                    _ => (ProgramKey::TrainStep, Source::Train),
                };
                let (b, w) = self.batch(stream)?;
                let extra = match key {
                    ProgramKey::Lower => vec![hyper(Hyperparameter::Gamma, self.gamma())],
                    _ => vec![],
                };
                let res = self.exec(key, &[("", &b)], extra, &[])?;
                let mut g = self.grads(key, &res, Role::Gradient, &lower_group)?;
                let loss_at = self.progs.bindings[&key].loss;
                let mut sums = [self.host_sum(key, &res, loss_at)?];
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
        // The lower step's outputs with its V gradients replaced by the global g; its
        // ∇_M L_tr stays this rank's (fd-forward differences it with this rank's pass at V⁺).
        let lower = &self.progs.bindings[&ProgramKey::Lower].outputs;
        let mut prev: Vec<(String, Output)> = vec![];
        for ((n, o), slot) in lower_out.iter().zip(lower) {
            let global = slot
                .of
                .as_ref()
                .filter(|_| slot.role == Role::Gradient)
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
        )?;
        let mut hv = self.grads(ProgramKey::UpperVal, &vres, Role::ValGradient, &both)?;
        let val_loss = self.progs.bindings[&ProgramKey::UpperVal].loss;
        let mut sums = [self.host_sum(ProgramKey::UpperVal, &vres, val_loss)?];
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
        let upper_val = &self.progs.bindings[&ProgramKey::UpperVal];
        for (i, of) in upper_val.with_role(Role::ValGradient) {
            if let Some(a) = hv.get(of) {
                let name = upper_val.outputs[i].name.clone();
                prev.push((name, Output::Host(HostTensor::F32(a.clone()))));
            }
        }
        let mres = self.exec(
            ProgramKey::UpperMixed,
            &[("train.", b_tr)],
            vec![hyper(Hyperparameter::AlphaFd, alpha)],
            &prev,
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
}
