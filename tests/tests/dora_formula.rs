//! The lowered DoRA/LoRA programs against an independent evaluation of the formulas with
//! ndarray, with random non-zero A, B and m, for every weight layout the rewrite handles:
//! `MatMul(x, W[in,out])`, `MatMul(x, Transpose(W[out,in]))`, `Gemm(x, W[out,in], transB=1)`,
//! and one block of a fused `Gemm(x, W[in, q+k+v])` cut by a Split (GPT-2's c_attn; here of
//! unequal widths, as a grouped-query qkv_proj).

use bidora_compiler::ir::{AttrValue, Dim, Graph, Node, Tensor};
use bidora_compiler::rewrite::Method;
use bidora_runtime::tract_exec::{run_once, HostTensor};
use bidora_tests::*;
use ndarray::{s, Array1, Array2, ArrayD, Axis, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const IN: usize = 12;
const OUT: usize = 9;
const ROWS: usize = 5;
/// The fused case's q | k | v widths: unequal (grouped-query attention), v of width OUT.
const FUSED: [usize; 3] = [OUT + 3, OUT - 2, OUT];

#[derive(Clone, Copy, Debug)]
enum Kind {
    MatMul,
    MatMulTransposed,
    GemmTransB,
    FusedGemm,
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// One linear op with bias, its weight stored as the kind dictates. Returns the model and the
/// effective `[in, out_total]` weight and bias.
fn linear(
    kind: Kind,
    rng: &mut ChaCha8Rng,
) -> (bidora_compiler::ir::Model, Array2<f32>, Array1<f32>) {
    let out_total = if matches!(kind, Kind::FusedGemm) {
        FUSED.iter().sum()
    } else {
        OUT
    };
    let w_eff =
        Array2::from_shape_vec((IN, out_total), rand_vec(rng, IN * out_total, 0.5)).unwrap();
    let bias = Array1::from_vec(rand_vec(rng, out_total, 0.1));
    let mut g = Graph {
        name: "linear".into(),
        ..Default::default()
    };
    g.inputs.push(f32_input(
        "x",
        &[Dim::Known(ROWS as i64), Dim::Known(IN as i64)],
    ));
    g.outputs.push(f32_input(
        "y",
        &[Dim::Known(ROWS as i64), Dim::Known(out_total as i64)],
    ));
    let stored_t = w_eff.t().as_standard_layout().to_owned();
    let (w_store, dims) = match kind {
        Kind::MatMul | Kind::FusedGemm => (
            w_eff.iter().copied().collect::<Vec<_>>(),
            vec![IN as i64, out_total as i64],
        ),
        _ => (
            stored_t.iter().copied().collect(),
            vec![out_total as i64, IN as i64],
        ),
    };
    g.initializers.insert(
        "mod.proj.weight".into(),
        Tensor::from_f32("mod.proj.weight", dims, &w_store),
    );
    g.initializers.insert(
        "mod.proj.bias".into(),
        Tensor::from_f32(
            "mod.proj.bias",
            vec![out_total as i64],
            bias.as_slice().unwrap(),
        ),
    );
    let x = "x".to_string();
    let w = "mod.proj.weight".to_string();
    let b = "mod.proj.bias".to_string();
    match kind {
        Kind::MatMul => {
            g.nodes.push(Node::new(
                "MatMul",
                "/mod/proj/MatMul",
                vec![x, w],
                vec!["xw".into()],
            ));
            g.nodes.push(Node::new(
                "Add",
                "/mod/proj/Add",
                vec!["xw".into(), b],
                vec!["y".into()],
            ));
        }
        Kind::MatMulTransposed => {
            g.nodes.push(
                Node::new("Transpose", "/mod/proj/T", vec![w], vec!["wt".into()])
                    .with_attr("perm", AttrValue::Ints(vec![1, 0])),
            );
            g.nodes.push(Node::new(
                "MatMul",
                "/mod/proj/MatMul",
                vec![x, "wt".into()],
                vec!["xw".into()],
            ));
            g.nodes.push(Node::new(
                "Add",
                "/mod/proj/Add",
                vec!["xw".into(), b],
                vec!["y".into()],
            ));
        }
        Kind::GemmTransB => {
            g.nodes.push(
                Node::new("Gemm", "/mod/proj/Gemm", vec![x, w, b], vec!["y".into()])
                    .with_attr("transB", AttrValue::Int(1)),
            );
        }
        Kind::FusedGemm => {
            // Cut into q | k | v by a Split, as models do (the split's sizes are what the
            // compiler reads), and joined again so `y` is the whole fused output.
            g.nodes.push(Node::new(
                "Gemm",
                "/mod/proj/Gemm",
                vec![x, w, b],
                vec!["qkv".into()],
            ));
            let sizes: Vec<i64> = FUSED.iter().map(|&d| d as i64).collect();
            g.initializers
                .insert("sizes".into(), Tensor::from_i64("sizes", vec![3], &sizes));
            g.nodes.push(
                Node::new(
                    "Split",
                    "/mod/split",
                    vec!["qkv".into(), "sizes".into()],
                    vec!["q".into(), "k".into(), "v".into()],
                )
                .with_attr("axis", AttrValue::Int(-1)),
            );
            g.nodes.push(
                Node::new(
                    "Concat",
                    "/mod/concat",
                    vec!["q".into(), "k".into(), "v".into()],
                    vec!["y".into()],
                )
                .with_attr("axis", AttrValue::Int(-1)),
            );
        }
    }
    (model_of(g), w_eff, bias)
}

/// `(x·V) ⊙ (m / ‖V‖_col) + bias` with `V = W + s·A·B`: the DoRA paper's formula, directly.
fn dora_reference(
    x: &Array2<f32>,
    w: &Array2<f32>,
    a: &Array2<f32>,
    b: &Array2<f32>,
    m: &Array1<f32>,
    s: f32,
) -> Array2<f32> {
    let v = w + &(a.dot(b) * s);
    let norms = v.map_axis(Axis(0), |c| {
        c.iter().map(|z| (*z as f64).powi(2)).sum::<f64>().sqrt() as f32
    });
    x.dot(&v) * &(m / &norms)
}

fn check(kind: Kind, method: Method) {
    let mut rng = ChaCha8Rng::seed_from_u64(kind as u64 * 10 + method as u64);
    let (model, w_eff, bias) = linear(kind, &mut rng);
    let target = match kind {
        Kind::FusedGemm => "proj:v",
        _ => "proj",
    };
    let opts = options(vec![target.into()], method);
    let c = compile(&model, &opts);
    assert_eq!(c.adapters.len(), 1);
    let ad = &c.adapters[0];
    let s = ad.scaling;
    let r = ad.rank;
    let a = Array2::from_shape_vec((IN, r), rand_vec(&mut rng, IN * r, 0.5)).unwrap();
    let b = Array2::from_shape_vec((r, OUT), rand_vec(&mut rng, r * OUT, 0.5)).unwrap();
    let m = Array1::from_vec(rand_vec(&mut rng, OUT, 1.0)).mapv(|v| v + 1.5);
    let x = Array2::from_shape_vec((ROWS, IN), rand_vec(&mut rng, ROWS * IN, 1.0)).unwrap();

    // Expected output, block by block for the fused case.
    let col0 = if matches!(kind, Kind::FusedGemm) {
        FUSED[0] + FUSED[1]
    } else {
        0
    };
    let mut expected = x.dot(&w_eff) + &bias;
    let w_blk = w_eff.slice(s![.., col0..col0 + OUT]).to_owned();
    let blk = match method {
        Method::Dora => dora_reference(&x, &w_blk, &a, &b, &m, s),
        Method::Lora => x.dot(&w_blk) + x.dot(&a).dot(&b) * s,
    } + bias.slice(s![col0..col0 + OUT]);
    expected.slice_mut(s![.., col0..col0 + OUT]).assign(&blk);

    let dir = tempfile::tempdir().unwrap();
    let path = save(&c.forward, dir.path(), "forward.onnx");
    let dyn2 = |a: &Array2<f32>| HostTensor::F32(a.clone().into_dyn());
    let mut inputs = vec![
        ("x".to_string(), dyn2(&x)),
        (ad.lora_a.clone(), dyn2(&a)),
        (ad.lora_b.clone(), dyn2(&b)),
    ];
    if let Some(mname) = &ad.magnitude {
        inputs.push((mname.clone(), HostTensor::F32(m.clone().into_dyn())));
    }
    let out = run_once(&path, &inputs).unwrap();
    let got = out[0].as_f32().unwrap();
    let expected: ArrayD<f32> = expected.into_dyn();
    let diff = max_abs_diff(got, &expected);
    let scale = expected.iter().fold(0f32, |acc, v| acc.max(v.abs()));
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "{kind:?} {method:?}: max abs diff {diff} (output scale {scale})"
    );
    let _ = IxDyn(&[0]);
}

#[test]
fn dora_matmul() {
    check(Kind::MatMul, Method::Dora);
}

#[test]
fn dora_matmul_transposed() {
    check(Kind::MatMulTransposed, Method::Dora);
}

#[test]
fn dora_gemm_transb() {
    check(Kind::GemmTransB, Method::Dora);
}

#[test]
fn dora_fused_block() {
    check(Kind::FusedGemm, Method::Dora);
}

#[test]
fn lora_matmul() {
    check(Kind::MatMul, Method::Lora);
}

#[test]
fn lora_matmul_transposed() {
    check(Kind::MatMulTransposed, Method::Lora);
}

#[test]
fn lora_gemm_transb() {
    check(Kind::GemmTransB, Method::Lora);
}

#[test]
fn lora_fused_block() {
    check(Kind::FusedGemm, Method::Lora);
}
