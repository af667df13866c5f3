//! Loss heads the compiler appends to a model's logits, chosen with `--task`.
//!
//! Every loss is built from ops that tract and stock ONNX Runtime both run and that have
//! gradient rules here: no SoftmaxCrossEntropyLoss/NegativeLogLikelihoodLoss (tract lacks
//! them), no GatherElements on the logits (cross-entropy picks the label's log-probability
//! with a one-hot product instead). Losses are means over the counted elements.
//!
//! | task | labels input | loss |
//! |---|---|---|
//! | `seq-cls` | `labels: i64[batch]` | mean cross-entropy |
//! | `regression` | `labels: f32[batch]` (logits `[batch, 1]`) | mean squared error |
//! | `multi-label` | `labels: f32[batch, n]` in {0, 1} | mean binary cross-entropy with logits |
//! | `token-cls` | `labels: i64[batch, seq]`, -100 ignored | cross-entropy over labelled tokens |
//! | `causal-lm` | none: `input_ids` shifted, `attention_mask` masks padding | shifted cross-entropy |
//! | `causal-lm` with `--lm-labels` | `labels: i64[batch, seq]` aligned with `input_ids`, -100 ignored (a prompt, padding) | shifted cross-entropy over the kept labels |

use crate::error::{Error, Result};
use crate::ir::builder::Builder;
use crate::ir::{AttrValue, DataType, Dim, Model, Tensor, ValueInfo, ValueType};
use crate::shape;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    SeqCls,
    Regression,
    MultiLabel,
    TokenCls,
    CausalLm,
}

impl Task {
    /// The `--task` spelling (and the manifest's).
    pub fn name(self) -> &'static str {
        match self {
            Task::SeqCls => "seq-cls",
            Task::Regression => "regression",
            Task::MultiLabel => "multi-label",
            Task::TokenCls => "token-cls",
            Task::CausalLm => "causal-lm",
        }
    }
}

/// The label value peft and transformers ignore in token-level losses.
pub const IGNORE_INDEX: i64 = -100;

/// What the head added: the loss value and the label inputs it reads.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    pub task: Task,
    pub logits: String,
    pub loss: String,
    pub labels: Vec<String>,
}

