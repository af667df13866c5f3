//! One copy of each constant across every tract model a backend holds.
//!
//! tract gives every parsed program its own copy of the initializers, and every optimised plan
//! its own folded and packed copy of the weights (a plan per input shape: the quickstart's
//! BiDoRA run made 20–30 of them, about 35 MB each for a 34 MB model). Packing is
//! deterministic, so plans of one shape class, and programs that share a weight, hold
//! byte-identical constants: [`ConstPool::share`] replaces each with the first equal one seen.
//! The pool holds weak references, so a plan evicted from a cache frees what only it used.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tract_linalg::mmm::EagerPackedInput;
use tract_linalg::pack::PackedFormat;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
use tract_onnx::tract_hir::infer::GenericFactoid;

/// Constants smaller than this are not worth a hash and a lookup.
const MIN_BYTES: usize = 16 * 1024;

type Pool<T> = Arc<Mutex<HashMap<u64, Vec<Weak<T>>>>>;

#[derive(Clone, Default)]
pub struct ConstPool {
    tensors: Pool<Tensor>,
    blobs: Pool<Blob>,
    /// Bytes of the constants replaced by an equal pooled one (freed, unless held elsewhere).
    deduplicated: Arc<AtomicUsize>,
    off: bool,
}

/// What a pool holds and has saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Distinct live constants (tensors and packed operands).
    pub live: usize,
    /// Bytes of constants that were replaced by an equal pooled one.
    pub deduplicated_bytes: usize,
    /// Bytes the distinct live constants hold (what the plans and programs keep, once).
    pub live_bytes: usize,
}

impl ConstPool {
    /// A pool that shares nothing: every model keeps its own constants (the reference that
    /// tests compare pooled programs with).
    pub fn off() -> ConstPool {
        ConstPool {
            off: true,
            ..ConstPool::default()
        }
    }

    pub fn stats(&self) -> PoolStats {
        /// (count, bytes) of the live entries.
        fn live<T>(pool: &Pool<T>, bytes: impl Fn(&T) -> usize) -> (usize, usize) {
            pool.lock().map_or((0, 0), |m| {
                m.values()
                    .flatten()
                    .filter_map(Weak::upgrade)
                    .fold((0, 0), |(n, b), v| (n + 1, b + bytes(&v)))
            })
        }
        let tensors = live(&self.tensors, |t| t.len() * t.datum_type().size_of());
        let blobs = live(&self.blobs, |b| b.len());
        PoolStats {
            live: tensors.0 + blobs.0,
            deduplicated_bytes: self.deduplicated.load(Ordering::Relaxed),
            live_bytes: tensors.1 + blobs.1,
        }
    }

    /// The pooled value equal to `value`, or `value` itself, now pooled; `bytes` is its size,
    /// counted as deduplicated when an equal one was there.
    fn intern<T: Hash + PartialEq>(&self, pool: &Pool<T>, value: &Arc<T>, bytes: usize) -> Arc<T> {
        if self.off {
            return value.clone();
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut h);
        let Ok(mut map) = pool.lock() else {
            return value.clone();
        };
        let bucket = map.entry(h.finish()).or_default();
        bucket.retain(|w| w.strong_count() > 0);
        for w in bucket.iter() {
            if let Some(shared) = w.upgrade() {
                if Arc::ptr_eq(&shared, value) {
                    return shared;
                }
                if *shared == **value {
                    self.deduplicated.fetch_add(bytes, Ordering::Relaxed);
                    return shared;
                }
            }
        }
        bucket.push(Arc::downgrade(value));
        value.clone()
    }

    /// The pooled tensor equal to a large constant's value, if it is not that value already.
    fn shared_value(&self, c: &Const) -> Option<Arc<Tensor>> {
        let t = c.val();
        // Packed matmul operands are exotic: their shape is the batch of packed matrices
        // (often a scalar), not the matrix, so they are always pooled.
        let bytes = t.len() * t.datum_type().size_of();
        if !t.is_exotic() && bytes < MIN_BYTES {
            return None;
        }
        let shared = self.intern(&self.tensors, t, bytes);
        (!Arc::ptr_eq(&shared, t)).then_some(shared)
    }

    /// An optimised plan's constants pooled: `Const` nodes (folded values) and the packed
    /// weights tract bakes into each `OptMatMul` (a matmul's constant operand is packed at
    /// optimisation and held by the op, not by a graph node).
    pub fn share_typed(&self, model: &mut TypedModel) -> TractResult<()> {
        for node in model.nodes_mut() {
            if let Some(mm) = node.op_as_mut::<OptMatMul>() {
                for spec in &mut mm.micro_ops {
                    if let ProtoFusedSpec::AddMatMul { a, b, .. } = spec {
                        for operand in [a, b] {
                            self.share_operand(operand);
                        }
                    }
                }
                continue;
            }
            let Some(c) = node.op_as::<Const>() else {
                continue;
            };
            let Some(shared) = self.shared_value(c) else {
                continue;
            };
            let exotic = c
                .exotic_fact()
                .map(tract_onnx::tract_core::dyn_clone::clone_box);
            node.op = Box::new(Const::new_with_opt_exotic_fact(shared.clone(), exotic)?);
            if let Some(out) = node.outputs.first_mut() {
                if out.fact.konst.is_some() {
                    out.fact.konst = Some(shared);
                }
            }
        }
        Ok(())
    }

