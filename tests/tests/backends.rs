//! The two backends behind `bidora_runtime::backend`: every fixture's forward, train_step and
//! eval programs give the same outputs in tract and in ONNX Runtime (the `ort` backend, CPU);
//! tract's plan cache; and the errors a caller sees for bad inputs, libraries and devices.
//!
//! The ort half needs an ONNX Runtime library (the PyPI `onnxruntime` package, ORT_DYLIB_PATH);
//! without one it is skipped with a message, unless `BIDORA_REQUIRE_ORT=1` (CI), where that
//! is a failure.

use std::path::{Path, PathBuf};

use bidora_compiler::heads::Task;
use bidora_compiler::ir::Model;
use bidora_compiler::load_model;
use bidora_compiler::rewrite::Method;
use bidora_runtime::backend::tract::{TractProgram, PLAN_CACHE};
use bidora_runtime::backend::tract_consts::ConstPool;
use bidora_runtime::backend::{
    select, BackendError, BackendKind, BackendOptions, Device, HostTensor, Program,
};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

/// Relative agreement: max |tract − ort| over max |ort|, per output.
const TOL: f64 = 1e-5;
/// The op fixtures' bound. Measured: Llama and Phi-3 programs ≤ 4.5e-7, the ViT's forward and
/// eval 2.8e-8, its v_proj gradients ≤ 4.6e-7, but its q_proj gradients up to 2.0e-5: they
/// are ~1e-10 (v_proj's ~1e-4), what is left when nearly uniform attention (random weights of
/// scale 0.02 over 17 tokens) cancels the softmax's terms, so f32 rounding of those terms is
/// a large part of them, in either backend.
const OP_FIXTURE_TOL: f64 = 5e-5;

fn opts() -> BackendOptions {
    BackendOptions {
        threads: 1,
        ..BackendOptions::default()
    }
}

/// The values among `all` that `p` takes, in `all`'s order.
fn inputs_of(p: &dyn Program, all: &[(String, HostTensor)]) -> Vec<(String, HostTensor)> {
    all.iter()
        .filter(|(n, _)| p.input_names().contains(n))
        .cloned()
        .collect()
}

fn as_f64(t: &HostTensor) -> Vec<f64> {
    match t {
        HostTensor::F32(a) => a.iter().map(|&v| v as f64).collect(),
        HostTensor::F64(a) => a.iter().copied().collect(),
        HostTensor::I64(a) => a.iter().map(|&v| v as f64).collect(),
    }
}

/// Worst relative difference over the outputs; panics on a shape, type or name mismatch.
fn compare(what: &str, names: &[String], a: &[HostTensor], b: &[HostTensor]) -> f64 {
    compare_within(what, names, a, b, TOL)
}

fn compare_within(
    what: &str,
    names: &[String],
    a: &[HostTensor],
    b: &[HostTensor],
    tol: f64,
) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: output count");
    let mut worst: f64 = 0.0;
    for ((name, x), y) in names.iter().zip(a).zip(b) {
        assert_eq!(x.dtype(), y.dtype(), "{what}: {name} type");
        assert_eq!(x.shape(), y.shape(), "{what}: {name} shape");
        let (x, y) = (as_f64(x), as_f64(y));
        let scale = y.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        let diff = x
            .iter()
            .zip(&y)
            .fold(0f64, |m, (p, q)| m.max((p - q).abs()));
        let rel = diff / scale;
        assert!(
            rel <= tol,
            "{what}: output '{name}' differs by {rel:.2e} relative"
        );
        worst = worst.max(rel);
    }
    worst
}

fn task_of(path: &Path) -> Task {
    if family(path) == "gpt2" {
        Task::CausalLm
    } else {
        Task::SeqCls
    }
}

/// The fixture's three programs saved in `dir`, and every input any of them takes.
fn programs(
    path: &Path,
    model: &Model,
    method: Method,
    dir: &Path,
) -> (Vec<PathBuf>, Vec<(String, HostTensor)>) {
    let inputs = example_inputs(model);
    programs_for(
        model,
        qv_targets(&family(path)),
        task_of(path),
        inputs,
        method,
        dir,
    )
}

