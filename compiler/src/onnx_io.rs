//! Reading and writing ONNX model files. This is the only module that touches model files on
//! disk.
//!
//! - [`decode_model`] / [`encode_model`]: protobuf bytes to and from [`ModelProto`], with a
//!   sanity check that the bytes really describe a model.
//! - [`read_model`]: reads a `.onnx` file and loads every tensor stored as external data
//!   (initializers, sparse initializers, tensor attributes, subgraphs, function bodies,
//!   training graphs) into `raw_data`. Locations are checked before any file is opened:
//!   absolute paths, `..` components and symlinks that leave the model's folder are refused,
//!   and every read is bounds-checked against the file size before memory is allocated.
//! - [`write_model`] / [`write_model_auto`]: atomic writes (temporary file in the same folder,
//!   fsync, rename), optionally moving large tensors into one external data file.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use prost::Message;
use tempfile::NamedTempFile;

use crate::proto::onnx::tensor_proto::{DataLocation, DataType};
use crate::proto::onnx::{
    AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, SparseTensorProto,
    StringStringEntryProto, TensorProto, TrainingInfoProto,
};

/// Largest protobuf message other tools can read (2 GiB - 1 bytes).
pub const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;

/// [`write_model_auto`] embeds all data while the encoded model stays below this (1.9 GiB).
pub const AUTO_EMBED_LIMIT: u64 = 19 * (1 << 30) / 10;

/// Tensors of at least this many bytes go external when [`write_model_auto`] must split.
pub const AUTO_EXTERNAL_THRESHOLD: usize = 1024;

/// Alignment of each tensor's offset inside an external data file written by us.
pub const EXTERNAL_ALIGNMENT: u64 = 64;

/// Everything that can go wrong reading or writing a model. Every variant names the file,
/// and the tensor where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum OnnxIoError {
    /// The model file could not be read (missing, unreadable, a folder...).
    #[error("cannot read ONNX model `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The bytes are not a protobuf `ModelProto` (truncated, garbage, another format).
    #[error("`{}` is not a valid ONNX model: {source}", path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },

    /// The protobuf decoded but lacks what every model has (an IR version, a graph).
    #[error("`{}` is not a valid ONNX model: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },

    /// A tensor's external data description is malformed or inconsistent.
    #[error("`{}`: external data of tensor `{tensor}`: {reason}", model.display())]
    ExternalData {
        model: PathBuf,
        tensor: String,
        reason: String,
    },

    /// A tensor's external data location could reach outside the model's folder.
    #[error(
        "`{}`: tensor `{tensor}` refers to external data at `{location}`, which is refused: {reason}",
        model.display()
    )]
    UnsafeExternalPath {
        model: PathBuf,
        tensor: String,
        location: String,
        reason: String,
    },

    /// The external data file of a tensor does not exist.
    #[error(
        "`{}`: tensor `{tensor}` stores its data in `{}`, which does not exist",
        model.display(),
        file.display()
    )]
    MissingExternalFile {
        model: PathBuf,
        tensor: String,
        file: PathBuf,
    },

    /// The external data file of a tensor exists but could not be opened or read.
    #[error(
        "`{}`: cannot read the external data of tensor `{tensor}` from `{}`: {source}",
        model.display(),
        file.display()
    )]
    ExternalFile {
        model: PathBuf,
        tensor: String,
        file: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The declared byte range of a tensor is not inside its external data file.
    #[error(
        "`{}`: tensor `{tensor}` needs {length} bytes at offset {offset} of `{}`, which holds only {file_size} bytes",
        model.display(),
        file.display()
    )]
    ExternalOutOfBounds {
        model: PathBuf,
        tensor: String,
        file: PathBuf,
        offset: u64,
        length: u64,
        file_size: u64,
    },

    /// Writing a file failed; nothing half-written is left behind.
    #[error("cannot write `{}`: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The model cannot be written as asked (too large, unloaded external data, bad options).
    #[error("cannot write `{}`: {reason}", path.display())]
    Unwritable { path: PathBuf, reason: String },
}

type Result<T, E = OnnxIoError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Bytes.

/// Decodes a model from protobuf bytes. `origin` only names the source in errors.
///
/// Besides protobuf errors this refuses empty input and messages without an `ir_version` or
/// without a graph, which is what arbitrary bytes usually decode to.
pub fn decode_model(bytes: &[u8], origin: &Path) -> Result<ModelProto> {
    decode_model_shared(bytes::Bytes::copy_from_slice(bytes), origin)
}

/// Like [`decode_model`], but tensors' `raw_data` become slices of `bytes` instead of copies,
/// so a model's weights are held in memory once.
pub fn decode_model_shared(bytes: bytes::Bytes, origin: &Path) -> Result<ModelProto> {
    let invalid = |reason: &str| OnnxIoError::Invalid {
        path: origin.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.is_empty() {
        return Err(invalid("the file is empty"));
    }
    let model = ModelProto::decode(bytes).map_err(|source| OnnxIoError::Decode {
        path: origin.to_path_buf(),
        source,
    })?;
    match model.ir_version {
        None | Some(0) => return Err(invalid("it has no ir_version (missing or 0)")),
        Some(v) if v < 0 => return Err(invalid(&format!("its ir_version {v} is negative"))),
        Some(_) => {}
    }
    if model.graph.is_none() {
        return Err(invalid("it has no graph"));
    }
    Ok(model)
}

/// Encodes a model to protobuf bytes (no size check; see [`write_model`]).
pub fn encode_model(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

// ---------------------------------------------------------------------------------------------
// Reading.

/// Reads a model file and loads all of its external data into `raw_data`.
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = fs::read(path).map_err(|source| OnnxIoError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut model = decode_model_shared(bytes.into(), path)?;
    load_external_data(&mut model, path)?;
    Ok(model)
}

/// Loads every tensor of `model` whose `data_location` is EXTERNAL, resolving locations
/// against the folder of `model_path`. Afterwards such tensors hold their bytes in `raw_data`,
/// have no `external_data` entries and no `data_location` (absent means DEFAULT).
pub fn load_external_data(model: &mut ModelProto, model_path: &Path) -> Result<()> {
    let mut loader = ExternalLoader::new(model_path);
    visit_model_mut(model, &mut |t, site| loader.load(t, site))
}

/// What the `external_data` entries of one tensor say.
struct ExternalRef {
    location: String,
    offset: u64,
    length: Option<u64>,
}

struct OpenFile {
    file: File,
    size: u64,
}

/// Resolves and reads external data, opening each file once.
struct ExternalLoader<'a> {
    model_path: &'a Path,
    folder: PathBuf,
    canonical_folder: Option<PathBuf>,
    /// location string -> canonical path of the file.
    resolved: HashMap<String, PathBuf>,
    /// canonical path -> open handle.
    files: HashMap<PathBuf, OpenFile>,
}

impl<'a> ExternalLoader<'a> {
    fn new(model_path: &'a Path) -> Self {
        ExternalLoader {
            model_path,
            folder: folder_of(model_path).to_path_buf(),
            canonical_folder: None,
            resolved: HashMap::new(),
            files: HashMap::new(),
        }
    }

    fn load(&mut self, t: &mut TensorProto, site: &dyn Fn() -> String) -> Result<()> {
        if t.data_location != Some(DataLocation::External as i32) {
            return Ok(());
        }
        let model_path = self.model_path;
        let tensor = tensor_label(t, site);
        let bad = |reason: String| OnnxIoError::ExternalData {
            model: model_path.to_path_buf(),
            tensor: tensor.clone(),
            reason,
        };

        let ext = parse_external_entries(&t.external_data).map_err(&bad)?;
        if t.data_type == Some(DataType::String as i32) {
            return Err(bad(
                "STRING tensors cannot be stored as external data".into()
            ));
        }
        let expected = expected_byte_len(t).map_err(&bad)?;
        let length = match (ext.length, expected) {
            (Some(declared), Some(expected)) if declared != expected => {
                return Err(bad(format!(
                    "length {declared} does not match the {expected} bytes its data type and \
                     dims {:?} need",
                    t.dims
                )));
            }
            (Some(declared), _) => declared,
            (None, Some(expected)) => expected,
            (None, None) => {
                return Err(bad(format!(
                    "no length is given and data type {} has no fixed element size",
                    data_type_name(t.data_type)
                )));
            }
        };

        let path = self.resolve(&ext.location, &tensor)?;
        let open = match self.files.entry(path.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let io_err = |source| OnnxIoError::ExternalFile {
                    model: model_path.to_path_buf(),
                    tensor: tensor.clone(),
                    file: path.clone(),
                    source,
                };
                let file = File::open(&path).map_err(io_err)?;
                let size = file.metadata().map_err(io_err)?.len();
                e.insert(OpenFile { file, size })
            }
        };

        // Bounds first, so a huge declared length never reaches the allocator.
        let in_bounds = ext
            .offset
            .checked_add(length)
            .is_some_and(|end| end <= open.size);
        if !in_bounds {
            return Err(OnnxIoError::ExternalOutOfBounds {
                model: model_path.to_path_buf(),
                tensor,
                file: path,
                offset: ext.offset,
                length,
                file_size: open.size,
            });
        }
        let len = usize::try_from(length).map_err(|_| {
            bad(format!(
                "{length} bytes do not fit in memory on this machine"
            ))
        })?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| bad(format!("cannot allocate {len} bytes")))?;
        buf.resize(len, 0);
        let read = open
            .file
            .seek(SeekFrom::Start(ext.offset))
            .and_then(|_| open.file.read_exact(&mut buf));
        if let Err(source) = read {
            return Err(OnnxIoError::ExternalFile {
                model: model_path.to_path_buf(),
                tensor,
                file: path,
                source,
            });
        }

        t.raw_data = Some(buf.into());
        t.external_data.clear();
        t.data_location = None;
        Ok(())
    }

    /// Checks a location and returns the canonical path of its file, which is known to be a
    /// regular file inside the model's folder.
    fn resolve(&mut self, location: &str, tensor: &str) -> Result<PathBuf> {
        if let Some(p) = self.resolved.get(location) {
            return Ok(p.clone());
        }
        let model_path = self.model_path;
        let unsafe_path = |reason: String| OnnxIoError::UnsafeExternalPath {
            model: model_path.to_path_buf(),
            tensor: tensor.to_string(),
            location: location.to_string(),
            reason,
        };
        let relative = check_location(location).map_err(|r| unsafe_path(r.to_string()))?;
        let joined = self.folder.join(relative);
        let io_err = |file: &Path, source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                OnnxIoError::MissingExternalFile {
                    model: model_path.to_path_buf(),
                    tensor: tensor.to_string(),
                    file: file.to_path_buf(),
                }
            } else {
                OnnxIoError::ExternalFile {
                    model: model_path.to_path_buf(),
                    tensor: tensor.to_string(),
                    file: file.to_path_buf(),
                    source,
                }
            }
        };
        let canonical_folder = match &self.canonical_folder {
            Some(f) => f.clone(),
            None => {
                let f = fs::canonicalize(&self.folder).map_err(|e| io_err(&self.folder, e))?;
                self.canonical_folder = Some(f.clone());
                f
            }
        };
        let canonical = fs::canonicalize(&joined).map_err(|e| io_err(&joined, e))?;
        if !canonical.starts_with(&canonical_folder) {
            return Err(unsafe_path(format!(
                "it resolves to `{}`, outside the model's folder `{}`",
                canonical.display(),
                canonical_folder.display()
            )));
        }
        let meta = fs::metadata(&canonical).map_err(|e| io_err(&joined, e))?;
        if !meta.is_file() {
            return Err(unsafe_path("it is not a regular file".into()));
        }
        self.resolved
            .insert(location.to_string(), canonical.clone());
        Ok(canonical)
    }
}

