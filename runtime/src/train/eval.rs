//! Scoring the eval program's logits against a split's labels, per task head, with the
//! metrics the paper reports (definitions in `crate::metrics`).
//!
//! | task | reported (default main metric first) | GLUE / paper choice via `metric` |
//! |---|---|---|
//! | seq-cls | accuracy, f1, macro_f1, mcc | `mcc` for CoLA, `f1` for MRPC |
//! | regression | pearson, spearman, mse | STS-B: pearson (spearman also logged) |
//! | multi-label | micro_f1 (sigmoid > 0.5), macro_f1, subset_accuracy | |
//! | token-cls | entity_f1, entity_precision, entity_recall, token_accuracy | |
//! | causal-lm | perplexity (lower is better); with generation: bleu, nist, rouge_l, cider | `bleu` for E2E |
//!
//! seq-cls `f1` is the F1 of class 1 when the head has two classes (GLUE's MRPC/QQP F1) and
//! the macro F1 otherwise. token-cls scores entities (conlleval's chunks) over the labelled
//! positions of each example (labels −100 are skipped), so it needs the tag names in id order:
//! the config's `data.labels`.

use ndarray::{ArrayD, Axis};
use serde::Serialize;

use super::TrainError;
use crate::backend::HostTensor;
use crate::metrics;

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

    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|(n, _)| n == name).map(|p| p.1)
    }
}

/// The metrics a task head reports, its default main metric first.
pub fn metric_names(task: &str) -> &'static [&'static str] {
    match task {
        "seq-cls" => &["accuracy", "f1", "macro_f1", "mcc"],
        "regression" => &["pearson", "spearman", "mse"],
        "multi-label" => &["micro_f1", "macro_f1", "subset_accuracy"],
        "token-cls" => &[
            "entity_f1",
            "entity_precision",
            "entity_recall",
            "token_accuracy",
        ],
        _ => &["perplexity", "bleu", "nist", "rouge_l", "cider"],
    }
}

/// The metric that selects the best checkpoint: `chosen` (the config's `metric`) or the
/// task's default.
pub fn main_metric_name(task: &str, chosen: Option<&str>) -> String {
    chosen.unwrap_or(metric_names(task)[0]).to_string()
}

/// Refuses a `metric` the task head does not report, naming the ones it does.
pub fn check_metric(task: &str, chosen: Option<&str>) -> Result<(), TrainError> {
    match chosen {
        Some(m) if !metric_names(task).contains(&m) => Err(TrainError::Config {
            origin: "metric".into(),
            message: format!(
                "'{m}' is not reported for a {task} head (choose one of: {})",
                metric_names(task).join(", ")
            ),
        }),
        _ => Ok(()),
    }
}

/// Collects predictions batch by batch.
pub struct Accumulator {
    task: String,
    main: String,
    /// token-cls: tag names by id.
    tags: Vec<String>,
    classes: usize,
    loss_sum: f64,
    count: usize,
    pred: Vec<i64>,
    gold: Vec<i64>,
    pred_f: Vec<f64>,
    gold_f: Vec<f64>,
    /// Multi-label: per example, predicted and gold label sets as 0/1 rows.
    rows_pred: Vec<Vec<bool>>,
    rows_gold: Vec<Vec<bool>>,
    /// token-cls: per example, the tag names at its labelled positions.
    seq_pred: Vec<Vec<String>>,
    seq_gold: Vec<Vec<String>>,
    /// causal-lm: the scores of generated texts, when this evaluation generated.
    generation: Option<crate::metrics::GenerationScores>,
}

