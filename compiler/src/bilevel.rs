//! BiDoRA's two optimisation levels as programs (docs/design.md, "The two levels").
//!
//! V = every low-rank factor A, B (and the head when trained), M = every magnitude m.
//!
//! - **lower** (`lower.onnx`): `L_tr(V, M) + γ·R(V)` on a training batch, its gradient w.r.t.
//!   V and the gradient of `L_tr` w.r.t. M (free in the same sweep; `fd-forward` reuses it).
//!   γ is an input, so the `γ = 0` ablation needs no recompilation.
//! - **upper** (`upper.onnx`): the hypergradient of every m and the validation loss, from a
//!   training batch, a validation batch, V, M and the lower step's `g = ∇_V L_lower(V, M)`.
//!
//! The upper program follows the paper's four steps:
//! 1. virtual step `V̄ = V − ξ·g` (ξ an input; the lower learning rate by default);
//! 2. `h = ∇_M L_val(V̄, M)` and `v = ∇_V̄ L_val(V̄, M)` in one sweep on the validation batch;
//! 3. `ε = α_fd / ‖v‖` (α_fd an input, 0.01 by default);
//! 4. `∇M = h − ξ·H·v`, with the mixed term `H·v = ∇²_{M,V} L_tr(V, M)·v` estimated per mode:
//!
//! | mode | `H·v` | passes after the val sweep |
//! |---|---|---|
//! | `fd` (paper) | `(∇_M L_tr(V⁺) − ∇_M L_tr(V⁻)) / 2ε`, `V± = V ± ε·v` | 2 (w.r.t. M only) |
//! | `fd-forward` | `(∇_M L_tr(V⁺) − ∇_M L_tr(V)) / ε`, the second term from the lower step | 1 |
//! | `exact` | `∇_M ⟨∇_V L_tr(V, M), v⟩`: the lower backward differentiated again | 1 double |
//! | `first-order` | none (ξ = 0: plain alternation) | 0 |
//! | `betty` | as `fd` but without the virtual step: h, v at V (the released code's library) | 2 |
//!
//! R does not depend on M, so `∇²_{M,V} L_lower = ∇²_{M,V} L_tr`: the mixed term never
//! evaluates the regulariser. Each pass is an instance of the same loss graph
//! ([`crate::ir::instance`]), so frozen weights are stored once.
//!
//! Data-parallel runs cannot use the one upper program: each rank sees a shard of the
//! batches, and `ε = α_fd/‖v‖` needs the global `v` before the perturbed passes. For them
//! [`upper_phases`] emits the same computation cut after step 2: `upper_val` (steps 1–2:
//! `h`, `v`, the validation loss, from the global `g`) and `upper_mixed` (steps 3–4's `H·v`
//! on the training batch, from the global `v`); the runtime reduces between the two and
//! forms `∇M = h − ξ·H·v`. Everything the phases output is a mean over their batch, so a
//! weighted sum over the ranks is the global batch's value.

use std::collections::HashMap;

use crate::autodiff;
use crate::error::{Error, Result};
use crate::heads::Head;
use crate::ir::builder::Builder;
use crate::ir::instance::instantiate;
use crate::ir::{AttrValue, DataType, Dim, Graph, Model, Tensor, ValueInfo, ValueType};
use crate::regularizer::{self, RegVariant};
use crate::rewrite::{self, AdapterRecord};
use crate::shape;

/// Names of the scalar inputs the programs read.
pub const GAMMA: &str = "gamma";
pub const XI: &str = "xi";
pub const ALPHA_FD: &str = "alpha_fd";
/// Prefixes of the two batches' inputs in the upper program.
pub const TRAIN_PREFIX: &str = "train.";
pub const VAL_PREFIX: &str = "val.";
/// Prefixes of the two batches' symbolic dimension names in the upper program: the trainer
/// pads each batch to its own longest example, so `train_sequence` and `val_sequence` differ
/// (one shared `sequence` makes ONNX Runtime's planner reuse buffers of the wrong size).
pub const TRAIN_DIM_PREFIX: &str = "train_";
pub const VAL_DIM_PREFIX: &str = "val_";
/// The upper program's validation-loss output.
pub const VAL_LOSS: &str = "val.loss";

