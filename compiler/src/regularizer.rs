//! BiDoRA's orthogonality regulariser on the DoRA directions (paper eq. for R(V);
//! docs/design.md, "The two levels"):
//! for each adapted module k, `D_k` is the column-normalised direction
//! `V'_k / ‖V'_k‖_col` with `V'_k = W0_k + s·A_k·B_k` (`[in, out]`), and
//!
//! - `Paper`: `R(V) = Σ_k ‖D_kᵀ D_k − I‖²_F` (squared Frobenius, summed over modules);
//! - `Released`: the released code's `mean_k ‖D_kᵀ D_k − I‖_F` (unsquared, averaged).
//!
//! The lower-level loss is `L_tr + γ·R`. `R` needs each `[out, out]` Gram matrix, so its cost
//! grows with out²; that is the method's, not ours. The Gram matrix is assembled from
//! `W0ᵀW0` (a node on constants, folded by the backends at load) and rank-r corrections, so
//! no `[in, out]` direction is materialised and no dense constant is stored.

use crate::error::{Error, Result};
use crate::ir::builder::Builder;
use crate::ir::{AttrValue, DataType, Model, Tensor};
use crate::rewrite::AdapterRecord;
use crate::targets::Layout;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum RegVariant {
    Paper,
    Released,
}

/// Appends `loss + γ·R(V)` to `model` (which must output `loss`); returns the new loss name
/// and the name of R's value. `gamma` names a scalar of the model's float type; when the
/// graph does not define it, it becomes a graph input, so one compiled program serves every
/// γ (the paper's ablation sets it to 0). Adapters without a magnitude (LoRA) have no direction to
/// regularise and are an error.
pub fn attach(
    model: &Model,
    adapters: &[AdapterRecord],
    loss: &str,
    gamma: &str,
    variant: RegVariant,
) -> Result<(Model, String, String)> {
    let mut m = model.clone();
    let g = &mut m.graph;
    let mut b = Builder::new(g, "reg");
    let mut terms = vec![];
    let mut dtype = DataType::Float;
    for ad in adapters {
        let (term, t) = module_term(&mut b, ad, variant)?;
        terms.push(term);
        dtype = t;
    }
    if terms.is_empty() {
        return Err(Error::Other("no adapters to regularise".into()));
    }
    let refs: Vec<&str> = terms.iter().map(String::as_str).collect();
    let total = if refs.len() == 1 {
        refs[0].to_string()
    } else {
        b.op("Sum", "total", &refs, vec![])
    };
    let r = match variant {
        RegVariant::Paper => total,
        RegVariant::Released => {
            let k = b.constant(
                "modules",
                Tensor::from_f64_as(dtype, "", vec![], &[terms.len() as f64]),
            );
            b.op("Div", "mean", &[&total, &k], vec![])
        }
    };
    let gr = b.op("Mul", "gamma_R", &[&r, gamma], vec![]);
    let new_loss = b.fresh("loss_total");
    let new_loss = b.op_into("Add", "loss_total", &[loss, &gr], vec![], new_loss);
    let nodes = b.finish();
    g.nodes.extend(nodes);
    let defined = g.initializers.contains_key(gamma)
        || g.is_graph_input(gamma)
        || g.nodes.iter().any(|n| n.outputs.iter().any(|o| o == gamma));
    if !defined {
        g.inputs.push(crate::ir::ValueInfo::new(
            gamma,
            crate::ir::ValueType::tensor(dtype, vec![]),
        ));
    }
    g.outputs.push(crate::ir::ValueInfo::new(
        r.clone(),
        crate::ir::ValueType::tensor(dtype, vec![]),
    ));
    g.outputs.push(crate::ir::ValueInfo::new(
        new_loss.clone(),
        crate::ir::ValueType::tensor(dtype, vec![]),
    ));
    Ok((m, new_loss, r))
}