/// The folder a model file lives in (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Name of a tensor for messages, or a description of where an unnamed one sits.
fn tensor_label(t: &TensorProto, site: &dyn Fn() -> String) -> String {
    match t.name.as_deref() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => format!("<unnamed, {}>", site()),
    }
}

fn parse_external_entries(entries: &[StringStringEntryProto]) -> Result<ExternalRef, String> {
    let mut location = None;
    let mut offset = None;
    let mut length = None;
    for entry in entries {
        let key = entry.key.as_deref().unwrap_or_default();
        let value = entry.value.as_deref().unwrap_or_default();
        let slot = match key {
            "location" => &mut location,
            "offset" => &mut offset,
            "length" => &mut length,
            // checksum, basepath and anything else carry nothing we need.
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(format!("the key `{key}` appears more than once"));
        }
    }
    let number = |key: &str, value: Option<&str>| -> Result<Option<u64>, String> {
        value
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("`{key}` is `{v}`, not a non-negative integer"))
            })
            .transpose()
    };
    let location = match location {
        Some(l) if !l.is_empty() => l.to_string(),
        _ => return Err("it has no `location`".into()),
    };
    Ok(ExternalRef {
        location,
        offset: number("offset", offset)?.unwrap_or(0),
        length: number("length", length)?,
    })
}

/// Accepts only relative paths without `..`, checking both `/` and `\` as separators so a
/// model is refused alike on every platform.
fn check_location(location: &str) -> Result<&Path, &'static str> {
    if location.contains('\0') {
        return Err("it contains a NUL byte");
    }
    let bytes = location.as_bytes();
    let drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    if location.starts_with(['/', '\\']) || drive {
        return Err("absolute paths are not allowed");
    }
    if location.split(['/', '\\']).any(|part| part == "..") {
        return Err("`..` components are not allowed");
    }
    let path = Path::new(location);
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("`..` components are not allowed"),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute paths are not allowed")
            }
        }
    }
    Ok(path)
}

/// `FLOAT`, `INT4`... for messages; the number itself when it is not a known data type.
fn data_type_name(data_type: Option<i32>) -> String {
    match data_type {
        None => "(unset)".into(),
        Some(v) => DataType::try_from(v)
            .map(|d| d.as_str_name().to_string())
            .unwrap_or_else(|_| v.to_string()),
    }
}

/// Bits per element of a data type; `None` for STRING, UNDEFINED and unknown values.
fn element_bits(data_type: i32) -> Option<u64> {
    use DataType as D;
    let bits = match D::try_from(data_type).ok()? {
        D::Undefined | D::String => return None,
        D::Uint2 | D::Int2 => 2,
        D::Uint4 | D::Int4 | D::Float4e2m1 => 4,
        D::Uint8
        | D::Int8
        | D::Bool
        | D::Float8e4m3fn
        | D::Float8e4m3fnuz
        | D::Float8e5m2
        | D::Float8e5m2fnuz
        | D::Float8e8m0 => 8,
        D::Uint16 | D::Int16 | D::Float16 | D::Bfloat16 => 16,
        D::Float | D::Int32 | D::Uint32 => 32,
        D::Int64 | D::Uint64 | D::Double | D::Complex64 => 64,
        D::Complex128 => 128,
    };
    Some(bits)
}

/// Bytes the payload of `t` must have according to its dims and data type (sub-byte types
/// packed), or `None` when that cannot be known (no fixed element size, or a segment).
fn expected_byte_len(t: &TensorProto) -> Result<Option<u64>, String> {
    let Some(bits) = t.data_type.and_then(element_bits) else {
        return Ok(None);
    };
    if t.segment.is_some() {
        return Ok(None);
    }
    let overflow = || format!("dims {:?} describe more bytes than can exist", t.dims);
    let mut elements: u64 = 1;
    for &d in &t.dims {
        let d = u64::try_from(d).map_err(|_| format!("dims {:?} hold a negative value", t.dims))?;
        elements = elements.checked_mul(d).ok_or_else(overflow)?;
    }
    let total_bits = elements.checked_mul(bits).ok_or_else(overflow)?;
    Ok(Some(total_bits.div_ceil(8)))
}

// ---------------------------------------------------------------------------------------------
// Visiting every tensor of a model.
//
// The patterns below list every field on purpose (no `..`): when the schema gains a field,
// this stops compiling, and whoever updates it decides whether the field can hold tensors.

/// Calls `f` on every `TensorProto` of the model. `f` also gets a lazily built description
/// of where the tensor sits, for messages about unnamed tensors.
macro_rules! tensor_visitor {
    ($model:ident, $graph:ident, $function:ident, $node:ident, $attribute:ident, $sparse:ident;
     $($mutability:tt)?) => {
        fn $model(
            m: &$($mutability)? ModelProto,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let ModelProto {
                ir_version: _,
                opset_import: _,
                producer_name: _,
                producer_version: _,
                domain: _,
                model_version: _,
                doc_string: _,
                graph,
                metadata_props: _,
                training_info,
                functions,
                configuration: _,
            } = m;
            if let Some(g) = graph {
                $graph(g, f)?;
            }
            for info in training_info {
                let TrainingInfoProto {
                    initialization,
                    algorithm,
                    initialization_binding: _,
                    update_binding: _,
                } = info;
                if let Some(g) = initialization {
                    $graph(g, f)?;
                }
                if let Some(g) = algorithm {
                    $graph(g, f)?;
                }
            }
            for function in functions {
                $function(function, f)?;
            }
            Ok(())
        }

        fn $graph(
            g: &$($mutability)? GraphProto,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let GraphProto {
                node,
                name,
                initializer,
                sparse_initializer,
                doc_string: _,
                input: _,
                output: _,
                value_info: _,
                quantization_annotation: _,
                metadata_props: _,
            } = g;
            let graph_name: &str = name.as_deref().unwrap_or_default();
            for t in initializer {
                f(t, &|| format!("initializer of graph '{graph_name}'"))?;
            }
            for s in sparse_initializer {
                $sparse(s, &|| format!("sparse initializer of graph '{graph_name}'"), f)?;
            }
            for n in node {
                $node(n, "", f)?;
            }
            Ok(())
        }

        fn $function(
            func: &$($mutability)? FunctionProto,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let FunctionProto {
                name,
                input: _,
                output: _,
                attribute: _,
                attribute_proto,
                node,
                doc_string: _,
                opset_import: _,
                domain: _,
                overload: _,
                value_info: _,
                metadata_props: _,
            } = func;
            let owner = format!("function '{}'", name.as_deref().unwrap_or_default());
            let suffix = format!(" of {owner}");
            for a in attribute_proto {
                $attribute(a, &owner, f)?;
            }
            for n in node {
                $node(n, &suffix, f)?;
            }
            Ok(())
        }

        fn $node(
            n: &$($mutability)? NodeProto,
            suffix: &str,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let NodeProto {
                input: _,
                output: _,
                name,
                op_type,
                domain: _,
                overload: _,
                attribute,
                doc_string: _,
                metadata_props: _,
                device_configurations: _,
            } = n;
            if attribute.is_empty() {
                return Ok(());
            }
            let owner = match name.as_deref() {
                Some(name) if !name.is_empty() => format!("node '{name}'{suffix}"),
                _ => format!(
                    "unnamed '{}' node{suffix}",
                    op_type.as_deref().unwrap_or_default()
                ),
            };
            for a in attribute {
                $attribute(a, &owner, f)?;
            }
            Ok(())
        }

        fn $attribute(
            a: &$($mutability)? AttributeProto,
            owner: &str,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let AttributeProto {
                name,
                ref_attr_name: _,
                doc_string: _,
                r#type: _,
                f: _,
                i: _,
                s: _,
                t,
                g,
                sparse_tensor,
                tp: _,
                floats: _,
                ints: _,
                strings: _,
                tensors,
                graphs,
                sparse_tensors,
                type_protos: _,
            } = a;
            let attr_name: &str = name.as_deref().unwrap_or_default();
            let site = || format!("attribute '{attr_name}' of {owner}");
            if let Some(t) = t {
                f(t, &site)?;
            }
            for t in tensors {
                f(t, &site)?;
            }
            if let Some(s) = sparse_tensor {
                $sparse(s, &site, f)?;
            }
            for s in sparse_tensors {
                $sparse(s, &site, f)?;
            }
            if let Some(g) = g {
                $graph(g, f)?;
            }
            for g in graphs {
                $graph(g, f)?;
            }
            Ok(())
        }

        fn $sparse(
            s: &$($mutability)? SparseTensorProto,
            site: &dyn Fn() -> String,
            f: &mut dyn FnMut(&$($mutability)? TensorProto, &dyn Fn() -> String) -> Result<()>,
        ) -> Result<()> {
            let SparseTensorProto {
                values,
                indices,
                dims: _,
            } = s;
            let values_name = values
                .as_ref()
                .and_then(|v| v.name.clone())
                .unwrap_or_default();
            if let Some(v) = values {
                f(v, &|| format!("values of a sparse tensor, {}", site()))?;
            }
            if let Some(i) = indices {
                f(i, &|| {
                    format!("indices of sparse tensor '{values_name}', {}", site())
                })?;
            }
            Ok(())
        }
    };
}