/// Defaults recorded in the manifest: γ and the regulariser from the paper's appendix B
/// (1e-5 where used), α_fd from DARTS and the released code (0.01). ξ defaults to the lower
/// learning rate, which the runtime knows.
pub const DEFAULT_GAMMA: f64 = 1e-5;
pub const DEFAULT_ALPHA_FD: f64 = 0.01;

/// How the upper program estimates the hypergradient (`--hypergrad`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Hypergrad {
    Fd,
    FdForward,
    Exact,
    FirstOrder,
    Betty,
}

impl Hypergrad {
    pub const ALL: [Hypergrad; 5] = [
        Hypergrad::Fd,
        Hypergrad::FdForward,
        Hypergrad::Exact,
        Hypergrad::FirstOrder,
        Hypergrad::Betty,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hypergrad::Fd => "fd",
            Hypergrad::FdForward => "fd-forward",
            Hypergrad::Exact => "exact",
            Hypergrad::FirstOrder => "first-order",
            Hypergrad::Betty => "betty",
        }
    }

    pub fn parse(s: &str) -> Option<Hypergrad> {
        Hypergrad::ALL.into_iter().find(|m| m.name() == s)
    }

    /// Whether the program takes a virtual step `V̄ = V − ξ·g` (and so reads `g`).
    pub fn virtual_step(self) -> bool {
        matches!(
            self,
            Hypergrad::Fd | Hypergrad::FdForward | Hypergrad::Exact
        )
    }
}

/// The parameter groups: what each level trains.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Groups {
    /// Lower level: every A, B and head parameter.
    pub lower: Vec<String>,
    /// Upper level: every magnitude.
    pub upper: Vec<String>,
}

impl Groups {
    pub fn new(adapters: &[AdapterRecord], head_params: &[String]) -> Result<Groups> {
        let mut lower = vec![];
        let mut upper = vec![];
        for a in adapters {
            lower.push(a.lora_a.clone());
            lower.push(a.lora_b.clone());
            match &a.magnitude {
                Some(m) => upper.push(m.clone()),
                None => {
                    return Err(Error::Other(format!(
                        "BiDoRA needs DoRA adapters (magnitudes for the upper level); '{}' is LoRA",
                        a.module
                    )))
                }
            }
        }
        lower.extend(head_params.iter().cloned());
        Ok(Groups { lower, upper })
    }
}

/// The lower program and the names of its outputs.
pub struct Lower {
    pub model: Model,
    /// `L_tr + γ·R`, the value the V gradients belong to.
    pub loss: String,
    /// `L_tr` alone.
    pub data_loss: String,
    /// `R(V)`.
    pub reg: String,
    /// (tensor, gradient output) for every V (of `L_tr + γR`), then every m (of `L_tr`).
    pub grads: Vec<(String, String)>,
}

/// Builds the lower program from the model with its loss head (`with_loss`, still carrying
/// `ai.bidora` markers).
pub fn lower_program(
    with_loss: &Model,
    head: &Head,
    adapters: &[AdapterRecord],
    groups: &Groups,
    variant: RegVariant,
) -> Result<Lower> {
    let (with_reg, total, reg) =
        regularizer::attach(with_loss, adapters, &head.loss, GAMMA, variant)?;
    let wrt: Vec<String> = groups.lower.iter().chain(&groups.upper).cloned().collect();
    let grads = autodiff::backward(&with_reg, &total, &wrt)?;
    let mut model = rewrite::strip_markers(&grads.model);
    // Outputs: total loss, data loss, R, gradients (V then M), logits.
    let outs = std::mem::take(&mut model.graph.outputs);
    let pick = |name: &str| outs.iter().find(|o| o.name == name).cloned();
    model.graph.outputs = [&total, &head.loss, &reg]
        .into_iter()
        .map(|n| pick(n))
        .chain(grads.grads.iter().map(|(_, g)| pick(g)))
        .chain(std::iter::once(pick(&head.logits)))
        .flatten()
        .collect();
    shape::infer(&model)?;
    Ok(Lower {
        model,
        loss: total,
        data_loss: head.loss.clone(),
        reg,
        grads: grads.grads,
    })
}