/// Appends the loss for `task` to `model` (whose first output is the logits) and makes the
/// loss a graph output after the logits. `lm_labels` (causal-lm only): read the targets from
/// a `labels` input in Hugging Face's convention (aligned with `input_ids`, shifted here,
/// -100 ignored) instead of from `input_ids`, so a data-to-text prompt is not scored.
pub fn attach(model: &Model, task: Task, lm_labels: bool) -> Result<(Model, Head)> {
    if lm_labels && task != Task::CausalLm {
        return Err(Error::Other(format!(
            "--lm-labels applies to --task causal-lm, not {task:?}"
        )));
    }
    let facts = shape::infer(model)?;
    let mut m = model.clone();
    let logits = m
        .graph
        .outputs
        .first()
        .ok_or_else(|| Error::Other("the model has no output to put a loss on".into()))?
        .name
        .clone();
    let mut lf = facts.get(&logits).unwrap().clone();
    if lf.dtype.is_half() {
        // The loss is f32 whatever the model's type: the half logits get a new name and the
        // output's name becomes their f32 cast.
        let half = crate::ir::names::Names::of(&m.graph).value(&format!("{logits}.half"));
        for n in &mut m.graph.nodes {
            for v in n.inputs.iter_mut().chain(n.outputs.iter_mut()) {
                if *v == logits {
                    *v = half.clone();
                }
            }
        }
        m.graph.nodes.push(
            crate::ir::Node::new(
                "Cast",
                format!("{logits}.to_f32"),
                vec![half],
                vec![logits.clone()],
            )
            .with_attr("to", AttrValue::Int(DataType::Float as i64)),
        );
        m.graph.value_info.retain(|v| v.name != logits);
        m.graph.outputs[0].ty = Some(ValueType::tensor(
            DataType::Float,
            lf.shape
                .iter()
                .map(|d| match d.as_known() {
                    Some(v) => Dim::Known(v),
                    None => Dim::Sym(d.to_string()),
                })
                .collect(),
        ));
        lf.dtype = DataType::Float;
    }
    if lf.dtype != DataType::Float {
        return Err(Error::Other(format!(
            "logits '{logits}' are {}, not f32",
            lf.dtype.short_name()
        )));
    }
    let sym = |d: &shape::DimExpr| match d.as_known() {
        Some(v) => Dim::Known(v),
        None => Dim::Sym(d.to_string()),
    };
    let vocab = lf.shape.last().and_then(|d| d.as_known());
    let g = &mut m.graph;
    let mut labels = vec![];
    let mut b = Builder::new(g, "loss");
    let loss = match task {
        Task::SeqCls | Task::TokenCls | Task::CausalLm => {
            let v = vocab.ok_or_else(|| {
                Error::Other("the logits' last dim (classes) must be known".into())
            })?;
            if v < 2 {
                // log_softmax over one class is 0 whatever the logit: nothing would train.
                let hint = match task {
                    Task::SeqCls => {
                        "; for one real-valued output per example (an export with \
                                     num_labels=1) use --task regression"
                    }
                    _ => "",
                };
                return Err(Error::Other(format!(
                    "{} needs at least 2 classes, but logits '{logits}' are {}: cross-entropy \
                     over one class is identically 0{hint}",
                    task.name(),
                    lf.display()
                )));
            }
            let (label, mask) = match task {
                Task::SeqCls => {
                    if lf.rank() != 2 {
                        return Err(Error::Other(format!(
                            "seq-cls needs logits [batch, classes], got {}",
                            lf.display()
                        )));
                    }
                    labels.push((
                        "labels".to_string(),
                        DataType::Int64,
                        vec![sym(&lf.shape[0])],
                    ));
                    ("labels".to_string(), None)
                }
                Task::TokenCls => {
                    if lf.rank() != 3 {
                        return Err(Error::Other(format!(
                            "token-cls needs logits [batch, seq, classes], got {}",
                            lf.display()
                        )));
                    }
                    labels.push((
                        "labels".to_string(),
                        DataType::Int64,
                        vec![sym(&lf.shape[0]), sym(&lf.shape[1])],
                    ));
                    let (safe, keep) = ignore_mask(&mut b, "labels");
                    (safe, Some(keep))
                }
                _ if lm_labels => {
                    labels.push((
                        "labels".to_string(),
                        DataType::Int64,
                        vec![sym(&lf.shape[0]), sym(&lf.shape[1])],
                    ));
                    causal_lm_given_labels(&mut b, model, &lf)?
                }
                _ => causal_lm_labels(&mut b, model, &lf)?,
            };
            let lsm = b.op(
                "LogSoftmax",
                "log_probs",
                &[&logits],
                vec![("axis", AttrValue::Int(-1))],
            );
            let classes: Vec<i64> = (0..v).collect();
            let range = b.constant("classes", Tensor::from_i64("", vec![v], &classes));
            let last = b.ints("last", &[-1]);
            let col = b.op("Unsqueeze", "label_col", &[&label, &last], vec![]);
            let hot = b.op("Equal", "onehot_b", &[&col, &range], vec![]);
            let onehot = b.op(
                "Cast",
                "onehot",
                &[&hot],
                vec![("to", AttrValue::Int(DataType::Float as i64))],
            );
            let picked = b.op("Mul", "picked", &[&lsm, &onehot], vec![]);
            let ll = b.op(
                "ReduceSum",
                "log_lik",
                &[&picked, &last],
                vec![("keepdims", AttrValue::Int(0))],
            );
            let nll = b.op("Neg", "nll", &[&ll], vec![]);
            match mask {
                None => b.op(
                    "ReduceMean",
                    "mean",
                    &[&nll],
                    vec![("keepdims", AttrValue::Int(0))],
                ),
                Some(keep) => masked_mean(&mut b, &nll, &keep),
            }
        }
        Task::Regression => {
            if lf.rank() != 2 || lf.shape[1].as_known() != Some(1) {
                return Err(Error::Other(format!(
                    "regression needs logits [batch, 1], got {}",
                    lf.display()
                )));
            }
            labels.push((
                "labels".to_string(),
                DataType::Float,
                vec![sym(&lf.shape[0])],
            ));
            let last = b.ints("last", &[-1]);
            let pred = b.op("Squeeze", "pred", &[&logits, &last], vec![]);
            let d = b.op("Sub", "err", &[&pred, "labels"], vec![]);
            let d2 = b.op("Mul", "sq_err", &[&d, &d], vec![]);
            b.op(
                "ReduceMean",
                "mean",
                &[&d2],
                vec![("keepdims", AttrValue::Int(0))],
            )
        }
        Task::MultiLabel => {
            if lf.rank() != 2 {
                return Err(Error::Other(format!(
                    "multi-label needs logits [batch, labels], got {}",
                    lf.display()
                )));
            }
            labels.push((
                "labels".to_string(),
                DataType::Float,
                vec![sym(&lf.shape[0]), sym(&lf.shape[1])],
            ));
            // BCE with logits, stable form: relu(x) − x·y + log(1 + exp(−|x|)), |x| = relu(x) + relu(−x).
            let pos = b.op("Relu", "relu", &[&logits], vec![]);
            let neg_x = b.op("Neg", "neg", &[&logits], vec![]);
            let negp = b.op("Relu", "relu_neg", &[&neg_x], vec![]);
            let abs = b.op("Add", "abs", &[&pos, &negp], vec![]);
            let nabs = b.op("Neg", "neg_abs", &[&abs], vec![]);
            let e = b.op("Exp", "exp", &[&nabs], vec![]);
            let one = b.constant("one", Tensor::from_f32("", vec![], &[1.0]));
            let ope = b.op("Add", "one_plus", &[&one, &e], vec![]);
            let log = b.op("Log", "softplus_tail", &[&ope], vec![]);
            let xy = b.op("Mul", "x_y", &[&logits, "labels"], vec![]);
            let t = b.op("Sub", "t", &[&pos, &xy], vec![]);
            let bce = b.op("Add", "bce", &[&t, &log], vec![]);
            b.op(
                "ReduceMean",
                "mean",
                &[&bce],
                vec![("keepdims", AttrValue::Int(0))],
            )
        }
    };
    let nodes = b.finish();
    g.nodes.extend(nodes);
    for (name, dtype, dims) in &labels {
        g.inputs.push(ValueInfo::new(
            name.clone(),
            ValueType::tensor(*dtype, dims.clone()),
        ));
    }
    // ReduceMean without axes reduces everything (all opsets); keepdims=0 gives a scalar.
    let loss_name = g.fresh_name("loss");
    g.nodes.push(crate::ir::Node::new(
        "Identity",
        "loss",
        vec![loss],
        vec![loss_name.clone()],
    ));
    g.outputs.push(ValueInfo::new(
        loss_name.clone(),
        ValueType::tensor(DataType::Float, vec![]),
    ));
    crate::ir::topo::toposort(g)?;
    Ok((
        m,
        Head {
            task,
            logits,
            loss: loss_name,
            labels: labels.into_iter().map(|l| l.0).collect(),
        },
    ))
}

