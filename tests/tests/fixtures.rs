//! Every fixture in `models/` (real exports: torch.onnx dynamo at opset 18, legacy at opset 17):
//! lossless import/export, and LoRA/DoRA at initialisation reproducing the original outputs.

use std::path::Path;

use bidora_compiler::ir::convert;
use bidora_compiler::rewrite::Method;
use bidora_compiler::{load_model, onnx_io};
use bidora_runtime::tract_exec::{run_once, HostTensor};
use bidora_tests::*;
use prost::Message;

fn outputs(path: &Path, inputs: &[(String, HostTensor)]) -> Vec<ndarray::ArrayD<f32>> {
    run_once(path, inputs)
        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
        .into_iter()
        .map(|t| t.as_f32().expect("f32 output").clone())
        .collect()
}

#[test]
fn import_export_round_trip_is_lossless() {
    for path in fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let original = onnx_io::read_model(&path).unwrap();
        let model = convert::model_from_proto(original.clone()).unwrap();
        let exported = convert::model_to_proto(&model);
        // Protobuf level: every node (with attributes and metadata), value info and the
        // model's metadata are identical to what the exporter wrote.
        let (g0, g1) = (
            original.graph.as_ref().unwrap(),
            exported.graph.as_ref().unwrap(),
        );
        assert_eq!(g0.node.len(), g1.node.len(), "{name}");
        for (a, b) in g0.node.iter().zip(&g1.node) {
            assert_eq!(
                a.encode_to_vec(),
                b.encode_to_vec(),
                "{name}: node '{}' changed on round trip",
                a.name()
            );
        }
        assert_eq!(g0.input, g1.input, "{name}: inputs");
        assert_eq!(g0.output, g1.output, "{name}: outputs");
        assert_eq!(g0.value_info, g1.value_info, "{name}: value_info");
        assert_eq!(original.metadata_props, exported.metadata_props, "{name}");
        assert_eq!(original.opset_import, exported.opset_import, "{name}");
        assert_eq!(original.functions, exported.functions, "{name}");
        // Initializers: same names, order, types, dims and bytes.
        assert_eq!(g0.initializer.len(), g1.initializer.len(), "{name}");
        for (a, b) in g0.initializer.iter().zip(&g1.initializer) {
            let ta = convert::tensor_from_proto(a.clone()).unwrap();
            let tb = convert::tensor_from_proto(b.clone()).unwrap();
            assert_eq!(ta, tb, "{name}: initializer '{}'", a.name());
        }
        // IR level: a second round trip is the identity.
        let again = convert::model_from_proto(
            bidora_compiler::proto::onnx::ModelProto::decode(&exported.encode_to_vec()[..])
                .unwrap(),
        )
        .unwrap();
        assert_eq!(model, again, "{name}: IR changed on the second round trip");

        // Same outputs in tract, bit for bit.
        let dir = tempfile::tempdir().unwrap();
        let written = save(&model, dir.path(), &name);
        let inputs = example_inputs(&model);
        let (o0, o1) = (outputs(&path, &inputs), outputs(&written, &inputs));
        assert_eq!(o0, o1, "{name}: outputs differ after round trip");

        // And tract agrees with the exporter's own model (torch logits saved by the recipe).
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(path.with_extension("ref.json")).unwrap(),
        )
        .unwrap();
        let want: Vec<f32> = reference["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got: Vec<f32> = o0[0].iter().copied().collect();
        assert_eq!(got.len(), want.len(), "{name}: logits size");
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-4, "{name}: tract differs from torch by {d}");
    }
}