/// The upper program and the names of its inputs and outputs.
pub struct Upper {
    pub model: Model,
    pub mode: Hypergrad,
    /// (m, hypergradient output) for every magnitude.
    pub hypergrads: Vec<(String, String)>,
    /// (V tensor, the input that takes its lower-step gradient `g`), when the mode reads g.
    pub g_inputs: Vec<(String, String)>,
    /// (m, the input that takes `∇_M L_tr(V, M)` from the lower step): `fd-forward` only.
    pub gm_inputs: Vec<(String, String)>,
    /// Batch inputs: (model input, train-batch input, val-batch input).
    pub batch_inputs: Vec<(String, String, String)>,
}

/// What both forms of the upper program start from: the loss graph's facts, the parameters
/// (V then M), their dtype, and the lower program's gradient names.
struct UpperCx<'a> {
    with_loss: &'a Model,
    lower_grads: &'a [(String, String)],
    facts: shape::Facts,
    params: Vec<String>,
    dtype: DataType,
}

impl<'a> UpperCx<'a> {
    fn new(
        with_loss: &'a Model,
        groups: &Groups,
        lower_grads: &'a [(String, String)],
    ) -> Result<UpperCx<'a>> {
        let facts = shape::infer(with_loss)?;
        let params = groups.lower.iter().chain(&groups.upper).cloned().collect();
        let dtype = facts
            .get(&groups.upper[0])
            .map(|f| f.dtype)
            .unwrap_or(DataType::Float);
        Ok(UpperCx {
            with_loss,
            lower_grads,
            facts,
            params,
            dtype,
        })
    }

    /// The lower program's gradient output for `t` (the upper program's input of that name).
    fn grad_name(&self, t: &str) -> Result<String> {
        self.lower_grads
            .iter()
            .find(|(w, _)| w == t)
            .map(|(_, g)| g.clone())
            .ok_or_else(|| Error::Other(format!("the lower program has no gradient for '{t}'")))
    }

    /// The loss graph's input `name`, to copy (renamed) into the upper program.
    fn input_info(&self, name: &str) -> Result<ValueInfo> {
        self.with_loss
            .graph
            .inputs
            .iter()
            .find(|i| i.name == name)
            .cloned()
            .ok_or_else(|| Error::Other(format!("'{name}' is not an input of the loss graph")))
    }

    fn scalar(&self, n: &str) -> ValueInfo {
        ValueInfo::new(n, ValueType::tensor(self.dtype, vec![]))
    }

    /// An empty program named after the loss graph, keeping its opsets and metadata.
    fn empty(&self, suffix: &str) -> Model {
        let mut model = self.with_loss.clone();
        model.graph = Graph {
            name: format!("{}_{suffix}", self.with_loss.graph.name),
            ..Default::default()
        };
        model
    }

    /// `V̄ = V − ξ·g` for every (V, g input), as nodes appended to `g`; returns V → V̄.
    fn virtual_step(g: &mut Graph, g_inputs: &[(String, String)]) -> HashMap<String, String> {
        let mut vbar = HashMap::new();
        let mut b = Builder::new(g, "virtual_step");
        for (v, gi) in g_inputs {
            let step = b.op("Mul", "xi_g", &[XI, gi], vec![]);
            vbar.insert(v.clone(), b.op("Sub", "vbar", &[v, &step], vec![]));
        }
        let nodes = b.finish();
        g.nodes.extend(nodes);
        vbar
    }
}

/// A finished program: markers gone, nodes in order, shapes checked.
fn finish(model: &Model) -> Result<Model> {
    let mut model = rewrite::strip_markers(model);
    crate::ir::topo::toposort(&mut model.graph)?;
    shape::infer(&model)?;
    Ok(model)
}

