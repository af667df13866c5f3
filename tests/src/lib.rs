//! Shared helpers of the end-to-end tests: fixture discovery, example inputs, building small
//! synthetic models, running programs with tract, and the gradient-check harness.

pub mod bench;
pub mod gradcheck;
pub mod ort;

use std::path::{Path, PathBuf};

use bidora_compiler::ir::{self, DataType, Dim, Model, ValueInfo, ValueType};
use bidora_compiler::pipeline::{self, CompileOptions, Compiled};
use bidora_compiler::rewrite::{AdapterConfig, Method};
use bidora_compiler::targets::TargetSpec;
use bidora_runtime::tract_exec::HostTensor;
use ndarray::{ArrayD, IxDyn};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every fixture model in `models/`, sorted by name.
pub fn fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo_root().join("models"))
        .expect("models/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures in models/");
    v
}

/// A model in `models/ops/`: graphs that need ops the encoder fixtures lack (GatherND
/// last-token pooling, a Conv patch embedding, a grouped-query fused qkv_proj), with the
/// `--target` adapting its attention's query and value projections and its loss head.
pub struct OpFixture {
    pub path: PathBuf,
    pub targets: Vec<String>,
    pub task: bidora_compiler::heads::Task,
}

/// Every op fixture (written by `models/make_fixtures.py --ops`), sorted by name.
pub fn op_fixtures() -> Vec<OpFixture> {
    use bidora_compiler::heads::Task;
    let ops = repo_root().join("models/ops");
    let fixture = |file: &str, target: &str, task| OpFixture {
        path: ops.join(file),
        targets: vec![target.into()],
        task,
    };
    vec![
        // LlamaForSequenceClassification: last-token pooling is a GatherND.
        fixture("llama_seqcls_dynamo18.onnx", "q_proj,v_proj", Task::SeqCls),
        // Phi-3: qkv_proj fuses q 64 | k 32 | v 32 (two KV heads of four).
        fixture("phi3_gqa_dynamo18.onnx", "qkv_proj:q,v", Task::CausalLm),
        // ViTForImageClassification: Conv patch embedding before every adapter.
        fixture("vit_dynamo18.onnx", "q_proj,v_proj", Task::SeqCls),
    ]
}

/// The input torch's reference was computed on (`<model>.ref.json`, ids as i64, pixels as
/// f32) and the reference logits (shape, values).
pub fn reference(path: &Path) -> (Vec<(String, HostTensor)>, Vec<usize>, Vec<f32>) {
    let text = std::fs::read_to_string(path.with_extension("ref.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    fn flatten(v: &serde_json::Value, shape: &mut Vec<usize>, depth: usize, out: &mut Vec<f64>) {
        match v.as_array() {
            Some(items) => {
                if shape.len() == depth {
                    shape.push(items.len());
                }
                for item in items {
                    flatten(item, shape, depth + 1, out);
                }
            }
            None => out.push(v.as_f64().unwrap()),
        }
    }
    let mut inputs = vec![];
    for (name, v) in r["inputs"].as_object().unwrap() {
        let (mut shape, mut vals) = (vec![], vec![]);
        flatten(v, &mut shape, 0, &mut vals);
        let t = if name == "pixel_values" {
            HostTensor::F32(
                ArrayD::from_shape_vec(IxDyn(&shape), vals.iter().map(|&x| x as f32).collect())
                    .unwrap(),
            )
        } else {
            HostTensor::I64(
                ArrayD::from_shape_vec(IxDyn(&shape), vals.iter().map(|&x| x as i64).collect())
                    .unwrap(),
            )
        };
        inputs.push((name.clone(), t));
    }
    let shape = r["logits_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let logits = r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    (inputs, shape, logits)
}

/// `bert`, `roberta`, `gpt2`, `esm` (or an op fixture's `llama`, `phi3`, `vit`), from the
/// fixture's file name.
pub fn family(path: &Path) -> String {
    let stem = path.file_stem().unwrap().to_string_lossy().to_string();
    stem.split('_').next().unwrap().to_string()
}

/// The attention query/value projections, in each family's module names.
pub fn qv_targets(family: &str) -> Vec<String> {
    match family {
        "gpt2" => vec!["c_attn:q,v".into()],
        "phi3" => vec!["qkv_proj:q,v".into()],
        _ => vec!["query,value".into()],
    }
}

pub fn options(targets: Vec<String>, method: Method) -> CompileOptions {
    CompileOptions {
        targets: TargetSpec::parse(&targets, None).unwrap(),
        adapter: AdapterConfig {
            method,
            rank: 4,
            alpha: 8.0,
            rslora: false,
            detach_norm: false,
            seed: 7,
        },
        task: None,
        train_head: false,
        bilevel: None,
        lm_labels: false,
    }
}

/// Sequence classification with a trained head and, given a hypergradient mode, BiDoRA's
/// lower/upper programs (paper regulariser): what the trainer tests and benches compile.
pub fn seq_cls_options(
    targets: Vec<String>,
    method: Method,
    hypergrad: Option<bidora_compiler::bilevel::Hypergrad>,
) -> CompileOptions {
    let mut opts = options(targets, method);
    opts.task = Some(bidora_compiler::heads::Task::SeqCls);
    opts.train_head = true;
    opts.bilevel = hypergrad.map(|hypergrad| pipeline::BilevelOptions {
        hypergrad,
        regularizer: bidora_compiler::regularizer::RegVariant::Paper,
    });
    opts
}

/// Compiles `model` into the new artifact folder `dir` and opens it as the
/// runtime does; `name` is the model file name the manifest records.
pub fn write_artifact(
    model: &Model,
    opts: &CompileOptions,
    name: &str,
    dir: &Path,
) -> bidora_runtime::artifact::Artifact {
    let c = pipeline::compile(model, opts).unwrap();
    bidora_compiler::artifact::write(&pipeline::artifact(&c, name, opts), dir, false).unwrap();
    bidora_runtime::artifact::Artifact::open(dir).unwrap()
}

/// Deterministic token ids and an attention mask with one padded position, batch 2 × seq 8:
/// the same input `models/make_fixtures.py` saved torch's reference logits for. Ids stay
/// below 20 so that every fixture's vocabulary (ESM's has 33 tokens) covers them.
pub fn example_inputs(model: &Model) -> Vec<(String, HostTensor)> {
    let (b, s) = (2usize, 8usize);
    model
        .graph
        .inputs
        .iter()
        .filter(|i| !model.graph.initializers.contains_key(&i.name))
        .map(|i| {
            let v: Vec<i64> = if i.name.contains("mask") {
                (0..b * s)
                    .map(|k| if k == b * s - 1 { 0 } else { 1 })
                    .collect()
            } else if i.name.contains("type") {
                vec![0; b * s]
            } else {
                (0..b * s)
                    .map(|k| if k == b * s - 1 { 4 } else { 5 + k as i64 })
                    .collect()
            };
            (
                i.name.clone(),
                HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[b, s]), v).unwrap()),
            )
        })
        .collect()
}

