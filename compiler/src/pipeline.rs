//! The compiler's passes in order, as one function a binary or a test calls.

use indexmap::IndexMap;

use crate::artifact::{self, Artifact, Manifest};
use crate::error::Result;
use crate::ir::{Model, Tensor};
use crate::rewrite::{self, AdapterConfig, AdapterRecord};
use crate::targets::{self, TargetSpec};

pub struct CompileOptions {
    pub targets: TargetSpec,
    pub adapter: AdapterConfig,
}

/// Every stage's result, kept so that tools and tests can look at any of them.
pub struct Compiled {
    /// After the rewrite, with composite `ai.bidora` nodes.
    pub adapted: Model,
    /// The forward program: standard ONNX only.
    pub forward: Model,
    pub adapters: Vec<AdapterRecord>,
    pub init: IndexMap<String, Tensor>,
}

pub fn compile(model: &Model, opts: &CompileOptions) -> Result<Compiled> {
    let selected = targets::select(&model.graph, &opts.targets)?;
    let adapted = rewrite::adapt(model, selected, &opts.adapter)?;
    let mut forward = rewrite::strip_markers(&rewrite::lower(&adapted.model)?);
    crate::ir::topo::toposort(&mut forward.graph)?;
    // Type-check the emitted program: a rewrite bug fails here, naming the node, rather than
    // in a runtime on another machine.
    crate::shape::infer(&forward)?;
    Ok(Compiled {
        adapted: adapted.model,
        forward,
        adapters: adapted.adapters,
        init: adapted.init,
    })
}

/// Packs a compilation into the artifact folder's contents.
pub fn artifact(c: &Compiled, source_model: &str, opts: &CompileOptions) -> Artifact {
    let mut programs = IndexMap::new();
    programs.insert(
        "forward".to_string(),
        artifact::program_sig(artifact::FORWARD, &c.forward.graph, &c.adapters),
    );
    Artifact {
        manifest: Manifest {
            format: "bidora-artifact",
            format_version: 1,
            compiler_version: env!("CARGO_PKG_VERSION"),
            source_model: source_model.to_string(),
            opset: c.forward.onnx_opset().unwrap_or(0),
            config: opts.adapter.clone(),
            adapters: c.adapters.clone(),
            programs,
        },
        programs: vec![(artifact::FORWARD.to_string(), c.forward.clone())],
        init: c.init.clone(),
    }
}
