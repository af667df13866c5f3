//! BiDoRA's orthogonality regulariser on the DoRA directions (paper eq. for R(V); DESIGN.md):
//! for each adapted module k, `D_k` is the column-normalised direction
//! `V'_k / ‖V'_k‖_col` with `V'_k = W0_k + s·A_k·B_k` (`[in, out]`), and
//!
//! - `Paper`: `R(V) = Σ_k ‖D_kᵀ D_k − I‖²_F` (squared Frobenius, summed over modules);
//! - `Released`: the released code's `mean_k ‖D_kᵀ D_k − I‖_F` (unsquared, averaged).
//!
//! The lower-level loss is `L_tr + γ·R`. `R` materialises each `[in, out]` direction and an
//! `[out, out]` Gram matrix, so its cost grows with out²; that is the method's, not ours.

use crate::error::{Error, Result};
use crate::ir::builder::Builder;
use crate::ir::{AttrValue, DataType, Model, Tensor};
use crate::rewrite::AdapterRecord;
use crate::targets::Layout;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
        dtype = w.dtype;
        // W0 as [in, out], a compile-time constant.
        let w_in_out = match ad.layout {
            Layout::InOut => w.clone(),
            Layout::OutIn => {
                let v = w
                    .to_f64_vec()
                    .ok_or_else(|| Error::Other("weight is not float".into()))?;
                let (r, c) = (w.dims[0] as usize, w.dims[1] as usize);
                let t: Vec<f64> = (0..c)
                    .flat_map(|j| (0..r).map(move |i| (i, j)))
                    .map(|(i, j)| v[i * c + j])
                    .collect();
                Tensor::from_f64_as(dtype, "", vec![c as i64, r as i64], &t)
            }
        };
        let w0 = b.constant("w0", w_in_out);
        let s = b.constant(
            "s",
            Tensor::from_f64_as(dtype, "", vec![], &[ad.scaling as f64]),
        );
        let ab = b.op("MatMul", "AB", &[&ad.lora_a, &ad.lora_b], vec![]);
        let sab = b.op("Mul", "sAB", &[&ab, &s], vec![]);
        let v = b.op("Add", "V", &[&w0, &sab], vec![]);
        let v2 = b.op("Mul", "V2", &[&v, &v], vec![]);
        let ax0 = b.ints("axis0", &[0]);
        let col = b.op(
            "ReduceSum",
            "colsq",
            &[&v2, &ax0],
            vec![("keepdims", AttrValue::Int(1))],
        );
        let n = b.op("Sqrt", "colnorm", &[&col], vec![]);
        let d = b.op("Div", "D", &[&v, &n], vec![]);
        let dt = b.op(
            "Transpose",
            "Dt",
            &[&d],
            vec![("perm", AttrValue::Ints(vec![1, 0]))],
        );
        let gram = b.op("MatMul", "gram", &[&dt, &d], vec![]);
        let out = ad.out_features as usize;
        let eye: Vec<f64> = (0..out * out)
            .map(|k| if k / out == k % out { 1.0 } else { 0.0 })
            .collect();
        let i = b.constant(
            "eye",
            Tensor::from_f64_as(dtype, "", vec![out as i64, out as i64], &eye),
        );
        let diff = b.op("Sub", "gram_minus_I", &[&gram, &i], vec![]);
        let d2 = b.op("Mul", "sq", &[&diff, &diff], vec![]);
        let fro2 = b.op(
            "ReduceSum",
            "fro2",
            &[&d2],
            vec![("keepdims", AttrValue::Int(0))],
        );
        terms.push(match variant {
            RegVariant::Paper => fro2,
            RegVariant::Released => b.op("Sqrt", "fro", &[&fro2], vec![]),
        });
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
