use super::*;

// ---------------------------------------------------------------------------------------------
// Reading.

/// Reads a model file and loads all of its external data into `raw_data`.
///
/// Files of at least [`mapped::MAP_THRESHOLD`] bytes (the model file and its external data)
/// are memory-mapped, not read: tensors are slices of the mapping (see [`mapped`]).
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let read_err = |source| OnnxIoError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let bytes = if meta.is_file() && meta.len() >= mapped::MAP_THRESHOLD {
        mapped::map(&file).map_err(read_err)?
    } else {
        let mut buf = Vec::new();
        (&file).read_to_end(&mut buf).map_err(read_err)?;
        buf.into()
    };
    let mut model = decode_model_shared(bytes, path)?;
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
pub(super) struct ExternalRef {
    pub(super) location: String,
    pub(super) offset: u64,
    pub(super) length: Option<u64>,
}

pub(super) struct OpenFile {
    file: File,
    size: u64,
    /// The whole file, mapped, when it is large enough (see [`mapped`]).
    map: Option<bytes::Bytes>,
}

/// Resolves and reads external data, opening each file once.
pub(super) struct ExternalLoader<'a> {
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
                let map = if size >= mapped::MAP_THRESHOLD {
                    Some(mapped::map(&file).map_err(io_err)?)
                } else {
                    None
                };
                e.insert(OpenFile { file, size, map })
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
        if let Some(map) = &open.map {
            // In bounds (checked above), and the map covers the whole file.
            let start = ext.offset as usize;
            t.raw_data = Some(map.slice(start..start + len));
            t.external_data.clear();
            t.data_location = None;
            return Ok(());
        }
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
pub(super) fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Name of a tensor for messages, or a description of where an unnamed one sits.
pub(super) fn tensor_label(t: &TensorProto, site: &dyn Fn() -> String) -> String {
    match t.name.as_deref() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => format!("<unnamed, {}>", site()),
    }
}

pub(super) fn parse_external_entries(
    entries: &[StringStringEntryProto],
) -> Result<ExternalRef, String> {
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
pub(super) fn check_location(location: &str) -> Result<&Path, &'static str> {
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
pub(super) fn data_type_name(data_type: Option<i32>) -> String {
    match data_type {
        None => "(unset)".into(),
        Some(v) => DataType::try_from(v)
            .map(|d| d.as_str_name().to_string())
            .unwrap_or_else(|_| v.to_string()),
    }
}

/// Bits per element of a data type; `None` for STRING, UNDEFINED and unknown values.
pub(super) fn element_bits(data_type: i32) -> Option<u64> {
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
pub(super) fn expected_byte_len(t: &TensorProto) -> Result<Option<u64>, String> {
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
