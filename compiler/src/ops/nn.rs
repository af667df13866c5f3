//! Normalisation: `LayerNormalization` (opset 17), whose optional outputs Mean and InvStdDev
//! keep the leading dims and have size 1 on the normalised axes.

use super::{InferCx, OpDef};
use crate::error::Result;
use crate::shape::{DimExpr, Fact};

pub const OPS: &[OpDef] = &[OpDef {
    op: "LayerNormalization",
    infer: layer_norm,
}];

fn layer_norm(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    let axis = cx.axis(cx.node.attr_int("axis").unwrap_or(-1), x.rank())?;
    let stats: Vec<DimExpr> = x
        .shape
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if i < axis {
                d.clone()
            } else {
                DimExpr::known(1)
            }
        })
        .collect();
    let stash = crate::ir::DataType::from_i32(cx.node.attr_int("stash_type").unwrap_or(1) as i32)
        .unwrap_or(crate::ir::DataType::Float);
    Ok(vec![
        Fact::new(x.dtype, x.shape.clone()),
        Fact::new(stash, stats.clone()),
        Fact::new(stash, stats),
    ])
}
