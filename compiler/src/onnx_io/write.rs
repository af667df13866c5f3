use super::*;

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
        model_path: path.to_path_buf(),
        folder,
        data_path: folder.join(&data_name),
        location: data_name,
        threshold: opts.external_data_threshold,
        out: None,
        position: 0,
        stored: HashMap::new(),
    };
    let stripped = map_model(model, &mut |t, site| sink.place(t, site))?;
    let bytes = encode_model(&stripped);
    drop(stripped);
    check_size(&bytes, path)?;
    sink.commit()?;
    write_atomically(path, folder, &bytes)
}

/// Writes several models into one folder, their tensors of at least `threshold` bytes in one
/// external data file `data_name` that every model references: a tensor several models
/// share (same name, same bytes: the frozen weights every program of an artifact holds) is
/// stored once. Each file is written atomically, the data file first; on error no partial
/// file is left behind (files already renamed into place stay, so callers stage the folder).
pub fn write_models_sharing_data(
    folder: &Path,
    models: &[(&str, &ModelProto)],
    data_name: &str,
    threshold: usize,
) -> Result<()> {
    let data_path = folder.join(data_name);
    let mut sink = DataSink {
        model_path: data_path.clone(),
        folder,
        data_path: data_path.clone(),
        location: data_name.to_string(),
        threshold,
        out: None,
        position: 0,
        stored: HashMap::new(),
    };
    let mut encoded = Vec::with_capacity(models.len());
    for (file, model) in models {
        let path = folder.join(file);
        check_data_file_name(data_name, file).map_err(|r| OnnxIoError::Unwritable {
            path: path.clone(),
            reason: format!("external data file name `{data_name}`: {r}"),
        })?;
        sink.model_path = path.clone();
        let stripped = map_model(model, &mut |t, site| sink.place(t, site))?;
        let bytes = encode_model(&stripped);
        drop(stripped);
        check_size(&bytes, &path)?;
        encoded.push((path, bytes));
    }
    sink.commit()?;
    for (path, bytes) in encoded {
        write_atomically(&path, folder, &bytes)?;
    }
    Ok(())
}

pub(super) fn refuse_unloaded(
    t: &TensorProto,
    site: &dyn Fn() -> String,
    path: &Path,
) -> Result<()> {
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

pub(super) fn check_size(bytes: &[u8], path: &Path) -> Result<()> {
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

pub(super) fn check_data_file_name(name: &str, model_name: &str) -> Result<(), &'static str> {
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
pub(super) struct DataSink<'a> {
    /// The model being written, for messages.
    model_path: PathBuf,
    folder: &'a Path,
    data_path: PathBuf,
    location: String,
    threshold: usize,
    out: Option<BufWriter<NamedTempFile>>,
    position: u64,
    /// Payloads already written, by (tensor name, length): their bytes and offset, so that a
    /// tensor several models share is stored once.
    stored: HashMap<(String, usize), Vec<(bytes::Bytes, u64)>>,
}

impl DataSink<'_> {
    /// Returns the tensor as it goes into the model file, appending its payload to the data
    /// file when it is large enough.
    fn place(&mut self, t: &TensorProto, site: &dyn Fn() -> String) -> Result<TensorProto> {
        refuse_unloaded(t, site, &self.model_path)?;
        let raw = match &t.raw_data {
            Some(raw)
                if raw.len() >= self.threshold && t.data_type != Some(DataType::String as i32) =>
            {
                raw
            }
            _ => return Ok(t.clone()),
        };
        let key = (t.name.clone().unwrap_or_default(), raw.len());
        let known = self
            .stored
            .get(&key)
            // The same slice (one weight shared by several programs) is the common case; only
            // a different slice of the same name and length needs its bytes compared.
            .and_then(|v| {
                v.iter()
                    .find(|(b, _)| b.as_ptr() == raw.as_ptr() || b == raw)
                    .map(|(_, off)| *off)
            });
        let offset = match known {
            Some(off) => off,
            None => {
                let off = self.append(raw)?;
                self.stored.entry(key).or_default().push((raw.clone(), off));
                off
            }
        };
        Ok(external_ref(t, &self.location, offset, raw.len()))
    }

    /// Appends a payload at the next aligned offset and returns that offset.
    fn append(&mut self, raw: &[u8]) -> Result<u64> {
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
        // A mapped source weight is written once; its pages need not stay in this process.
        super::mapped::release(raw);
        self.position = offset + raw.len() as u64;
        Ok(offset)
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
pub(super) fn temp_file_for(final_path: &Path, folder: &Path) -> Result<NamedTempFile> {
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

pub(super) fn write_atomically(path: &Path, folder: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_file_for(path, folder)?;
    tmp.write_all(bytes).map_err(|source| OnnxIoError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    persist(tmp, path, folder)
}

pub(super) fn persist(tmp: NamedTempFile, path: &Path, folder: &Path) -> Result<()> {
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

/// The tensor as a model file stores it when its payload lives at `offset` in `location`.
fn external_ref(t: &TensorProto, location: &str, offset: u64, len: usize) -> TensorProto {
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
    TensorProto {
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
            entry("location", location.to_string()),
            entry("offset", offset.to_string()),
            entry("length", len.to_string()),
        ],
        data_location: Some(DataLocation::External as i32),
        double_data: double_data.clone(),
        uint64_data: uint64_data.clone(),
        metadata_props: metadata_props.clone(),
    }
}
