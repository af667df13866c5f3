//! The graph IR every pass works on.
//!
//! Values are named by strings, as in ONNX: a node's inputs and outputs, graph inputs and
//! initializers share one namespace. That keeps import/export lossless and rewrites readable
//! (`{node}.dora.scale`), at the price of a name → producer map that passes build on demand.
//!
//! **Invariant:** only `ir::convert` (and `onnx_io`) see prost types for the parts of ONNX the
//! compiler reasons about. Parts it only carries through (model-local functions, training info,
//! sparse initializers, device configurations) stay as their protobuf messages in `Passthrough`
//! fields, so a round trip keeps them bit for bit.

pub mod builder;
pub mod convert;
pub mod instance;
pub mod names;
pub mod tensor;
pub mod topo;

use std::collections::HashMap;

use indexmap::IndexMap;

pub use tensor::{DataType, Tensor, TensorData};

use crate::proto::onnx as pb;

/// The default ONNX operator domain is the empty string (also spelled `ai.onnx`).
pub const ONNX_DOMAIN: &str = "";
/// The domain of the compiler's own composite ops (e.g. `DoRA`), lowered before export.
pub const BIDORA_DOMAIN: &str = "ai.bidora";

#[derive(Clone, Debug, PartialEq)]
pub struct OpsetImport {
    pub domain: String,
    pub version: i64,
    /// Whether the file spelled out an empty domain (some exporters do, some omit it);
    /// kept so that export writes the same bytes.
    pub domain_explicit: bool,
}

impl OpsetImport {
    pub fn new(domain: &str, version: i64) -> OpsetImport {
        OpsetImport {
            domain: domain.to_string(),
            version,
            domain_explicit: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub ir_version: i64,
    pub opset_imports: Vec<OpsetImport>,
    pub producer_name: String,
    pub producer_version: String,
    pub domain: String,
    pub model_version: i64,
    pub doc_string: String,
    pub metadata_props: Vec<(String, String)>,
    pub graph: Graph,
    pub passthrough: ModelPassthrough,
}

/// Model-level parts carried through untouched.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelPassthrough {
    pub functions: Vec<pb::FunctionProto>,
    pub training_info: Vec<pb::TrainingInfoProto>,
    pub configuration: Vec<pb::DeviceConfigurationProto>,
}

impl Model {
    /// A model written by the compiler: `graph` on the given ai.onnx opset.
    pub fn emitted(graph: Graph, opset: i64, doc_string: &str) -> Model {
        Model {
            ir_version: 9,
            opset_imports: vec![OpsetImport::new("", opset)],
            producer_name: "bidora-compile".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: String::new(),
            model_version: 0,
            doc_string: doc_string.into(),
            metadata_props: vec![],
            graph,
            passthrough: Default::default(),
        }
    }