tensor_visitor!(visit_model, visit_graph, visit_function, visit_node, visit_attribute,
    visit_sparse;);
tensor_visitor!(visit_model_mut, visit_graph_mut, visit_function_mut, visit_node_mut,
    visit_attribute_mut, visit_sparse_mut; mut);

// ---------------------------------------------------------------------------------------------
// Copying a model while replacing its tensors (used to write external data without cloning
// the payloads that move out of the model file).

type TensorMap<'a> = dyn FnMut(&TensorProto, &dyn Fn() -> String) -> Result<TensorProto> + 'a;

fn map_model(m: &ModelProto, f: &mut TensorMap) -> Result<ModelProto> {
    let ModelProto {
        ir_version,
        opset_import,
        producer_name,
        producer_version,
        domain,
        model_version,
        doc_string,
        graph,
        metadata_props,
        training_info,
        functions,
        configuration,
    } = m;
    Ok(ModelProto {
        ir_version: *ir_version,
        opset_import: opset_import.clone(),
        producer_name: producer_name.clone(),
        producer_version: producer_version.clone(),
        domain: domain.clone(),
        model_version: *model_version,
        doc_string: doc_string.clone(),
        graph: graph.as_ref().map(|g| map_graph(g, f)).transpose()?,
        metadata_props: metadata_props.clone(),
        training_info: training_info
            .iter()
            .map(|info| {
                let TrainingInfoProto {
                    initialization,
                    algorithm,
                    initialization_binding,
                    update_binding,
                } = info;
                Ok(TrainingInfoProto {
                    initialization: initialization
                        .as_ref()
                        .map(|g| map_graph(g, f))
                        .transpose()?,
                    algorithm: algorithm.as_ref().map(|g| map_graph(g, f)).transpose()?,
                    initialization_binding: initialization_binding.clone(),
                    update_binding: update_binding.clone(),
                })
            })
            .collect::<Result<_>>()?,
        functions: functions
            .iter()
            .map(|func| map_function(func, f))
            .collect::<Result<_>>()?,
        configuration: configuration.clone(),
    })
}

fn map_graph(g: &GraphProto, f: &mut TensorMap) -> Result<GraphProto> {
    let GraphProto {
        node,
        name,
        initializer,
        sparse_initializer,
        doc_string,
        input,
        output,
        value_info,
        quantization_annotation,
        metadata_props,
    } = g;
    let graph_name: &str = name.as_deref().unwrap_or_default();
    Ok(GraphProto {
        node: node
            .iter()
            .map(|n| map_node(n, "", f))
            .collect::<Result<_>>()?,
        name: name.clone(),
        initializer: initializer
            .iter()
            .map(|t| f(t, &|| format!("initializer of graph '{graph_name}'")))
            .collect::<Result<_>>()?,
        sparse_initializer: sparse_initializer
            .iter()
            .map(|s| {
                map_sparse(
                    s,
                    &|| format!("sparse initializer of graph '{graph_name}'"),
                    f,
                )
            })
            .collect::<Result<_>>()?,
        doc_string: doc_string.clone(),
        input: input.clone(),
        output: output.clone(),
        value_info: value_info.clone(),
        quantization_annotation: quantization_annotation.clone(),
        metadata_props: metadata_props.clone(),
    })
}

fn map_function(func: &FunctionProto, f: &mut TensorMap) -> Result<FunctionProto> {
    let FunctionProto {
        name,
        input,
        output,
        attribute,
        attribute_proto,
        node,
        doc_string,
        opset_import,
        domain,
        overload,
        value_info,
        metadata_props,
    } = func;
    let owner = format!("function '{}'", name.as_deref().unwrap_or_default());
    let suffix = format!(" of {owner}");
    Ok(FunctionProto {
        name: name.clone(),
        input: input.clone(),
        output: output.clone(),
        attribute: attribute.clone(),
        attribute_proto: attribute_proto
            .iter()
            .map(|a| map_attribute(a, &owner, f))
            .collect::<Result<_>>()?,
        node: node
            .iter()
            .map(|n| map_node(n, &suffix, f))
            .collect::<Result<_>>()?,
        doc_string: doc_string.clone(),
        opset_import: opset_import.clone(),
        domain: domain.clone(),
        overload: overload.clone(),
        value_info: value_info.clone(),
        metadata_props: metadata_props.clone(),
    })
}

fn map_node(n: &NodeProto, suffix: &str, f: &mut TensorMap) -> Result<NodeProto> {
    let NodeProto {
        input,
        output,
        name,
        op_type,
        domain,
        overload,
        attribute,
        doc_string,
        metadata_props,
        device_configurations,
    } = n;
    let owner = match name.as_deref() {
        Some(name) if !name.is_empty() => format!("node '{name}'{suffix}"),
        _ => format!(
            "unnamed '{}' node{suffix}",
            op_type.as_deref().unwrap_or_default()
        ),
    };
    Ok(NodeProto {
        input: input.clone(),
        output: output.clone(),
        name: name.clone(),
        op_type: op_type.clone(),
        domain: domain.clone(),
        overload: overload.clone(),
        attribute: attribute
            .iter()
            .map(|a| map_attribute(a, &owner, f))
            .collect::<Result<_>>()?,
        doc_string: doc_string.clone(),
        metadata_props: metadata_props.clone(),
        device_configurations: device_configurations.clone(),
    })
}

fn map_attribute(a: &AttributeProto, owner: &str, f: &mut TensorMap) -> Result<AttributeProto> {
    let AttributeProto {
        name,
        ref_attr_name,
        doc_string,
        r#type,
        f: float,
        i,
        s,
        t,
        g,
        sparse_tensor,
        tp,
        floats,
        ints,
        strings,
        tensors,
        graphs,
        sparse_tensors,
        type_protos,
    } = a;
    let attr_name: &str = name.as_deref().unwrap_or_default();
    let site = || format!("attribute '{attr_name}' of {owner}");
    Ok(AttributeProto {
        name: name.clone(),
        ref_attr_name: ref_attr_name.clone(),
        doc_string: doc_string.clone(),
        r#type: *r#type,
        f: *float,
        i: *i,
        s: s.clone(),
        t: t.as_ref().map(|t| f(t, &site)).transpose()?,
        g: g.as_ref().map(|g| map_graph(g, f)).transpose()?,
        sparse_tensor: sparse_tensor
            .as_ref()
            .map(|s| map_sparse(s, &site, f))
            .transpose()?,
        tp: tp.clone(),
        floats: floats.clone(),
        ints: ints.clone(),
        strings: strings.clone(),
        tensors: tensors.iter().map(|t| f(t, &site)).collect::<Result<_>>()?,
        graphs: graphs
            .iter()
            .map(|g| map_graph(g, f))
            .collect::<Result<_>>()?,
        sparse_tensors: sparse_tensors
            .iter()
            .map(|s| map_sparse(s, &site, f))
            .collect::<Result<_>>()?,
        type_protos: type_protos.clone(),
    })
}