/// [`programs`] for any model, adapters on `targets`, fed `inputs` (labels are added).
fn programs_for(
    model: &Model,
    targets: Vec<String>,
    task: Task,
    mut inputs: Vec<(String, HostTensor)>,
    method: Method,
    dir: &Path,
) -> (Vec<PathBuf>, Vec<(String, HostTensor)>) {
    let mut o = options(targets, method);
    o.task = Some(task);
    let c = compile(model, &o);
    let t = c.training.as_ref().unwrap();
    let files = vec![
        save(&c.forward, dir, "forward.onnx"),
        save(&t.train_step, dir, "train_step.onnx"),
        save(&t.eval, dir, "eval.onnx"),
    ];
    if task == Task::SeqCls {
        inputs.push((
            "labels".into(),
            HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![0, 1]).unwrap()),
        ));
    }
    inputs.extend(perturbed_init(&c, 3));
    (files, inputs)
}

#[test]
fn forward_train_step_and_eval_agree_between_tract_and_ort() {
    let Some(ort) = ort1() else { return };
    eprintln!("{}", ort.description());
    let tract = tract1();
    let mut worst: f64 = 0.0;
    for path in fixtures() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let model = load_model(&path).unwrap();
        for method in [Method::Lora, Method::Dora] {
            let dir = tempfile::tempdir().unwrap();
            let (files, all) = programs(&path, &model, method, dir.path());
            for file in &files {
                let what = format!(
                    "{name} {method:?} {}",
                    file.file_name().unwrap().to_string_lossy()
                );
                let mut t = tract.load(file).unwrap_or_else(|e| panic!("{what}: {e}"));
                let mut o = ort.load(file).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(t.input_names(), o.input_names(), "{what}: inputs");
                assert_eq!(t.output_names(), o.output_names(), "{what}: outputs");
                let inputs = inputs_of(t.as_ref(), &all);
                let a = t.run(&inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
                let b = o.run(&inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
                worst = worst.max(compare(&what, t.output_names(), &a, &b));
            }
        }
    }
    eprintln!("worst relative difference tract vs ort over every fixture program: {worst:.2e}");
}

/// The same for the op fixtures (GatherND pooling and its ScatterND gradient, a grouped-query
/// fused qkv_proj, a ViT's Conv), on the inputs of their torch references.
#[test]
fn op_fixture_programs_agree_between_tract_and_ort() {
    let Some(ort) = ort1() else { return };
    let tract = tract1();
    for f in op_fixtures() {
        let name = f.path.file_stem().unwrap().to_string_lossy().to_string();
        let model = load_model(&f.path).unwrap();
        let (inputs, _, _) = reference(&f.path);
        let dir = tempfile::tempdir().unwrap();
        let (files, all) = programs_for(
            &model,
            f.targets.clone(),
            f.task,
            inputs,
            Method::Dora,
            dir.path(),
        );
        for file in &files {
            let what = format!("{name} {}", file.file_name().unwrap().to_string_lossy());
            let mut t = tract.load(file).unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut o = ort.load(file).unwrap_or_else(|e| panic!("{what}: {e}"));
            let inputs = inputs_of(t.as_ref(), &all);
            let a = t.run(&inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
            let b = o.run(&inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
            let rel = compare_within(&what, t.output_names(), &a, &b, OP_FIXTURE_TOL);
            eprintln!("{what}: worst relative difference {rel:.2e}");
        }
    }
}

/// Token ids and a full mask of `batch × seq` for the BERT fixture's inputs.
fn batch(model: &Model, batch: usize, seq: usize) -> Vec<(String, HostTensor)> {
    model
        .graph
        .inputs
        .iter()
        .filter(|i| !model.graph.initializers.contains_key(&i.name))
        .map(|i| {
            let n = batch * seq;
            let v: Vec<i64> = if i.name.contains("mask") {
                vec![1; n]
            } else if i.name.contains("type") {
                vec![0; n]
            } else {
                (0..n).map(|k| 5 + (k as i64 * 7) % 13).collect()
            };
            let a = ArrayD::from_shape_vec(IxDyn(&[batch, seq]), v).unwrap();
            (i.name.clone(), HostTensor::I64(a))
        })
        .collect()
}

fn bert_forward(dir: &Path) -> (Model, PathBuf, Vec<(String, HostTensor)>) {
    let model = load_model(&repo_root().join("models/bert_legacy17.onnx")).unwrap();
    let c = compile(&model, &options(qv_targets("bert"), Method::Dora));
    let p = save(&c.forward, dir, "forward.onnx");
    (model, p, perturbed_init(&c, 5))
}

#[test]
fn tract_keeps_one_plan_per_input_shape_and_a_bounded_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (model, path, init) = bert_forward(dir.path());
    let with = |b: usize, s: usize| {
        let mut v = batch(&model, b, s);
        v.extend(init.iter().cloned());
        v
    };
    let mut p = TractProgram::open(&path).unwrap();
    assert_eq!(p.plans(), 0, "no plan before the first run");
    let first = Program::run(&mut p, &with(2, 8)).unwrap();
    let again = Program::run(&mut p, &with(2, 8)).unwrap();
    assert_eq!(p.plans(), 1, "the same shapes reuse the plan");
    assert_eq!(first, again);
    let shorter = Program::run(&mut p, &with(2, 5)).unwrap();
    assert_eq!(p.plans(), 2, "another length makes a second plan");
    assert_eq!(shorter[0].shape(), &[2, 2]);
    for s in 1..=PLAN_CACHE + 2 {
        Program::run(&mut p, &with(1, s)).unwrap();
    }
    assert_eq!(p.plans(), PLAN_CACHE, "the cache is bounded");
}

/// Plans of several lengths and two programs opened with one pool hold one copy of each
/// packed weight, and pooling changes no output (compared with programs opened alone).
#[test]
fn tract_programs_of_one_pool_share_their_weights_and_outputs_are_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let model = load_model(&repo_root().join("models/bert_legacy17.onnx")).unwrap();
    let mut o = options(qv_targets("bert"), Method::Dora);
    o.task = Some(Task::SeqCls);
    let c = compile(&model, &o);
    let forward = save(&c.forward, dir.path(), "forward.onnx");
    let eval = save(&c.training.as_ref().unwrap().eval, dir.path(), "eval.onnx");
    let init = perturbed_init(&c, 5);
    let with = |b: usize, s: usize| {
        let mut v = batch(&model, b, s);
        v.extend(init.iter().cloned());
        v.push((
            "labels".into(),
            HostTensor::I64(ArrayD::from_elem(IxDyn(&[b]), 1)),
        ));
        v
    };
    let pool = ConstPool::default();
    let fwd = TractProgram::open_pooled(&forward, pool.clone()).unwrap();
    let first = fwd.run(&with(2, 8)).unwrap();
    let after_one = pool.stats();
    // A second plan of the same shape packs the same kernels' operands: nothing new is kept
    // (tract leaves panel padding uninitialised; the pool zeroes it so the bytes compare).
    let again = TractProgram::open_pooled(&forward, pool.clone()).unwrap();
    assert_eq!(again.run(&with(2, 8)).unwrap(), first);
    assert_eq!(
        pool.stats().live_bytes,
        after_one.live_bytes,
        "a second plan of one shape adds no constants: {after_one:?} then {:?}",
        pool.stats()
    );
    drop(again);
    let other_length = fwd.run(&with(2, 5)).unwrap();
    let after_two = pool.stats();
    assert!(
        after_two.deduplicated_bytes > after_one.deduplicated_bytes,
        "a second plan's packed weights are the first's: {after_one:?} then {after_two:?}"
    );
    let ev = TractProgram::open_pooled(&eval, pool.clone()).unwrap();
    let evaluated = ev.run(&with(2, 8)).unwrap();
    let after_eval = pool.stats();
    assert!(after_eval.deduplicated_bytes > after_two.deduplicated_bytes);
    // Unpooled: every program and plan with its own constants.
    let alone = |p: &Path, b, s| {
        let p = TractProgram::open_pooled(p, ConstPool::off()).unwrap();
        p.run(&with(b, s)).unwrap()
    };
    assert_eq!(first, alone(&forward, 2, 8));
    assert_eq!(other_length, alone(&forward, 2, 5));
    assert_eq!(evaluated, alone(&eval, 2, 8));
}

#[test]
fn ort_runs_any_sequence_length_like_tract() {
    let Some(ort) = ort1() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (model, path, init) = bert_forward(dir.path());
    let mut o = ort.load(&path).unwrap();
    let mut t = tract1().load(&path).unwrap();
    for (b, s) in [(2, 8), (3, 5), (1, 16)] {
        let mut inputs = batch(&model, b, s);
        inputs.extend(init.iter().cloned());
        let x = t.run(&inputs).unwrap();
        let y = o.run(&inputs).unwrap();
        compare(&format!("bert forward {b}×{s}"), t.output_names(), &x, &y);
    }
}

/// Both backends name a missing input and an input the program lacks.
#[test]
fn missing_and_unknown_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (model, path, init) = bert_forward(dir.path());
    let mut good = batch(&model, 2, 8);
    good.extend(init);
    let mut backends = vec![tract1()];
    backends.extend(ort1());
    for backend in backends {
        let mut p = backend.load(&path).unwrap();
        let missing: Vec<_> = good
            .iter()
            .filter(|(n, _)| n != "attention_mask")
            .cloned()
            .collect();
        let e = p.run(&missing).unwrap_err();
        assert!(
            matches!(&e, BackendError::MissingInputs { names, .. } if names == &["attention_mask"]),
            "{}: {e}",
            backend.name()
        );
        assert!(e.to_string().contains("attention_mask"), "{e}");
        let mut extra = good.clone();
        extra.push(("atention_mask".into(), good[1].1.clone()));
        let e = p.run(&extra).unwrap_err();
        assert!(
            matches!(&e, BackendError::UnknownInputs { names, .. } if names == &["atention_mask"]),
            "{}: {e}",
            backend.name()
        );
        // The program is still usable after refused calls.
        p.run(&good).unwrap();
    }
}

