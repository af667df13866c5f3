//! The adapter rewrite: each selected linear op becomes a composite `ai.bidora` node.
//!
//! `DoRA(x, W, A, B, m)` computes `(x·W + s·(x·A)·B) ⊙ (m / ‖W + s·A·B‖_col)` and
//! `LoRA(x, W, A, B)` computes `x·W + s·(x·A)·B`, with `W` exactly the linear op's own weight
//! operand (`w_transposed=1` when it is `[out, in]`, as in `Gemm(transB=1)`). A Gemm bias is
//! re-added after the composite node, outside the magnitude scaling, as peft does.
//!
//! Initial values follow peft: `A` kaiming-uniform (bound `1/√in`, from `a=√5`), `B` zeros,
//! `m` the per-output-feature norm of `W`, `s = α/r` (or `α/√r` with rsLoRA). `A` is stored
//! `[in, r]` and `B` `[r, out]` (the transposes of peft's `lora_A`/`lora_B` weights).

use std::collections::HashMap;

use indexmap::IndexMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{adapter_dtype, magnitude_from_sqnorms, out_feature_sqnorms, split_fused};
use crate::error::{Error, Result};
use crate::ir::names::Names;
use crate::ir::{AttrValue, Dim, Model, Node, Tensor, ValueInfo, ValueType, BIDORA_DOMAIN};
use crate::targets::{Block, Layout, Selected};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Lora,
    Dora,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterConfig {
    pub method: Method,
    pub rank: usize,
    pub alpha: f32,
    #[serde(default)]
    pub rslora: bool,
    /// DoRA §4.3: treat the column norm as a constant in the backward pass.
    #[serde(default)]
    pub detach_norm: bool,
    pub seed: u64,
}

