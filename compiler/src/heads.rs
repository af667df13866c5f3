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

/// The loss head (`--task`; the manifest's `task`). The doc comments are `--help`'s.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Sequence classification, cross-entropy; labels i64[batch].
    SeqCls,
    /// Regression, mean squared error; labels f32[batch], logits [batch, 1].
    Regression,
    /// Multi-label classification, binary cross-entropy with logits; labels f32[batch, n].
    MultiLabel,
    /// Token classification, cross-entropy ignoring label -100; labels i64[batch, seq].
    TokenCls,
    /// Causal language modelling: next-token cross-entropy on input_ids, padding ignored.
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
    let (logits, lf) = f32_logits(&mut m, &facts)?;
    let mut b = Builder::new(&mut m.graph, "loss");
    let (loss, label) = match task {
        Task::SeqCls => seq_cls(&mut b, &logits, &lf)?,
        Task::TokenCls => token_cls(&mut b, &logits, &lf)?,
        Task::CausalLm => causal_lm(&mut b, model, &logits, &lf, lm_labels)?,
        Task::Regression => regression(&mut b, &logits, &lf)?,
        Task::MultiLabel => multi_label(&mut b, &logits, &lf)?,
    };
    let nodes = b.finish();
    let g = &mut m.graph;
    g.nodes.extend(nodes);
    let mut labels = vec![];
    if let Some((dtype, dims)) = label {
        g.inputs
            .push(ValueInfo::new("labels", ValueType::tensor(dtype, dims)));
        labels.push("labels".to_string());
    }
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
            labels,
        },
    ))
}

/// A task's loss value and the `labels` input it reads (element type and dims), if any.
type Loss = (String, Option<(DataType, Vec<Dim>)>);

fn dim(d: &shape::DimExpr) -> Dim {
    match d.as_known() {
        Some(v) => Dim::Known(v),
        None => Dim::Sym(d.to_string()),
    }
}

/// The model's first output as f32 logits, with their fact. The loss is f32 whatever the
/// model's type: half logits get a new name and the output's name becomes their f32 cast.
fn f32_logits(m: &mut Model, facts: &shape::Facts) -> Result<(String, shape::Fact)> {
    let logits = m
        .graph
        .outputs
        .first()
        .ok_or_else(|| Error::Other("the model has no output to put a loss on".into()))?
        .name
        .clone();
    let mut lf = facts.get(&logits).unwrap().clone();
    if lf.dtype.is_half() {
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
            lf.shape.iter().map(dim).collect(),
        ));
        lf.dtype = DataType::Float;
    }
    if lf.dtype != DataType::Float {
        return Err(Error::Other(format!(
            "logits '{logits}' are {}, not f32",
            lf.dtype.short_name()
        )));
    }
    Ok((logits, lf))
}

/// The number of classes of a cross-entropy task: the logits' last dim, known and ≥ 2.
fn classes(task: Task, logits: &str, lf: &shape::Fact) -> Result<i64> {
    let v = lf
        .shape
        .last()
        .and_then(|d| d.as_known())
        .ok_or_else(|| Error::Other("the logits' last dim (classes) must be known".into()))?;
    if v < 2 {
        // log_softmax over one class is 0 whatever the logit: nothing would train.
        let hint = match task {
            Task::SeqCls => {
                "; for one real-valued output per example (an export with num_labels=1) use \
                 --task regression"
            }
            _ => "",
        };
        return Err(Error::Other(format!(
            "{} needs at least 2 classes, but logits '{logits}' are {}: cross-entropy over one \
             class is identically 0{hint}",
            task.name(),
            lf.display()
        )));
    }
    Ok(v)
}

fn need_rank(task: Task, lf: &shape::Fact, rank: usize, layout: &str) -> Result<()> {
    if lf.rank() != rank {
        return Err(Error::Other(format!(
            "{} needs logits {layout}, got {}",
            task.name(),
            lf.display()
        )));
    }
    Ok(())
}

