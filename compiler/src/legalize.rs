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