impl AdapterConfig {
    pub fn scaling(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// What the manifest records for one adapter.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterRecord {
    pub module: String,
    pub block: Option<Block>,
    /// The original linear node (for a fused block: the per-block node the split made).
    pub node: String,
    pub op: String,
    /// The weight the adapter reads (for a fused block: the block the split cut out).
    pub weight: String,
    /// For a fused block: the input model's fused weight that `weight` is a column block of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fused_weight: Option<String>,
    /// For a fused block: its first output feature in the fused weight and the fused
    /// weight's output features. Absent in artifacts from before unequal blocks: then the
    /// blocks are equal thirds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_offset: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fused_out_features: Option<i64>,
    pub layout: Layout,
    pub in_features: i64,
    pub out_features: i64,
    pub rank: usize,
    pub scaling: f32,
    /// Graph input names of the adapter tensors.
    pub lora_a: String,
    pub lora_b: String,
    pub magnitude: Option<String>,
}

/// The adapted model (composite nodes, not yet lowered) with its adapters' initial values.
pub struct Adapted {
    pub model: Model,
    pub adapters: Vec<AdapterRecord>,
    pub init: IndexMap<String, Tensor>,
}

pub fn adapt(model: &Model, selected: Vec<Selected>, cfg: &AdapterConfig) -> Result<Adapted> {
    if cfg.rank == 0 {
        return Err(Error::Other("--rank must be at least 1".into()));
    }
    let mut model = model.clone();
    let graph = &mut model.graph;
    let targets = split_fused(graph, selected)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut adapters = vec![];
    let mut init = IndexMap::new();
    let s = cfg.scaling();
    // Indexed once, and the replacements applied in one pass at the end, so adapting stays
    // linear in the graph however many targets there are.
    let mut names = Names::of(graph);
    let position: HashMap<String, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    let mut replacements: HashMap<usize, Vec<Node>> = HashMap::new();
    for (sel, block) in targets {
        let c = &sel.candidate;
        let label = format!("{} node '{}'", c.op, c.node);
        let err = |msg: String| Error::Rewrite {
            node: label.clone(),
            msg,
        };
        let idx = *position
            .get(&c.node)
            .ok_or_else(|| err("node not found".into()))?;
        if replacements.contains_key(&idx) {
            return Err(err("selected twice".into()));
        }
        let w = &graph.initializers[&c.weight];
        if !w.dtype.is_float() {
            return Err(err(format!(
                "weight '{}' is {}; adapters support f32, f64, f16 and bf16 weights \
                 (a quantised model: export it unquantised)",
                c.weight,
                w.dtype.short_name()
            )));
        }
        // Half weights get f32 adapters; the lowering casts between the two.
        let dtype = adapter_dtype(w.dtype);
        let (din, dout, r) = (c.in_features, c.out_features, cfg.rank as i64);
        let base = match block {
            Some(b) => format!("{}.{}", c.module, b.name()),
            None => c.module.clone(),
        };
        let a_name = names.value(&format!("{base}.lora_A"));
        let b_name = names.value(&format!("{base}.lora_B"));
        let bound = 1.0 / (din as f32).sqrt();
        // Drawn in f32 whatever the weight's type, so f32 and f64 models start alike.
        let a_vals: Vec<f64> = (0..din * r)
            .map(|_| rng.random_range(-bound..bound) as f64)
            .collect();
        init.insert(
            a_name.clone(),
            Tensor::from_f64_as(dtype, a_name.clone(), vec![din, r], &a_vals),
        );
        init.insert(
            b_name.clone(),
            Tensor::from_f64_as(
                dtype,
                b_name.clone(),
                vec![r, dout],
                &vec![0.0; (r * dout) as usize],
            ),
        );
        let mut inputs_new = vec![
            (a_name.clone(), vec![din, r]),
            (b_name.clone(), vec![r, dout]),
        ];
        let magnitude = if cfg.method == Method::Dora {
            let m_name = names.value(&format!("{base}.lora_magnitude"));
            let sq = out_feature_sqnorms(w, c.layout)
                .ok_or_else(|| err("weight is not a readable float tensor".into()))?;
            let m = magnitude_from_sqnorms(dtype, &sq);
            init.insert(
                m_name.clone(),
                Tensor::from_f64_as(dtype, m_name.clone(), vec![dout], &m),
            );
            inputs_new.push((m_name.clone(), vec![dout]));
            Some(m_name)
        } else {
            None
        };
        for (name, dims) in &inputs_new {
            graph.inputs.push(ValueInfo::new(
                name.clone(),
                ValueType::tensor(dtype, dims.iter().map(|&d| Dim::Known(d)).collect()),
            ));
        }

        let old = graph.nodes[idx].clone();
        let mut inputs = vec![
            old.inputs[0].clone(),
            old.inputs[1].clone(),
            a_name.clone(),
            b_name.clone(),
        ];
        inputs.extend(magnitude.clone());
        let gemm_bias = (old.op_type == "Gemm")
            .then(|| old.input(2).map(str::to_string))
            .flatten();
        let out = if gemm_bias.is_some() {
            names.value(&format!("{}.adapted", old.outputs[0]))
        } else {
            old.outputs[0].clone()
        };
        let op = match cfg.method {
            Method::Dora => "DoRA",
            Method::Lora => "LoRA",
        };
        let mut node = Node::new(op, old.name.clone(), inputs, vec![out.clone()])
            .with_attr("scale", AttrValue::Float(s))
            .with_attr(
                "w_transposed",
                AttrValue::Int((c.layout == Layout::OutIn && old.op_type == "Gemm") as i64),
            )
            .with_attr("module", AttrValue::String(base.clone().into_bytes()));
        if cfg.method == Method::Dora {
            node = node.with_attr("detach_norm", AttrValue::Int(cfg.detach_norm as i64));
        }
        node.domain = BIDORA_DOMAIN.to_string();
        node.metadata_props = old.metadata_props.clone();
        let mut replacement = vec![node];
        if let Some(bias) = gemm_bias {
            replacement.push(Node::new(
                "Add",
                format!("{}.bias", old.name),
                vec![out, bias],
                vec![old.outputs[0].clone()],
            ));
        }
        replacements.insert(idx, replacement);

        adapters.push(AdapterRecord {
            module: c.module.clone(),
            block,
            node: c.node.clone(),
            op: c.op.clone(),
            weight: c.weight.clone(),
            fused_weight: c.fused_weight.clone(),
            block_offset: c.block_offset,
            fused_out_features: c.fused_out_features,
            layout: c.layout,
            in_features: din,
            out_features: dout,
            rank: cfg.rank,
            scaling: s,
            lora_a: a_name,
            lora_b: b_name,
            magnitude,
        });
    }
    if !replacements.is_empty() {
        let old = std::mem::take(&mut graph.nodes);
        graph.nodes = old
            .into_iter()
            .enumerate()
            .flat_map(|(i, n)| replacements.remove(&i).unwrap_or_else(|| vec![n]))
            .collect();
    }
    if !model
        .opset_imports
        .iter()
        .any(|o| o.domain == BIDORA_DOMAIN)
    {
        model
            .opset_imports
            .push(crate::ir::OpsetImport::new(BIDORA_DOMAIN, 1));
    }
    Ok(Adapted {
        model,
        adapters,
        init,
    })
}
