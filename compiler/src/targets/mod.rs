//! Finding the linear ops that can carry adapters, and matching them the way peft's
//! `target_modules` does.
//!
//! A candidate is a `MatMul` whose right operand is a constant 2-D weight, possibly behind a
//! `Transpose` (the dynamo exporter keeps PyTorch's `[out, in]` weight and transposes in the
//! graph), or a `Gemm` with a constant `B` (`transB=1` holds `[out, in]`). Its module path is
//! recovered, in order of trust, from the weight's initializer name (`...query.weight`), the
//! dynamo exporter's `pkg.torch.onnx.name_scopes` node metadata, the legacy exporter's
//! `/bert/encoder/layer.0/attention/self/query/MatMul` node names, or the bias name.

pub mod blocks;

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ir::{Graph, Node};

/// How the stored weight is laid out relative to `y = x · W`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// The initializer is `[in, out]` and used as is.
    InOut,
    /// The initializer is `[out, in]` (PyTorch's layout): a `Transpose` or `Gemm(transB=1)`.
    OutIn,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Candidate {
    pub module: String,
    /// Index of the linear node in `graph.nodes` at selection time.
    #[serde(skip)]
    pub node_index: usize,
    pub node: String,
    pub op: String,
    /// The weight initializer's name.
    pub weight: String,
    pub layout: Layout,
    /// The `Transpose` node between the weight and a `MatMul`, if any.
    pub transpose: Option<String>,
    pub in_features: i64,
    pub out_features: i64,
    /// Why the node cannot be adapted (e.g. a 3-D weight); it is still listed.
    pub unsupported: Option<String>,
    /// For one block of a split fused projection: the fused weight of the input model that
    /// `weight` was cut from (export writes the merged block back into it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_weight: Option<String>,
    /// For one block: its first output feature in the fused weight, and the fused weight's
    /// output features (blocks may differ in width: grouped-query attention's q | k | v).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_out_features: Option<i64>,
}

/// One block of a fused projection such as GPT-2's `c_attn` (q|k|v as column blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Block {
    Q,
    K,
    V,
}

impl Block {
    pub const ALL: [Block; 3] = [Block::Q, Block::K, Block::V];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        ["q", "k", "v"][self.index()]
    }

    fn parse(s: &str) -> Option<Block> {
        match s {
            "q" => Some(Block::Q),
            "k" => Some(Block::K),
            "v" => Some(Block::V),
            _ => None,
        }
    }
}

/// What the user asked for: peft-style names, optionally with fused blocks, or a regex.
#[derive(Clone, Debug, Default)]
pub struct TargetSpec {
    pub names: Vec<(String, Option<Vec<Block>>)>,
    pub regex: Option<regex_lite::Regex>,
}

impl TargetSpec {
    /// Parses `query,value` or `c_attn:q,v` (block letters after a `name:` continue its list).
    pub fn parse(list: &[String], regex: Option<&str>) -> Result<TargetSpec> {
        let mut names: Vec<(String, Option<Vec<Block>>)> = vec![];
        let mut in_blocks = false;
        for tok in list.iter().flat_map(|s| s.split(',')).map(str::trim) {
            if tok.is_empty() {
                continue;
            }
            if let Some((name, first)) = tok.split_once(':') {
                let block = Block::parse(first).ok_or_else(|| Error::Target {
                    msg: format!("target '{tok}': '{first}' is not a block of a fused projection (use q, k or v)"),
                })?;
                names.push((name.to_string(), Some(vec![block])));
                in_blocks = true;
            } else if let (true, Some(b)) = (in_blocks, Block::parse(tok)) {
                let blocks = names.last_mut().unwrap().1.as_mut().unwrap();
                if !blocks.contains(&b) {
                    blocks.push(b);
                }
            } else {
                names.push((tok.to_string(), None));
                in_blocks = false;
            }
        }
        let regex = regex
            .map(|r| {
                regex_lite::Regex::new(&format!("^(?:{r})$")).map_err(|e| Error::Target {
                    msg: format!("--target-regex '{r}' is not a valid regular expression: {e}"),
                })
            })
            .transpose()?;
        if names.is_empty() && regex.is_none() {
            return Err(Error::Target {
                msg: "no target given: pass --target (e.g. query,value) or --target-regex".into(),
            });
        }
        Ok(TargetSpec { names, regex })
    }
}

/// A candidate chosen for adaptation, with the fused blocks to adapt (None: the whole weight).
#[derive(Clone, Debug)]
pub struct Selected {
    pub candidate: Candidate,
    pub blocks: Option<Vec<Block>>,
}

