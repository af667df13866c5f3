//! Import + rewrite + write of a MiniLM-L6-size graph (~90 MB of f32 weights), end to end
//! through the `bidora-compile` binary, measuring wall time and the child's peak RSS.
//!
//! Baseline in the same run: copying the model file (read + write of the same bytes), so the
//! ratio says how much the compiler costs beyond the unavoidable I/O.
//!
//! Second case, compile cost against graph size: a chain of N nodes and one of 2N compiled
//! with `--task seq-cls` (DoRA, every program), reporting the time ratio; linear cost gives
//! about 2, the acceptance bound is 2.5.
//!
//! `cargo bench -p bidora-compiler --bench compile` (results: BENCHMARKS.md); `-- minilm` or
//! `-- chain` runs one case; `-- chain 8000` sets the smaller chain's node count, and
//! `-- chain 1500 every` adapts every block (growth in the number of adapters);
//! `BIDORA_COMPILE=path` times another build of the binary in the chain case.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use bidora_compiler::ir::{
    self, AttrValue, DataType, Dim, Graph, Model, Node, Tensor, ValueInfo, ValueType,
};

const VOCAB: i64 = 30522;
const HIDDEN: i64 = 384;
const FFN: i64 = 1536;
const LAYERS: usize = 6;

fn weights(name: &str, dims: Vec<i64>, seed: u32) -> Tensor {
    let n: i64 = dims.iter().product();
    // A cheap deterministic fill; values do not matter for timing, only size.
    let v: Vec<f32> = (0..n as u32)
        .map(|i| {
            ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 9) as f32 / 8388608.0 - 0.5) * 0.05
        })
        .collect();
    Tensor::from_f32(name, dims, &v)
}

/// A BERT-shaped graph of MiniLM-L6's size, written the way the legacy exporter names things
/// (anonymous `onnx::MatMul_N` weights, scoped node names).
fn synth_minilm() -> Model {
    let mut g = Graph {
        name: "minilm_synth".into(),
        ..Default::default()
    };
    let sym = |s: &str| Dim::Sym(s.into());
    g.inputs.push(ValueInfo::new(
        "input_ids",
        ValueType::tensor(DataType::Int64, vec![sym("batch"), sym("sequence")]),
    ));
    g.outputs.push(ValueInfo::new(
        "last_hidden_state",
        ValueType::tensor(
            DataType::Float,
            vec![sym("batch"), sym("sequence"), Dim::Known(HIDDEN)],
        ),
    ));
    let mut seed = 1;
    let mut add_w = |g: &mut Graph, name: &str, dims: Vec<i64>| {
        seed += 1;
        g.initializers
            .insert(name.into(), weights(name, dims, seed));
    };
    add_w(
        &mut g,
        "embeddings.word_embeddings.weight",
        vec![VOCAB, HIDDEN],
    );
    g.nodes.push(Node::new(
        "Gather",
        "/embeddings/word_embeddings/Gather",
        vec![
            "embeddings.word_embeddings.weight".into(),
            "input_ids".into(),
        ],
        vec!["h0".into()],
    ));
    let mut h = "h0".to_string();
    let mut k = 0;
    for l in 0..LAYERS {
        let mut lin = |g: &mut Graph, x: &str, scope: &str, din: i64, dout: i64| -> String {
            k += 1;
            let w = format!("onnx::MatMul_{k}");
            add_w(g, &w, vec![din, dout]);
            let b = format!("encoder.layer.{l}.{}.bias", scope.replace('/', "."));
            add_w(g, &b, vec![dout]);
            let mm = format!("/encoder/layer.{l}/{scope}/MatMul_output_0");
            let out = format!("/encoder/layer.{l}/{scope}/Add_output_0");
            g.nodes.push(Node::new(
                "MatMul",
                format!("/encoder/layer.{l}/{scope}/MatMul"),
                vec![x.into(), w],
                vec![mm.clone()],
            ));
            g.nodes.push(Node::new(
                "Add",
                format!("/encoder/layer.{l}/{scope}/Add"),
                vec![b, mm],
                vec![out.clone()],
            ));
            out
        };
        let q = lin(&mut g, &h, "attention/self/query", HIDDEN, HIDDEN);
        let kk = lin(&mut g, &h, "attention/self/key", HIDDEN, HIDDEN);
        let v = lin(&mut g, &h, "attention/self/value", HIDDEN, HIDDEN);
        let mix = format!("/encoder/layer.{l}/attention/mix");
        g.nodes.push(Node::new(
            "Sum",
            mix.clone(),
            vec![q, kk, v],
            vec![mix.clone()],
        ));
        let o = lin(&mut g, &mix, "attention/output/dense", HIDDEN, HIDDEN);
        let r1 = format!("/encoder/layer.{l}/attention/output/residual");
        g.nodes.push(Node::new(
            "Add",
            r1.clone(),
            vec![o, h.clone()],
            vec![r1.clone()],
        ));
        let up = lin(&mut g, &r1, "intermediate/dense", HIDDEN, FFN);
        let act = format!("/encoder/layer.{l}/intermediate/act");
        g.nodes
            .push(Node::new("Relu", act.clone(), vec![up], vec![act.clone()]));
        let down = lin(&mut g, &act, "output/dense", FFN, HIDDEN);
        let r2 = format!("/encoder/layer.{l}/output/residual");
        g.nodes.push(Node::new(
            "Add",
            r2.clone(),
            vec![down, r1],
            vec![r2.clone()],
        ));
        h = r2;
    }
    g.nodes.push(
        Node::new(
            "Identity",
            "/output",
            vec![h],
            vec!["last_hidden_state".into()],
        )
        .with_attr("unused", AttrValue::Int(0)),
    );
    g.nodes.last_mut().unwrap().attributes.clear();
    bench_model(g)
}

