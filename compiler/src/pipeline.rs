//! The compiler's passes in order, as one function a binary or a test calls.

use indexmap::IndexMap;

use crate::artifact::{self, Artifact, Manifest};
use crate::autodiff;
use crate::bilevel::{self, Groups, Hypergrad};
use crate::check::{self, InputGroup};
use crate::error::Result;
use crate::heads::{self, Head, Task};
use crate::ir::{Model, Tensor};
use crate::regularizer::RegVariant;
use crate::rewrite::{self, AdapterConfig, AdapterRecord};
use crate::targets::{self, TargetSpec};

pub struct CompileOptions {
    pub targets: TargetSpec,
    pub adapter: AdapterConfig,
    /// With a task, the loss head is attached and `train_step`/`eval` programs are emitted.
    pub task: Option<Task>,
    /// Train the classifier head's weights and biases too (peft's `modules_to_save`).
    pub train_head: bool,
    /// With a task and DoRA adapters: emit BiDoRA's lower and upper programs.
    pub bilevel: Option<BilevelOptions>,
    /// causal-lm: targets from a `labels` input (-100 ignored) rather than `input_ids`.
    pub lm_labels: bool,
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct BilevelOptions {
    pub hypergrad: Hypergrad,
    pub regularizer: RegVariant,
}

/// BiDoRA's programs (see [`crate::bilevel`]).
pub struct BilevelPrograms {
    pub options: BilevelOptions,
    pub groups: Groups,
    pub lower: bilevel::Lower,
    pub upper: bilevel::Upper,
    /// The upper program's two phases, for data-parallel runs.
    pub upper_val: bilevel::UpperVal,
    pub upper_mixed: Option<bilevel::UpperMixed>,
}

/// The single-level training programs (see `ARCHITECTURE.md`).
pub struct TrainPrograms {
    pub head: Head,
    /// Batch + trainable tensors → loss, every gradient, logits.
    pub train_step: Model,
    /// Batch + trainable tensors → logits, loss.
    pub eval: Model,
    /// Trainable tensor → its gradient output in `train_step`.
    pub grads: Vec<(String, String)>,
}

/// Every stage's result, kept so that tools and tests can look at any of them.
pub struct Compiled {
    /// After the rewrite, with composite `ai.bidora` nodes.
    pub adapted: Model,
    /// The forward program: standard ONNX only.
    pub forward: Model,
    pub adapters: Vec<AdapterRecord>,
    /// Initial values of every trainable tensor: adapters, then head parameters.
    pub init: IndexMap<String, Tensor>,
    /// The head parameters among `init` (`--train-head`).
    pub head_params: Vec<String>,
    pub training: Option<TrainPrograms>,
    pub bilevel: Option<BilevelPrograms>,
}

pub fn compile(model: &Model, opts: &CompileOptions) -> Result<Compiled> {
    // The input type-checks first: a fault in the user's model is reported as one, naming
    // its node, not later as a failed check of an emitted program (a compiler bug).
    crate::shape::infer(model)?;
    let selected = targets::select(&model.graph, &opts.targets)?;
    let mut adapted = rewrite::adapt(model, selected, &opts.adapter)?;
    let mut head_params = vec![];
    if opts.train_head {
        let (m, params) = rewrite::head::make_trainable(&adapted.model)?;
        adapted.model = m;
        head_params = params.keys().cloned().collect();
        adapted.init.extend(params);
    }
    let lowered = rewrite::lower(&adapted.model)?;
    let mut forward = rewrite::strip_markers(&lowered);
    crate::ir::topo::toposort(&mut forward.graph)?;
    // Check the emitted programs: a rewrite bug fails here, naming the node, rather than in a
    // runtime on another machine.
    let trainable: Vec<String> = adapted.init.keys().cloned().collect();
    check::program(
        artifact::ProgramKey::Forward.file(),
        &forward,
        &[batch_group(&forward, &trainable)],
    )?;
    let mut bilevel_programs = None;
    let training = match opts.task {
        None => None,
        Some(task) => {
            let (with_loss, head) = heads::attach(&lowered, task, opts.lm_labels)?;
            if let Some(bo) = opts.bilevel {
                let groups = Groups::new(&adapted.adapters, &head_params)?;
                let lower = bilevel::lower_program(
                    &with_loss,
                    &head,
                    &adapted.adapters,
                    &groups,
                    bo.regularizer,
                )?;
                let upper =
                    bilevel::upper_program(&with_loss, &head, &groups, &lower.grads, bo.hypergrad)?;
                check::program(
                    artifact::ProgramKey::Lower.file(),
                    &lower.model,
                    &[batch_group(&lower.model, &trainable)],
                )?;
                let groups_of = |pick: fn(&(String, String, String)) -> &String| {
                    upper.batch_inputs.iter().map(pick).cloned()
                };
                check::program(
                    artifact::ProgramKey::Upper.file(),
                    &upper.model,
                    &[
                        InputGroup::new("training batch", groups_of(|b| &b.1)),
                        InputGroup::new("validation batch", groups_of(|b| &b.2)),
                    ],
                )?;
                let (upper_val, upper_mixed) =
                    bilevel::upper_phases(&with_loss, &head, &groups, &lower.grads, bo.hypergrad)?;
                check::program(
                    artifact::ProgramKey::UpperVal.file(),
                    &upper_val.model,
                    &[InputGroup::new(
                        "validation batch",
                        upper_val.batch_inputs.iter().map(|b| b.1.clone()),
                    )],
                )?;
                if let Some(mx) = &upper_mixed {
                    check::program(
                        artifact::ProgramKey::UpperMixed.file(),
                        &mx.model,
                        &[InputGroup::new(
                            "training batch",
                            mx.batch_inputs.iter().map(|b| b.1.clone()),
                        )],
                    )?;
                }
                bilevel_programs = Some(BilevelPrograms {
                    options: bo,
                    groups,
                    lower,
                    upper,
                    upper_val,
                    upper_mixed,
                });
            }
            let grads = autodiff::backward(&with_loss, &head.loss, &trainable)?;
            let mut train_step = rewrite::strip_markers(&grads.model);
            // Outputs: loss first, then the gradients, then the logits.
            let outs = std::mem::take(&mut train_step.graph.outputs);
            let pick = |name: &str| outs.iter().find(|o| o.name == name).cloned();
            train_step.graph.outputs = std::iter::once(pick(&head.loss))
                .chain(grads.grads.iter().map(|(_, g)| pick(g)))
                .chain(std::iter::once(pick(&head.logits)))
                .flatten()
                .collect();
            let eval = rewrite::strip_markers(&with_loss);
            for (file, m) in [
                (artifact::ProgramKey::TrainStep.file(), &train_step),
                (artifact::ProgramKey::Eval.file(), &eval),
            ] {
                check::program(file, m, &[batch_group(m, &trainable)])?;
            }
            Some(TrainPrograms {
                head,
                train_step,
                eval,
                grads: grads.grads,
            })
        }
    };
    Ok(Compiled {
        adapted: adapted.model,
        forward,
        adapters: adapted.adapters,
        init: adapted.init,
        head_params,
        training,
        bilevel: bilevel_programs,
    })
}

/// A single-batch program's data and label inputs: every input but the trainable tensors and
/// the scalar hyperparameters.
fn batch_group(model: &Model, trainable: &[String]) -> InputGroup {
    let scalars = [bilevel::GAMMA, bilevel::XI, bilevel::ALPHA_FD];
    InputGroup::new(
        "batch",
        model
            .graph
            .inputs
            .iter()
            .map(|i| &i.name)
            .filter(|n| !trainable.contains(n) && !scalars.contains(&n.as_str()))
            .cloned(),
    )
}

/// Packs a compilation into the artifact folder's contents.
pub fn artifact(c: &Compiled, source_model: &str, opts: &CompileOptions) -> Artifact {
    use artifact::ProgramKey;
    let roles = roles(c);
    let mut emitted: Vec<(ProgramKey, &Model)> = vec![(ProgramKey::Forward, &c.forward)];
    if let Some(t) = &c.training {
        emitted.push((ProgramKey::TrainStep, &t.train_step));
        emitted.push((ProgramKey::Eval, &t.eval));
    }
    if let Some(b) = &c.bilevel {
        emitted.push((ProgramKey::Lower, &b.lower.model));
        emitted.push((ProgramKey::Upper, &b.upper.model));
        emitted.push((ProgramKey::UpperVal, &b.upper_val.model));
        if let Some(mx) = &b.upper_mixed {
            emitted.push((ProgramKey::UpperMixed, &mx.model));
        }
    }
    let mut programs = IndexMap::new();
    let mut files = vec![];
    for (key, model) in emitted {
        programs.insert(key, artifact::program_sig(key.file(), &model.graph, &roles));
        files.push((key.file().to_string(), model.clone()));
    }
    Artifact {
        manifest: Manifest {
            format: artifact::FORMAT.to_string(),
            format_version: artifact::FORMAT_VERSION,
            compiler_version: env!("CARGO_PKG_VERSION").to_string(),
            source_model: source_model.to_string(),
            source_model_path: None,
            opset: c.forward.onnx_opset().unwrap_or(0),
            vocab_size: artifact::vocab_size(&c.forward.graph),
            config: opts.adapter.clone(),
            head_params: c.head_params.clone(),
            task: c.training.as_ref().map(|t| t.head.clone()),
            adapters: c.adapters.clone(),
            bilevel: c.bilevel.as_ref().map(|b| artifact::BilevelManifest {
                hypergrad: b.options.hypergrad,
                regularizer: b.options.regularizer,
                groups: b.groups.clone(),
                defaults: artifact::BilevelDefaults {
                    gamma: bilevel::DEFAULT_GAMMA,
                    alpha_fd: bilevel::DEFAULT_ALPHA_FD,
                    xi: "lower learning rate".to_string(),
                },
            }),
            programs,
            source_fingerprint: None,
        },
        programs: files,
        init: c.init.clone(),
    }
}

/// What each program input and output is for, for the manifest.
fn roles(c: &Compiled) -> artifact::Roles {
    use artifact::Role;
    let mut r = artifact::Roles::new();
    for a in &c.adapters {
        r.insert(a.lora_a.clone(), (Role::Adapter, None));
        r.insert(a.lora_b.clone(), (Role::Adapter, None));
        if let Some(m) = &a.magnitude {
            r.insert(m.clone(), (Role::Magnitude, None));
        }
    }
    for h in &c.head_params {
        r.insert(h.clone(), (Role::Head, None));
    }
    if let Some(t) = &c.training {
        for l in &t.head.labels {
            r.insert(l.clone(), (Role::Label, None));
        }
        r.insert(t.head.loss.clone(), (Role::Loss, None));
        for (w, g) in &t.grads {
            r.insert(g.clone(), (Role::Gradient, Some(w.clone())));
        }
    }
    if let Some(b) = &c.bilevel {
        for (w, g) in &b.lower.grads {
            r.insert(g.clone(), (Role::Gradient, Some(w.clone())));
        }
        r.insert(b.lower.loss.clone(), (Role::Loss, None));
        r.insert(b.lower.reg.clone(), (Role::Regularizer, None));
        for n in [bilevel::GAMMA, bilevel::XI, bilevel::ALPHA_FD] {
            r.insert(n.to_string(), (Role::Hyperparameter, None));
        }
        for (m, h) in &b.upper.hypergrads {
            r.insert(h.clone(), (Role::Hypergradient, Some(m.clone())));
        }
        r.insert(bilevel::VAL_LOSS.to_string(), (Role::Loss, None));
        for (t, out) in &b.upper_val.val_grads {
            r.insert(out.clone(), (Role::ValGradient, Some(t.clone())));
        }
        if let Some(mx) = &b.upper_mixed {
            for (m, out) in &mx.mixed {
                r.insert(out.clone(), (Role::MixedTerm, Some(m.clone())));
            }
        }
        let labels = c
            .training
            .as_ref()
            .map(|t| t.head.labels.clone())
            .unwrap_or_default();
        for (orig, tr, va) in &b.upper.batch_inputs {
            if labels.contains(orig) {
                r.insert(tr.clone(), (Role::Label, Some(orig.clone())));
                r.insert(va.clone(), (Role::Label, Some(orig.clone())));
            } else {
                r.insert(tr.clone(), (Role::Data, Some(orig.clone())));
                r.insert(va.clone(), (Role::Data, Some(orig.clone())));
            }
        }
    }
    r
}
