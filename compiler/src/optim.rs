//! AdamW as a plain-ONNX program, so the optimiser can run where the programs run: on a GPU
//! the trainable tensors, their gradients and both moments then stay in device memory between
//! steps (the runtime's resident mode), and only the loss comes back to the host.
//!
//! The update is the runtime's host AdamW (`runtime/src/optim.rs`; Loshchilov & Hutter,
//! decoupled weight decay) operation for operation, in f32:
//!
//! ```text
//! m' = β1·m + (1−β1)·g
//! v' = β2·v + ((1−β2)·g)·g
//! p' = p − lr·((m'/bc1) / (√(v'/bc2) + ε) + wd·p)      bc1 = 1−β1ᵗ, bc2 = 1−β2ᵗ
//! ```
//!
//! Inputs per parameter `p`: `p`, `p.grad`, `p.adam_m`, `p.adam_v`; outputs `p.next`,
//! `p.adam_m.next`, `p.adam_v.next`. The step's scalars are inputs too (`lr`, `beta1`,
//! `one_minus_beta1`, `beta2`, `one_minus_beta2`, `eps`, `weight_decay`, `bc1`, `bc2`), computed
//! on the host in f32 exactly as the host AdamW computes them, so a schedule changes nothing in
//! the program.

use crate::ir::builder::Builder;
use crate::ir::{DataType, Dim, Graph, Model, ValueInfo, ValueType};

/// The scalar inputs, in graph order.
pub const SCALARS: [&str; 9] = [
    "lr",
    "beta1",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "eps",
    "weight_decay",
    "bc1",
    "bc2",
];

/// Input and output names of one parameter's slots.
pub fn grad_name(p: &str) -> String {
    format!("{p}.grad")
}
pub fn m_name(p: &str) -> String {
    format!("{p}.adam_m")
}
pub fn v_name(p: &str) -> String {
    format!("{p}.adam_v")
}
pub fn next_name(slot: &str) -> String {
    format!("{slot}.next")
}

/// One AdamW step over `params` (name, shape), every tensor f32.
pub fn adamw_program(params: &[(String, Vec<usize>)]) -> Model {
    let f32s = |name: &str, shape: &[usize]| {
        ValueInfo::new(
            name,
            ValueType::tensor(
                DataType::Float,
                shape.iter().map(|&d| Dim::Known(d as i64)).collect(),
            ),
        )
    };
    let mut g = Graph {
        name: "adamw".into(),
        ..Default::default()
    };
    for s in SCALARS {
        g.inputs.push(f32s(s, &[]));
    }
    let mut nodes = vec![];
    for (p, shape) in params {
        let (grad, m, v) = (grad_name(p), m_name(p), v_name(p));
        for name in [p.as_str(), &grad, &m, &v] {
            g.inputs.push(f32s(name, shape));
        }
        let mut b = Builder::new(&mut g, format!("adamw.{p}"));
        let m_old = b.op("Mul", "m_decay", &["beta1", &m], vec![]);
        let m_new_g = b.op("Mul", "m_grad", &["one_minus_beta1", &grad], vec![]);
        let m_next = b.op_into("Add", "m", &[&m_old, &m_new_g], vec![], next_name(&m));
        let v_old = b.op("Mul", "v_decay", &["beta2", &v], vec![]);
        // ((1−β2)·g)·g, the host's association, so both round alike.
        let sg = b.op("Mul", "v_scaled_grad", &["one_minus_beta2", &grad], vec![]);
        let v_new_g = b.op("Mul", "v_grad", &[&sg, &grad], vec![]);
        let v_next = b.op_into("Add", "v", &[&v_old, &v_new_g], vec![], next_name(&v));
        let m_hat = b.op("Div", "m_hat", &[&m_next, "bc1"], vec![]);
        let v_hat = b.op("Div", "v_hat", &[&v_next, "bc2"], vec![]);
        let root = b.op("Sqrt", "sqrt", &[&v_hat], vec![]);
        let denom = b.op("Add", "denom", &[&root, "eps"], vec![]);
        let update = b.op("Div", "update", &[&m_hat, &denom], vec![]);
        let decay = b.op("Mul", "decay", &["weight_decay", p], vec![]);
        let total = b.op("Add", "total", &[&update, &decay], vec![]);
        let delta = b.op("Mul", "delta", &["lr", &total], vec![]);
        b.op_into("Sub", "p", &[p, &delta], vec![], next_name(p));
        nodes.extend(b.finish());
        for name in [next_name(p), next_name(&m), next_name(&v)] {
            g.outputs.push(f32s(&name, shape));
        }
    }
    g.nodes = nodes;
    Model::emitted(g, 18, "AdamW step (bidora_compiler::optim)")
}