/// Builds the upper program. `lower_grads` are the lower program's gradient outputs (the
/// upper program names its `g` inputs after them, so a runtime binds one to the other by name).
pub fn upper_program(
    with_loss: &Model,
    head: &Head,
    groups: &Groups,
    lower_grads: &[(String, String)],
    mode: Hypergrad,
) -> Result<Upper> {
    let cx = UpperCx::new(with_loss, groups, lower_grads)?;
    let params = &cx.params;

    // The passes, each a graph to instantiate.
    let val_wrt = if mode == Hypergrad::FirstOrder {
        groups.upper.clone()
    } else {
        params.clone()
    };
    let val_pass = autodiff::backward(with_loss, &head.loss, &val_wrt)?;
    let grads_of =
        |g: &autodiff::Gradients| -> HashMap<String, String> { g.grads.iter().cloned().collect() };

    let mut model = cx.empty(&format!("upper_{}", mode.name()));
    let g = &mut model.graph;

    // Inputs: both batches, V, M, then what the mode reads from the lower step, then scalars.
    let mut batch_inputs = vec![];
    for i in &with_loss.graph.inputs {
        if params.contains(&i.name) || with_loss.graph.initializers.contains_key(&i.name) {
            continue;
        }
        let (t, v) = (
            format!("{TRAIN_PREFIX}{}", i.name),
            format!("{VAL_PREFIX}{}", i.name),
        );
        batch_inputs.push((i.name.clone(), t, v));
    }
    for (orig, t, v) in &batch_inputs {
        for (n, dims) in [(t, TRAIN_DIM_PREFIX), (v, VAL_DIM_PREFIX)] {
            let mut vi = cx.input_info(orig)?;
            vi.name = n.clone();
            vi.ty = vi.ty.map(|t| t.with_dims_renamed(|d| format!("{dims}{d}")));
            g.inputs.push(vi);
        }
    }
    for p in params {
        g.inputs.push(cx.input_info(p)?);
    }
    let mut g_inputs = vec![];
    if mode.virtual_step() {
        for v in &groups.lower {
            let mut vi = cx.input_info(v)?;
            vi.name = cx.grad_name(v)?;
            g_inputs.push((v.clone(), vi.name.clone()));
            g.inputs.push(vi);
        }
    }
    let mut gm_inputs = vec![];
    if mode == Hypergrad::FdForward {
        for m in &groups.upper {
            let mut vi = cx.input_info(m)?;
            vi.name = cx.grad_name(m)?;
            gm_inputs.push((m.clone(), vi.name.clone()));
            g.inputs.push(vi);
        }
    }
    if mode != Hypergrad::FirstOrder {
        g.inputs.push(cx.scalar(XI));
        g.inputs.push(cx.scalar(ALPHA_FD));
    }

    let batch = |which: usize| -> HashMap<String, String> {
        batch_inputs
            .iter()
            .map(|(o, t, v)| (o.clone(), if which == 0 { t.clone() } else { v.clone() }))
            .collect()
    };

    // 1. The virtual step.
    let mut vbar = UpperCx::virtual_step(g, &g_inputs);
    for v in &groups.lower {
        vbar.entry(v.clone()).or_insert_with(|| v.clone());
    }

    // 2. h and v on the validation batch at (V̄, M).
    let mut bind = batch(1);
    bind.extend(vbar.clone());
    let val_out = instantiate(g, &val_pass.model.graph, "val", &bind)?;
    let val_grads = grads_of(&val_pass);
    let h: Vec<String> = groups
        .upper
        .iter()
        .map(|m| val_out[&val_grads[m]].clone())
        .collect();
    let val_loss = val_out[&head.loss].clone();

    let mixed: Option<Vec<String>> = match mode {
        Hypergrad::FirstOrder => None,
        _ => {
            let v: Vec<String> = groups
                .lower
                .iter()
                .map(|p| val_out[&val_grads[p]].clone())
                .collect();
            Some(mixed_term(
                g,
                with_loss,
                head,
                groups,
                &cx.facts,
                mode,
                &v,
                &gm_inputs,
                batch(0),
            )?)
        }
    };

    // 4. ∇M = h − ξ·H·v.
    let mut hypergrads = vec![];
    let mut b = Builder::new(g, "hypergrad");
    for (k, m) in groups.upper.iter().enumerate() {
        let out = b.fresh_unprefixed(&format!("{m}.hypergrad"));
        let src = match &mixed {
            None => h[k].clone(),
            Some(mx) => {
                let scaled = b.op("Mul", "xi_Hv", &[XI, &mx[k]], vec![]);
                b.op("Sub", "h_minus", &[&h[k], &scaled], vec![])
            }
        };
        b.op_into("Identity", "out", &[&src], vec![], out.clone());
        hypergrads.push((m.clone(), out));
    }
    b.op_into(
        "Identity",
        "val_loss",
        &[&val_loss],
        vec![],
        VAL_LOSS.into(),
    );
    let nodes = b.finish();
    g.nodes.extend(nodes);
    for (m, out) in &hypergrads {
        let mut vi = cx.input_info(m)?;
        vi.name = out.clone();
        g.outputs.push(vi);
    }
    g.outputs.push(cx.scalar(VAL_LOSS));

    Ok(Upper {
        model: finish(&model)?,
        mode,
        hypergrads,
        g_inputs,
        gm_inputs,
        batch_inputs,
    })
}

