//! The gradient-check harness every rule and program is held to: JAX's `check_grads` idea.
//! For random directions `t` (one per differentiated input), the emitted gradient's
//! directional derivative `Σ ⟨∇L, t⟩` must match the central difference
//! `(L(x + h·t) − L(x − h·t)) / 2h` of the emitted loss, to a stated relative tolerance.

use std::path::Path;

use bidora_compiler::autodiff;
use bidora_compiler::ir::Model;
use bidora_runtime::tract_exec::{HostTensor, TractProgram};
use ndarray::ArrayD;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Which direction the directional derivative is taken along.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Direction {
    /// Uniform in [-1, 1] per element (independent of the gradient).
    Random,
    /// The emitted gradient itself, scaled to a largest element of 1: the derivative is then
    /// ‖g‖²/max|g|, the largest signal there is, which f32 whole-model checks need when the
    /// random-direction derivative is as small as the f32 rounding of the differences.
    Gradient,
}

/// How a check is taken.
#[derive(Clone, Copy)]
pub struct CheckOpts<'a> {
    /// Finite differences on this model instead (same inputs and loss output).
    pub reference: Option<&'a Model>,
    /// Step along the direction.
    pub h: f64,
    pub seed: u64,
    pub direction: Direction,
    /// Take the finite differences in ONNX Runtime (f64 kernels exact where tract's are not);
    /// `check_emitted` returns None when onnxruntime is not installed.
    pub numeric_in_ort: bool,
}

/// The result of one check.
#[derive(Debug)]
pub struct Check {
    pub analytic: f64,
    pub numeric: f64,
    pub rel_err: f64,
}

fn as_f64(t: &HostTensor) -> ArrayD<f64> {
    match t {
        HostTensor::F64(a) => a.clone(),
        HostTensor::F32(a) => a.mapv(|v| v as f64),
        HostTensor::I64(a) => a.mapv(|v| v as f64),
    }
}

fn perturbed(t: &HostTensor, dir: &ArrayD<f64>, h: f64) -> HostTensor {
    match t {
        HostTensor::F64(a) => HostTensor::F64(a + &(dir * h)),
        HostTensor::F32(a) => HostTensor::F32(a + &dir.mapv(|v| (v * h) as f32)),
        HostTensor::I64(_) => panic!("cannot perturb an integer input"),
    }
}

/// Differentiates `model`'s scalar `loss` w.r.t. `wrt` (graph inputs) and checks the result
/// at `inputs` along a random direction with step `h`.
pub fn check(
    model: &Model,
    loss: &str,
    wrt: &[&str],
    inputs: &[(String, HostTensor)],
    h: f64,
    seed: u64,
) -> Check {
    check_against(model, None, loss, wrt, inputs, h, seed)
}

/// Like [`check`], with the finite differences taken on `reference` (same inputs, same loss
/// output). `BIDORA_DUMP_GRAD=DIR` copies the differentiated program there for inspection.
pub fn check_against(
    model: &Model,
    reference: Option<&Model>,
    loss: &str,
    wrt: &[&str],
    inputs: &[(String, HostTensor)],
    h: f64,
    seed: u64,
) -> Check {
    let wrt: Vec<String> = wrt.iter().map(|s| s.to_string()).collect();
    let grads =
        autodiff::backward(model, loss, &wrt).unwrap_or_else(|e| panic!("backward failed: {e}"));
    let model = bidora_compiler::rewrite::strip_markers(&grads.model);
    let opts = CheckOpts {
        reference,
        h,
        seed,
        direction: Direction::Random,
        numeric_in_ort: false,
    };
    check_emitted(&model, loss, &grads.grads, inputs, &opts).expect("tract check")
}