/// Every linear op in the graph that could carry an adapter, in graph order.
pub fn candidates(graph: &Graph) -> Vec<Candidate> {
    let producers = graph.producers();
    let consumers = graph.consumers();
    let mut out = vec![];
    for (i, node) in graph.nodes.iter().enumerate() {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            continue;
        }
        let found = match node.op_type.as_str() {
            "MatMul" => matmul_weight(graph, &producers, node),
            "Gemm" => gemm_weight(graph, node),
            _ => None,
        };
        let Some((weight, layout, transpose, unsupported)) = found else {
            continue;
        };
        let dims = graph.initializers[&weight].dims.clone();
        let (in_f, out_f) = match (dims.len(), layout) {
            (2, Layout::InOut) => (dims[0], dims[1]),
            (2, Layout::OutIn) => (dims[1], dims[0]),
            _ => (0, 0),
        };
        let bias = bias_of(graph, &consumers, node);
        out.push(Candidate {
            module: module_path(node, &weight, bias.as_deref()),
            node_index: i,
            node: node.name.clone(),
            op: node.op_type.clone(),
            weight,
            layout,
            transpose,
            in_features: in_f,
            out_features: out_f,
            unsupported,
            fused_weight: None,
            block_offset: None,
            fused_out_features: None,
        });
    }
    out
}

type WeightInfo = (String, Layout, Option<String>, Option<String>);

fn matmul_weight(
    graph: &Graph,
    producers: &HashMap<&str, usize>,
    node: &Node,
) -> Option<WeightInfo> {
    let w = node.input(1)?;
    if let Some(t) = graph.constant(w) {
        let bad =
            (t.dims.len() != 2).then(|| format!("its weight '{w}' is {}-D, not 2-D", t.dims.len()));
        return Some((w.to_string(), Layout::InOut, None, bad));
    }
    let tr = &graph.nodes[*producers.get(w)?];
    if tr.op_type != "Transpose" {
        return None;
    }
    let src = tr.input(0)?;
    let t = graph.constant(src)?;
    if t.dims.len() != 2 {
        return Some((
            src.to_string(),
            Layout::OutIn,
            Some(tr.name.clone()),
            Some(format!("its weight '{src}' is {}-D, not 2-D", t.dims.len())),
        ));
    }
    match tr.attr_ints("perm") {
        None | Some([1, 0]) => Some((src.to_string(), Layout::OutIn, Some(tr.name.clone()), None)),
        Some(_) => None,
    }
}

fn gemm_weight(graph: &Graph, node: &Node) -> Option<WeightInfo> {
    let w = node.input(1)?;
    let t = graph.constant(w)?;
    let layout = if node.attr_int("transB").unwrap_or(0) != 0 {
        Layout::OutIn
    } else {
        Layout::InOut
    };
    let mut bad = None;
    if node.attr_int("transA").unwrap_or(0) != 0 {
        bad = Some("it transposes its input (transA=1)".to_string());
    } else if node.attr_float("alpha").unwrap_or(1.0) != 1.0 {
        bad = Some("its alpha is not 1".to_string());
    } else if node.input(2).is_some() && node.attr_float("beta").unwrap_or(1.0) != 1.0 {
        bad = Some("its beta is not 1".to_string());
    } else if t.dims.len() != 2 {
        bad = Some(format!("its weight '{w}' is {}-D, not 2-D", t.dims.len()));
    }
    Some((w.to_string(), layout, None, bad))
}

/// The bias of a linear op: Gemm's C, or a 1-D constant added right after a MatMul.
fn bias_of(graph: &Graph, consumers: &HashMap<&str, Vec<usize>>, node: &Node) -> Option<String> {
    if node.op_type == "Gemm" {
        return node.input(2).map(str::to_string);
    }
    let users = consumers.get(node.outputs.first()?.as_str())?;
    let [u] = users.as_slice() else { return None };
    let add = &graph.nodes[*u];
    if add.op_type != "Add" {
        return None;
    }
    add.inputs
        .iter()
        .find(|v| graph.constant(v).is_some_and(|t| t.dims.len() == 1))
        .cloned()
}

/// Recovers the PyTorch module path of a linear op; see the module docs for the order.
pub fn module_path(node: &Node, weight: &str, bias: Option<&str>) -> String {
    if let Some(p) = weight
        .strip_suffix(".weight")
        .filter(|p| looks_like_path(p))
    {
        return p.to_string();
    }
    if let Some(p) = node
        .metadata("pkg.torch.onnx.name_scopes")
        .and_then(path_from_name_scopes)
    {
        return p;
    }
    if let Some(p) = path_from_node_name(&node.name) {
        return p;
    }
    if let Some(p) = bias
        .and_then(|b| b.strip_suffix(".bias"))
        .filter(|p| looks_like_path(p))
    {
        return p.to_string();
    }
    node.name.clone()
}

fn looks_like_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains("::")
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