impl Accumulator {
    /// `labels`: the class names in id order (needed by token-cls); `main`: the config's
    /// `metric`.
    pub fn new(
        task: &str,
        labels: Option<&[String]>,
        main: Option<&str>,
    ) -> Result<Accumulator, TrainError> {
        check_metric(task, main)?;
        if task == "token-cls" && labels.is_none() {
            return Err(TrainError::Config {
                origin: "data.labels".into(),
                message: "a token-cls head is scored by entities: list the tag names in id \
                          order (data.labels = [\"O\", \"B-PER\", ...])"
                    .into(),
            });
        }
        Ok(Accumulator {
            task: task.to_string(),
            main: main_metric_name(task, main),
            tags: labels.map(<[String]>::to_vec).unwrap_or_default(),
            classes: 0,
            loss_sum: 0.0,
            count: 0,
            pred: vec![],
            gold: vec![],
            pred_f: vec![],
            gold_f: vec![],
            rows_pred: vec![],
            rows_gold: vec![],
            seq_pred: vec![],
            seq_gold: vec![],
            generation: None,
        })
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
                self.classes = self.classes.max(*logits.shape().last().unwrap_or(&0));
                for (row, &g) in logits.axis_iter(Axis(0)).zip(y.iter()) {
                    self.pred.push(argmax(row.iter().copied()) as i64);
                    self.gold.push(g);
                }
            }
            ("token-cls", Some(HostTensor::I64(y))) => {
                let c = *logits.shape().last().ok_or_else(|| bad("scalar logits"))?;
                if logits.ndim() != 3 || y.ndim() != 2 || logits.shape()[..2] != y.shape()[..] {
                    return Err(bad(&format!(
                        "token-cls logits {:?} do not fit labels {:?}",
                        logits.shape(),
                        y.shape()
                    )));
                }
                let name = |id: i64| {
                    usize::try_from(id)
                        .ok()
                        .and_then(|i| self.tags.get(i))
                        .cloned()
                        .ok_or_else(|| {
                            bad(&format!(
                                "tag id {id} has no name: data.labels names {} tags, the head \
                                 has {c} classes",
                                self.tags.len()
                            ))
                        })
                };
                for (ex, gold) in logits.axis_iter(Axis(0)).zip(y.axis_iter(Axis(0))) {
                    let (mut p_tags, mut g_tags) = (vec![], vec![]);
                    for (tok, &g) in ex.axis_iter(Axis(0)).zip(gold.iter()) {
                        if g == -100 {
                            continue;
                        }
                        let p = argmax(tok.iter().copied()) as i64;
                        self.pred.push(p);
                        self.gold.push(g);
                        p_tags.push(name(p)?);
                        g_tags.push(name(g)?);
                    }
                    self.seq_pred.push(p_tags);
                    self.seq_gold.push(g_tags);
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

    /// Adds the scores of texts generated from the split (causal-lm).
    pub fn add_generation(&mut self, s: crate::metrics::GenerationScores) {
        self.generation = Some(s);
    }

    pub fn finish(self) -> Result<Scores, TrainError> {
        let loss = self.loss_sum / self.count.max(1) as f64;
        let (p, g) = (&self.pred, &self.gold);
        let mut values: Vec<(&str, f64)> = match self.task.as_str() {
            "seq-cls" => vec![
                ("accuracy", metrics::accuracy(p, g)),
                (
                    "f1",
                    if self.classes <= 2 {
                        metrics::f1_binary(p, g, 1)
                    } else {
                        metrics::f1_macro(p, g)
                    },
                ),
                ("macro_f1", metrics::f1_macro(p, g)),
                ("mcc", metrics::matthews(p, g)),
            ],
            "regression" => {
                let (p, g) = (&self.pred_f, &self.gold_f);
                vec![
                    ("pearson", metrics::pearson(p, g)),
                    ("spearman", metrics::spearman(p, g)),
                    ("mse", metrics::mse(p, g)),
                ]
            }
            "multi-label" => {
                let (p, g) = (&self.rows_pred, &self.rows_gold);
                vec![
                    ("micro_f1", metrics::multilabel_f1_micro(p, g)),
                    ("macro_f1", metrics::multilabel_f1_macro(p, g)),
                    ("subset_accuracy", metrics::subset_accuracy(p, g)),
                ]
            }
            "token-cls" => {
                let e = metrics::entity_scores(&self.seq_gold, &self.seq_pred)
                    .map_err(|e| TrainError::Data(format!("evaluation: {e}")))?;
                vec![
                    ("entity_f1", e.f1),
                    ("entity_precision", e.precision),
                    ("entity_recall", e.recall),
                    ("token_accuracy", metrics::accuracy(p, g)),
                ]
            }
            _ => {
                let mut v = vec![("perplexity", loss.exp())];
                if let Some(g) = &self.generation {
                    v.extend([
                        ("bleu", g.bleu),
                        ("nist", g.nist),
                        ("rouge_l", g.rouge_l),
                        ("cider", g.cider),
                    ]);
                }
                v
            }
        };
        if !values.iter().any(|(n, _)| *n == self.main) {
            return Err(TrainError::Data(format!(
                "evaluation: the main metric '{}' was not computed (generation metrics need \
                 generation at this evaluation)",
                self.main
            )));
        }
        // The main metric first: `Scores::main` and best-checkpoint selection read it there.
        if let Some(i) = values.iter().position(|(n, _)| *n == self.main) {
            values[..=i].rotate_right(1);
        }
        Ok(Scores {
            loss,
            lower_is_better: matches!(self.main.as_str(), "perplexity" | "mse"),
            metrics: values
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
        })
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

#[cfg(test)]
mod tests {
    use ndarray::{arr2, arr3, ArrayD};

    use super::*;

    fn i64s(a: ndarray::Array2<i64>) -> HostTensor {
        HostTensor::I64(a.into_dyn())
    }

    #[test]
    fn seq_cls_reports_glue_metrics_and_the_chosen_main_one() {
        let logits: ArrayD<f32> =
            arr2(&[[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]]).into_dyn();
        let y = HostTensor::I64(ndarray::arr1(&[0i64, 1, 0, 1]).into_dyn());
        let mut a = Accumulator::new("seq-cls", None, Some("mcc")).unwrap();
        a.add(&logits, Some(&y), 0.5, 4).unwrap();
        let s = a.finish().unwrap();
        // pred 0 1 1 0 vs gold 0 1 0 1: tp 1, fp 1, fn 1, tn 1.
        assert_eq!(s.main(), ("mcc", 0.0));
        assert_eq!(s.get("accuracy"), Some(0.5));
        assert_eq!(s.get("f1"), Some(0.5));
        assert!(!s.better(0.1, 0.2));
        assert!(Accumulator::new("seq-cls", None, Some("bleu")).is_err());
    }

    #[test]
    fn token_cls_scores_entities_over_labelled_positions() {
        let tags: Vec<String> = ["O", "B-PER", "I-PER"].map(String::from).to_vec();
        // One example of four positions; position 2 is a continuation sub-token (−100).
        // Gold: B-PER I-PER (skip) O; predicted: B-PER I-PER (anything) O → one correct entity.
        let logits: ArrayD<f32> = arr3(&[[
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0],
        ]])
        .into_dyn();
        let y = i64s(arr2(&[[1, 2, -100, 0]]));
        let mut a = Accumulator::new("token-cls", Some(&tags), None).unwrap();
        a.add(&logits, Some(&y), 0.1, 1).unwrap();
        let s = a.finish().unwrap();
        assert_eq!(s.main(), ("entity_f1", 1.0));
        assert_eq!(s.get("token_accuracy"), Some(1.0));
        // Predicting I-PER at the start of a chunk is still a PER chunk (IOB1 reading), but
        // ending it early is a miss.
        let logits: ArrayD<f32> = arr3(&[[
            [0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0],
        ]])
        .into_dyn();
        let mut a = Accumulator::new("token-cls", Some(&tags), None).unwrap();
        a.add(&logits, Some(&y), 0.1, 1).unwrap();
        let s = a.finish().unwrap();
        assert_eq!(s.main(), ("entity_f1", 0.0));
        assert!(Accumulator::new("token-cls", None, None).is_err());
        let short = vec!["O".to_string()];
        let mut a = Accumulator::new("token-cls", Some(&short), None).unwrap();
        assert!(a.add(&logits, Some(&y), 0.1, 1).is_err());
    }

    #[test]
    fn regression_and_multi_label() {
        let logits: ArrayD<f32> = arr2(&[[1.0], [2.0], [3.0]]).into_dyn();
        let y = HostTensor::F32(arr2(&[[1.0f32], [3.0], [2.0]]).into_dyn());
        let mut a = Accumulator::new("regression", None, Some("mse")).unwrap();
        a.add(&logits, Some(&y), 0.0, 3).unwrap();
        let s = a.finish().unwrap();
        assert_eq!(s.main().0, "mse");
        assert!((s.main().1 - 2.0 / 3.0).abs() < 1e-12);
        assert!(s.better(0.1, 0.2), "lower MSE is better");
        assert!((s.get("pearson").unwrap() - 0.5).abs() < 1e-12);
        let logits: ArrayD<f32> = arr2(&[[2.0, -1.0], [-3.0, 0.5]]).into_dyn();
        let y = HostTensor::F32(arr2(&[[1.0f32, 0.0], [0.0, 0.0]]).into_dyn());
        let mut a = Accumulator::new("multi-label", None, None).unwrap();
        a.add(&logits, Some(&y), 0.0, 2).unwrap();
        let s = a.finish().unwrap();
        assert_eq!(s.main().0, "micro_f1");
        assert!((s.main().1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.get("subset_accuracy"), Some(0.5));
    }
}
