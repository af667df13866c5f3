//! What a gradient rule sees and the helpers it builds with, in the manner of ONNX Runtime's
//! gradient builders (`I(i)`, `O(i)`, `GO(i)`): the node, its facts, the output gradients,
//! which inputs need a gradient, and a [`Builder`] for new nodes. Rules emit standard ONNX
//! ops only, themselves differentiable, so a backward graph can be differentiated again.

use crate::error::{Error, Result};
use crate::fact::{DimExpr, Fact, Facts};
use crate::ir::builder::Builder;
use crate::ir::{AttrValue, DataType, Node, Tensor};

pub struct GradCx<'a, 'g> {
    pub node: &'a Node,
    pub facts: &'a Facts,
    pub b: Builder<'g>,
    /// Gradient of the loss w.r.t. each output (None: the output does not reach the loss).
    pub out_grads: Vec<Option<String>>,
    /// Whether each input needs a gradient; rules may skip work for the others.
    pub needs: Vec<bool>,
    pub opset: i64,
}

impl GradCx<'_, '_> {
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::UnsupportedOp {
            op: self.node.op_type.clone(),
            node: self.node.name.clone(),
            msg: msg.into(),
        }
    }

    /// Input i's value name.
    pub fn x(&self, i: usize) -> String {
        self.node.inputs.get(i).cloned().unwrap_or_default()
    }

    /// Output i's value name.
    pub fn y(&self, i: usize) -> String {
        self.node.outputs[i].clone()
    }

    pub fn needs(&self, i: usize) -> bool {
        self.needs.get(i).copied().unwrap_or(false)
    }

    /// Input `i`'s gradient built by `f`, or None (no work) when `i` needs none: a rule's
    /// per-input branch in one line, `let da = cx.grad_for(0, |cx| cx.unbroadcast(&g, 0))?;`.
    pub fn grad_for(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut Self) -> Result<String>,
    ) -> Result<Option<String>> {
        if self.needs(i) {
            f(self).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn fact(&self, name: &str) -> Result<&Fact> {
        self.facts
            .get(name)
            .ok_or_else(|| self.err(format!("no type known for '{name}'")))
    }

    /// The gradient of output i, or zeros shaped like the output when it does not reach the
    /// loss (e.g. one unused branch of a Split).
    pub fn gy(&mut self, i: usize) -> Result<String> {
        if let Some(g) = self.out_grads.get(i).cloned().flatten() {
            return Ok(g);
        }
        let y = self.y(i);
        let dtype = self.fact(&y)?.dtype;
        let shape = self.b.op("Shape", "zshape", &[&y], vec![]);
        Ok(self.b.op(
            "ConstantOfShape",
            "zeros",
            &[&shape],
            vec![(
                "value",
                AttrValue::Tensor(scalar_tensor(dtype, 0.0, vec![1])?),
            )],
        ))
    }

    /// A scalar constant with the element type of `like`.
    pub fn scalar(&mut self, v: f64, like: &str) -> Result<String> {
        let dtype = self.fact(like)?.dtype;
        let t = scalar_tensor(dtype, v, vec![])?;
        Ok(self.b.constant("c", t))
    }

    pub fn op(&mut self, op: &str, tag: &str, inputs: &[&str]) -> String {
        self.b.op(op, tag, inputs, vec![])
    }

    pub fn op_attrs(
        &mut self,
        op: &str,
        tag: &str,
        inputs: &[&str],
        attrs: Vec<(&str, AttrValue)>,
    ) -> String {
        self.b.op(op, tag, inputs, attrs)
    }

    /// Sums a gradient computed at the broadcast shape of the node's output back to the shape
    /// of input i: reduces the leading axes the input lacks and the axes where the input has
    /// size 1, then reshapes to the input's runtime shape. Known-1 input dims are reduced even
    /// when the output's size is symbolic (summing one element is exact), so symbolic batch
    /// dims need no runtime shape logic.
    pub fn unbroadcast(&mut self, grad: &str, i: usize) -> Result<String> {
        let x = self.x(i);
        let xs = self.fact(&x)?.shape.clone();
        let gs = self.fact(&self.y(0))?.shape.clone();
        if xs == gs {
            return Ok(grad.to_string());
        }
        let lead = gs.len().saturating_sub(xs.len());
        let one = DimExpr::known(1);
        let axes: Vec<i64> = (0..gs.len())
            .filter(|&k| k < lead || (xs[k - lead] == one && gs[k] != one))
            .map(|k| k as i64)
            .collect();
        let summed = if axes.is_empty() {
            grad.to_string()
        } else {
            let ax = self.b.ints("axes", &axes);
            self.b.op(
                "ReduceSum",
                "unbroadcast",
                &[grad, &ax],
                vec![("keepdims", AttrValue::Int(1))],
            )
        };
        if lead == 0 && axes.is_empty() {
            return Ok(summed);
        }
        let shape = self.b.op("Shape", "xshape", &[&x], vec![]);
        Ok(self
            .b
            .op("Reshape", "unbroadcast.shape", &[&summed, &shape], vec![]))
    }

    /// A Transpose swapping the last two axes of a value of rank `rank`.
    pub fn swap_last_two(&mut self, v: &str, rank: usize) -> String {
        let mut perm: Vec<i64> = (0..rank as i64).collect();
        perm.swap(rank - 2, rank - 1);
        self.b.op(
            "Transpose",
            "T",
            &[v],
            vec![("perm", AttrValue::Ints(perm))],
        )
    }
}

/// A float constant of the given element type (f32, f64, f16 or bf16: activations of a
/// half-precision model carry half gradients, as in PyTorch's mixed-precision training).
pub fn scalar_tensor(dtype: DataType, v: f64, dims: Vec<i64>) -> Result<Tensor> {
    let n = dims.iter().product::<i64>().max(1) as usize;
    Ok(match dtype {
        DataType::Float | DataType::Double | DataType::Float16 | DataType::Bfloat16 => {
            Tensor::from_f64_as(dtype, "", dims, &vec![v; n])
        }
        other => {
            return Err(Error::Other(format!(
                "gradients need float values (f32, f64, f16, bf16), found {}",
                other.short_name()
            )))
        }
    })
}
