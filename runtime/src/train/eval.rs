//! Scoring the eval program's logits against a split's labels, per task head.
//!
//! | task | main metric | also |
//! |---|---|---|
//! | seq-cls | accuracy | F1 (binary: class 1; else macro), Matthews correlation |
//! | regression | Pearson | Spearman, MSE |
//! | multi-label | micro-F1 (sigmoid > 0.5) | macro-F1 |
//! | token-cls | token accuracy (labelled tokens) | |
//! | causal-lm | perplexity (lower is better) | |

use ndarray::{ArrayD, Axis};
use serde::Serialize;

use super::TrainError;
use crate::backend::HostTensor;

#[derive(Clone, Debug, Serialize)]
pub struct Scores {
    /// Mean loss over the split (weighted by batch size).
    pub loss: f64,
    /// (name, value); the first is the main metric.
    pub metrics: Vec<(String, f64)>,
    #[serde(skip)]
    lower_is_better: bool,
}

impl Scores {
    pub fn main(&self) -> (&str, f64) {
        self.metrics
            .first()
            .map(|(n, v)| (n.as_str(), *v))
            .unwrap_or(("loss", self.loss))
    }

    pub fn better(&self, a: f64, b: f64) -> bool {
        if self.lower_is_better {
            a < b
        } else {
            a > b
        }
    }
}

pub fn main_metric_name(task: &str) -> String {
    match task {
        "seq-cls" => "accuracy",
        "regression" => "pearson",
        "multi-label" => "micro_f1",
        "token-cls" => "token_accuracy",
        _ => "perplexity",
    }
    .into()
}

/// Collects predictions batch by batch.
pub struct Accumulator {
    task: String,
    loss_sum: f64,
    count: usize,
    pred: Vec<i64>,
    gold: Vec<i64>,
    pred_f: Vec<f64>,
    gold_f: Vec<f64>,
    /// Multi-label: per example, predicted and gold label sets as 0/1 rows.
    rows_pred: Vec<Vec<bool>>,
    rows_gold: Vec<Vec<bool>>,
}

impl Accumulator {
    pub fn new(task: &str) -> Accumulator {
        Accumulator {
            task: task.to_string(),
            loss_sum: 0.0,
            count: 0,
            pred: vec![],
            gold: vec![],
            pred_f: vec![],
            gold_f: vec![],
            rows_pred: vec![],
            rows_gold: vec![],
        }
    }

    pub fn add(
        &mut self,
        logits: &ArrayD<f32>,
        labels: Option<&HostTensor>,
        loss: f64,
        n: usize,
    ) -> Result<(), TrainError> {
        self.loss_sum += loss * n as f64;
        self.count += n;
        let bad = |what: &str| TrainError::Data(format!("evaluation: {what}"));
        match (self.task.as_str(), labels) {
            ("seq-cls", Some(HostTensor::I64(y))) => {
                for (row, &g) in logits.axis_iter(Axis(0)).zip(y.iter()) {
                    self.pred.push(argmax(row.iter().copied()) as i64);
                    self.gold.push(g);
                }
            }
            ("token-cls", Some(HostTensor::I64(y))) => {
                let c = *logits.shape().last().ok_or_else(|| bad("scalar logits"))?;
                let flat = logits
                    .view()
                    .into_shape_with_order((logits.len() / c, c))
                    .map_err(|_| bad("logits shape"))?;
                for (row, &g) in flat.axis_iter(Axis(0)).zip(y.iter()) {
                    if g != -100 {
                        self.pred.push(argmax(row.iter().copied()) as i64);
                        self.gold.push(g);
                    }
                }
            }
            ("regression", Some(HostTensor::F32(y))) => {
                self.pred_f.extend(logits.iter().map(|&v| v as f64));
                self.gold_f.extend(y.iter().map(|&v| v as f64));
            }
            ("multi-label", Some(HostTensor::F32(y))) => {
                for (row, g) in logits.axis_iter(Axis(0)).zip(y.axis_iter(Axis(0))) {
                    self.rows_pred.push(row.iter().map(|&v| v > 0.0).collect());
                    self.rows_gold.push(g.iter().map(|&v| v > 0.5).collect());
                }
            }
            ("causal-lm", _) => {}
            (task, _) => return Err(bad(&format!("labels do not fit the {task} head"))),
        }
        Ok(())
    }