/// Σ(v ⊙ keep) / max(Σ keep, 1): the mean over the kept (labelled, non-padding) positions.
fn masked_mean(b: &mut Builder, v: &str, keep: &str) -> String {
    let keepf = b.op(
        "Cast",
        "keep_f",
        &[keep],
        vec![("to", AttrValue::Int(DataType::Float as i64))],
    );
    let kept = b.op("Mul", "kept", &[v, &keepf], vec![]);
    let num = b.op(
        "ReduceSum",
        "sum",
        &[&kept],
        vec![("keepdims", AttrValue::Int(0))],
    );
    let den0 = b.op(
        "ReduceSum",
        "count",
        &[&keepf],
        vec![("keepdims", AttrValue::Int(0))],
    );
    let one = b.constant("one", Tensor::from_f32("", vec![], &[1.0]));
    let den = b.op("Max", "count_at_least_1", &[&den0, &one], vec![]);
    b.op("Div", "mean", &[&num, &den], vec![])
}

/// One column `[batch, 1]` of `value`, batch read from `like`'s runtime shape: appended after
/// a `[:, 1:]` slice, it keeps shifted targets as long as the logits. `one` is the `[1]`
/// constant the caller already has.
fn end_column(
    b: &mut Builder,
    like: &str,
    one: &str,
    value: i64,
    shape_name: &str,
    name: &str,
) -> String {
    let shape = b.op("Shape", shape_name, &[like], vec![]);
    let zero_i = b.ints("zero", &[0]);
    let batch = b.op(
        "Gather",
        "batch",
        &[&shape, &zero_i],
        vec![("axis", AttrValue::Int(0))],
    );
    let col_shape = b.op(
        "Concat",
        "col_shape",
        &[&batch, one],
        vec![("axis", AttrValue::Int(0))],
    );
    b.op(
        "ConstantOfShape",
        name,
        &[&col_shape],
        vec![(
            "value",
            AttrValue::Tensor(Tensor::from_i64("", vec![1], &[value])),
        )],
    )
}

