//! Backend legalisation: small rewrites that keep a program's meaning but avoid a known gap
//! of one runtime. Runtimes apply them when they load a program; artifacts stay portable.

use crate::ir::{AttrValue, DataType, Model, Node};

/// tract types the output of `Cast(to=INT64)` as its symbolic-dim type (TDim) and its CumSum
/// kernel has no TDim implementation, so `CumSum(Cast<to=INT64>(x))` (RoBERTa's and ESM's
/// position ids) fails at run time. Summing in int32 and casting back is exact while partial
/// sums stay below 2^31, which position counters do by many orders of magnitude.
pub fn for_tract(model: &Model) -> Model {
    let mut model = model.clone();
    let g = &mut model.graph;
    let producers: std::collections::HashMap<String, usize> = g
        .producers()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    // Decide every site against the unmodified graph, then rewrite from the back so the
    // indices still to visit stay valid (a program may hold many instances of the model).
    let sites: Vec<usize> = (0..g.nodes.len())
        .filter(|&i| {
            let n = &g.nodes[i];
            n.op_type == "CumSum"
                && n.domain.is_empty()
                && n.input(0)
                    .and_then(|x| producers.get(x))
                    .map(|&p| &g.nodes[p])
                    .is_some_and(|p| {
                        p.op_type == "Cast" && p.attr_int("to") == Some(DataType::Int64 as i64)
                    })
        })
        .collect();
    for &i in sites.iter().rev() {
        let mut cumsum = g.nodes[i].clone();
        let x = cumsum.inputs[0].clone();
        let y = cumsum.outputs[0].clone();
        let x32 = g.fresh_name(&format!("{x}.i32"));
        let y32 = g.fresh_name(&format!("{y}.i32"));
        let to_i32 = Node::new(
            "Cast",
            format!("{}.to_i32", cumsum.name),
            vec![x],
            vec![x32.clone()],
        )
        .with_attr("to", AttrValue::Int(DataType::Int32 as i64));
        let back = Node::new(
            "Cast",
            format!("{}.to_i64", cumsum.name),
            vec![y32.clone()],
            vec![y],
        )
        .with_attr("to", AttrValue::Int(DataType::Int64 as i64));
        cumsum.inputs[0] = x32;
        cumsum.outputs[0] = y32;
        g.nodes.splice(i..=i, [to_i32, cumsum, back]);
    }
    model
}

/// What [`upcast_half`] changed: tensors converted and their f32 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Upcast {
    pub tensors: usize,
    pub bytes: usize,
}

/// For backends without half-precision kernels (tract; ONNX Runtime's CPU provider has no
/// bf16 ones): every f16 and bf16 in the program becomes f32: constants (converted once,
/// exactly: every half value is an f32), declared types, `Cast`'s `to` and `dtype`
/// attributes, subgraphs included. The result computes what the half program computes with
/// f32 activations, so it rounds less, never more. Programs without half types come back
/// unchanged.
pub fn upcast_half(model: &Model) -> (Model, Upcast) {
    let mut model = model.clone();
    let mut done = Upcast::default();
    upcast_graph(&mut model.graph, &mut done);
    (model, done)
}

fn upcast_tensor(t: &mut crate::ir::Tensor, done: &mut Upcast) {
    if !t.dtype.is_half() {
        return;
    }
    // A half tensor whose payload cannot be read (strings) cannot occur: kept as it is.
    let Some(v) = t.to_f32_vec() else { return };
    let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    done.tensors += 1;
    done.bytes += raw.len();
    t.dtype = DataType::Float;
    t.data = crate::ir::TensorData::Raw(raw.into());
}

fn upcast_type(ty: &mut Option<crate::ir::ValueType>) {
    if let Some(crate::ir::ValueType::Tensor { elem, .. }) = ty {
        if elem.is_half() {
            *elem = DataType::Float;
        }
    }
}

fn upcast_graph(g: &mut crate::ir::Graph, done: &mut Upcast) {
    for t in g.initializers.values_mut() {
        upcast_tensor(t, done);
    }
    for v in g
        .inputs
        .iter_mut()
        .chain(&mut g.outputs)
        .chain(&mut g.value_info)
    {
        upcast_type(&mut v.ty);
    }
    let half = |v: i64| {
        i32::try_from(v)
            .ok()
            .and_then(DataType::from_i32)
            .is_some_and(DataType::is_half)
    };
    for n in &mut g.nodes {
        for a in &mut n.attributes {
            match &mut a.value {
                AttrValue::Int(v) if (a.name == "to" || a.name == "dtype") && half(*v) => {
                    *v = DataType::Float as i64;
                }
                AttrValue::Tensor(t) => upcast_tensor(t, done),
                AttrValue::Tensors(ts) => ts.iter_mut().for_each(|t| upcast_tensor(t, done)),
                AttrValue::Graph(sub) => upcast_graph(sub, done),
                AttrValue::Graphs(subs) => subs.iter_mut().for_each(|s| upcast_graph(s, done)),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dim, Graph, Tensor, ValueInfo, ValueType};

    #[test]
    fn upcast_half_converts_constants_types_and_casts_exactly() {
        let mut g = Graph::default();
        let vals = [0.1f64, -2.5, 65504.0, 1e-7];
        g.initializers.insert(
            "w".into(),
            Tensor::from_f64_as(DataType::Float16, "w", vec![4], &vals),
        );
        g.inputs.push(ValueInfo::new(
            "x",
            ValueType::tensor(DataType::Bfloat16, vec![Dim::Known(4)]),
        ));
        g.outputs.push(ValueInfo::new(
            "y",
            ValueType::tensor(DataType::Float16, vec![Dim::Known(4)]),
        ));
        g.nodes.push(
            Node::new("Cast", "c", vec!["x".into()], vec!["xh".into()])
                .with_attr("to", AttrValue::Int(DataType::Float16 as i64)),
        );
        g.nodes.push(
            Node::new("Cast", "i", vec!["x".into()], vec!["xi".into()])
                .with_attr("to", AttrValue::Int(DataType::Int64 as i64)),
        );
        let model = Model::emitted(g, 17, "");
        let (up, done) = upcast_half(&model);
        assert_eq!(done.tensors, 1);
        assert_eq!(done.bytes, 16);
        let w = &up.graph.initializers["w"];
        assert_eq!(w.dtype, DataType::Float);
        // The f16 roundings of the values, exactly (0.1 is not an f16).
        let want: Vec<f32> = vals
            .iter()
            .map(|&v| half::f16::from_f64(v).to_f32())
            .collect();
        assert_eq!(w.to_f32_vec().unwrap(), want);
        assert_ne!(want[0], 0.1f32);
        let elem = |v: &ValueInfo| match &v.ty {
            Some(ValueType::Tensor { elem, .. }) => *elem,
            _ => unreachable!(),
        };
        assert_eq!(elem(&up.graph.inputs[0]), DataType::Float);
        assert_eq!(elem(&up.graph.outputs[0]), DataType::Float);
        assert_eq!(
            up.graph.nodes[0].attr_int("to"),
            Some(DataType::Float as i64)
        );
        assert_eq!(
            up.graph.nodes[1].attr_int("to"),
            Some(DataType::Int64 as i64)
        );
        // Nothing half: unchanged.
        let (again, none) = upcast_half(&up);
        assert_eq!(none, Upcast::default());
        assert_eq!(again, up);
    }
}
