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

/// Hands a (memory-mapped) weight's pages back once a pass has read it: see
/// [`crate::onnx_io::mapped`].
pub fn release_weight(w: &Tensor) {
    if let Some(raw) = w.raw() {
        crate::onnx_io::mapped::release(raw);
    }
}

/// The squared norm of each output feature's column of `w`, summed in f64 (in row order, as
/// [`out_feature_sqnorms`] and the regulariser need), without a copy of `w`.
pub fn exact_out_feature_sqnorms(w: &Tensor, layout: Layout) -> Option<Vec<f64>> {
    if !w.dtype.is_float() {
        return None;
    }
    let (r, c) = (w.dims[0] as usize, w.dims[1] as usize);
    let mut sums = vec![0.0f64; if layout == Layout::InOut { c } else { r }];
    let mut k = 0usize;
    // Streamed, not copied to f64: a 4096 x 4096 weight would be 128 MB more per adapter.
    w.for_each_f64(|x| {
        let j = match layout {
            Layout::InOut => k % c,
            Layout::OutIn => k / c,
        };
        sums[j] += x * x;
        k += 1;
    })?;
    release_weight(w);
    Some(sums)
}

/// Squared L2 norm of every output feature of a 2-D float weight: the per-column norm of
/// the `[in, out]` matrix `x · W` uses, whatever the storage layout. Accumulated in f64 and
/// rounded once to the adapters' type ([`adapter_dtype`]), so the rewrite's magnitude and the
/// lowering's norm constant are the same values (for f32, `m = √sq` in f32 equals the graph's
/// `Sqrt(sq)`).
pub fn out_feature_sqnorms(w: &Tensor, layout: Layout) -> Option<Vec<f64>> {
    let sums = exact_out_feature_sqnorms(w, layout)?;
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