/// `‖D_kᵀD_k − I‖²_F` (or its root, `Released`) of one DoRA adapter; returns the term and
/// the type R is computed in.
fn module_term(
    b: &mut Builder,
    ad: &AdapterRecord,
    variant: RegVariant,
) -> Result<(String, DataType)> {
    if ad.magnitude.is_none() {
        return Err(Error::Other(format!(
            "the orthogonality regulariser needs DoRA adapters; '{}' is LoRA",
            ad.module
        )));
    }
    let w = b.g.initializers.get(&ad.weight).cloned().ok_or_else(|| {
        Error::Other(format!(
            "weight '{}' of '{}' is not a constant",
            ad.weight, ad.module
        ))
    })?;
    // Half weights: R is computed in f32 like the adapters (rewrite::adapter_dtype).
    let dtype = crate::rewrite::adapter_dtype(w.dtype);
    let out = match ad.layout {
        Layout::InOut => w.dims[1] as usize,
        Layout::OutIn => w.dims[0] as usize,
    };
    debug_assert_eq!(out, ad.out_features as usize);
    let (vtv, n) = direction_gram(b, ad, &w, out, dtype)?;
    // DᵀD = diag(1/n)·V'ᵀV'·diag(1/n): divide columns by n, then rows by n.
    let n_col = b.ints("n_col_shape", &[out as i64, 1]);
    let n_rows = b.op("Reshape", "colnorm_rows", &[&n, &n_col], vec![]);
    let by_col = b.op("Div", "gram_cols", &[&vtv, &n], vec![]);
    let gram = b.op("Div", "gram", &[&by_col, &n_rows], vec![]);
    // DᵀD has a unit diagonal (its columns are normalised), so ‖DᵀD − I‖²_F equals
    // ‖DᵀD‖²_F − out: no [out, out] identity is stored. Rounding can take the difference
    // a hair below 0 for near-orthogonal directions; the floor keeps R (and √R) defined.
    let g2 = b.op("Mul", "sq", &[&gram, &gram], vec![]);
    let all = b.op(
        "ReduceSum",
        "gram_sq",
        &[&g2],
        vec![("keepdims", AttrValue::Int(0))],
    );
    let n_out = b.constant("out", Tensor::from_f64_as(dtype, "", vec![], &[out as f64]));
    let zero = b.constant("zero", Tensor::from_f64_as(dtype, "", vec![], &[0.0]));
    let off = b.op("Sub", "minus_diag", &[&all, &n_out], vec![]);
    let fro2 = b.op("Max", "fro2", &[&off, &zero], vec![]);
    let term = match variant {
        RegVariant::Paper => fro2,
        RegVariant::Released => b.op("Sqrt", "fro", &[&fro2], vec![]),
    };
    Ok((term, dtype))
}