/// Mean cross-entropy over the batch; `labels: i64[batch]`.
fn seq_cls(b: &mut Builder, logits: &str, lf: &shape::Fact) -> Result<Loss> {
    let v = classes(Task::SeqCls, logits, lf)?;
    need_rank(Task::SeqCls, lf, 2, "[batch, classes]")?;
    let loss = cross_entropy(b, logits, "labels", None, v);
    Ok((loss, Some((DataType::Int64, vec![dim(&lf.shape[0])]))))
}

/// Cross-entropy over the labelled tokens; `labels: i64[batch, seq]`, -100 ignored.
fn token_cls(b: &mut Builder, logits: &str, lf: &shape::Fact) -> Result<Loss> {
    let v = classes(Task::TokenCls, logits, lf)?;
    need_rank(Task::TokenCls, lf, 3, "[batch, seq, classes]")?;
    let (safe, keep) = ignore_mask(b, "labels");
    let loss = cross_entropy(b, logits, &safe, Some(&keep), v);
    let dims = vec![dim(&lf.shape[0]), dim(&lf.shape[1])];
    Ok((loss, Some((DataType::Int64, dims))))
}

/// Shifted next-token cross-entropy, targets from `input_ids` or (`lm_labels`) a `labels`
/// input.
fn causal_lm(
    b: &mut Builder,
    model: &Model,
    logits: &str,
    lf: &shape::Fact,
    lm_labels: bool,
) -> Result<Loss> {
    let v = classes(Task::CausalLm, logits, lf)?;
    need_rank(Task::CausalLm, lf, 3, "[batch, seq, vocab]")?;
    let (label, keep, input) = if lm_labels {
        let (safe, keep) = causal_lm_given_labels(b, model)?;
        let dims = vec![dim(&lf.shape[0]), dim(&lf.shape[1])];
        (safe, keep, Some((DataType::Int64, dims)))
    } else {
        let (ids, keep) = causal_lm_labels(b, model)?;
        (ids, keep, None)
    };
    Ok((cross_entropy(b, logits, &label, Some(&keep), v), input))
}

/// Mean squared error; logits `[batch, 1]`, `labels: f32[batch]`.
fn regression(b: &mut Builder, logits: &str, lf: &shape::Fact) -> Result<Loss> {
    if lf.rank() != 2 || lf.shape[1].as_known() != Some(1) {
        return Err(Error::Other(format!(
            "regression needs logits [batch, 1], got {}",
            lf.display()
        )));
    }
    let last = b.ints("last", &[-1]);
    let pred = b.binary("Squeeze", "pred", logits, &last);
    let d = b.binary("Sub", "err", &pred, "labels");
    let d2 = b.binary("Mul", "sq_err", &d, &d);
    let loss = b.reduce_all("ReduceMean", "mean", &d2);
    Ok((loss, Some((DataType::Float, vec![dim(&lf.shape[0])]))))
}

/// Mean binary cross-entropy with logits; `labels: f32[batch, n]` in {0, 1}.
fn multi_label(b: &mut Builder, logits: &str, lf: &shape::Fact) -> Result<Loss> {
    need_rank(Task::MultiLabel, lf, 2, "[batch, labels]")?;
    // Stable form: relu(x) − x·y + log(1 + exp(−|x|)), |x| = relu(x) + relu(−x).
    let pos = b.unary("Relu", "relu", logits);
    let neg_x = b.unary("Neg", "neg", logits);
    let negp = b.unary("Relu", "relu_neg", &neg_x);
    let abs = b.binary("Add", "abs", &pos, &negp);
    let nabs = b.unary("Neg", "neg_abs", &abs);
    let e = b.unary("Exp", "exp", &nabs);
    let one = b.constant("one", Tensor::from_f32("", vec![], &[1.0]));
    let ope = b.binary("Add", "one_plus", &one, &e);
    let log = b.unary("Log", "softplus_tail", &ope);
    let xy = b.binary("Mul", "x_y", logits, "labels");
    let t = b.binary("Sub", "t", &pos, &xy);
    let bce = b.binary("Add", "bce", &t, &log);
    let loss = b.reduce_all("ReduceMean", "mean", &bce);
    let dims = vec![dim(&lf.shape[0]), dim(&lf.shape[1])];
    Ok((loss, Some((DataType::Float, dims))))
}