/// A chain of `layers` blocks `MatMul → Add → Tanh` (hidden 8, 3 nodes each) from
/// `x[batch, 8]` to `logits[batch, 2]`, with DoRA's target (`query`) on the first block only:
/// the backward pass still runs through every node, and the adapted part stays the same size
/// whatever the length, so the measured growth is the passes' own. With `adapt_every`, every
/// block is a target: the growth in the number of adapters.
fn synth_chain(layers: usize, adapt_every: bool) -> Model {
    const H: i64 = 8;
    let mut g = Graph {
        name: "chain".into(),
        ..Default::default()
    };
    let batch = Dim::Sym("batch".into());
    g.inputs.push(ValueInfo::new(
        "x",
        ValueType::tensor(DataType::Float, vec![batch.clone(), Dim::Known(H)]),
    ));
    g.outputs.push(ValueInfo::new(
        "logits",
        ValueType::tensor(DataType::Float, vec![batch, Dim::Known(2)]),
    ));
    let mut h = "x".to_string();
    for l in 0..layers {
        let dout = if l + 1 == layers { 2 } else { H };
        let module = if l == 0 || adapt_every {
            "query"
        } else {
            "dense"
        };
        let scope = format!("/layer.{l}/{module}");
        let w = format!("onnx::MatMul_{l}");
        let b = format!("layer.{l}.{module}.bias");
        g.initializers
            .insert(w.clone(), weights(&w, vec![H, dout], l as u32));
        g.initializers
            .insert(b.clone(), weights(&b, vec![dout], l as u32 + 7));
        let mm = format!("{scope}/MatMul_output_0");
        let add = format!("{scope}/Add_output_0");
        g.nodes.push(Node::new(
            "MatMul",
            format!("{scope}/MatMul"),
            vec![h, w],
            vec![mm.clone()],
        ));
        g.nodes.push(Node::new(
            "Add",
            format!("{scope}/Add"),
            vec![mm, b],
            vec![add.clone()],
        ));
        h = if l + 1 == layers {
            "logits".into()
        } else {
            format!("{scope}/Tanh_output_0")
        };
        g.nodes.push(Node::new(
            "Tanh",
            format!("{scope}/Tanh"),
            vec![add],
            vec![h.clone()],
        ));
    }
    bench_model(g)
}

/// A model around `g` at opset 17, as the bench's generators write them.
fn bench_model(graph: ir::Graph) -> Model {
    Model {
        ir_version: 8,
        opset_imports: vec![ir::OpsetImport::new("", 17)],
        producer_name: "bidora-bench".into(),
        producer_version: String::new(),
        domain: String::new(),
        model_version: 0,
        doc_string: String::new(),
        metadata_props: vec![],
        graph,
        passthrough: Default::default(),
    }
}