/// `V'ᵀV'` (`[out, out]`) and the column norms `‖V'‖_col` of `V' = W0 + s·A·B` (`out`
/// output features), in `dtype`.
///
/// Neither V' nor a product of two `[in, out]` matrices is formed: with `P = Aᵀ·W0` and
/// `C = s·P + (s²/2)·(AᵀA)·B` (both `[r, out]`),
///   `V'ᵀV' = W0ᵀW0 + BᵀC + CᵀB`,   `‖V'‖²_col = ‖W0‖²_col + 2·colsum(B ⊙ C)`.
/// Every matmul on trainable tensors is rank-r: O(r·out²) instead of the direct form's
/// O(in·out²) forward and twice that backward. W0ᵀW0 depends on constants only: it is a
/// node, not a stored `[out, out]` constant, so the artifact holds no dense per-adapter
/// tensors; tract and ONNX Runtime fold it once when they load the program (O(in·out²) then,
/// and out² floats per adapter in memory for the run).
fn direction_gram(
    b: &mut Builder,
    ad: &AdapterRecord,
    w: &Tensor,
    out: usize,
    dtype: DataType,
) -> Result<(String, String)> {
    let half = dtype != w.dtype;
    let cast = |b: &mut Builder, tag: &str, v: &str, to: DataType| {
        b.op("Cast", tag, &[v], vec![("to", AttrValue::Int(to as i64))])
    };
    let sq0 = crate::rewrite::exact_out_feature_sqnorms(w, ad.layout)
        .ok_or_else(|| Error::Other("weight is not float".into()))?;
    // For a half weight the Gram matrix is taken of W0 cast up (constants only: folded at
    // load, the up-cast copy dropped after), so DᵀD keeps f32 accuracy.
    let w0 = if half {
        cast(b, "w0.up", &ad.weight, dtype)
    } else {
        ad.weight.clone()
    };
    let flag = match ad.layout {
        Layout::InOut => "transA",
        Layout::OutIn => "transB",
    };
    let g0 = b.op(
        "Gemm",
        "w0_gram",
        &[&w0, &w0],
        vec![(flag, AttrValue::Int(1))],
    );
    let sq0 = b.constant(
        "w0_sqnorm",
        Tensor::from_f64_as(dtype, "", vec![out as i64], &sq0),
    );
    let s = ad.scaling as f64;
    let sc = b.constant("s", Tensor::from_f64_as(dtype, "", vec![], &[s]));
    let half_s2 = b.constant(
        "half_s2",
        Tensor::from_f64_as(dtype, "", vec![], &[s * s / 2.0]),
    );
    let two = b.constant("two", Tensor::from_f64_as(dtype, "", vec![], &[2.0]));
    let ta = vec![("transA", AttrValue::Int(1))];
    // Aᵀ·W0 against the weight in its own type (as the lowering does: A cast down, the
    // [r, out] product cast up), so no f32 copy of W0 lives beside the run.
    let a_w = if half {
        cast(b, "A.down", &ad.lora_a, w.dtype)
    } else {
        ad.lora_a.clone()
    };
    let mut p = match ad.layout {
        Layout::InOut => b.op("Gemm", "AtW", &[&a_w, &ad.weight], ta.clone()),
        Layout::OutIn => b.op(
            "Gemm",
            "AtW",
            &[&a_w, &ad.weight],
            vec![("transA", AttrValue::Int(1)), ("transB", AttrValue::Int(1))],
        ),
    };
    if half {
        p = cast(b, "AtW.up", &p, dtype);
    }
    let ata = b.op("Gemm", "AtA", &[&ad.lora_a, &ad.lora_a], ta.clone());
    let atab = b.op("MatMul", "AtAB", &[&ata, &ad.lora_b], vec![]);
    let c1 = b.op("Mul", "sP", &[&p, &sc], vec![]);
    let c2 = b.op("Mul", "quad", &[&atab, &half_s2], vec![]);
    let c = b.op("Add", "C", &[&c1, &c2], vec![]);
    let btc = b.op("Gemm", "BtC", &[&ad.lora_b, &c], ta);
    let ctb = b.op(
        "Transpose",
        "CtB",
        &[&btc],
        vec![("perm", AttrValue::Ints(vec![1, 0]))],
    );
    let low = b.op("Add", "lowrank", &[&btc, &ctb], vec![]);
    let vtv = b.op("Add", "VtV", &[&g0, &low], vec![]);
    let bc = b.op("Mul", "BC", &[&ad.lora_b, &c], vec![]);
    let ax0 = b.ints("axis0", &[0]);
    let cross = b.op(
        "ReduceSum",
        "cross",
        &[&bc, &ax0],
        vec![("keepdims", AttrValue::Int(0))],
    );
    let cross2 = b.op("Mul", "cross2", &[&cross, &two], vec![]);
    let col = b.op("Add", "colsq", &[&sq0, &cross2], vec![]);
    let n = b.op("Sqrt", "colnorm", &[&col], vec![]);
    Ok((vtv, n))
}