/// Step 3 and the mixed term `H·v` of step 4 on the training batch, per mode.
#[allow(clippy::too_many_arguments)]
fn mixed_term(
    g: &mut Graph,
    with_loss: &Model,
    head: &Head,
    groups: &Groups,
    facts: &shape::Facts,
    mode: Hypergrad,
    v: &[String],
    gm_inputs: &[(String, String)],
    train: HashMap<String, String>,
) -> Result<Vec<String>> {
    if mode == Hypergrad::Exact {
        return exact_mixed(g, with_loss, head, groups, facts, v, train);
    }
    // ε = α_fd / ‖v‖, the norm over every V tensor together. A zero v (nothing to learn on
    // the validation batch) would make ε infinite and V± NaN: the floor keeps V± = V there.
    let dtype = facts.get(&groups.upper[0]).unwrap().dtype;
    let mut b = Builder::new(g, "fd");
    let mut sq = vec![];
    for (vi, p) in v.iter().zip(&groups.lower) {
        let rank = facts.get(p).unwrap().rank();
        let axes = b.ints("axes", &(0..rank as i64).collect::<Vec<_>>());
        let s2 = b.op("Mul", "v2", &[vi, vi], vec![]);
        sq.push(b.op(
            "ReduceSum",
            "v2_sum",
            &[&s2, &axes],
            vec![("keepdims", AttrValue::Int(0))],
        ));
    }
    let refs: Vec<&str> = sq.iter().map(String::as_str).collect();
    let total = if refs.len() == 1 {
        refs[0].to_string()
    } else {
        b.op("Sum", "norm2", &refs, vec![])
    };
    let norm = b.op("Sqrt", "norm", &[&total], vec![]);
    let floor = b.constant("floor", Tensor::from_f64_as(dtype, "", vec![], &[1e-30]));
    let norm = b.op("Max", "norm_floor", &[&norm, &floor], vec![]);
    let eps = b.op("Div", "eps", &[ALPHA_FD, &norm], vec![]);
    let mut plus = HashMap::new();
    let mut minus = HashMap::new();
    for (vi, p) in v.iter().zip(&groups.lower) {
        let d = b.op("Mul", "eps_v", &[&eps, vi], vec![]);
        plus.insert(p.clone(), b.op("Add", "v_plus", &[p, &d], vec![]));
        if mode != Hypergrad::FdForward {
            minus.insert(p.clone(), b.op("Sub", "v_minus", &[p, &d], vec![]));
        }
    }
    let nodes = b.finish();
    g.nodes.extend(nodes);

    // The perturbed passes differentiate w.r.t. M only.
    let pass = autodiff::backward(with_loss, &head.loss, &groups.upper)?;
    let pg: HashMap<String, String> = pass.grads.iter().cloned().collect();
    let run = |g: &mut Graph, at: HashMap<String, String>, name: &str| -> Result<Vec<String>> {
        let mut bind = train.clone();
        bind.extend(at);
        let out = instantiate(g, &pass.model.graph, name, &bind)?;
        Ok(groups.upper.iter().map(|m| out[&pg[m]].clone()).collect())
    };
    let gp = run(g, plus, "train_plus")?;
    let gm: Vec<String> = if mode == Hypergrad::FdForward {
        gm_inputs.iter().map(|(_, i)| i.clone()).collect()
    } else {
        run(g, minus, "train_minus")?
    };
    let mut b = Builder::new(g, "fd_diff");
    let two = b.constant("two", Tensor::from_f64_as(dtype, "", vec![], &[2.0]));
    let denom = if mode == Hypergrad::FdForward {
        eps
    } else {
        b.op("Mul", "two_eps", &[&two, &eps], vec![])
    };
    let out = gp
        .iter()
        .zip(&gm)
        .map(|(p, m)| {
            let d = b.op("Sub", "diff", &[p, m], vec![]);
            b.op("Div", "Hv", &[&d, &denom], vec![])
        })
        .collect();
    let nodes = b.finish();
    g.nodes.extend(nodes);
    Ok(out)
}