fn map_sparse(
    s: &SparseTensorProto,
    site: &dyn Fn() -> String,
    f: &mut TensorMap,
) -> Result<SparseTensorProto> {
    let SparseTensorProto {
        values,
        indices,
        dims,
    } = s;
    let values_name = values
        .as_ref()
        .and_then(|v| v.name.as_deref())
        .unwrap_or_default();
    Ok(SparseTensorProto {
        values: values
            .as_ref()
            .map(|v| f(v, &|| format!("values of a sparse tensor, {}", site())))
            .transpose()?,
        indices: indices
            .as_ref()
            .map(|i| {
                f(i, &|| {
                    format!("indices of sparse tensor '{values_name}', {}", site())
                })
            })
            .transpose()?,
        dims: dims.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// How [`write_model`] stores tensor data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Tensors whose `raw_data` has at least this many bytes go to the external data file;
    /// `usize::MAX` embeds everything. Tensors stored in the typed fields (`float_data`...)
    /// always stay embedded, so a read gives back exactly the message that was written.
    pub external_data_threshold: usize,
    /// File name (no folders) of the external data file, created beside the model; `None`
    /// means `<model stem>.data`.
    pub external_file_name: Option<String>,
}

impl Default for WriteOptions {
    /// Embeds everything in the model file.
    fn default() -> Self {
        Self::embedded()
    }
}

impl WriteOptions {
    /// Everything in the model file.
    pub fn embedded() -> Self {
        WriteOptions {
            external_data_threshold: usize::MAX,
            external_file_name: None,
        }
    }

    /// Tensors of at least `threshold` bytes in `<model stem>.data`.
    pub fn external(threshold: usize) -> Self {
        WriteOptions {
            external_data_threshold: threshold,
            external_file_name: None,
        }
    }

    /// Embedded while the encoded model is below [`AUTO_EMBED_LIMIT`]; otherwise every tensor
    /// of at least [`AUTO_EXTERNAL_THRESHOLD`] bytes goes external.
    pub fn auto(model: &ModelProto) -> Self {
        if (model.encoded_len() as u64) < AUTO_EMBED_LIMIT {
            Self::embedded()
        } else {
            Self::external(AUTO_EXTERNAL_THRESHOLD)
        }
    }

    fn embeds_everything(&self) -> bool {
        self.external_data_threshold == usize::MAX
    }
}

/// Writes `model` to `path` as [`WriteOptions::auto`] decides, and returns the options used.
pub fn write_model_auto(model: &ModelProto, path: &Path) -> Result<WriteOptions> {
    let opts = WriteOptions::auto(model);
    write_model(model, path, &opts)?;
    Ok(opts)
}

/// Writes `model` to `path`, atomically: each file is written to a temporary file in the same
/// folder, synced, then renamed over its destination (the data file before the model file).
/// On error no partial file is left behind.
///
/// Tensors that still refer to external data (not loaded by [`read_model`]) are refused,
/// since their locations would not be valid beside the new file.
pub fn write_model(model: &ModelProto, path: &Path, opts: &WriteOptions) -> Result<()> {
    let unwritable = |reason: String| OnnxIoError::Unwritable {
        path: path.to_path_buf(),
        reason,
    };
    let Some(model_name) = path.file_name() else {
        return Err(unwritable("the path does not name a file".into()));
    };
    let folder = folder_of(path);

    if opts.embeds_everything() {
        visit_model(model, &mut |t, site| refuse_unloaded(t, site, path))?;
        let bytes = encode_model(model);
        check_size(&bytes, path)?;
        return write_atomically(path, folder, &bytes);
    }

    let data_name = match &opts.external_file_name {
        Some(name) => name.clone(),
        None => {
            let stem = Path::new(model_name)
                .file_stem()
                .unwrap_or(model_name)
                .to_string_lossy();
            format!("{stem}.data")
        }
    };
    check_data_file_name(&data_name, model_name.to_string_lossy().as_ref())
        .map_err(|r| unwritable(format!("external data file name `{data_name}`: {r}")))?;

    let mut sink = DataSink {
        model_path: path,
        folder,
        data_path: folder.join(&data_name),
        location: data_name,
        threshold: opts.external_data_threshold,
        out: None,
        position: 0,
    };
    let stripped = map_model(model, &mut |t, site| sink.place(t, site))?;
    let bytes = encode_model(&stripped);
    drop(stripped);
    check_size(&bytes, path)?;
    sink.commit()?;
    write_atomically(path, folder, &bytes)
}

fn refuse_unloaded(t: &TensorProto, site: &dyn Fn() -> String, path: &Path) -> Result<()> {
    if t.data_location == Some(DataLocation::External as i32) {
        return Err(OnnxIoError::Unwritable {
            path: path.to_path_buf(),
            reason: format!(
                "tensor `{}` still refers to external data; load it first (read_model)",
                tensor_label(t, site)
            ),
        });
    }
    Ok(())
}

fn check_size(bytes: &[u8], path: &Path) -> Result<()> {
    if bytes.len() as u64 > PROTOBUF_LIMIT {
        return Err(OnnxIoError::Unwritable {
            path: path.to_path_buf(),
            reason: format!(
                "the encoded model has {} bytes, over protobuf's 2 GiB limit; store large \
                 tensors as external data (WriteOptions::external or write_model_auto)",
                bytes.len()
            ),
        });
    }
    Ok(())
}

fn check_data_file_name(name: &str, model_name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name == "." || name == ".." {
        return Err("not a file name");
    }
    if name.contains(['/', '\\', '\0']) {
        return Err("must be a plain file name without folders");
    }
    if name == model_name {
        return Err("is the model file itself");
    }
    Ok(())
}

/// Collects the payloads that move out of the model into one temporary data file.
struct DataSink<'a> {
    model_path: &'a Path,
    folder: &'a Path,
    data_path: PathBuf,
    location: String,
    threshold: usize,
    out: Option<BufWriter<NamedTempFile>>,
    position: u64,
}

impl DataSink<'_> {
    /// Returns the tensor as it goes into the model file, appending its payload to the data
    /// file when it is large enough.
    fn place(&mut self, t: &TensorProto, site: &dyn Fn() -> String) -> Result<TensorProto> {
        refuse_unloaded(t, site, self.model_path)?;
        let raw = match &t.raw_data {
            Some(raw)
                if raw.len() >= self.threshold && t.data_type != Some(DataType::String as i32) =>
            {
                raw
            }
            _ => return Ok(t.clone()),
        };

        let write_err = |source| OnnxIoError::Write {
            path: self.data_path.clone(),
            source,
        };
        let out = match &mut self.out {
            Some(out) => out,
            None => {
                let tmp = temp_file_for(&self.data_path, self.folder)?;
                self.out.insert(BufWriter::with_capacity(1 << 20, tmp))
            }
        };
        let padding =
            (EXTERNAL_ALIGNMENT - self.position % EXTERNAL_ALIGNMENT) % EXTERNAL_ALIGNMENT;
        out.write_all(&[0u8; EXTERNAL_ALIGNMENT as usize][..padding as usize])
            .map_err(write_err)?;
        let offset = self.position + padding;
        out.write_all(raw).map_err(write_err)?;
        self.position = offset + raw.len() as u64;

        let TensorProto {
            dims,
            data_type,
            segment,
            float_data,
            int32_data,
            string_data,
            int64_data,
            name,
            doc_string,
            raw_data: _,
            external_data: _,
            data_location: _,
            double_data,
            uint64_data,
            metadata_props,
        } = t;
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: Some(key.to_string()),
            value: Some(value),
        };
        Ok(TensorProto {
            dims: dims.clone(),
            data_type: *data_type,
            segment: *segment,
            float_data: float_data.clone(),
            int32_data: int32_data.clone(),
            string_data: string_data.clone(),
            int64_data: int64_data.clone(),
            name: name.clone(),
            doc_string: doc_string.clone(),
            raw_data: None,
            external_data: vec![
                entry("location", self.location.clone()),
                entry("offset", offset.to_string()),
                entry("length", raw.len().to_string()),
            ],
            data_location: Some(DataLocation::External as i32),
            double_data: double_data.clone(),
            uint64_data: uint64_data.clone(),
            metadata_props: metadata_props.clone(),
        })
    }

    /// Syncs and renames the data file into place (when any tensor went external).
    fn commit(self) -> Result<()> {
        match self.out {
            Some(out) => {
                let tmp = out.into_inner().map_err(|e| OnnxIoError::Write {
                    path: self.data_path.clone(),
                    source: e.into_error(),
                })?;
                persist(tmp, &self.data_path, self.folder)
            }
            None => Ok(()),
        }
    }
}

/// A temporary file beside `final_path`, removed again if it is never persisted.
fn temp_file_for(final_path: &Path, folder: &Path) -> Result<NamedTempFile> {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        // Like a plain File::create: 0666 minus the umask (tempfile defaults to 0600).
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(fs::Permissions::from_mode(0o666));
    }
    builder
        .tempfile_in(folder)
        .map_err(|source| OnnxIoError::Write {
            path: final_path.to_path_buf(),
            source,
        })
}