/// (labels with -100 replaced by 0, the mask of kept positions): the one-hot product needs a
/// valid class everywhere, the mask drops the ignored positions from the mean.
fn ignore_mask(b: &mut Builder, labels: &str) -> (String, String) {
    let ignore = b.constant("ignore", Tensor::from_i64("", vec![], &[IGNORE_INDEX]));
    let is_ignored = b.op("Equal", "is_ignored", &[labels, &ignore], vec![]);
    let keep = b.op("Not", "keep", &[&is_ignored], vec![]);
    let zero = b.constant("zero_i", Tensor::from_i64("", vec![], &[0]));
    let safe = b.op("Where", "safe_labels", &[&keep, labels, &zero], vec![]);
    (safe, keep)
}

fn need_lm_logits(lf: &shape::Fact) -> Result<()> {
    if lf.rank() != 3 {
        return Err(Error::Other(format!(
            "causal-lm needs logits [batch, seq, vocab], got {}",
            lf.display()
        )));
    }
    Ok(())
}

/// Next-token targets from a `labels` input aligned with `input_ids`: position t is scored
/// against `labels[t+1]` unless that is -100; the last position is never scored.
fn causal_lm_given_labels(
    b: &mut Builder,
    model: &Model,
    lf: &shape::Fact,
) -> Result<(String, Option<String>)> {
    need_lm_logits(lf)?;
    if !model.graph.inputs.iter().any(|i| i.name == "input_ids") {
        return Err(Error::Other(
            "causal-lm needs a graph input input_ids".into(),
        ));
    }
    let one = b.ints("one", &[1]);
    let axis1 = b.ints("axis1", &[1]);
    let big = b.ints("end", &[i64::MAX]);
    let next = b.op(
        "Slice",
        "labels_next",
        &["labels", &one, &big, &axis1],
        vec![],
    );
    let ignored_col = end_column(
        b,
        "labels",
        &one,
        IGNORE_INDEX,
        "labels_shape",
        "ignored_col",
    );
    let shifted = b.op(
        "Concat",
        "shifted_labels",
        &[&next, &ignored_col],
        vec![("axis", AttrValue::Int(1))],
    );
    let (safe, keep) = ignore_mask(b, &shifted);
    Ok((safe, Some(keep)))
}

/// Labels for next-token prediction without slicing the logits: position t is scored against
/// token t+1; the last position and padding (attention_mask 0) are masked out.
fn causal_lm_labels(
    b: &mut Builder,
    model: &Model,
    lf: &shape::Fact,
) -> Result<(String, Option<String>)> {
    need_lm_logits(lf)?;
    let has = |n: &str| model.graph.inputs.iter().any(|i| i.name == n);
    if !has("input_ids") || !has("attention_mask") {
        return Err(Error::Other(
            "causal-lm needs graph inputs input_ids and attention_mask".into(),
        ));
    }
    let one = b.ints("one", &[1]);
    let axis1 = b.ints("axis1", &[1]);
    let big = b.ints("end", &[i64::MAX]);
    let ids_next = b.op(
        "Slice",
        "ids_next",
        &["input_ids", &one, &big, &axis1],
        vec![],
    );
    let mask_next = b.op(
        "Slice",
        "mask_next",
        &["attention_mask", &one, &big, &axis1],
        vec![],
    );
    let zeros = end_column(b, "input_ids", &one, 0, "ids_shape", "zero_col");
    let labels = b.op(
        "Concat",
        "shifted_ids",
        &[&ids_next, &zeros],
        vec![("axis", AttrValue::Int(1))],
    );
    let mask = b.op(
        "Concat",
        "shifted_mask",
        &[&mask_next, &zeros],
        vec![("axis", AttrValue::Int(1))],
    );
    let zero_s = b.constant("zero_s", Tensor::from_i64("", vec![], &[0]));
    let keep = b.op("Greater", "keep", &[&mask, &zero_s], vec![]);
    Ok((labels, Some(keep)))
}
