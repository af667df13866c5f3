//! How much memory the machine has free, for refusing up front a rank or a batch that
//! cannot fit (an allocation failure aborts the process instead of returning an error), and
//! how much a program needs at a given batch ([`plan`]).

use std::collections::HashMap;

use crate::ir::Model;

/// Bytes of memory available to a new allocation (Linux: `MemAvailable` of
/// `/proc/meminfo`); `None` where that is not known, and nothing is refused then.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `bytes` for a message: `3.2 GiB`, `512.0 MiB`.
pub fn human(bytes: f64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes / GIB)
    } else {
        format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
    }
}

/// What one program holds at a batch size, from its own graph: its constants, its inputs,
/// and the peak of the values its nodes produce when each lives from its producer to its
/// last consumer, in node order (what a runtime's static memory planner achieves at best
/// without recomputation; in-place reuse and fusion can only lower it).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProgramMemory {
    /// Initializers (the frozen weights, stored once however many programs share them).
    pub constants: u64,
    /// The program's inputs: the batch, and the trainable tensors.
    pub inputs: u64,
    /// The peak of live intermediate values (and outputs, which live to the end).
    pub peak_values: u64,
    /// The largest single value.
    pub largest_value: u64,
    /// Values whose size has a symbol `bind` does not know (a sum of sizes, say): counted as 0.
    pub unknown_values: usize,
    /// The first few of them, and why.
    pub unknown_examples: Vec<String>,
}

/// [`ProgramMemory`] of `model` with the symbolic sizes bound by `bind` (e.g. every dim
/// whose name ends in `batch` to 8, in `sequence` to 512).
pub fn plan(model: &Model, bind: &dyn Fn(&str) -> Option<i64>) -> crate::Result<ProgramMemory> {
    let facts = crate::shape::infer(model)?;
    let g = &model.graph;
    let mut unknown = 0usize;
    let mut examples = vec![];
    let mut size = |name: &str| -> u64 {
        let Some(f) = facts.get(name) else {
            unknown += 1;
            if examples.len() < 3 {
                examples.push(format!("{name} (no shape)"));
            }
            return 0;
        };
        let mut n: u64 = 1;
        for d in &f.shape {
            match d.eval(bind) {
                Some(v) if v >= 0 => n = n.saturating_mul(v as u64),
                _ => {
                    unknown += 1;
                    if examples.len() < 3 {
                        let dims: Vec<String> = f.shape.iter().map(|d| d.to_string()).collect();
                        examples.push(format!("{name} [{}]", dims.join(", ")));
                    }
                    return 0;
                }
            }
        }
        n.saturating_mul(f.dtype.bits() as u64).div_ceil(8)
    };
    let mut m = ProgramMemory::default();
    for t in g.initializers.values() {
        m.constants += t.raw().map_or(0, |r| r.len() as u64);
    }
    for i in &g.inputs {
        if !g.initializers.contains_key(&i.name) {
            m.inputs += size(&i.name);
        }
    }
    let mut last_use: HashMap<&str, usize> = HashMap::new();
    for (k, n) in g.nodes.iter().enumerate() {
        for x in &n.inputs {
            last_use.insert(x.as_str(), k);
        }
    }
    let outputs: std::collections::HashSet<&str> =
        g.outputs.iter().map(|o| o.name.as_str()).collect();
    let mut live: HashMap<&str, u64> = HashMap::new();
    let mut current = 0u64;
    for (k, n) in g.nodes.iter().enumerate() {
        for y in n.outputs.iter().filter(|y| !y.is_empty()) {
            let b = size(y);
            m.largest_value = m.largest_value.max(b);
            current += b;
            live.insert(y.as_str(), b);
        }
        m.peak_values = m.peak_values.max(current);
        for x in &n.inputs {
            if last_use.get(x.as_str()) == Some(&k) && !outputs.contains(x.as_str()) {
                if let Some(b) = live.remove(x.as_str()) {
                    current -= b;
                }
            }
        }
    }
    m.unknown_values = unknown;
    m.unknown_examples = examples;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DataType, Dim, Graph, Node, ValueInfo, ValueType};

    fn value(name: &str, dims: Vec<Dim>) -> ValueInfo {
        ValueInfo::new(name, ValueType::tensor(DataType::Float, dims))
    }

    /// x [batch, 4] → Relu → a → Relu → b → Relu → y: at most two of them are live at once.
    fn chain() -> Model {
        let dims = || vec![Dim::Sym("batch".into()), Dim::Known(4)];
        let mut g = Graph::default();
        g.inputs.push(value("x", dims()));
        for (i, o) in [("x", "a"), ("a", "b"), ("b", "y")] {
            g.nodes
                .push(Node::new("Relu", o, vec![i.into()], vec![o.into()]));
        }
        g.outputs.push(value("y", dims()));
        Model::emitted(g, 18, "")
    }

    #[test]
    fn peak_counts_only_values_alive_together() {
        let bind = |s: &str| (s == "batch").then_some(3);
        let m = plan(&chain(), &bind).unwrap();
        let one = 3 * 4 * 4;
        assert_eq!(m.inputs, one);
        // a and b at the second node, b and y at the third; a freed after its last use.
        assert_eq!(m.peak_values, 2 * one);
        assert_eq!(m.largest_value, one);
        assert_eq!(m.unknown_values, 0);
    }

    #[test]
    fn unbound_sizes_are_reported_not_guessed() {
        let m = plan(&chain(), &|_| None).unwrap();
        assert_eq!(m.peak_values, 0);
        assert_eq!(m.unknown_values, 4);
        assert!(
            m.unknown_examples[0].contains("batch"),
            "{:?}",
            m.unknown_examples
        );
    }
}