fn write_atomically(path: &Path, folder: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_file_for(path, folder)?;
    tmp.write_all(bytes).map_err(|source| OnnxIoError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    persist(tmp, path, folder)
}

fn persist(tmp: NamedTempFile, path: &Path, folder: &Path) -> Result<()> {
    let write_err = |source| OnnxIoError::Write {
        path: path.to_path_buf(),
        source,
    };
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(path).map_err(|e| write_err(e.error))?;
    // Make the rename itself durable. Not every platform or file system can sync a folder,
    // and the data is already safe, so failure here is ignored.
    #[cfg(unix)]
    if let Ok(dir) = File::open(folder) {
        let _ = dir.sync_all();
    }
    #[cfg(not(unix))]
    let _ = folder;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::onnx::tensor_proto::Segment;
    use crate::proto::onnx::{
        attribute_proto::AttributeType, simple_sharded_dim_proto, tensor_shape_proto, type_proto,
        DeviceConfigurationProto, IntIntListEntryProto, NodeDeviceConfigurationProto,
        OperatorSetIdProto, ShardedDimProto, ShardingSpecProto, SimpleShardedDimProto,
        TensorAnnotation, TensorShapeProto, TypeProto, ValueInfoProto,
    };

    // --- builders -------------------------------------------------------------------------

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    fn kv(key: &str, value: &str) -> StringStringEntryProto {
        StringStringEntryProto {
            key: s(key),
            value: s(value),
        }
    }

    fn props(owner: &str) -> Vec<StringStringEntryProto> {
        vec![kv("owner", owner), kv("note", &format!("{owner} note"))]
    }

    /// Deterministic bytes that differ per seed.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn raw(name: &str, dims: &[i64], data_type: DataType, bytes: Vec<u8>) -> TensorProto {
        TensorProto {
            name: s(name),
            dims: dims.to_vec(),
            data_type: Some(data_type as i32),
            raw_data: Some(bytes.into()),
            ..Default::default()
        }
    }

    fn floats(name: &str, n: usize, seed: u64) -> TensorProto {
        raw(name, &[n as i64], DataType::Float, pattern(n * 4, seed))
    }

    fn dim_value(v: i64) -> tensor_shape_proto::Dimension {
        tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(v)),
            denotation: None,
        }
    }

    fn dim_param(p: &str) -> tensor_shape_proto::Dimension {
        tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimParam(p.into())),
            denotation: None,
        }
    }

    fn tensor_type(elem: DataType, dims: Vec<tensor_shape_proto::Dimension>) -> TypeProto {
        TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            denotation: None,
        }
    }

    /// One TypeProto of each variant, with denotations and every kind of dimension.
    fn every_type() -> Vec<TypeProto> {
        let mut batch = dim_value(2);
        batch.denotation = s("DATA_BATCH");
        let unknown = tensor_shape_proto::Dimension::default();
        let mut image = tensor_type(DataType::Float, vec![batch, dim_param("seq"), unknown]);
        image.denotation = s("IMAGE");
        let wrap = |value| TypeProto {
            value: Some(value),
            denotation: None,
        };
        vec![
            image,
            wrap(type_proto::Value::SequenceType(Box::new(
                type_proto::Sequence {
                    elem_type: Some(Box::new(tensor_type(DataType::Int64, vec![]))),
                },
            ))),
            wrap(type_proto::Value::MapType(Box::new(type_proto::Map {
                key_type: Some(DataType::String as i32),
                value_type: Some(Box::new(tensor_type(DataType::Double, vec![dim_value(1)]))),
            }))),
            wrap(type_proto::Value::OptionalType(Box::new(
                type_proto::Optional {
                    elem_type: Some(Box::new(tensor_type(DataType::Bfloat16, vec![]))),
                },
            ))),
            wrap(type_proto::Value::SparseTensorType(
                type_proto::SparseTensor {
                    elem_type: Some(DataType::Float8e4m3fn as i32),
                    shape: Some(TensorShapeProto {
                        dim: vec![dim_value(10), dim_param("n")],
                    }),
                },
            )),
            wrap(type_proto::Value::OpaqueType(type_proto::Opaque {
                domain: s("com.example"),
                name: s("Handle"),
            })),
        ]
    }

    fn value_info(name: &str, ty: TypeProto) -> ValueInfoProto {
        ValueInfoProto {
            name: s(name),
            r#type: Some(ty),
            doc_string: s(&format!("doc of {name}")),
            metadata_props: props(name),
        }
    }

    fn sparse(tag: &str) -> SparseTensorProto {
        SparseTensorProto {
            values: Some(floats(&format!("{tag}_values"), 3, 11)),
            indices: Some(raw("", &[3], DataType::Int64, pattern(24, 12))),
            dims: vec![4, 5],
        }
    }

    /// A small graph with its own initializer and a node carrying a tensor attribute.
    fn subgraph(tag: &str) -> GraphProto {
        GraphProto {
            name: s(tag),
            initializer: vec![floats(&format!("{tag}_w"), 8, 21)],
            node: vec![NodeProto {
                op_type: s("Constant"),
                output: vec![format!("{tag}_c")],
                attribute: vec![AttributeProto {
                    name: s("value"),
                    r#type: Some(AttributeType::Tensor as i32),
                    t: Some(raw("", &[2], DataType::Int32, pattern(8, 22))),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            output: vec![value_info(
                &format!("{tag}_c"),
                tensor_type(DataType::Int32, vec![dim_value(2)]),
            )],
            ..Default::default()
        }
    }

    fn attribute(name: &str, kind: AttributeType) -> AttributeProto {
        AttributeProto {
            name: s(name),
            r#type: Some(kind as i32),
            doc_string: s(&format!("doc of {name}")),
            ..Default::default()
        }
    }

    /// A node with one attribute of every type, an overload, metadata and device annotations.
    fn node_with_every_attribute() -> NodeProto {
        let mut attrs = vec![
            AttributeProto {
                f: Some(0.5),
                ..attribute("f", AttributeType::Float)
            },
            AttributeProto {
                i: Some(-7),
                ..attribute("i", AttributeType::Int)
            },
            AttributeProto {
                s: Some(b"text".to_vec()),
                ..attribute("s", AttributeType::String)
            },
            AttributeProto {
                t: Some(floats("attr_t", 4, 31)),
                ..attribute("t", AttributeType::Tensor)
            },
            AttributeProto {
                g: Some(subgraph("then_branch")),
                ..attribute("g", AttributeType::Graph)
            },
            AttributeProto {
                sparse_tensor: Some(sparse("attr_sparse")),
                ..attribute("sparse_tensor", AttributeType::SparseTensor)
            },
            AttributeProto {
                tp: Some(every_type()[2].clone()),
                ..attribute("tp", AttributeType::TypeProto)
            },
            AttributeProto {
                floats: vec![1.0, -2.5],
                ..attribute("floats", AttributeType::Floats)
            },
            AttributeProto {
                ints: vec![1, -2, 3],
                ..attribute("ints", AttributeType::Ints)
            },
            AttributeProto {
                strings: vec![b"a".to_vec(), b"bc".to_vec()],
                ..attribute("strings", AttributeType::Strings)
            },
            AttributeProto {
                tensors: vec![floats("attr_t0", 2, 32), floats("", 3, 33)],
                ..attribute("tensors", AttributeType::Tensors)
            },
            AttributeProto {
                graphs: vec![subgraph("body_a"), subgraph("body_b")],
                ..attribute("graphs", AttributeType::Graphs)
            },
            AttributeProto {
                sparse_tensors: vec![sparse("attr_sparse0")],
                ..attribute("sparse_tensors", AttributeType::SparseTensors)
            },
            AttributeProto {
                type_protos: every_type(),
                ..attribute("type_protos", AttributeType::TypeProtos)
            },
        ];
        attrs.push(AttributeProto {
            ref_attr_name: s("alpha"),
            ..attribute("alpha", AttributeType::Float)
        });
        NodeProto {
            input: vec!["x".into(), String::new(), "w".into()],
            output: vec!["y".into()],
            name: s("everything"),
            op_type: s("Custom"),
            domain: s("com.example"),
            overload: s("v2"),
            attribute: attrs,
            doc_string: s("a node with every attribute"),
            metadata_props: props("node"),
            device_configurations: vec![NodeDeviceConfigurationProto {
                configuration_id: s("two_gpus"),
                sharding_spec: vec![ShardingSpecProto {
                    tensor_name: s("x"),
                    device: vec![0, 1, 100],
                    index_to_device_group_map: vec![IntIntListEntryProto {
                        key: Some(100),
                        value: vec![0, 1],
                    }],
                    sharded_dim: vec![ShardedDimProto {
                        axis: Some(-1),
                        simple_sharding: vec![
                            SimpleShardedDimProto {
                                dim: Some(simple_sharded_dim_proto::Dim::DimValue(64)),
                                num_shards: Some(2),
                            },
                            SimpleShardedDimProto {
                                dim: Some(simple_sharded_dim_proto::Dim::DimParam("seq".into())),
                                num_shards: Some(2),
                            },
                        ],
                    }],
                }],
                pipeline_stage: Some(1),
            }],
        }
    }

    /// Typed-field tensors (never moved to external data) and some odd raw ones.
    fn typed_tensors() -> Vec<TensorProto> {
        vec![
            TensorProto {
                name: s("typed_f"),
                dims: vec![2],
                data_type: Some(DataType::Float as i32),
                float_data: vec![1.5, -0.25],
                doc_string: s("float_data"),
                metadata_props: props("typed_f"),
                ..Default::default()
            },
            TensorProto {
                name: s("typed_i32"),
                dims: vec![3],
                data_type: Some(DataType::Int8 as i32),
                int32_data: vec![-1, 0, 127],
                ..Default::default()
            },
            TensorProto {
                name: s("typed_str"),
                dims: vec![2],
                data_type: Some(DataType::String as i32),
                string_data: vec![b"x".to_vec(), vec![0xff, 0]],
                ..Default::default()
            },
            TensorProto {
                name: s("typed_i64"),
                dims: vec![1],
                data_type: Some(DataType::Int64 as i32),
                int64_data: vec![i64::MIN],
                ..Default::default()
            },
            TensorProto {
                name: s("typed_f64"),
                dims: vec![1],
                data_type: Some(DataType::Double as i32),
                double_data: vec![std::f64::consts::PI],
                ..Default::default()
            },
            TensorProto {
                name: s("typed_u64"),
                dims: vec![1],
                data_type: Some(DataType::Uint64 as i32),
                uint64_data: vec![u64::MAX],
                ..Default::default()
            },
            TensorProto {
                segment: Some(Segment {
                    begin: Some(0),
                    end: Some(2),
                }),
                ..raw("segmented", &[4], DataType::Float16, pattern(4, 41))
            },
            raw("packed_int4", &[3], DataType::Int4, pattern(2, 42)),
            raw("empty", &[0], DataType::Float, Vec::new()),
            raw("scalar_f4", &[], DataType::Float4e2m1, pattern(1, 43)),
        ]
    }

    fn function() -> FunctionProto {
        FunctionProto {
            name: s("Scale"),
            input: vec!["a".into()],
            output: vec!["b".into()],
            attribute: vec!["plain".into()],
            attribute_proto: vec![AttributeProto {
                t: Some(floats("default_scale", 2, 51)),
                ..attribute("scale", AttributeType::Tensor)
            }],
            node: vec![NodeProto {
                op_type: s("Mul"),
                input: vec!["a".into(), "k".into()],
                output: vec!["b".into()],
                attribute: vec![AttributeProto {
                    t: Some(raw("", &[1], DataType::Float, pattern(4, 52))),
                    ..attribute("value", AttributeType::Tensor)
                }],
                metadata_props: props("function node"),
                ..Default::default()
            }],
            doc_string: s("multiplies"),
            opset_import: vec![OperatorSetIdProto {
                domain: s(""),
                version: Some(21),
            }],
            domain: s("com.example"),
            overload: s("v2"),
            value_info: vec![value_info("k", every_type()[0].clone())],
            metadata_props: props("function"),
        }
    }

    /// A model that sets every message type and most fields.
    fn full_model() -> ModelProto {
        let types = every_type();
        let mut initializer = vec![
            floats("w", 64, 1),
            raw("b", &[2, 3], DataType::Float16, pattern(12, 2)),
            raw("big", &[300], DataType::Uint8, pattern(300, 3)),
        ];
        initializer[0].doc_string = s("weight");
        initializer[0].metadata_props = props("w");
        initializer.extend(typed_tensors());
        let graph = GraphProto {
            node: vec![node_with_every_attribute()],
            name: s("main"),
            initializer,
            sparse_initializer: vec![sparse("sp")],
            doc_string: s("the main graph"),
            input: vec![value_info("x", types[0].clone())],
            output: vec![value_info("y", types[0].clone())],
            value_info: types
                .iter()
                .enumerate()
                .map(|(i, t)| value_info(&format!("v{i}"), t.clone()))
                .collect(),
            quantization_annotation: vec![TensorAnnotation {
                tensor_name: s("y"),
                quant_parameter_tensor_names: vec![
                    kv("SCALE_TENSOR", "y_scale"),
                    kv("ZERO_POINT_TENSOR", "y_zp"),
                ],
            }],
            metadata_props: props("graph"),
        };
        ModelProto {
            ir_version: Some(11),
            opset_import: vec![
                OperatorSetIdProto {
                    domain: s(""),
                    version: Some(21),
                },
                OperatorSetIdProto {
                    domain: s("com.example"),
                    version: Some(1),
                },
            ],
            producer_name: s("bidora-tests"),
            producer_version: s("0.1"),
            domain: s("org.bidora"),
            model_version: Some(3),
            doc_string: s("everything at once"),
            graph: Some(graph),
            metadata_props: props("model"),
            training_info: vec![TrainingInfoProto {
                initialization: Some(subgraph("init")),
                algorithm: Some(subgraph("step")),
                initialization_binding: vec![kv("w", "init_w")],
                update_binding: vec![kv("w", "step_w")],
            }],
            functions: vec![function()],
            configuration: vec![DeviceConfigurationProto {
                name: s("two_gpus"),
                num_devices: Some(2),
                device: vec!["cuda:0".into(), "cuda:1".into()],
            }],
        }
    }

    fn minimal_model(initializer: Vec<TensorProto>) -> ModelProto {
        ModelProto {
            ir_version: Some(10),
            opset_import: vec![OperatorSetIdProto {
                domain: s(""),
                version: Some(17),
            }],
            graph: Some(GraphProto {
                name: s("g"),
                initializer,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn external(
        name: &str,
        dims: &[i64],
        data_type: DataType,
        entries: &[(&str, &str)],
    ) -> TensorProto {
        TensorProto {
            name: s(name),
            dims: dims.to_vec(),
            data_type: Some(data_type as i32),
            external_data: entries.iter().map(|(k, v)| kv(k, v)).collect(),
            data_location: Some(DataLocation::External as i32),
            ..Default::default()
        }
    }

    /// Writes `model` as-is (external references untouched) to `dir/model.onnx`.
    fn save(dir: &Path, model: &ModelProto) -> PathBuf {
        let path = dir.join("model.onnx");
        fs::write(&path, encode_model(model)).unwrap();
        path
    }

    fn read_one(dir: &Path, tensor: TensorProto) -> Result<ModelProto> {
        read_model(&save(dir, &minimal_model(vec![tensor])))
    }

    fn all_tensors(model: &ModelProto) -> Vec<TensorProto> {
        let mut out = Vec::new();
        visit_model(model, &mut |t, _| {
            out.push(t.clone());
            Ok(())
        })
        .unwrap();
        out
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    // --- schema ---------------------------------------------------------------------------

    #[test]
    fn round_trip_keeps_every_field() {
        let model = full_model();
        let bytes = encode_model(&model);
        let decoded = decode_model(&bytes, Path::new("full.onnx")).unwrap();
        assert_eq!(decoded, model);
        assert_eq!(encode_model(&decoded), bytes);
        // The builder really reaches tensors everywhere (graph, sparse, attributes, subgraphs,
        // functions, training graphs).
        assert!(all_tensors(&model).len() > 30);
    }

    fn key(field: u32, wire: u32) -> Vec<u8> {
        let mut v = u64::from(field << 3 | wire);
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    /// Field numbers of the official onnx.proto, checked on the wire (only that field set).
    #[test]
    fn field_numbers_match_onnx() {
        const LEN: u32 = 2;
        const VARINT: u32 = 0;
        let some = || Some(String::new());
        let cases: Vec<(&str, Vec<u8>, u32, u32)> = vec![
            (
                "ModelProto.training_info",
                ModelProto {
                    training_info: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                20,
                LEN,
            ),
            (
                "ModelProto.functions",
                ModelProto {
                    functions: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                25,
                LEN,
            ),
            (
                "ModelProto.configuration",
                ModelProto {
                    configuration: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                26,
                LEN,
            ),
            (
                "ModelProto.metadata_props",
                ModelProto {
                    metadata_props: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                14,
                LEN,
            ),
            (
                "NodeProto.overload",
                NodeProto {
                    overload: some(),
                    ..Default::default()
                }
                .encode_to_vec(),
                8,
                LEN,
            ),
            (
                "NodeProto.metadata_props",
                NodeProto {
                    metadata_props: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                9,
                LEN,
            ),
            (
                "NodeProto.device_configurations",
                NodeProto {
                    device_configurations: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                10,
                LEN,
            ),
            (
                "GraphProto.sparse_initializer",
                GraphProto {
                    sparse_initializer: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                15,
                LEN,
            ),
            (
                "GraphProto.metadata_props",
                GraphProto {
                    metadata_props: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                16,
                LEN,
            ),
            (
                "TensorProto.external_data",
                TensorProto {
                    external_data: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                13,
                LEN,
            ),
            (
                "TensorProto.data_location",
                TensorProto {
                    data_location: Some(1),
                    ..Default::default()
                }
                .encode_to_vec(),
                14,
                VARINT,
            ),
            (
                "TensorProto.metadata_props",
                TensorProto {
                    metadata_props: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                16,
                LEN,
            ),
            (
                "TensorProto.uint64_data",
                TensorProto {
                    uint64_data: vec![1],
                    ..Default::default()
                }
                .encode_to_vec(),
                11,
                LEN, // packed
            ),
            (
                "ValueInfoProto.metadata_props",
                ValueInfoProto {
                    metadata_props: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                4,
                LEN,
            ),
            (
                "AttributeProto.type",
                AttributeProto {
                    r#type: Some(1),
                    ..Default::default()
                }
                .encode_to_vec(),
                20,
                VARINT,
            ),
            (
                "AttributeProto.ref_attr_name",
                AttributeProto {
                    ref_attr_name: some(),
                    ..Default::default()
                }
                .encode_to_vec(),
                21,
                LEN,
            ),
            (
                "AttributeProto.sparse_tensor",
                AttributeProto {
                    sparse_tensor: Some(Default::default()),
                    ..Default::default()
                }
                .encode_to_vec(),
                22,
                LEN,
            ),
            (
                "AttributeProto.sparse_tensors",
                AttributeProto {
                    sparse_tensors: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                23,
                LEN,
            ),
            (
                "AttributeProto.tp",
                AttributeProto {
                    tp: Some(Default::default()),
                    ..Default::default()
                }
                .encode_to_vec(),
                14,
                LEN,
            ),
            (
                "AttributeProto.type_protos",
                AttributeProto {
                    type_protos: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                15,
                LEN,
            ),
            (
                "AttributeProto.ints (not packed in proto2)",
                AttributeProto {
                    ints: vec![1],
                    ..Default::default()
                }
                .encode_to_vec(),
                8,
                VARINT,
            ),
            (
                "TypeProto.optional_type",
                TypeProto {
                    value: Some(type_proto::Value::OptionalType(Default::default())),
                    denotation: None,
                }
                .encode_to_vec(),
                9,
                LEN,
            ),
            (
                "TypeProto.sparse_tensor_type",
                TypeProto {
                    value: Some(type_proto::Value::SparseTensorType(Default::default())),
                    denotation: None,
                }
                .encode_to_vec(),
                8,
                LEN,
            ),
            (
                "TypeProto.opaque_type",
                TypeProto {
                    value: Some(type_proto::Value::OpaqueType(Default::default())),
                    denotation: None,
                }
                .encode_to_vec(),
                7,
                LEN,
            ),
            (
                "FunctionProto.attribute_proto",
                FunctionProto {
                    attribute_proto: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                11,
                LEN,
            ),
            (
                "FunctionProto.value_info",
                FunctionProto {
                    value_info: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                12,
                LEN,
            ),
            (
                "FunctionProto.overload",
                FunctionProto {
                    overload: some(),
                    ..Default::default()
                }
                .encode_to_vec(),
                13,
                LEN,
            ),
            (
                "FunctionProto.metadata_props",
                FunctionProto {
                    metadata_props: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                14,
                LEN,
            ),
            (
                "NodeDeviceConfigurationProto.pipeline_stage",
                NodeDeviceConfigurationProto {
                    pipeline_stage: Some(1),
                    ..Default::default()
                }
                .encode_to_vec(),
                3,
                VARINT,
            ),
            (
                "ShardingSpecProto.sharded_dim",
                ShardingSpecProto {
                    sharded_dim: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                4,
                LEN,
            ),
            (
                "SimpleShardedDimProto.num_shards",
                SimpleShardedDimProto {
                    num_shards: Some(1),
                    dim: None,
                }
                .encode_to_vec(),
                3,
                VARINT,
            ),
            (
                "DeviceConfigurationProto.device",
                DeviceConfigurationProto {
                    device: vec![String::new()],
                    ..Default::default()
                }
                .encode_to_vec(),
                3,
                LEN,
            ),
            (
                "TrainingInfoProto.update_binding",
                TrainingInfoProto {
                    update_binding: vec![Default::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
                4,
                LEN,
            ),
        ];
        for (what, bytes, field, wire) in cases {
            assert!(
                bytes.starts_with(&key(field, wire)),
                "{what}: expected field {field} wire type {wire}, got bytes {bytes:?}"
            );
        }
    }

    #[test]
    fn enum_values_match_onnx() {
        let data_types = [
            (DataType::Bfloat16, 16),
            (DataType::Float8e4m3fn, 17),
            (DataType::Float8e4m3fnuz, 18),
            (DataType::Float8e5m2, 19),
            (DataType::Float8e5m2fnuz, 20),
            (DataType::Uint4, 21),
            (DataType::Int4, 22),
            (DataType::Float4e2m1, 23),
            (DataType::Float8e8m0, 24),
            (DataType::Uint2, 25),
            (DataType::Int2, 26),
        ];
        for (dt, v) in data_types {
            assert_eq!(dt as i32, v, "{dt:?}");
        }
        let attr_types = [
            (AttributeType::SparseTensor, 11),
            (AttributeType::SparseTensors, 12),
            (AttributeType::TypeProto, 13),
            (AttributeType::TypeProtos, 14),
        ];
        for (at, v) in attr_types {
            assert_eq!(at as i32, v, "{at:?}");
        }
        assert_eq!(DataLocation::External as i32, 1);
        assert_eq!(crate::proto::onnx::Version::IrVersion20250512 as i32, 11);
        assert_eq!(crate::proto::onnx::Version::IrVersion20250826 as i32, 12);
        assert_eq!(crate::proto::onnx::OperatorStatus::Stable as i32, 1);
    }

    // --- decoding ---------------------------------------------------------------------------

    #[test]
    fn truncated_and_garbage_bytes_are_errors() {
        let bytes = encode_model(&full_model());
        let origin = Path::new("x.onnx");

        let err = decode_model(&bytes[..bytes.len() / 2], origin).unwrap_err();
        assert!(matches!(err, OnnxIoError::Decode { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("`x.onnx` is not a valid ONNX model"),
            "{msg}"
        );
        assert!(msg.contains("failed to decode"), "{msg}");

        // Every cut point: an error or (at a field boundary) a shorter model, never a panic.
        for cut in 0..bytes.len() {
            let _ = decode_model(&bytes[..cut], origin);
        }

        for seed in 0..64 {
            let garbage = pattern(4096, seed);
            assert!(decode_model(&garbage, origin).is_err(), "seed {seed}");
        }
        let err = decode_model(b"", origin).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = decode_model(b"<html>not a model</html>", origin).unwrap_err();
        assert!(err.to_string().contains("x.onnx"), "{err}");
    }

    #[test]
    fn models_without_version_or_graph_are_refused() {
        let origin = Path::new("m.onnx");
        let mut m = minimal_model(vec![]);
        m.graph = None;
        let err = decode_model(&encode_model(&m), origin).unwrap_err();
        assert!(err.to_string().contains("no graph"), "{err}");

        let mut m = minimal_model(vec![]);
        m.ir_version = Some(0);
        let err = decode_model(&encode_model(&m), origin).unwrap_err();
        assert!(err.to_string().contains("ir_version"), "{err}");

        m.ir_version = None;
        assert!(matches!(
            decode_model(&encode_model(&m), origin),
            Err(OnnxIoError::Invalid { .. })
        ));
    }

    #[test]
    fn missing_model_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.onnx");
        let err = read_model(&path).unwrap_err();
        assert!(matches!(err, OnnxIoError::Read { .. }), "{err}");
        assert!(err.to_string().contains("nope.onnx"), "{err}");
    }

    // --- writing and reading back -------------------------------------------------------------

    #[test]
    fn embedded_write_reads_back_identical() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        let model = full_model();
        write_model(&model, &path, &WriteOptions::default()).unwrap();
        assert_eq!(names_in(dir.path()), ["model.onnx"]);
        assert_eq!(read_model(&path).unwrap(), model);
        assert_eq!(fs::read(&path).unwrap(), encode_model(&model));
    }

    #[test]
    fn external_write_reads_back_identical() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        let model = full_model();
        write_model(&model, &path, &WriteOptions::external(0)).unwrap();
        assert_eq!(names_in(dir.path()), ["model.data", "model.onnx"]);

        // On disk every raw payload went external, at 64-byte aligned offsets.
        let on_disk = decode_model(&fs::read(&path).unwrap(), &path).unwrap();
        let before = all_tensors(&model);
        let after = all_tensors(&on_disk);
        assert_eq!(before.len(), after.len());
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if let Some(payload) = &b.raw_data {
                moved += 1;
                assert_eq!(a.data_location, Some(DataLocation::External as i32));
                assert!(a.raw_data.is_none());
                let ext = parse_external_entries(&a.external_data).unwrap();
                assert_eq!(ext.location, "model.data");
                assert_eq!(ext.offset % EXTERNAL_ALIGNMENT, 0);
                assert_eq!(ext.length, Some(payload.len() as u64));
            } else {
                assert_eq!(a, b);
            }
        }
        assert!(moved > 20, "{moved}");

        assert_eq!(read_model(&path).unwrap(), model);
    }

    #[test]
    fn threshold_keeps_small_tensors_embedded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.onnx");
        let model = full_model();
        let opts = WriteOptions {
            external_data_threshold: 256,
            external_file_name: Some("weights.bin".into()),
        };
        write_model(&model, &path, &opts).unwrap();
        assert_eq!(names_in(dir.path()), ["net.onnx", "weights.bin"]);
        let on_disk = decode_model(&fs::read(&path).unwrap(), &path).unwrap();
        for t in all_tensors(&on_disk) {
            let external = t.data_location == Some(DataLocation::External as i32);
            let name = t.name.as_deref().unwrap_or_default();
            assert_eq!(external, name == "w" || name == "big", "{name}");
        }
        assert_eq!(read_model(&path).unwrap(), model);
    }

    #[test]
    fn many_tensors_share_one_data_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        let tensors: Vec<_> = (0..600)
            .map(|i| floats(&format!("t{i}"), 61 + i % 7, i as u64))
            .collect();
        let model = minimal_model(tensors);
        write_model(&model, &path, &WriteOptions::external(0)).unwrap();
        assert_eq!(names_in(dir.path()), ["model.data", "model.onnx"]);
        assert_eq!(read_model(&path).unwrap(), model);
    }

    #[test]
    fn bad_external_file_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        let model = full_model();
        for name in [
            "",
            ".",
            "..",
            "../x.data",
            "sub/x.data",
            "a\\b",
            "model.onnx",
        ] {
            let opts = WriteOptions {
                external_data_threshold: 0,
                external_file_name: Some(name.into()),
            };
            let err = write_model(&model, &path, &opts).unwrap_err();
            assert!(
                matches!(err, OnnxIoError::Unwritable { .. }),
                "{name}: {err}"
            );
        }
        assert!(names_in(dir.path()).is_empty());
    }

    #[test]
    fn writes_are_atomic_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/folder/model.onnx");
        let err = write_model(&full_model(), &missing, &WriteOptions::external(0)).unwrap_err();
        assert!(matches!(err, OnnxIoError::Write { .. }), "{err}");
        assert!(names_in(dir.path()).is_empty());

        // Overwriting replaces both files in place.
        let path = dir.path().join("model.onnx");
        write_model(
            &minimal_model(vec![floats("a", 512, 1)]),
            &path,
            &WriteOptions::external(0),
        )
        .unwrap();
        let second = minimal_model(vec![floats("b", 300, 2)]);
        write_model(&second, &path, &WriteOptions::external(0)).unwrap();
        assert_eq!(names_in(dir.path()), ["model.data", "model.onnx"]);
        assert_eq!(read_model(&path).unwrap(), second);

        // A model that cannot be written leaves the existing files untouched.
        let unloaded = minimal_model(vec![external(
            "u",
            &[1],
            DataType::Float,
            &[("location", "model.data")],
        )]);
        let before = fs::read(&path).unwrap();
        let err = write_model(&unloaded, &path, &WriteOptions::external(0)).unwrap_err();
        assert!(
            err.to_string().contains("still refers to external data"),
            "{err}"
        );
        let err = write_model(&unloaded, &path, &WriteOptions::default()).unwrap_err();
        assert!(matches!(err, OnnxIoError::Unwritable { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_eq!(names_in(dir.path()), ["model.data", "model.onnx"]);
    }

    #[test]
    fn auto_embeds_small_models() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        let model = full_model();
        assert_eq!(WriteOptions::auto(&model), WriteOptions::embedded());
        assert_eq!(
            write_model_auto(&model, &path).unwrap(),
            WriteOptions::embedded()
        );
        assert_eq!(names_in(dir.path()), ["model.onnx"]);
        assert_eq!(read_model(&path).unwrap(), model);
    }

    #[cfg(unix)]
    #[test]
    fn written_files_are_not_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        write_model(&full_model(), &path, &WriteOptions::external(0)).unwrap();
        for name in ["model.onnx", "model.data"] {
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            // Owner read/write always; the group/other bits follow the umask, not 0600.
            assert_eq!(mode & 0o600, 0o600, "{name}: {mode:o}");
        }
    }

    // --- external data: reading and refusals ----------------------------------------------------

    #[test]
    fn length_defaults_to_dims_times_element_size() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(16, 5);
        fs::write(dir.path().join("w.bin"), &data).unwrap();
        let model = read_model(&save(
            dir.path(),
            &minimal_model(vec![
                external("h", &[3], DataType::Float16, &[("location", "w.bin")]),
                external(
                    "q",
                    &[3],
                    DataType::Int4,
                    &[("location", "w.bin"), ("offset", "6")],
                ),
                external(
                    "c",
                    &[1],
                    DataType::Complex64,
                    &[("location", "./w.bin"), ("offset", "8")],
                ),
            ]),
        ))
        .unwrap();
        let g = model.graph.unwrap();
        assert_eq!(g.initializer[0].raw_data.as_deref(), Some(&data[..6]));
        assert_eq!(g.initializer[1].raw_data.as_deref(), Some(&data[6..8]));
        assert_eq!(g.initializer[2].raw_data.as_deref(), Some(&data[8..16]));
        for t in &g.initializer {
            assert!(t.external_data.is_empty());
            assert_eq!(t.data_location, None);
        }
    }

    #[test]
    fn parent_dir_locations_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("m");
        fs::create_dir(&dir).unwrap();
        fs::write(root.path().join("x.bin"), [0u8; 16]).unwrap();
        for location in ["../x.bin", "sub/../../x.bin", "..\\x.bin", "./../x.bin"] {
            let t = external("w", &[4], DataType::Float, &[("location", location)]);
            let err = read_one(&dir, t).unwrap_err();
            assert!(
                matches!(err, OnnxIoError::UnsafeExternalPath { .. }),
                "{location}: {err}"
            );
            assert!(err.to_string().contains(".."), "{err}");
        }
    }

    #[test]
    fn absolute_locations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
        let inside = dir.path().join("w.bin").to_string_lossy().into_owned();
        for location in [
            "/abs/x.bin",
            inside.as_str(),
            "C:\\x.bin",
            "\\\\server\\x.bin",
        ] {
            let t = external("w", &[4], DataType::Float, &[("location", location)]);
            let err = read_one(dir.path(), t).unwrap_err();
            assert!(
                matches!(err, OnnxIoError::UnsafeExternalPath { .. }),
                "{location}: {err}"
            );
            assert!(err.to_string().contains("absolute"), "{err}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_leaving_the_folder_are_refused() {
        use std::os::unix::fs::symlink;
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret.bin"), [7u8; 16]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        symlink(
            outside.path().join("secret.bin"),
            dir.path().join("link.bin"),
        )
        .unwrap();
        symlink(outside.path(), dir.path().join("linked_dir")).unwrap();
        for location in ["link.bin", "linked_dir/secret.bin"] {
            let t = external("w", &[4], DataType::Float, &[("location", location)]);
            let err = read_one(dir.path(), t).unwrap_err();
            assert!(
                matches!(err, OnnxIoError::UnsafeExternalPath { .. }),
                "{location}: {err}"
            );
            assert!(
                err.to_string().contains("outside the model's folder"),
                "{err}"
            );
        }

        // A link that stays inside the folder is fine.
        fs::create_dir(dir.path().join("data")).unwrap();
        fs::write(dir.path().join("data/real.bin"), [1u8; 16]).unwrap();
        symlink("data/real.bin", dir.path().join("alias.bin")).unwrap();
        let t = external("w", &[4], DataType::Float, &[("location", "alias.bin")]);
        let model = read_one(dir.path(), t).unwrap();
        assert_eq!(
            model.graph.unwrap().initializer[0].raw_data,
            Some(vec![1u8; 16].into())
        );
    }

    #[test]
    fn missing_external_file_names_tensor_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = external(
            "weight_q",
            &[4],
            DataType::Float,
            &[("location", "absent.bin")],
        );
        let err = read_one(dir.path(), t).unwrap_err();
        assert!(
            matches!(err, OnnxIoError::MissingExternalFile { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("weight_q") && msg.contains("absent.bin"),
            "{msg}"
        );
        assert!(msg.contains("model.onnx"), "{msg}");

        // Unnamed tensors are described by where they sit.
        let mut model = minimal_model(vec![]);
        model.graph.as_mut().unwrap().node.push(NodeProto {
            name: s("const_7"),
            op_type: s("Constant"),
            attribute: vec![AttributeProto {
                t: Some(external(
                    "",
                    &[1],
                    DataType::Float,
                    &[("location", "gone.bin")],
                )),
                ..attribute("value", AttributeType::Tensor)
            }],
            ..Default::default()
        });
        let err = read_model(&save(dir.path(), &model)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("attribute 'value' of node 'const_7'"), "{msg}");
    }

    #[test]
    fn ranges_past_the_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
        let t = external(
            "w",
            &[4],
            DataType::Float,
            &[("location", "w.bin"), ("offset", "8"), ("length", "16")],
        );
        match read_one(dir.path(), t).unwrap_err() {
            OnnxIoError::ExternalOutOfBounds {
                offset,
                length,
                file_size,
                tensor,
                ..
            } => assert_eq!(
                (offset, length, file_size, tensor.as_str()),
                (8, 16, 16, "w")
            ),
            other => panic!("{other}"),
        }
        // Inferred length past the end, and an offset beyond the file.
        let t = external("w", &[8], DataType::Float, &[("location", "w.bin")]);
        assert!(matches!(
            read_one(dir.path(), t),
            Err(OnnxIoError::ExternalOutOfBounds { .. })
        ));
        let t = external(
            "w",
            &[0],
            DataType::Float,
            &[("location", "w.bin"), ("offset", "17")],
        );
        assert!(matches!(
            read_one(dir.path(), t),
            Err(OnnxIoError::ExternalOutOfBounds { .. })
        ));
    }

    #[test]
    fn huge_declared_sizes_fail_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
        let huge = (1u64 << 60).to_string();
        let cases = [
            external(
                "a",
                &[1 << 60],
                DataType::Uint8,
                &[("location", "w.bin"), ("length", &huge)],
            ),
            external(
                "b",
                &[],
                DataType::Undefined,
                &[("location", "w.bin"), ("length", &huge)],
            ),
            external(
                "c",
                &[1],
                DataType::Uint8,
                &[
                    ("location", "w.bin"),
                    ("offset", &u64::MAX.to_string()),
                    ("length", "1"),
                ],
            ),
            external(
                "d",
                &[1 << 20, 1 << 20],
                DataType::Double,
                &[("location", "w.bin")],
            ),
        ];
        for t in cases {
            let name = t.name.clone().unwrap();
            let err = read_one(dir.path(), t).unwrap_err();
            assert!(
                matches!(err, OnnxIoError::ExternalOutOfBounds { .. }),
                "{name}: {err}"
            );
        }
        // Element counts that overflow u64 are caught by the checked arithmetic.
        let t = external(
            "e",
            &[1 << 40, 1 << 40],
            DataType::Float,
            &[("location", "w.bin")],
        );
        let err = read_one(dir.path(), t).unwrap_err();
        assert!(matches!(err, OnnxIoError::ExternalData { .. }), "{err}");
    }

    #[test]
    fn malformed_external_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("folder")).unwrap();
        fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
        let cases: Vec<(TensorProto, &str)> = vec![
            (
                external("a", &[1], DataType::Float, &[("offset", "0")]),
                "no `location`",
            ),
            (
                external("b", &[1], DataType::Float, &[("location", "")]),
                "no `location`",
            ),
            (
                external(
                    "c",
                    &[1],
                    DataType::Float,
                    &[("location", "w.bin"), ("offset", "abc")],
                ),
                "not a non-negative integer",
            ),
            (
                external(
                    "d",
                    &[1],
                    DataType::Float,
                    &[("location", "w.bin"), ("length", "-4")],
                ),
                "not a non-negative integer",
            ),
            (
                external(
                    "e",
                    &[1],
                    DataType::Float,
                    &[("location", "w.bin"), ("location", "w.bin")],
                ),
                "more than once",
            ),
            (
                external(
                    "f",
                    &[2],
                    DataType::Float,
                    &[("location", "w.bin"), ("length", "4")],
                ),
                "does not match",
            ),
            (
                external("g", &[1], DataType::String, &[("location", "w.bin")]),
                "STRING",
            ),
            (
                external("h", &[1], DataType::Undefined, &[("location", "w.bin")]),
                "no length",
            ),
            (
                external("i", &[-1], DataType::Float, &[("location", "w.bin")]),
                "negative",
            ),
        ];
        for (t, needle) in cases {
            let name = t.name.clone().unwrap();
            let err = read_one(dir.path(), t).unwrap_err();
            assert!(
                matches!(err, OnnxIoError::ExternalData { .. }),
                "{name}: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(needle) && msg.contains(&format!("`{name}`")),
                "{msg}"
            );
        }
        let t = external("j", &[1], DataType::Float, &[("location", "folder")]);
        let err = read_one(dir.path(), t).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
