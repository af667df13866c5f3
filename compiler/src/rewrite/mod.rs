//! Graph-to-graph passes that put adapters into a model, in the order the compiler runs them:
//!
//! 1. [`split_fused`]: a fused projection targeted per block (GPT-2's `c_attn:q,v`) becomes one
//!    linear op per block plus a `Concat`; outputs are unchanged.
//! 2. [`adapt`]: each target becomes a composite `ai.bidora` node (`DoRA` or `LoRA`) whose
//!    adapter tensors are new graph inputs; their initial values are returned, not stored.
//! 3. [`lower`]: composite nodes become standard ONNX ops, so stock runtimes run the result.
//!
//! Composite nodes exist so that later passes (autodiff, the bilevel programs) see one node per
//! adapter with one gradient rule, and `detach_norm` is an attribute rather than a graph shape.

pub mod adapt;
pub mod head;
pub mod lower;
pub mod split_fused;

pub use adapt::{adapt, Adapted, AdapterConfig, AdapterRecord, Method};
pub use lower::{lower, strip_markers};
pub use split_fused::split_fused;

use crate::ir::{DataType, Tensor};
use crate::targets::Layout;

/// Squared L2 norm of every output feature of a 2-D float weight: the per-column norm of
/// the `[in, out]` matrix `x · W` uses, whatever the storage layout. Accumulated in f64 and
/// rounded once to the adapters' type ([`adapter_dtype`]), so the rewrite's magnitude and the
/// lowering's norm constant are the same values (for f32, `m = √sq` in f32 equals the graph's
/// `Sqrt(sq)`).
pub fn out_feature_sqnorms(w: &Tensor, layout: Layout) -> Option<Vec<f64>> {
    if !w.dtype.is_float() {
        return None;
    }
    let v = w.to_f64_vec()?;
    let (r, c) = (w.dims[0] as usize, w.dims[1] as usize);
    let sums: Vec<f64> = match layout {
        Layout::InOut => (0..c)
            .map(|j| (0..r).map(|i| v[i * c + j].powi(2)).sum::<f64>())
            .collect(),
        Layout::OutIn => (0..r)
            .map(|j| {
                v[j * c..(j + 1) * c]
                    .iter()
                    .map(|&x| x.powi(2))
                    .sum::<f64>()
            })
            .collect(),
    };
    Some(match adapter_dtype(w.dtype) {
        DataType::Float => sums.into_iter().map(|x| x as f32 as f64).collect(),
        _ => sums,
    })
}

/// The element type of the adapters (A, B, m), the DoRA column norm and everything trained
/// for a weight of type `weight`: the weight's own for f32 and f64; f32 for f16 and bf16
/// (peft's mixed precision: frozen weights stay half, what trains is f32).
pub fn adapter_dtype(weight: DataType) -> DataType {
    if weight.is_half() {
        DataType::Float
    } else {
        weight
    }
}

/// The DoRA magnitude `√sq` computed in the weight's type.
pub fn magnitude_from_sqnorms(dtype: DataType, sq: &[f64]) -> Vec<f64> {
    match dtype {
        DataType::Float => sq.iter().map(|&x| (x as f32).sqrt() as f64).collect(),
        _ => sq.iter().map(|x| x.sqrt()).collect(),
    }
}