#[test]
fn a_bad_library_path_is_named() {
    let missing = PathBuf::from("/nonexistent/libonnxruntime.so.1.32.0");
    let o = BackendOptions {
        ort_lib: Some(missing.clone()),
        ..opts()
    };
    for kind in [BackendKind::Ort, BackendKind::Auto] {
        let e = select(kind, &o).err().expect("no library there");
        assert!(e.to_string().contains(missing.to_str().unwrap()), "{e}");
    }
    // A file that is not a library: refused when it is loaded (or, when another library is
    // already loaded in this process, as a second library), naming it either way.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a library").unwrap();
    let e = select(
        BackendKind::Ort,
        &BackendOptions {
            ort_lib: Some(fake.clone()),
            ..opts()
        },
    )
    .err()
    .expect("not a library");
    assert!(e.to_string().contains(fake.to_str().unwrap()), "{e}");
}

#[test]
fn devices_the_machine_lacks_are_clear_errors() {
    let cuda = BackendOptions {
        device: Device::Cuda(0),
        ..opts()
    };
    let e = select(BackendKind::Tract, &cuda)
        .err()
        .expect("tract has no CUDA");
    assert!(e.to_string().contains("CPU only"), "{e}");
    if ort1().is_none() {
        return;
    }
    match select(BackendKind::Ort, &cuda) {
        // A machine with onnxruntime-gpu: the provider is there.
        Ok(b) => eprintln!("CUDA available: {}", b.description()),
        Err(e) => {
            assert!(matches!(e, BackendError::DeviceUnavailable { .. }), "{e}");
            assert!(e.to_string().contains("CUDA"), "{e}");
        }
    }
}