/// The dynamo exporter's scopes: `['', 'bert', 'bert.encoder', ..., 'bert.encoder.layer.0.
/// attention.self.query', 'linear']`, cumulative module paths followed by the op's own local
/// name. The module is the last entry that extends the chain.
fn path_from_name_scopes(v: &str) -> Option<String> {
    let items = v
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|s| s.trim().trim_matches(|c| c == '\'' || c == '"'))
        .filter(|s| !s.is_empty());
    let mut path = "";
    for item in items {
        if path.is_empty() || item.strip_prefix(path).is_some_and(|r| r.starts_with('.')) {
            path = item;
        } else {
            break;
        }
    }
    (!path.is_empty() && looks_like_path(path)).then(|| path.to_string())
}

/// `/bert/encoder/layer.0/attention/self/query/MatMul` → `bert.encoder.layer.0.attention.self.query`.
fn path_from_node_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix('/')?;
    let (scope, _op) = rest.rsplit_once('/')?;
    let path = scope.replace('/', ".");
    looks_like_path(&path).then_some(path)
}

/// peft's rule: a module matches a name when its path equals it or ends with `.name`.
fn name_matches(module: &str, name: &str) -> bool {
    module == name || module.ends_with(&format!(".{name}"))
}

/// Chooses the candidates the spec names. A name that matches nothing, or a match that cannot
/// be adapted, is an error that lists the candidates.
pub fn select(graph: &Graph, spec: &TargetSpec) -> Result<Vec<Selected>> {
    let all = candidates(graph);
    let listing = || format_candidates(&all);
    let mut chosen: Vec<Selected> = vec![];
    let mut index = None;
    let mut push = |c: &Candidate, blocks: Option<Vec<Block>>| -> Result<()> {
        if let Some(why) = &c.unsupported {
            return Err(Error::Target {
                msg: format!(
                    "target module '{}' ({} node '{}') cannot be adapted: {why}",
                    c.module, c.op, c.node
                ),
            });
        }
        if blocks.is_some() {
            // Checked here so a wrong `:q,v` fails before any rewriting.
            let (consumers, producers) =
                index.get_or_insert_with(|| (graph.consumers(), graph.producers()));
            let node = &graph.nodes[c.node_index];
            blocks::block_widths(graph, consumers, producers, node, c.out_features).map_err(
                |why| Error::Target {
                    msg: format!(
                        "target module '{}' ({} node '{}') cannot be split into blocks: {why}",
                        c.module, c.op, c.node
                    ),
                },
            )?;
        }
        if let Some(prev) = chosen.iter_mut().find(|s| s.candidate.node == c.node) {
            // Named twice (e.g. by a name and the regex): merge block lists.
            match (&mut prev.blocks, blocks) {
                (Some(a), Some(b)) => {
                    for x in b {
                        if !a.contains(&x) {
                            a.push(x);
                        }
                    }
                }
                (a, _) => *a = None,
            }
            return Ok(());
        }
        chosen.push(Selected {
            candidate: c.clone(),
            blocks,
        });
        Ok(())
    };
    for (name, blocks) in &spec.names {
        let hits: Vec<&Candidate> = all
            .iter()
            .filter(|c| name_matches(&c.module, name))
            .collect();
        if hits.is_empty() {
            return Err(Error::Target {
                msg: format!(
                    "target '{name}' matches no linear op. Candidates:\n{}",
                    listing()
                ),
            });
        }
        for c in hits {
            push(c, blocks.clone())?;
        }
    }
    if let Some(re) = &spec.regex {
        let hits: Vec<&Candidate> = all.iter().filter(|c| re.is_match(&c.module)).collect();
        if hits.is_empty() {
            return Err(Error::Target {
                msg: format!(
                    "--target-regex '{}' matches no linear op. Candidates:\n{}",
                    re.as_str()
                        .trim_start_matches("^(?:")
                        .trim_end_matches(")$"),
                    listing()
                ),
            });
        }
        for c in hits {
            push(c, None)?;
        }
    }
    chosen.sort_by_key(|s| s.candidate.node_index);
    Ok(chosen)
}

/// One line per candidate: module path, op, layout and shape, as `--list-targets` prints.
pub fn format_candidates(cands: &[Candidate]) -> String {
    let mut s = String::new();
    for c in cands {
        let layout = match c.layout {
            Layout::InOut => "[in,out]",
            Layout::OutIn => "[out,in]",
        };
        let via = match (&c.transpose, c.op.as_str()) {
            (Some(_), _) => " via Transpose",
            (None, "Gemm") if c.layout == Layout::OutIn => " transB=1",
            _ => "",
        };
        s.push_str(&format!(
            "  {:<48} {:<6} in={:<5} out={:<5} weight {layout}{via} '{}'",
            c.module, c.op, c.in_features, c.out_features, c.weight
        ));
        if let Some(why) = &c.unsupported {
            s.push_str(&format!("  (not adaptable: {why})"));
        }
        s.push('\n');
    }
    if cands.is_empty() {
        s.push_str("  (none: the graph has no MatMul or Gemm with a constant weight)\n");
    }
    s
}
