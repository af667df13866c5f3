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

use crate::ir::Tensor;
use crate::targets::Layout;

/// Squared L2 norm of every output feature of a 2-D f32 weight: the per-column norm of the
/// `[in, out]` matrix `x · W` uses, whatever the storage layout. Accumulated in f64 and rounded
/// once, so the rewrite's magnitude and the lowering's norm constant are the same f32 values.
pub fn out_feature_sqnorms(w: &Tensor, layout: Layout) -> Option<Vec<f32>> {
    let v = w.to_f32_vec()?;
    let (r, c) = (w.dims[0] as usize, w.dims[1] as usize);
    let out = match layout {
        Layout::InOut => (0..c)
            .map(|j| (0..r).map(|i| (v[i * c + j] as f64).powi(2)).sum::<f64>() as f32)
            .collect(),
        Layout::OutIn => (0..r)
            .map(|j| {
                v[j * c..(j + 1) * c]
                    .iter()
                    .map(|&x| (x as f64).powi(2))
                    .sum::<f64>() as f32
            })
            .collect(),
    };
    Some(out)
}