/// `∇_M ⟨∇_V L_tr(V, M), v⟩`: the lower backward, dotted with `v` (an input of the
/// differentiated graph, so no gradient flows into it), differentiated again w.r.t. M.
fn exact_mixed(
    g: &mut Graph,
    with_loss: &Model,
    head: &Head,
    groups: &Groups,
    facts: &shape::Facts,
    v: &[String],
    train: HashMap<String, String>,
) -> Result<Vec<String>> {
    let first = autodiff::backward(with_loss, &head.loss, &groups.lower)?;
    let mut m = first.model.clone();
    let dtype = facts.get(&groups.upper[0]).unwrap().dtype;
    let mut dirs = vec![];
    let s = {
        let gg = &mut m.graph;
        let mut terms = vec![];
        let mut b = Builder::new(gg, "hvp");
        for (p, gp) in &first.grads {
            let dir = b.fresh(&format!("dir.{p}"));
            let rank = facts.get(p).unwrap().rank();
            let axes = b.ints("axes", &(0..rank as i64).collect::<Vec<_>>());
            let prod = b.op("Mul", "g_dot_v", &[gp, &dir], vec![]);
            terms.push(b.op(
                "ReduceSum",
                "dot",
                &[&prod, &axes],
                vec![("keepdims", AttrValue::Int(0))],
            ));
            dirs.push((p.clone(), dir));
        }
        let refs: Vec<&str> = terms.iter().map(String::as_str).collect();
        let s = if refs.len() == 1 {
            b.op("Identity", "s", &refs, vec![])
        } else {
            b.op("Sum", "s", &refs, vec![])
        };
        let nodes = b.finish();
        gg.nodes.extend(nodes);
        for (p, dir) in &dirs {
            let f = facts.get(p).unwrap();
            let dims = f
                .shape
                .iter()
                .map(|d| match d.as_known() {
                    Some(k) => Dim::Known(k),
                    None => Dim::Sym(d.to_string()),
                })
                .collect();
            gg.inputs
                .push(ValueInfo::new(dir.clone(), ValueType::tensor(dtype, dims)));
        }
        gg.outputs
            .push(ValueInfo::new(s.clone(), ValueType::tensor(dtype, vec![])));
        s
    };
    let second = autodiff::backward(&m, &s, &groups.upper)?;
    let sg: HashMap<String, String> = second.grads.iter().cloned().collect();
    let mut bind = train;
    for ((_, dir), vi) in dirs.iter().zip(v) {
        bind.insert(dir.clone(), vi.clone());
    }
    let out = instantiate(g, &second.model.graph, "train_hvp", &bind)?;
    Ok(groups.upper.iter().map(|m| out[&sg[m]].clone()).collect())
}