/// Checks a program that already outputs gradients (`grads`: input → gradient output name)
/// against finite differences of its own `loss` output (or of `reference`'s).
pub fn check_emitted(
    model: &Model,
    loss: &str,
    grads: &[(String, String)],
    inputs: &[(String, HostTensor)],
    opts: &CheckOpts,
) -> Option<Check> {
    let CheckOpts {
        reference,
        h,
        seed,
        direction,
        numeric_in_ort,
    } = *opts;
    let dir = tempfile::tempdir().unwrap();
    let path = crate::save(model, dir.path(), "grad.onnx");
    if let Ok(d) = std::env::var("BIDORA_DUMP_GRAD") {
        std::fs::copy(&path, Path::new(&d).join("grad.onnx")).unwrap();
    }
    let prog = TractProgram::load(Path::new(&path), inputs).unwrap_or_else(|e| panic!("{e:#}"));
    let outs = prog.run(inputs).unwrap();
    let names = prog.output_names().to_vec();
    let find = |outs: &[HostTensor], name: &str| -> ArrayD<f64> {
        let i = names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no output {name} in {names:?}"));
        as_f64(&outs[i])
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut analytic = 0.0;
    let mut dirs = vec![];
    let gmax = grads
        .iter()
        .map(|(_, gname)| find(&outs, gname).iter().fold(0f64, |m, v| m.max(v.abs())))
        .fold(0f64, f64::max)
        .max(1e-30);
    for (w, gname) in grads {
        let x = &inputs.iter().find(|(n, _)| n == w).unwrap().1;
        let g = find(&outs, gname);
        let t = match direction {
            Direction::Random => as_f64(x).mapv(|_| rng.random_range(-1.0..1.0)),
            Direction::Gradient => g.mapv(|v| v / gmax),
        };
        assert_eq!(
            g.shape(),
            t.shape(),
            "gradient of '{w}' has the wrong shape"
        );
        analytic += (&g * &t).sum();
        dirs.push((w.clone(), t));
    }
    let ref_path = reference.map(|r| crate::save(r, dir.path(), "reference.onnx"));
    let numeric_path = ref_path.clone().unwrap_or_else(|| path.clone());
    let ref_prog = ref_path
        .as_ref()
        .map(|p| TractProgram::load(Path::new(p), inputs).unwrap_or_else(|e| panic!("{e:#}")));
    let numeric_prog = ref_prog.as_ref().unwrap_or(&prog);
    let numeric_names = numeric_prog.output_names().to_vec();
    if numeric_in_ort {
        // Probe once: None (a skip) when onnxruntime is absent.
        crate::ort::run(&numeric_path, inputs)?;
    }
    let loss_at = |sign: f64| -> f64 {
        let moved: Vec<(String, HostTensor)> = inputs
            .iter()
            .map(|(n, t)| match dirs.iter().find(|(w, _)| w == n) {
                Some((_, d)) => (n.clone(), perturbed(t, d, sign * h)),
                None => (n.clone(), t.clone()),
            })
            .collect();
        if numeric_in_ort {
            let o = crate::ort::run(&numeric_path, &moved).expect("onnxruntime");
            let (_, _, v) = o
                .outputs
                .iter()
                .find(|(n, _, _)| n == loss)
                .expect("loss output");
            return v.iter().sum();
        }
        let outs = numeric_prog.run(&moved).unwrap();
        let i = numeric_names
            .iter()
            .position(|n| n == loss)
            .expect("loss output");
        as_f64(&outs[i]).sum()
    };
    let numeric = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * h);
    let rel_err = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-12);
    Some(Check {
        analytic,
        numeric,
        rel_err,
    })
}

/// For DoRA's `detach_norm`: the lowered model `m` (with its `StopGradient` marker) turned
/// into a model whose column norm is a graph input, and that input's value at `inputs`
/// (appended to `inputs`). Finite differences of the result are the gradients that treat the
/// norm as a constant, which is what `detach_norm` promises.
pub fn constant_norm_reference(m: &Model, inputs: &mut Vec<(String, HostTensor)>) -> Model {
    use bidora_compiler::ir::ValueInfo;
    use bidora_compiler::rewrite::strip_markers;
    let stop = m
        .graph
        .nodes
        .iter()
        .find(|n| n.op_type == autodiff::STOP_GRADIENT)
        .expect("a detach_norm marker")
        .clone();
    let norm = stop.outputs[0].clone();
    let facts = bidora_compiler::shape::infer(m).unwrap();
    let f = facts.get(&norm).unwrap();
    let ty = bidora_compiler::ir::ValueType::tensor(
        f.dtype,
        f.shape
            .iter()
            .map(|d| bidora_compiler::ir::Dim::Known(d.as_known().unwrap()))
            .collect(),
    );
    let mut probe = strip_markers(m);
    probe
        .graph
        .outputs
        .push(ValueInfo::new(norm.clone(), ty.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = crate::save(&probe, dir.path(), "probe.onnx");
    let value = bidora_runtime::tract_exec::run_once(&p, inputs)
        .unwrap()
        .pop()
        .unwrap();
    let mut r = strip_markers(m);
    r.graph.nodes.retain(|n| n.name != stop.name);
    r.graph.inputs.push(ValueInfo::new(norm.clone(), ty));
    inputs.push((norm, value));
    r
}