    fn share_operand(&self, operand: &mut MatMulOperand) {
        let MatMulOperand::Const(value) = operand else {
            return;
        };
        let Some(packed) = value.downcast_mut::<EagerPackedInput>() else {
            return;
        };
        zero_panel_padding(packed);
        let shared = self.intern(&self.blobs, &packed.packed, packed.packed.len());
        if !Arc::ptr_eq(&shared, &packed.packed) {
            packed.packed = shared;
        }
    }

    /// A parsed program's initializers pooled (programs of one artifact share their weights).
    pub fn share_inference(&self, model: &mut InferenceModel) -> TractResult<()> {
        for node in model.nodes_mut() {
            let Some(c) = node.op_as::<Const>() else {
                continue;
            };
            let Some(shared) = self.shared_value(c) else {
                continue;
            };
            node.op = Box::new(Const::new(shared.clone())?);
            if let Some(out) = node.outputs.first_mut() {
                if matches!(out.fact.value, GenericFactoid::Only(_)) {
                    out.fact.value = GenericFactoid::Only(shared);
                }
            }
        }
        Ok(())
    }
}

/// Zeroes the bytes after each panel's `k` records (tract's end-padding record and alignment
/// fill). Release builds of tract leave them uninitialised (only the last partial panel is
/// zeroed), so two packings of one weight differ in those bytes and would not deduplicate:
/// the quickstart's plans then kept ~25 copies of each weight. The kernels never use them
/// (tract's debug builds zero the whole buffer), so zeroing changes no result.
fn zero_panel_padding(packed: &mut EagerPackedInput) {
    let Some(format) = packed.fact.format.downcast_ref::<PackedFormat>() else {
        return;
    };
    let used = packed.fact.k * format.r * format.dt.size_of();
    let panel = packed.panel_bytes;
    if panel == 0 || used >= panel || !packed.packed.len().is_multiple_of(panel) {
        return;
    }
    let dirty = packed
        .packed
        .as_bytes()
        .chunks_exact(panel)
        .any(|p| p[used..].iter().any(|&b| b != 0));
    if !dirty {
        return;
    }
    let blob = Arc::make_mut(&mut packed.packed);
    for p in blob.as_bytes_mut().chunks_exact_mut(panel) {
        p[used..].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(w: &Tensor) -> EagerPackedInput {
        let format = PackedFormat::new(DatumType::F32, 8, 32);
        let value = format.pack_tensor(w, 0, 1).unwrap();
        value.downcast_ref::<EagerPackedInput>().unwrap().clone()
    }

    /// Two packings of one weight that differ only in their panels' padding (as tract's
    /// release builds leave it) become byte-identical, so the pool keeps one; the records a
    /// kernel reads are untouched.
    #[test]
    fn padding_is_zeroed_so_equal_packings_deduplicate() {
        let (k, mn) = (37, 20);
        let w = Tensor::from_shape(&[k, mn], &(0..k * mn).map(|i| i as f32).collect::<Vec<_>>())
            .unwrap();
        let clean = packed(&w);
        let used = k * 8 * 4;
        let dirty = |fill: u8| {
            let mut p = clean.clone();
            for panel in Arc::make_mut(&mut p.packed)
                .as_bytes_mut()
                .chunks_exact_mut(p.panel_bytes)
            {
                panel[used..].fill(fill);
            }
            p
        };
        let (mut a, mut b) = (dirty(0xAB), dirty(0x11));
        assert!(used < a.panel_bytes, "the format pads each panel");
        assert_ne!(a.packed.as_bytes(), b.packed.as_bytes());
        zero_panel_padding(&mut a);
        zero_panel_padding(&mut b);
        assert!(
            a.packed.as_bytes() == b.packed.as_bytes(),
            "the two packings still differ"
        );
        for (pa, pc) in a
            .packed
            .as_bytes()
            .chunks_exact(a.panel_bytes)
            .zip(clean.packed.as_bytes().chunks_exact(clean.panel_bytes))
        {
            assert!(pa[..used] == pc[..used], "the data records are unchanged");
        }
        let pool = ConstPool::default();
        let first = pool.intern(&pool.blobs, &a.packed, a.packed.len());
        let second = pool.intern(&pool.blobs, &b.packed, b.packed.len());
        assert!(Arc::ptr_eq(&first, &second));
    }
}
