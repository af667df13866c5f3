//! The compiler's composite ops in domain `ai.bidora` (see `rewrite/adapt.rs` for their
//! semantics): `DoRA(x, W, A, B, m)` and `LoRA(x, W, A, B)`. The output is `x`'s shape with
//! its last dim replaced by the out features (`B`'s columns).

use super::attr::{float, int, string};
use super::{dims_str, InferCx, OpDef, SameType};
use crate::error::Result;
use crate::fact::Fact;

pub const OPS: &[OpDef] = &[
    // Identity forward; the autodiff driver gives it a zero gradient (DoRA's detach_norm).
    OpDef {
        op: super::STOP_GRADIENT,
        infer: same,
        grad: None,
        attrs: &[],
        same_type: SameType::None,
    },
    OpDef {
        op: "DoRA",
        infer: adapter,
        grad: None,
        attrs: &[
            float("scale"),
            int("w_transposed"),
            string("module"),
            int("detach_norm"),
        ],
        same_type: SameType::None,
    },
    OpDef {
        op: "LoRA",
        infer: adapter,
        grad: None,
        attrs: &[float("scale"), int("w_transposed"), string("module")],
        same_type: SameType::None,
    },
];

fn adapter(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let (x, a, b) = (cx.input(0)?, cx.input(2)?, cx.input(3)?);
    if a.rank() != 2 || b.rank() != 2 || x.rank() == 0 {
        return Err(cx.err(format!(
            "expects x of rank >= 1 and 2-D A, B; got {}, {}, {}",
            dims_str(&x.shape),
            dims_str(&a.shape),
            dims_str(&b.shape)
        )));
    }
    let mut out = x.shape.clone();
    *out.last_mut().unwrap() = b.shape[1].clone();
    Ok(vec![Fact::new(x.dtype, out)])
}

fn same(cx: &mut InferCx) -> Result<Vec<Fact>> {
    let x = cx.input(0)?;
    Ok(vec![Fact::new(x.dtype, x.shape.clone())])
}