#[test]
fn auto_takes_ort_when_a_library_is_found_and_says_so() {
    let auto = select(BackendKind::Auto, &opts()).unwrap();
    let d = auto.description();
    assert!(d.contains("auto"), "{d}");
    match ort1() {
        Some(_) => assert_eq!(auto.name(), "ort", "{d}"),
        None => assert_eq!(auto.name(), "tract", "{d}"),
    }
}

/// A token id past the embedding table (another model's tokenizer) is a run error naming the
/// program in both backends, not a crash, and the program stays usable; so is a sequence
/// longer than the position table in tract.
#[test]
fn out_of_vocabulary_ids_are_a_run_error() {
    let dir = tempfile::tempdir().unwrap();
    let (model, path, init) = bert_forward(dir.path());
    let mut good = batch(&model, 2, 8);
    good.extend(init);
    let mut bad = good.clone();
    for (n, t) in bad.iter_mut() {
        if n == "input_ids" {
            *t = HostTensor::I64(ArrayD::from_elem(IxDyn(&[2, 8]), 5000));
        }
    }
    let mut backends = vec![tract1()];
    backends.extend(ort1());
    for backend in backends {
        let mut p = backend.load(&path).unwrap();
        let e = p.run(&bad).unwrap_err();
        assert!(
            matches!(&e, BackendError::Run { .. }) && e.to_string().contains("forward.onnx"),
            "{}: {e}",
            backend.name()
        );
        p.run(&good).unwrap();
    }
    // A sequence past the model's 64 positions fails while tract plans for the shape (for
    // GPT-2 its constant folding of the position Gather panics, caught the same way): an
    // error naming the program, and the program stays usable.
    let mut long = batch(&model, 1, 80);
    long.extend(bert_forward(dir.path()).2);
    let mut p = tract1().load(&path).unwrap();
    let e = p.run(&long).unwrap_err().to_string();
    assert!(e.contains("forward.onnx"), "{e}");
    p.run(&good).unwrap();
}