/// The upper level's first phase for data-parallel runs (`upper_val.onnx`): steps 1–2 on
/// the validation batch. Its outputs are means over the batch, so ranks reduce them before
/// step 3 needs the global `v` (ε = α/‖v‖ is not linear in v).
pub struct UpperVal {
    pub model: Model,
    /// (tensor, output) of `∇ L_val(V̄, M)`: `h` for every m, then `v` for every V (no `v` in
    /// `first-order`, which has no mixed term).
    pub val_grads: Vec<(String, String)>,
    /// (V tensor, the input that takes the lower step's global `g`), when the mode reads g.
    pub g_inputs: Vec<(String, String)>,
    /// Batch inputs: (model input, val-batch input).
    pub batch_inputs: Vec<(String, String)>,
}

/// The upper level's second phase (`upper_mixed.onnx`): step 3 and the mixed term `H·v` on
/// the training batch at the global `v`. The runtime forms `∇M = h − ξ·H·v` from the reduced
/// outputs of both phases with the same two f32 operations the single program ends with.
pub struct UpperMixed {
    pub model: Model,
    /// (m, output of its `H·v`).
    pub mixed: Vec<(String, String)>,
    /// (V tensor, the input that takes its `v`): named like [`UpperVal`]'s `v` output, so a
    /// runtime binds one to the other by name.
    pub v_inputs: Vec<(String, String)>,
    /// (m, the input that takes `∇_M L_tr(V, M)` from the lower step): `fd-forward` only.
    pub gm_inputs: Vec<(String, String)>,
    /// Batch inputs: (model input, train-batch input).
    pub batch_inputs: Vec<(String, String)>,
}

/// The inputs every upper phase starts from: one batch under `prefix` with its dimensions
/// renamed under `dim_prefix`, then V and M. Returns the batch pairs.
fn phase_inputs(
    g: &mut Graph,
    with_loss: &Model,
    params: &[String],
    prefix: &str,
    dim_prefix: &str,
) -> Vec<(String, String)> {
    let mut batch_inputs = vec![];
    for i in &with_loss.graph.inputs {
        if params.contains(&i.name) || with_loss.graph.initializers.contains_key(&i.name) {
            continue;
        }
        let mut vi = i.clone();
        vi.name = format!("{prefix}{}", i.name);
        vi.ty = vi
            .ty
            .map(|t| t.with_dims_renamed(|d| format!("{dim_prefix}{d}")));
        batch_inputs.push((i.name.clone(), vi.name.clone()));
        g.inputs.push(vi);
    }
    for p in params {
        if let Some(i) = with_loss.graph.inputs.iter().find(|i| i.name == *p) {
            g.inputs.push(i.clone());
        }
    }
    batch_inputs
}