    pub fn finish(self) -> Scores {
        let loss = self.loss_sum / self.count.max(1) as f64;
        let (metrics, lower_is_better) = match self.task.as_str() {
            "seq-cls" => {
                let classes = self
                    .gold
                    .iter()
                    .chain(&self.pred)
                    .copied()
                    .max()
                    .unwrap_or(0)
                    + 1;
                let f1 = if classes <= 2 {
                    ("f1", metrics::f1_binary(&self.pred, &self.gold, 1))
                } else {
                    ("macro_f1", metrics::f1_macro(&self.pred, &self.gold))
                };
                (
                    vec![
                        (
                            "accuracy".to_string(),
                            metrics::accuracy(&self.pred, &self.gold),
                        ),
                        (f1.0.to_string(), f1.1),
                        ("mcc".to_string(), metrics::matthews(&self.pred, &self.gold)),
                    ],
                    false,
                )
            }
            "token-cls" => (
                vec![(
                    "token_accuracy".to_string(),
                    metrics::accuracy(&self.pred, &self.gold),
                )],
                false,
            ),
            "regression" => (
                vec![
                    (
                        "pearson".to_string(),
                        metrics::pearson(&self.pred_f, &self.gold_f),
                    ),
                    (
                        "spearman".to_string(),
                        metrics::spearman(&self.pred_f, &self.gold_f),
                    ),
                    ("mse".to_string(), metrics::mse(&self.pred_f, &self.gold_f)),
                ],
                false,
            ),
            "multi-label" => (
                vec![(
                    "micro_f1".to_string(),
                    metrics::multilabel_micro_f1(&self.rows_pred, &self.rows_gold),
                )],
                false,
            ),
            _ => (vec![("perplexity".to_string(), loss.exp())], true),
        };
        Scores {
            loss,
            metrics,
            lower_is_better,
        }
    }
}

fn argmax(v: impl Iterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, x) in v.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Interim metric functions until the metrics module lands; replaced by `crate::metrics`.
mod metrics {
    pub fn accuracy(p: &[i64], g: &[i64]) -> f64 {
        p.iter().zip(g).filter(|(a, b)| a == b).count() as f64 / g.len().max(1) as f64
    }
    fn counts(p: &[i64], g: &[i64], c: i64) -> (f64, f64, f64) {
        let tp = p
            .iter()
            .zip(g)
            .filter(|(a, b)| **a == c && **b == c)
            .count() as f64;
        let fp = p
            .iter()
            .zip(g)
            .filter(|(a, b)| **a == c && **b != c)
            .count() as f64;
        let fneg = p
            .iter()
            .zip(g)
            .filter(|(a, b)| **a != c && **b == c)
            .count() as f64;
        (tp, fp, fneg)
    }
    fn f1(tp: f64, fp: f64, fneg: f64) -> f64 {
        if tp == 0.0 {
            0.0
        } else {
            2.0 * tp / (2.0 * tp + fp + fneg)
        }
    }
    pub fn f1_binary(p: &[i64], g: &[i64], pos: i64) -> f64 {
        let (tp, fp, fneg) = counts(p, g, pos);
        f1(tp, fp, fneg)
    }
    pub fn f1_macro(p: &[i64], g: &[i64]) -> f64 {
        let mut classes: Vec<i64> = g.to_vec();
        classes.sort();
        classes.dedup();
        classes.iter().map(|&c| f1_binary(p, g, c)).sum::<f64>() / classes.len().max(1) as f64
    }
    pub fn matthews(p: &[i64], g: &[i64]) -> f64 {
        let (tp, fp, fneg) = counts(p, g, 1);
        let tn = g.len() as f64 - tp - fp - fneg;
        let d = ((tp + fp) * (tp + fneg) * (tn + fp) * (tn + fneg)).sqrt();
        if d == 0.0 {
            0.0
        } else {
            (tp * tn - fp * fneg) / d
        }
    }
    pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len().max(1) as f64;
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
        cov / (va * vb).sqrt().max(1e-300)
    }
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for k in i..=j {
                r[idx[k]] = (i + j) as f64 / 2.0 + 1.0;
            }
            i = j + 1;
        }
        r
    }
    pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
        pearson(&ranks(a), &ranks(b))
    }
    pub fn mse(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len().max(1) as f64
    }
    pub fn multilabel_micro_f1(p: &[Vec<bool>], g: &[Vec<bool>]) -> f64 {
        let (mut tp, mut fp, mut fneg) = (0.0, 0.0, 0.0);
        for (a, b) in p.iter().zip(g) {
            for (x, y) in a.iter().zip(b) {
                match (x, y) {
                    (true, true) => tp += 1.0,
                    (true, false) => fp += 1.0,
                    (false, true) => fneg += 1.0,
                    _ => {}
                }
            }
        }
        f1(tp, fp, fneg)
    }
}