fn init_reproduces(method: Method) {
    for path in fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let model = load_model(&path).unwrap();
        let fam = family(&path);
        let c = compile(&model, &options(qv_targets(&fam), method));
        // Two layers, query and value in each.
        assert_eq!(
            c.adapters.len(),
            4,
            "{name}: adapters {:?}",
            c.adapters.iter().map(|a| &a.module).collect::<Vec<_>>()
        );
        let dir = tempfile::tempdir().unwrap();
        let fwd = save(&c.forward, dir.path(), "forward.onnx");
        let inputs = example_inputs(&model);
        let mut with_adapters = inputs.clone();
        with_adapters.extend(init_inputs(&c));
        let expected = outputs(&path, &inputs);
        let got = outputs(&fwd, &with_adapters);
        for (e, g) in expected.iter().zip(&got) {
            let d = max_abs_diff(e, g);
            assert!(
                d <= 1e-5,
                "{name} {method:?}: max abs diff {d} at initialisation"
            );
        }
    }
}

#[test]
fn dora_at_init_reproduces_original_outputs() {
    init_reproduces(Method::Dora);
}

#[test]
fn lora_at_init_reproduces_original_outputs() {
    init_reproduces(Method::Lora);
}

/// The op fixtures (`models/ops/`: GatherND pooling, Conv patches, a grouped-query fused
/// qkv_proj): tract runs the export as torch did, DoRA and LoRA on the attention's q and v at
/// initialisation reproduce it, and the training programs compile (with the exact
/// hypergradient, which differentiates the GatherND gradient again) and run in tract.
#[test]
fn op_fixtures_compile_and_reproduce_at_init() {
    use bidora_compiler::bilevel::Hypergrad;
    for f in op_fixtures() {
        let name = f.path.file_name().unwrap().to_string_lossy().to_string();
        let model = load_model(&f.path).unwrap();
        let (inputs, shape, want) = reference(&f.path);
        let original = outputs(&f.path, &inputs);
        assert_eq!(original[0].shape(), &shape[..], "{name}: logits shape");
        let d = original[0]
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-4, "{name}: tract differs from torch by {d}");
        for method in [Method::Dora, Method::Lora] {
            let c = compile(&model, &options(f.targets.clone(), method));
            assert_eq!(c.adapters.len(), 4, "{name}: two layers, q and v in each");
            let dir = tempfile::tempdir().unwrap();
            let fwd = save(&c.forward, dir.path(), "forward.onnx");
            let mut with_adapters = inputs.clone();
            with_adapters.extend(init_inputs(&c));
            let d = max_abs_diff(&original[0], &outputs(&fwd, &with_adapters)[0]);
            assert!(
                d <= 1e-5,
                "{name} {method:?}: max abs diff {d} at initialisation"
            );
        }
        let mut opts = options(f.targets.clone(), Method::Dora);
        opts.task = Some(f.task);
        opts.bilevel = Some(bidora_compiler::pipeline::BilevelOptions {
            hypergrad: Hypergrad::Exact,
            regularizer: bidora_compiler::regularizer::RegVariant::Paper,
        });
        let dir = tempfile::tempdir().unwrap();
        let art = bidora_tests::write_artifact(&model, &opts, &name, &dir.path().join("art"));
        let engine = tract1();
        for (key, prog) in &art.manifest.programs {
            let batch = inputs[0].1.shape()[0];
            let seq = inputs
                .iter()
                .find(|(n, _)| n == "input_ids")
                .map_or(1, |(_, t)| t.shape()[1]);
            let mut feed = art.example_inputs(prog, batch, seq).unwrap();
            // The synthetic batch holds ids; images need the reference pixels.
            for (n, t) in &inputs {
                if let Some(slot) = feed.iter_mut().find(|(m, _)| m == n) {
                    slot.1 = t.clone();
                }
            }
            let outs = engine
                .load(&art.dir.join(&prog.file))
                .unwrap()
                .run(&feed)
                .unwrap_or_else(|e| panic!("{name} {key}: {e:#}"));
            for (sig, o) in prog.outputs.iter().zip(&outs) {
                if let Some(a) = o.as_f32() {
                    assert!(
                        a.iter().all(|v| v.is_finite()),
                        "{name} {key}: {} is not finite",
                        sig.name
                    );
                }
            }
        }
    }
}
