//! The emitted programs in stock ONNX Runtime (PyPI `onnxruntime`, CPU) agree with tract, and
//! pass `onnx.checker` with the full check. Run for every fixture, LoRA and DoRA, with the
//! fixture family's first task head; skipped with a message where onnxruntime is absent.

use bidora_compiler::heads::Task;
use bidora_compiler::load_model;
use bidora_compiler::pipeline;
use bidora_compiler::rewrite::Method;
use bidora_runtime::tract_exec::{run_once, HostTensor};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

/// Relative agreement: max |tract − ort| over max |ort| per output.
const TOL: f64 = 1e-5;

#[test]
fn train_step_and_eval_agree_between_tract_and_onnxruntime() {
    let mut worst: f64 = 0.0;
    for path in fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let fam = family(&path);
        let model = load_model(&path).unwrap();
        for method in [Method::Lora, Method::Dora] {
            let task = if fam == "gpt2" {
                Task::CausalLm
            } else {
                Task::SeqCls
            };
            let mut opts = options(qv_targets(&fam), method);
            opts.task = Some(task);
            let c = pipeline::compile(&model, &opts).unwrap();
            let t = c.training.as_ref().unwrap();
            let mut inputs = example_inputs(&model);
            if task == Task::SeqCls {
                inputs.push((
                    "labels".into(),
                    HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![0, 1]).unwrap()),
                ));
            }
            inputs.extend(perturbed_init(&c, 2));
            let dir = tempfile::tempdir().unwrap();
            for (file, prog) in [("train_step.onnx", &t.train_step), ("eval.onnx", &t.eval)] {
                let p = save(prog, dir.path(), file);
                let Some(ort) = bidora_tests::ort::run(&p, &inputs) else {
                    return;
                };
                if std::env::var("BIDORA_REQUIRE_ORT").as_deref() == Ok("1") {
                    assert_eq!(ort.checker, "ok", "{name} {method:?} {file}: onnx.checker");
                }
                let tract = run_once(&p, &inputs).unwrap();
                assert_eq!(tract.len(), ort.outputs.len());
                for (k, (tr, (oname, oshape, ov))) in tract.iter().zip(&ort.outputs).enumerate() {
                    let tr = tr
                        .as_f32()
                        .unwrap_or_else(|| panic!("{name} {file}: output {k} is not f32"));
                    assert_eq!(
                        tr.shape(),
                        oshape.as_slice(),
                        "{name} {file}: {oname} shape"
                    );
                    let scale = ov.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
                    let diff = tr
                        .iter()
                        .zip(ov)
                        .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
                    let rel = diff / scale;
                    worst = worst.max(rel);
                    assert!(
                        rel <= TOL,
                        "{name} {method:?} {file}: output '{oname}' differs by {rel:.2e} relative"
                    );
                }
            }
        }
    }
    eprintln!("worst relative difference tract vs onnxruntime: {worst:.2e}");
}