/// Builds the two phases of the upper program for `mode` (`first-order` has no second).
/// Composed as the runtime composes them on one rank, they compute what [`upper_program`]
/// computes, op for op.
pub fn upper_phases(
    with_loss: &Model,
    head: &Head,
    groups: &Groups,
    lower_grads: &[(String, String)],
    mode: Hypergrad,
) -> Result<(UpperVal, Option<UpperMixed>)> {
    let cx = UpperCx::new(with_loss, groups, lower_grads)?;
    let params = &cx.params;

    // Phase 1: the virtual step and the validation sweep.
    let val_wrt = if mode == Hypergrad::FirstOrder {
        groups.upper.clone()
    } else {
        params.clone()
    };
    let val_pass = autodiff::backward(with_loss, &head.loss, &val_wrt)?;
    let mut model = cx.empty(&format!("upper_val_{}", mode.name()));
    let g = &mut model.graph;
    let batch_inputs = phase_inputs(g, with_loss, params, VAL_PREFIX, VAL_DIM_PREFIX);
    let mut g_inputs = vec![];
    if mode.virtual_step() {
        for v in &groups.lower {
            let mut vi = cx.input_info(v)?;
            vi.name = cx.grad_name(v)?;
            g_inputs.push((v.clone(), vi.name.clone()));
            g.inputs.push(vi);
        }
        g.inputs.push(cx.scalar(XI));
    }
    let mut bind: HashMap<String, String> = batch_inputs.iter().cloned().collect();
    bind.extend(UpperCx::virtual_step(g, &g_inputs));
    let val_out = instantiate(g, &val_pass.model.graph, "val", &bind)?;
    let pass_grads: HashMap<String, String> = val_pass.grads.iter().cloned().collect();
    let mut val_grads = vec![];
    let mut b = Builder::new(g, "val_grads");
    let with_v: &[String] = if mode == Hypergrad::FirstOrder {
        &[]
    } else {
        &groups.lower
    };
    for t in groups.upper.iter().chain(with_v) {
        let out = b.fresh_unprefixed(&format!("{t}.val_grad"));
        b.op_into(
            "Identity",
            "out",
            &[&val_out[&pass_grads[t]]],
            vec![],
            out.clone(),
        );
        val_grads.push((t.clone(), out));
    }
    b.op_into(
        "Identity",
        "val_loss",
        &[&val_out[&head.loss]],
        vec![],
        VAL_LOSS.into(),
    );
    let nodes = b.finish();
    g.nodes.extend(nodes);
    for (t, out) in &val_grads {
        let mut vi = cx.input_info(t)?;
        vi.name = out.clone();
        g.outputs.push(vi);
    }
    g.outputs.push(cx.scalar(VAL_LOSS));
    let upper_val = UpperVal {
        model: finish(&model)?,
        val_grads: val_grads.clone(),
        g_inputs,
        batch_inputs,
    };
    if mode == Hypergrad::FirstOrder {
        return Ok((upper_val, None));
    }

    // Phase 2: ε and the mixed term on the training batch, at the global v.
    let mut model = cx.empty(&format!("upper_mixed_{}", mode.name()));
    let g = &mut model.graph;
    let batch_inputs = phase_inputs(g, with_loss, params, TRAIN_PREFIX, TRAIN_DIM_PREFIX);
    let mut v_inputs = vec![];
    for v in &groups.lower {
        let (_, name) = val_grads
            .iter()
            .find(|(t, _)| t == v)
            .expect("phase 1 outputs every V's v");
        let mut vi = cx.input_info(v)?;
        vi.name = name.clone();
        v_inputs.push((v.clone(), name.clone()));
        g.inputs.push(vi);
    }
    let mut gm_inputs = vec![];
    if mode == Hypergrad::FdForward {
        for m in &groups.upper {
            let mut vi = cx.input_info(m)?;
            vi.name = cx.grad_name(m)?;
            gm_inputs.push((m.clone(), vi.name.clone()));
            g.inputs.push(vi);
        }
    }
    if mode != Hypergrad::Exact {
        g.inputs.push(cx.scalar(ALPHA_FD));
    }
    let v_names: Vec<String> = v_inputs.iter().map(|(_, n)| n.clone()).collect();
    let train: HashMap<String, String> = batch_inputs.iter().cloned().collect();
    let hv = mixed_term(
        g, with_loss, head, groups, &cx.facts, mode, &v_names, &gm_inputs, train,
    )?;
    let mut mixed = vec![];
    let mut b = Builder::new(g, "mixed");
    for (m, src) in groups.upper.iter().zip(&hv) {
        let out = b.fresh_unprefixed(&format!("{m}.mixed_term"));
        b.op_into("Identity", "out", &[src], vec![], out.clone());
        mixed.push((m.clone(), out));
    }
    let nodes = b.finish();
    g.nodes.extend(nodes);
    for (m, out) in &mixed {
        let mut vi = cx.input_info(m)?;
        vi.name = out.clone();
        g.outputs.push(vi);
    }
    Ok((
        upper_val,
        Some(UpperMixed {
            model: finish(&model)?,
            mixed,
            v_inputs,
            gm_inputs,
            batch_inputs,
        }),
    ))
}
