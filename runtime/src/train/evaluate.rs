//! Evaluation inside a run: scoring the current tensors on a split (with generation where
//! the head and data allow), logging the scores, and keeping the best tensors by the
//! validation metric.

use std::collections::HashMap;
use std::time::Instant;

use ndarray::ArrayD;
use serde_json::json;

use super::exec::f32_of;
use super::state::Best;
use super::{checkpoint, eval, generation, plot, Examples, TrainError, Trainer};
use crate::artifact::ProgramKey;
use crate::backend::{HostTensor, Program};

/// Indices of named outputs of a program.
fn outputs(p: &dyn Program) -> HashMap<String, usize> {
    p.output_names()
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i))
        .collect()
}

impl Trainer<'_> {
    /// Evaluates the current tensors on a split; logs and returns the scores. `generate`:
    /// also generate text and score it, where the head and data allow (causal-lm, e2e).
    pub(super) fn evaluate(
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
            let inputs = self.host_inputs(ProgramKey::Eval, &[("", &b)], &[], &[])?;
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
    pub(super) fn eval_and_select(
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
    pub(super) fn save_params(&mut self, name: &str) -> Result<(), TrainError> {
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
}