/// The adapters' tensors as program inputs.
pub fn init_inputs(c: &Compiled) -> Vec<(String, HostTensor)> {
    c.init
        .iter()
        .map(|(name, t)| {
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let a = ArrayD::from_shape_vec(IxDyn(&dims), t.to_f32_vec().unwrap()).unwrap();
            (name.clone(), HostTensor::F32(a))
        })
        .collect()
}

/// The trainable tensors' initial values moved by uniform noise in ±0.2, seeded: B and the
/// magnitudes away from their initialisation, so no gradient term vanishes.
pub fn perturbed_init(c: &Compiled, seed: u64) -> Vec<(String, HostTensor)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    init_inputs(c)
        .into_iter()
        .map(|(n, t)| {
            let a = t
                .as_f32()
                .unwrap()
                .mapv(|x| x + rng.random_range(-0.2..0.2));
            (n, HostTensor::F32(a))
        })
        .collect()
}

/// Appends `loss = Σ value ⊙ c` to a model, with `c` a new graph input of `value`'s concrete
/// shape: a scalar loss with random weights for gradient checks. `loss` becomes an output.
pub fn add_weighted_sum_loss(model: &mut Model, value: &str, dims: &[i64], dtype: DataType) {
    let g = &mut model.graph;
    let shape = dims.iter().map(|&d| Dim::Known(d)).collect();
    g.inputs
        .push(ValueInfo::new("c", ValueType::tensor(dtype, shape)));
    g.nodes.push(ir::Node::new(
        "Mul",
        "loss.mul",
        vec![value.into(), "c".into()],
        vec!["loss.p".into()],
    ));
    g.nodes.push(
        ir::Node::new(
            "ReduceSum",
            "loss.sum",
            vec!["loss.p".into()],
            vec!["loss".into()],
        )
        .with_attr("keepdims", ir::AttrValue::Int(0)),
    );
    g.outputs
        .push(ValueInfo::new("loss", ValueType::tensor(dtype, vec![])));
}

/// Writes a model to `dir/name` with the compiler's own writer.
pub fn save(model: &Model, dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let proto = ir::convert::model_to_proto(model);
    bidora_compiler::onnx_io::write_model(&proto, &p, &Default::default()).unwrap();
    p
}

pub fn compile(model: &Model, opts: &CompileOptions) -> Compiled {
    pipeline::compile(model, opts).unwrap_or_else(|e| panic!("compile failed: {e}"))
}

pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A model wrapping a single graph in a default opset-18 model.
pub fn model_of(graph: ir::Graph) -> Model {
    Model {
        ir_version: 9,
        opset_imports: vec![ir::OpsetImport::new("", 18)],
        producer_name: "bidora-tests".into(),
        producer_version: String::new(),
        domain: String::new(),
        model_version: 0,
        doc_string: String::new(),
        metadata_props: vec![],
        graph,
        passthrough: Default::default(),
    }
}

pub fn f32_input(name: &str, dims: &[Dim]) -> ValueInfo {
    ValueInfo::new(name, ValueType::tensor(DataType::Float, dims.to_vec()))
}

/// One-thread tract, the tests' default engine.
pub fn tract1() -> Box<dyn bidora_runtime::backend::Backend> {
    use bidora_runtime::backend::{select, BackendKind, BackendOptions};
    select(
        BackendKind::Tract,
        &BackendOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap()
}

/// One-thread ONNX Runtime, or `None` with a message where no library is installed (the
/// test then checks tract alone); under `BIDORA_REQUIRE_ORT=1` (CI) a missing library fails.
pub fn ort1() -> Option<Box<dyn bidora_runtime::backend::Backend>> {
    use bidora_runtime::backend::{select, BackendKind, BackendOptions};
    let opts = BackendOptions {
        threads: 1,
        ..Default::default()
    };
    match select(BackendKind::Ort, &opts) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(
                std::env::var("BIDORA_REQUIRE_ORT").as_deref() != Ok("1"),
                "BIDORA_REQUIRE_ORT=1 but the ort backend is unavailable: {e}"
            );
            eprintln!("SKIPPED the ONNX Runtime part: no library ({e}); pip install onnxruntime");
            None
        }
    }
}