    /// The opset version imported for the default ONNX domain.
    pub fn onnx_opset(&self) -> Option<i64> {
        self.opset_imports
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub name: String,
    pub doc_string: String,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub value_info: Vec<ValueInfo>,
    pub initializers: IndexMap<String, Tensor>,
    pub nodes: Vec<Node>,
    pub metadata_props: Vec<(String, String)>,
    pub passthrough: GraphPassthrough,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GraphPassthrough {
    pub sparse_initializers: Vec<pb::SparseTensorProto>,
    pub quantization_annotation: Vec<pb::TensorAnnotation>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    /// Input value names; an empty string marks an omitted optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
    pub doc_string: String,
    pub overload: String,
    pub metadata_props: Vec<(String, String)>,
    pub device_configurations: Vec<pb::NodeDeviceConfigurationProto>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub value: AttrValue,
    pub doc_string: String,
    /// Set inside function bodies: the attribute refers to the caller's attribute of this name.
    pub ref_attr_name: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    Tensor(Tensor),
    Graph(Box<Graph>),
    SparseTensor(Box<pb::SparseTensorProto>),
    Type(Box<pb::TypeProto>),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Vec<u8>>),
    Tensors(Vec<Tensor>),
    Graphs(Vec<Graph>),
    SparseTensors(Vec<pb::SparseTensorProto>),
    Types(Vec<pb::TypeProto>),
    /// An attribute with type UNDEFINED (only legal with `ref_attr_name`).
    Undefined,
}

/// One dimension of a declared or inferred shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(i64),
    /// A named symbolic dim such as `batch` or `sequence`.
    Sym(String),
    /// Declared without value or name.
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Known(v) => write!(f, "{v}"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A declared value type (graph input/output, `value_info`).
#[derive(Clone, Debug, PartialEq)]
pub enum ValueType {
    Tensor {
        elem: DataType,
        /// `None`: rank unknown.
        shape: Option<Vec<Dim>>,
        /// Per-dim denotations, kept only for a faithful round trip.
        dim_denotations: Vec<String>,
        denotation: String,
    },
    /// Sequence, map, optional, sparse and opaque types: carried, never reasoned about.
    Other(Box<pb::TypeProto>),
}

impl ValueType {
    pub fn tensor(elem: DataType, shape: Vec<Dim>) -> ValueType {
        ValueType::Tensor {
            dim_denotations: vec![String::new(); shape.len()],
            elem,
            shape: Some(shape),
            denotation: String::new(),
        }
    }

    /// The same type with every symbolic dimension renamed by `f`.
    pub fn with_dims_renamed(mut self, f: impl Fn(&str) -> String) -> ValueType {
        if let ValueType::Tensor {
            shape: Some(dims), ..
        } = &mut self
        {
            for d in dims.iter_mut() {
                if let Dim::Sym(s) = d {
                    *s = f(s);
                }
            }
        }
        self
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub ty: Option<ValueType>,
    pub doc_string: String,
    pub metadata_props: Vec<(String, String)>,
}

impl ValueInfo {
    pub fn new(name: impl Into<String>, ty: ValueType) -> ValueInfo {
        ValueInfo {
            name: name.into(),
            ty: Some(ty),
            doc_string: String::new(),
            metadata_props: vec![],
        }
    }
}

impl Node {
    pub fn new(
        op_type: &str,
        name: impl Into<String>,
        inputs: Vec<String>,
        outputs: Vec<String>,
    ) -> Node {
        Node {
            name: name.into(),
            op_type: op_type.to_string(),
            inputs,
            outputs,
            ..Default::default()
        }
    }

    pub fn with_attr(mut self, name: &str, value: AttrValue) -> Node {
        self.attributes.push(Attribute {
            name: name.to_string(),
            value,
            doc_string: String::new(),
            ref_attr_name: String::new(),
        });
        self
    }

    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| &a.value)
    }

    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name)? {
            AttrValue::Int(v) => Some(*v),
            _ => None,
        }
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attr(name)? {
            AttrValue::Float(v) => Some(*v),
            _ => None,
        }
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attr(name)? {
            AttrValue::Ints(v) => Some(v),
            _ => None,
        }
    }

    pub fn attr_string(&self, name: &str) -> Option<&str> {
        match self.attr(name)? {
            AttrValue::String(v) => std::str::from_utf8(v).ok(),
            _ => None,
        }
    }

    pub fn attr_tensor(&self, name: &str) -> Option<&Tensor> {
        match self.attr(name)? {
            AttrValue::Tensor(t) => Some(t),
            _ => None,
        }
    }

    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata_props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The i-th input if present (not omitted).
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// A short label for error messages: `MatMul node '/enc/q/MatMul'`.
    pub fn label(&self) -> String {
        format!("{} node '{}'", self.op_type, self.name)
    }
}

impl Graph {
    /// Map from value name to the index of the node producing it.
    pub fn producers(&self) -> HashMap<&str, usize> {
        let mut map = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                map.insert(o.as_str(), i);
            }
        }
        map
    }

    /// Map from value name to the indices of the nodes consuming it.
    pub fn consumers(&self) -> HashMap<&str, Vec<usize>> {
        let mut map: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.inputs.iter().filter(|v| !v.is_empty()) {
                map.entry(v.as_str()).or_default().push(i);
            }
        }
        map
    }

    pub fn is_graph_input(&self, name: &str) -> bool {
        self.inputs.iter().any(|i| i.name == name)
    }

    /// An initializer that is a constant: not overridable as a graph input.
    pub fn constant(&self, name: &str) -> Option<&Tensor> {
        if self.is_graph_input(name) {
            return None;
        }
        self.initializers.get(name)
    }

    /// A value name not used anywhere in the graph, derived from `base`. It scans the graph:
    /// for one name; a pass that makes many uses one [`names::Names`] (as [`builder::Builder`]
    /// does), which gives the same names in O(1) each.
    pub fn fresh_name(&self, base: &str) -> String {
        let taken = |n: &str| {
            self.initializers.contains_key(n)
                || self.inputs.iter().any(|v| v.name == n)
                || self.nodes.iter().any(|x| x.outputs.iter().any(|o| o == n))
        };
        if !taken(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !taken(n))
            .expect("unbounded counter")
    }
}