/// −log softmax(logits)[label], averaged over the batch or (with `keep`) the kept positions.
/// The label's log-probability is picked with a one-hot product (no GatherElements on the
/// logits: see the module docs).
fn cross_entropy(
    b: &mut Builder,
    logits: &str,
    label: &str,
    keep: Option<&str>,
    classes: i64,
) -> String {
    let lsm = b.op(
        "LogSoftmax",
        "log_probs",
        &[logits],
        vec![("axis", AttrValue::Int(-1))],
    );
    let ids: Vec<i64> = (0..classes).collect();
    let range = b.constant("classes", Tensor::from_i64("", vec![classes], &ids));
    let last = b.ints("last", &[-1]);
    let col = b.binary("Unsqueeze", "label_col", label, &last);
    let hot = b.binary("Equal", "onehot_b", &col, &range);
    let onehot = b.cast("onehot", &hot, DataType::Float);
    let picked = b.binary("Mul", "picked", &lsm, &onehot);
    let ll = b.reduce_axes("ReduceSum", "log_lik", &picked, &last, false);
    let nll = b.unary("Neg", "nll", &ll);
    match keep {
        None => b.reduce_all("ReduceMean", "mean", &nll),
        Some(keep) => masked_mean(b, &nll, keep),
    }
}

/// Σ(v ⊙ keep) / max(Σ keep, 1): the mean over the kept (labelled, non-padding) positions.
fn masked_mean(b: &mut Builder, v: &str, keep: &str) -> String {
    let keepf = b.cast("keep_f", keep, DataType::Float);
    let kept = b.binary("Mul", "kept", v, &keepf);
    let num = b.reduce_all("ReduceSum", "sum", &kept);
    let den0 = b.reduce_all("ReduceSum", "count", &keepf);
    let one = b.constant("one", Tensor::from_f32("", vec![], &[1.0]));
    let den = b.binary("Max", "count_at_least_1", &den0, &one);
    b.binary("Div", "mean", &num, &den)
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
    let shape = b.unary("Shape", shape_name, like);
    let zero_i = b.ints("zero", &[0]);
    let batch = b.op(
        "Gather",
        "batch",
        &[&shape, &zero_i],
        vec![("axis", AttrValue::Int(0))],
    );
    let col_shape = b.concat("col_shape", &[&batch, one], 0);
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

/// Next-token targets from a `labels` input aligned with `input_ids`: position t is scored
/// against `labels[t+1]` unless that is -100; the last position is never scored. Returns
/// (targets with -100 replaced by 0, the mask of scored positions).
fn causal_lm_given_labels(b: &mut Builder, model: &Model) -> Result<(String, String)> {
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
    let shifted = b.concat("shifted_labels", &[&next, &ignored_col], 1);
    Ok(ignore_mask(b, &shifted))
}

/// Labels for next-token prediction without slicing the logits: position t is scored against
/// token t+1; the last position and padding (attention_mask 0) are masked out. Returns (the
/// targets, the mask of scored positions).
fn causal_lm_labels(b: &mut Builder, model: &Model) -> Result<(String, String)> {
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
    let labels = b.concat("shifted_ids", &[&ids_next, &zeros], 1);
    let mask = b.concat("shifted_mask", &[&mask_next, &zeros], 1);
    let zero_s = b.constant("zero_s", Tensor::from_i64("", vec![], &[0]));
    let keep = b.binary("Greater", "keep", &mask, &zero_s);
    Ok((labels, keep))
}