/// Runs a command, returning (wall seconds, peak RSS bytes of the child).
fn measure(cmd: &mut Command) -> (f64, u64) {
    let t = Instant::now();
    let child = cmd.spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // wait4 gives this child's own peak RSS (ru_maxrss, KiB on Linux).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(r, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "command failed: {cmd:?}"
    );
    std::mem::forget(child);
    (secs, usage.ru_maxrss as u64 * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let case = args.first().map(String::as_str);
    if matches!(case, None | Some("minilm")) {
        minilm_case();
    }
    if matches!(case, None | Some("chain")) {
        let nodes = args
            .get(1)
            .map(|n| n.parse().expect("a node count"))
            .unwrap_or(8000);
        chain_case(nodes, args.get(2).map(String::as_str) == Some("every"));
    }
}

/// Compiles chains of about `nodes` and `2 * nodes` nodes with `--task seq-cls` (DoRA, so
/// also BiDoRA's lower and upper programs) and prints the time of each and their ratio.
fn chain_case(nodes: usize, adapt_every: bool) {
    // BIDORA_COMPILE=path measures another build of the binary (e.g. an older commit's).
    let bin = std::env::var("BIDORA_COMPILE")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_bidora-compile").to_string());
    let dir = tempfile::tempdir().unwrap();
    let mut times = vec![];
    for layers in [nodes / 3, 2 * (nodes / 3)] {
        let path = dir.path().join(format!("chain{layers}.onnx"));
        let proto = ir::convert::model_to_proto(&synth_chain(layers, adapt_every));
        bidora_compiler::onnx_io::write_model(&proto, &path, &Default::default()).unwrap();
        let out = dir.path().join(format!("out{layers}"));
        let (mut ts, mut peak) = (vec![], 0);
        for _ in 0..3 {
            let (t, rss) = measure(
                Command::new(&bin)
                    .arg(&path)
                    .args(["--target", "query", "--task", "seq-cls", "-o"])
                    .arg(&out)
                    .stderr(std::process::Stdio::null()),
            );
            ts.push(t);
            peak = peak.max(rss);
            let _ = std::fs::remove_dir_all(&out);
        }
        let t = median(ts);
        println!(
            "chain of {} nodes ({} adapters), --task seq-cls (DoRA, BiDoRA programs), median of 3: {t:.3} s, peak RSS {:.1} MB",
            3 * layers,
            if adapt_every { layers } else { 1 },
            peak as f64 / 1e6
        );
        times.push(t);
    }
    println!(
        "time ratio for twice the nodes: {:.2} (linear: 2, target <= 2.5)",
        times[1] / times[0]
    );
}

fn minilm_case() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("minilm_synth.onnx");
    let m = synth_minilm();
    let proto = ir::convert::model_to_proto(&m);
    bidora_compiler::onnx_io::write_model(&proto, &model_path, &Default::default()).unwrap();
    drop((m, proto));
    let size = std::fs::metadata(&model_path).unwrap().len();
    let runs = 5;
    let mut copy_t = vec![];
    let mut compile_t = vec![];
    let mut peak = 0;
    for i in 0..runs {
        let dst = dir.path().join(format!("copy{i}.onnx"));
        copy_t.push(measure(Command::new("cp").arg(&model_path).arg(&dst)).0);
        let out = dir.path().join(format!("out{i}"));
        let (t, rss) = measure(
            Command::new(env!("CARGO_BIN_EXE_bidora-compile"))
                .arg(&model_path)
                .args(["--target", "query,value", "-o"])
                .arg(&out)
                .stderr(std::process::Stdio::null()),
        );
        compile_t.push(t);
        peak = peak.max(rss);
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_file(&dst);
    }
    let (tc, tb) = (median(compile_t), median(copy_t));
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "model: {} ({:.1} MB, {} layers, hidden {HIDDEN}, vocab {VOCAB})",
        Path::new(&model_path)
            .file_name()
            .unwrap()
            .to_string_lossy(),
        mb(size),
        LAYERS
    );
    println!("compile (import + DoRA on query,value + write), median of {runs}: {tc:.3} s");
    println!("baseline file copy, median of {runs}:                            {tb:.3} s   (ratio {:.1}x)", tc / tb);
    println!(
        "compile peak RSS: {:.1} MB = {:.2}x the model size",
        mb(peak),
        peak as f64 / size as f64
    );
    println!("targets: < 2 s, < 3x model size");
}
