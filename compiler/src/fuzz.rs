//! Mutation fuzzing of the importer and the compile pipeline (issue 14): seeded mutants of the
//! fixture models, each run in-process through [`crate::load_model`], target listing and
//! [`pipeline::compile`] under `catch_unwind`, with a wall-clock watchdog.
//!
//! It lives in the compiler crate (hidden from the docs) rather than in `tests/src` so that
//! `compiler/tests/fuzz.rs` and `examples/fuzz.rs` share it without building the runtime and
//! tract, which the end-to-end crate pulls in and which the harness never needs.
//!
//! Mutant `k` of seed `s` is a pure function of `(s, k)` and the fixture files: its random
//! stream is ChaCha8 seeded with both, so a failure report's seed and index replay it.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::bilevel::Hypergrad;
use crate::heads::Task;
use crate::pipeline::{self, BilevelOptions, CompileOptions};
use crate::proto::onnx::tensor_proto::{self, DataLocation};
use crate::proto::onnx::{
    attribute_proto, tensor_shape_proto, type_proto, GraphProto, ModelProto,
    StringStringEntryProto, TensorProto,
};
use crate::regularizer::RegVariant;
use crate::rewrite::{AdapterConfig, Method};
use crate::targets::{self, TargetSpec};

/// One seed model with what a user would compile it with.
pub struct Fixture {
    pub name: String,
    pub bytes: Vec<u8>,
    pub proto: ModelProto,
    pub targets: Vec<String>,
    pub task: Task,
    /// Offsets of length-delimited fields' length varints (start, varint size), for tampering.
    lengths: Vec<(usize, usize)>,
}

/// The fixtures of `models/` and `models/ops/` with their usual `--target` and task.
pub fn fixtures(models: &Path) -> crate::Result<Vec<Fixture>> {
    let specs: [(&str, &str, Task); 11] = [
        ("bert_dynamo18.onnx", "query,value", Task::SeqCls),
        ("bert_legacy17.onnx", "query,value", Task::SeqCls),
        ("roberta_dynamo18.onnx", "query,value", Task::MultiLabel),
        ("roberta_legacy17.onnx", "query,value", Task::SeqCls),
        ("esm_dynamo18.onnx", "query,value", Task::SeqCls),
        ("esm_legacy17.onnx", "query,value", Task::SeqCls),
        ("gpt2_dynamo18.onnx", "c_attn:q,v", Task::CausalLm),
        ("gpt2_legacy17.onnx", "c_attn:q,v", Task::CausalLm),
        // GatherND pooling, a grouped-query fused qkv_proj, a Conv patch embedding.
        (
            "ops/llama_seqcls_dynamo18.onnx",
            "q_proj,v_proj",
            Task::SeqCls,
        ),
        ("ops/phi3_gqa_dynamo18.onnx", "qkv_proj:q,v", Task::CausalLm),
        ("ops/vit_dynamo18.onnx", "q_proj,v_proj", Task::SeqCls),
    ];
    specs
        .into_iter()
        .map(|(file, target, task)| {
            let path = models.join(file);
            let bytes = std::fs::read(&path)
                .map_err(|e| crate::Error::Other(format!("{}: {e}", path.display())))?;
            let proto = crate::onnx_io::decode_model(&bytes, &path)?;
            let mut lengths = vec![];
            scan_lengths(&bytes, 0, 0, &mut lengths);
            Ok(Fixture {
                name: file.into(),
                bytes,
                proto,
                targets: target.split(',').map(String::from).collect(),
                task,
                lengths,
            })
        })
        .collect()
}

/// Collects the length varints of length-delimited fields that themselves parse as messages,
/// a few levels deep (model → graph → node/initializer → attribute), without decoding.
fn scan_lengths(buf: &[u8], base: usize, depth: usize, out: &mut Vec<(usize, usize)>) {
    let mut pos = 0;
    while pos < buf.len() {
        let Some((key, n)) = varint(&buf[pos..]) else {
            return;
        };
        pos += n;
        match key & 7 {
            0 => match varint(&buf[pos..]) {
                Some((_, n)) => pos += n,
                None => return,
            },
            1 => pos += 8,
            5 => pos += 4,
            2 => {
                let Some((len, n)) = varint(&buf[pos..]) else {
                    return;
                };
                let start = pos + n;
                let Some(end) = usize::try_from(len)
                    .ok()
                    .and_then(|l| start.checked_add(l))
                    .filter(|&e| e <= buf.len())
                else {
                    return;
                };
                out.push((base + pos, n));
                // Raw weight payloads are large and not messages: only recurse into small ones
                // or the top-level graph.
                if depth < 3 && (end - start < 4096 || depth == 0) {
                    scan_lengths(&buf[start..end], base + start, depth + 1, out);
                }
                pos = end;
            }
            _ => return,
        }
    }
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A mutant: which fixture it started from, its bytes and the mutations applied, in order.
pub struct Mutant {
    pub fixture: usize,
    pub bytes: Vec<u8>,
    pub ops: Vec<&'static str>,
}

fn rng_for(seed: u64, index: u64) -> ChaCha8Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&index.to_le_bytes());
    s[16..24].copy_from_slice(b"bidora-f");
    ChaCha8Rng::from_seed(s)
}

/// Mutant `index` of `seed`: first 0–3 structure-aware mutations on the decoded model, then
/// (always when there was none) 0–3 mutations of the encoded bytes.
pub fn mutant(fx: &[Fixture], seed: u64, index: u64) -> Mutant {
    let mut rng = rng_for(seed, index);
    let fixture = rng.random_range(0..fx.len());
    let f = &fx[fixture];
    let mut ops = vec![];
    let n_struct = if rng.random_bool(0.6) {
        rng.random_range(1..=3)
    } else {
        0
    };
    let mut bytes = if n_struct > 0 {
        let mut m = f.proto.clone();
        for _ in 0..n_struct {
            ops.push(mutate_model(&mut m, &mut rng));
        }
        m.encode_to_vec()
    } else {
        f.bytes.clone()
    };
    let n_bytes = if n_struct == 0 {
        rng.random_range(1..=3)
    } else if rng.random_bool(0.2) {
        1
    } else {
        0
    };
    for i in 0..n_bytes {
        // Length offsets are the fixture's own: valid only before anything moved bytes.
        let lengths = (i == 0 && n_struct == 0).then_some(&f.lengths[..]);
        ops.push(mutate_bytes(&mut bytes, lengths, fx, &mut rng));
    }
    Mutant {
        fixture,
        bytes,
        ops,
    }
}

const INTERESTING_BYTES: [u8; 4] = [0, 0xff, 0x7f, 0x80];
const INTERESTING_DIMS: [i64; 10] = [
    0,
    -1,
    -7,
    1 << 31,
    1 << 40,
    1 << 62,
    i64::MAX,
    i64::MIN,
    3,
    65536,
];

fn mutate_bytes(
    b: &mut Vec<u8>,
    lengths: Option<&[(usize, usize)]>,
    fx: &[Fixture],
    rng: &mut ChaCha8Rng,
) -> &'static str {
    if b.is_empty() {
        b.push(0x08);
    }
    let pos = |rng: &mut ChaCha8Rng, len: usize| rng.random_range(0..len);
    match rng.random_range(0..8) {
        0 => {
            let p = pos(rng, b.len());
            b[p] ^= 1 << rng.random_range(0..8);
            "bit flip"
        }
        1 => {
            let p = pos(rng, b.len());
            b[p] = INTERESTING_BYTES[rng.random_range(0..4)];
            "interesting byte"
        }
        2 => {
            let l = pos(rng, b.len());
            b.truncate(l);
            "truncate"
        }
        3 => {
            let a = pos(rng, b.len());
            let n = rng.random_range(1..=64.min(b.len() - a));
            let at = pos(rng, b.len());
            let chunk = b[a..a + n].to_vec();
            b.splice(at..at, chunk);
            "duplicate chunk"
        }
        4 => {
            let a = pos(rng, b.len());
            let n = rng.random_range(1..=256.min(b.len() - a));
            b.drain(a..a + n);
            "delete chunk"
        }
        5 => {
            let other = &fx[rng.random_range(0..fx.len())].bytes;
            let a = pos(rng, other.len());
            let n = rng.random_range(1..=4096.min(other.len() - a));
            let at = pos(rng, b.len());
            let end = (at + n).min(b.len());
            b.splice(at..end, other[a..a + n].iter().copied());
            "splice from fixture"
        }
        _ => match lengths.filter(|l| !l.is_empty()) {
            Some(l) => {
                let (at, size) = l[rng.random_range(0..l.len())];
                let (old, _) = varint(&b[at..]).unwrap_or((0, size));
                let new = match rng.random_range(0..6) {
                    0 => 0,
                    1 => old.saturating_add(1),
                    2 => old.saturating_sub(1),
                    3 => old.saturating_add(rng.random_range(2..1000)),
                    4 => 1 << 32,
                    _ => u64::MAX >> 1,
                };
                let mut enc = vec![];
                put_varint(new, &mut enc);
                b.splice(at..at + size, enc);
                "length varint"
            }
            None => {
                let p = pos(rng, b.len());
                b[p] ^= 0x80;
                "varint continuation bit"
            }
        },
    }
}

fn pick<'a, T>(v: &'a mut [T], rng: &mut ChaCha8Rng) -> Option<&'a mut T> {
    if v.is_empty() {
        None
    } else {
        let i = rng.random_range(0..v.len());
        v.get_mut(i)
    }
}

fn long_name(rng: &mut ChaCha8Rng) -> String {
    let n = [300, 70_000, 2_000_000][rng.random_range(0..3)];
    "n".repeat(n)
}

fn mutate_model(m: &mut ModelProto, rng: &mut ChaCha8Rng) -> &'static str {
    // Mostly graph mutations: a model without opsets or with a bad version stops at the first
    // check, so these are rare enough that most mutants reach the compile.
    match rng.random_range(0..24) {
        0 | 1 => {
            let v = [-1, 0, 1, 12, 13, 17, 18, 23, 24, i64::MAX][rng.random_range(0..10)];
            if rng.random_bool(0.7) {
                match pick(&mut m.opset_import, rng) {
                    Some(o) => o.version = Some(v),
                    None => return "no opset",
                }
                "opset version"
            } else {
                m.ir_version = Some(v);
                "ir version"
            }
        }
        2 => {
            m.opset_import.clear();
            "opsets removed"
        }
        _ => match m.graph.as_mut() {
            Some(g) => mutate_graph(g, rng),
            None => "no graph",
        },
    }
}

fn mutate_graph(g: &mut GraphProto, rng: &mut ChaCha8Rng) -> &'static str {
    let value_names: Vec<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .collect();
    let any_value = |rng: &mut ChaCha8Rng| -> String {
        if value_names.is_empty() {
            String::new()
        } else {
            value_names[rng.random_range(0..value_names.len())].clone()
        }
    };
    match rng.random_range(0..18) {
        0 => {
            let Some(t) = pick(&mut g.initializer, rng) else {
                return "no initializer";
            };
            if t.dims.is_empty() {
                t.dims.push(INTERESTING_DIMS[rng.random_range(0..10)]);
            } else {
                let i = rng.random_range(0..t.dims.len());
                t.dims[i] = INTERESTING_DIMS[rng.random_range(0..10)];
            }
            "initializer dim"
        }
        1 => {
            let vis = match rng.random_range(0..3) {
                0 => &mut g.input,
                1 => &mut g.output,
                _ => &mut g.value_info,
            };
            let Some(vi) = pick(vis, rng) else {
                return "no value info";
            };
            let Some(type_proto::Value::TensorType(tt)) =
                vi.r#type.as_mut().and_then(|t| t.value.as_mut())
            else {
                return "value info not a tensor";
            };
            if rng.random_bool(0.5) {
                tt.elem_type = Some(rng.random_range(-1..=26));
                return "value info dtype";
            }
            let Some(shape) = tt.shape.as_mut() else {
                return "value info without shape";
            };
            let d = tensor_shape_proto::Dimension {
                denotation: None,
                value: Some(if rng.random_bool(0.8) {
                    tensor_shape_proto::dimension::Value::DimValue(
                        INTERESTING_DIMS[rng.random_range(0..10)],
                    )
                } else {
                    tensor_shape_proto::dimension::Value::DimParam(String::new())
                }),
            };
            match pick(&mut shape.dim, rng) {
                Some(x) if rng.random_bool(0.8) => *x = d,
                _ => shape.dim.push(d),
            }
            "value info dim"
        }
        2 => {
            let Some(t) = pick(&mut g.initializer, rng) else {
                return "no initializer";
            };
            t.data_type = Some(rng.random_range(-1..=26));
            "initializer dtype"
        }
        3 => {
            let Some(t) = pick(&mut g.initializer, rng) else {
                return "no initializer";
            };
            if let Some(r) = t.raw_data.as_mut() {
                let n = rng.random_range(0..=r.len());
                r.truncate(n);
            }
            "initializer data truncated"
        }
        4 => {
            let long = long_name(rng);
            let Some(n) = pick(&mut g.node, rng) else {
                return "no node";
            };
            n.name = Some(match rng.random_range(0..3) {
                0 => String::new(),
                1 => long,
                _ => "dup".into(),
            });
            "node name"
        }
        5 => {
            let other = any_value(rng);
            let long = long_name(rng);
            let Some(n) = pick(&mut g.node, rng) else {
                return "no node";
            };
            let Some(o) = pick(&mut n.output, rng) else {
                return "node without outputs";
            };
            *o = match rng.random_range(0..3) {
                0 => String::new(),
                1 => other,
                _ => long,
            };
            "node output renamed"
        }
        6 => {
            let Some(n) = pick(&mut g.node, rng) else {
                return "no node";
            };
            let undefined = format!("undefined_{}", rng.random::<u32>());
            match pick(&mut n.input, rng) {
                Some(i) => *i = undefined,
                None => n.input.push(undefined),
            }
            "node input undefined"
        }
        7 => {
            let Some(n) = pick(&mut g.node, rng) else {
                return "no node";
            };
            if n.attribute.is_empty() {
                return "node without attributes";
            }
            let i = rng.random_range(0..n.attribute.len());
            n.attribute.remove(i);
            "attribute removed"
        }
        8 => {
            let Some(n) = pick(&mut g.node, rng) else {
                return "no node";
            };
            let Some(a) = pick(&mut n.attribute, rng) else {
                return "node without attributes";
            };
            match rng.random_range(0..4) {
                0 => {
                    a.r#type = Some(rng.random_range(0..=15));
                }
                1 => {
                    a.r#type = Some(attribute_proto::AttributeType::Int as i32);
                    a.i = Some(INTERESTING_DIMS[rng.random_range(0..10)]);
                }
                2 => {
                    a.r#type = Some(attribute_proto::AttributeType::Ints as i32);
                    a.ints = (0..rng.random_range(0..5))
                        .map(|_| INTERESTING_DIMS[rng.random_range(0..10)])
                        .collect();
                }
                _ => {
                    a.name = Some(if rng.random_bool(0.5) {
                        String::new()
                    } else {
                        "no_such_attribute".into()
                    });
                }
            }
            "attribute retyped"
        }
        9 => {
            let Some(t) = pick(&mut g.initializer, rng) else {
                return "no initializer";
            };
            let location = [
                "../outside.bin",
                "/etc/passwd",
                "weights.bin",
                "sub/../../x",
                "",
                ".",
                "missing.bin",
            ][rng.random_range(0..7)];
            let entry = |k: &str, v: String| StringStringEntryProto {
                key: Some(k.into()),
                value: Some(v),
            };
            t.raw_data = None;
            t.data_location = Some(DataLocation::External as i32);
            t.external_data = vec![entry("location", location.into())];
            if rng.random_bool(0.7) {
                let v = ["0", "64", "4096", "-1", "18446744073709551615", "x"];
                t.external_data
                    .push(entry("offset", v[rng.random_range(0..v.len())].into()));
                t.external_data
                    .push(entry("length", v[rng.random_range(0..v.len())].into()));
            }
            "external data"
        }
        10 => {
            if g.node.is_empty() {
                return "no node";
            }
            let i = rng.random_range(0..g.node.len());
            g.node.remove(i);
            "node removed"
        }
        11 => {
            if g.initializer.is_empty() {
                return "no initializer";
            }
            let i = rng.random_range(0..g.initializer.len());
            g.initializer.remove(i);
            "initializer removed"
        }
        12 => {
            let n = g.node.len();
            if n < 2 {
                return "too few nodes";
            }
            g.node.swap(rng.random_range(0..n), rng.random_range(0..n));
            "nodes swapped"
        }
        13 => {
            if let Some(i) = g.input.first().cloned() {
                g.input.push(i);
            }
            "input duplicated"
        }
        14 => {
            let other = any_value(rng);
            let Some(t) = pick(&mut g.initializer, rng) else {
                return "no initializer";
            };
            t.name = Some(if rng.random_bool(0.5) {
                String::new()
            } else {
                other
            });
            "initializer renamed"
        }
        // Small integer tensors (Reshape shapes, Slice bounds, Split sizes, Gather indices) are
        // what shape inference computes with, so their values get the interesting dims twice
        // as often as any other mutation.
        16 | 17 => {
            let mut small: Vec<&mut TensorProto> = g
                .initializer
                .iter_mut()
                .chain(
                    g.node
                        .iter_mut()
                        .flat_map(|n| n.attribute.iter_mut())
                        .filter_map(|a| a.t.as_mut()),
                )
                .filter(|t| {
                    t.data_type == Some(tensor_proto::DataType::Int64 as i32)
                        && t.raw_data
                            .as_ref()
                            .is_some_and(|r| (8..=64).contains(&r.len()))
                })
                .collect();
            let Some(t) = pick(&mut small, rng) else {
                return "no small int tensor";
            };
            let Some(raw) = t.raw_data.as_ref() else {
                return "no small int tensor";
            };
            let mut v = raw.to_vec();
            let at = 8 * rng.random_range(0..v.len() / 8);
            if at + 8 <= v.len() {
                v[at..at + 8]
                    .copy_from_slice(&INTERESTING_DIMS[rng.random_range(0..10)].to_le_bytes());
            }
            t.raw_data = Some(v.into());
            "small int tensor value"
        }
        _ => {
            let Some(n) = pick(&mut g.node, rng) else {
                return "no node";
            };
            let ops = ["MatMul", "Gemm", "Split", "Reshape", "NoSuchOp", ""];
            n.op_type = Some(ops[rng.random_range(0..ops.len())].into());
            "op type changed"
        }
    }
}

/// How far one mutant got. Errors are the expected outcome; only a panic is a failure.
#[derive(Debug)]
pub enum Outcome {
    /// Refused by the importer (decoding, external data, conversion, opset, order).
    Refused(String),
    /// Imported, then refused by the compile.
    CompileError(String),
    Compiled,
    Panicked(String),
}

thread_local! {
    static PANIC_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
    static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that records a fuzzed panic's message and location instead of
/// printing it, so thousands of caught panics stay readable; other threads' panics print.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(|c| c.get()) {
                PANIC_MESSAGE.with(|m| *m.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

/// Options the mutants are compiled with: a user's DoRA + task + BiDoRA compile at a small rank.
pub fn options(f: &Fixture) -> crate::Result<CompileOptions> {
    Ok(CompileOptions {
        targets: TargetSpec::parse(&f.targets, None)?,
        adapter: AdapterConfig {
            method: Method::Dora,
            rank: 2,
            alpha: 4.0,
            rslora: false,
            detach_norm: false,
            seed: 0,
        },
        task: Some(f.task),
        train_head: false,
        bilevel: Some(BilevelOptions {
            hypergrad: Hypergrad::Fd,
            regularizer: RegVariant::Paper,
        }),
        lm_labels: false,
    })
}

/// Runs `bytes` through the importer as if read from `dir/model.onnx` (beside a small
/// `weights.bin` for external data to hit) and, when it loads, the compile. The bytes are not
/// written out: reading a file back is [`crate::load_model`]'s only difference from
/// [`crate::load_model_bytes`], and it cost each mutant a write and a read of ~600 kB.
pub fn run_file(bytes: &[u8], fixture: &Fixture, dir: &Path) -> Outcome {
    install_hook();
    let path = dir.join("model.onnx");
    let bytes = bytes.to_vec();
    CAPTURING.with(|c| c.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let model = match crate::load_model_bytes(bytes, &path) {
            Ok(m) => m,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        // What the CLI does before compiling: the non-finite check and --list-targets.
        let _ = crate::provenance::non_finite_weight(&model);
        let cands = targets::candidates(&model.graph);
        let _ = targets::format_candidates(&cands);
        let opts = match options(fixture) {
            Ok(o) => o,
            Err(e) => return Outcome::CompileError(e.to_string()),
        };
        match pipeline::compile(&model, &opts) {
            Ok(c) => {
                let _ = pipeline::artifact(&c, "model.onnx", &opts);
                Outcome::Compiled
            }
            Err(e) => Outcome::CompileError(e.to_string()),
        }
    }));
    CAPTURING.with(|c| c.set(false));
    result.unwrap_or_else(|payload| {
        let msg = PANIC_MESSAGE
            .with(|m| m.borrow_mut().take())
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic with a non-string payload".into());
        Outcome::Panicked(msg)
    })
}

/// A temp folder laid out as [`run_file`] expects.
pub fn work_dir() -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let weights: Vec<u8> = (0..8192u32).map(|i| (i * 37 % 251) as u8).collect();
    std::fs::write(dir.path().join("weights.bin"), weights)?;
    Ok(dir)
}

/// A failing mutant: replay it with [`mutant`]`(fixtures, seed, index)`.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub index: u64,
    pub fixture: String,
    pub ops: Vec<&'static str>,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} mutant {} ({}; {}): {}",
            self.seed,
            self.index,
            self.fixture,
            self.ops.join(", "),
            self.message
        )
    }
}

#[derive(Debug, Default)]
pub struct Summary {
    pub mutants: u64,
    pub refused: u64,
    pub compile_errors: u64,
    pub compiled: u64,
    pub panics: Vec<Failure>,
    /// Mutants that ran past the watchdog's limit (the run stops at the first).
    pub hangs: Vec<Failure>,
    pub peak_rss_bytes: Option<u64>,
    pub seconds: f64,
    /// The mutant that took longest and its wall time in seconds.
    pub slowest: Option<(u64, f64)>,
}

impl Summary {
    /// Mutants that imported (compiled or refused by the compile).
    pub fn loaded(&self) -> u64 {
        self.compile_errors + self.compiled
    }

    pub fn line(&self) -> String {
        format!(
            "mutants {}, loaded {}, compiled {}, errors {}, panics {}, hangs {}, peak RSS {}, {:.1} s ({:.0} mutants/s), slowest {}",
            self.mutants,
            self.loaded(),
            self.compiled,
            self.refused + self.compile_errors,
            self.panics.len(),
            self.hangs.len(),
            self.peak_rss_bytes
                .map(|b| format!("{} MiB", b >> 20))
                .unwrap_or_else(|| "unknown".into()),
            self.seconds,
            self.mutants as f64 / self.seconds.max(1e-9),
            self.slowest
                .map(|(i, t)| format!("mutant {i} ({t:.2} s)"))
                .unwrap_or_else(|| "none".into()),
        )
    }
}

/// This process's peak resident set (Linux `VmHWM`), or `None` where it cannot be read.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The mutant each worker is on (`u64::MAX`: none), for a signal handler: an abort (a failed
/// allocation, a stack overflow) cannot be caught, but the process can still say which mutants
/// were running.
pub static IN_FLIGHT: [AtomicU64; 64] = [const { AtomicU64::new(u64::MAX) }; 64];

pub struct RunOptions {
    pub seed: u64,
    /// The first mutant index: chunks `start..start + mutants` of one seed add up to one
    /// sequence, so a long campaign can be carried across sittings.
    pub start: u64,
    pub mutants: u64,
    pub threads: usize,
    /// A mutant running longer than this is a hang.
    pub hang_after: Duration,
    /// Stop starting mutants after this long (the summary counts those that ran).
    pub time_limit: Option<Duration>,
}

/// Runs mutants `start..start + mutants` of `seed` on `threads` workers; `progress` is called with the
/// number done so far about ten times a second. Stops at the first hang: the stuck worker
/// cannot be stopped from outside, so it is left detached and the caller should exit.
pub fn run(fx: Arc<Vec<Fixture>>, o: &RunOptions, progress: &dyn Fn(u64)) -> Summary {
    #[derive(Default)]
    struct Shared {
        next: AtomicU64,
        done: AtomicU64,
        refused: AtomicU64,
        compile_errors: AtomicU64,
        compiled: AtomicU64,
        stop: AtomicBool,
        panics: Mutex<Vec<Failure>>,
        slowest: Mutex<Option<(u64, f64)>>,
    }
    let start = Instant::now();
    let shared = Arc::new(Shared::default());
    // Per worker: the mutant it is on and since when.
    type Slot = Arc<Mutex<Option<(u64, Instant)>>>;
    let current: Vec<Slot> = (0..o.threads.max(1)).map(|_| Arc::default()).collect();
    let mut handles = vec![];
    for (worker, slot) in current.iter().enumerate() {
        let (fx, shared, slot) = (fx.clone(), shared.clone(), slot.clone());
        let (seed, first) = (o.seed, o.start);
        let end = o.start.saturating_add(o.mutants);
        handles.push(std::thread::spawn(move || {
            let dir = match work_dir() {
                Ok(d) => d,
                Err(e) => {
                    shared.stop.store(true, Ordering::SeqCst);
                    return Err(e.to_string());
                }
            };
            while !shared.stop.load(Ordering::SeqCst) {
                let index = first.saturating_add(shared.next.fetch_add(1, Ordering::SeqCst));
                if index >= end {
                    break;
                }
                let began = Instant::now();
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((index, began));
                if let Some(f) = IN_FLIGHT.get(worker) {
                    f.store(index, Ordering::SeqCst);
                }
                let m = mutant(&fx, seed, index);
                let f = &fx[m.fixture];
                match run_file(&m.bytes, f, dir.path()) {
                    Outcome::Refused(_) => shared.refused.fetch_add(1, Ordering::Relaxed),
                    Outcome::CompileError(_) => {
                        shared.compile_errors.fetch_add(1, Ordering::Relaxed)
                    }
                    Outcome::Compiled => shared.compiled.fetch_add(1, Ordering::Relaxed),
                    Outcome::Panicked(message) => {
                        shared
                            .panics
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Failure {
                                seed,
                                index,
                                fixture: f.name.clone(),
                                ops: m.ops,
                                message,
                            });
                        0
                    }
                };
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let took = began.elapsed().as_secs_f64();
                let mut slowest = shared.slowest.lock().unwrap_or_else(|e| e.into_inner());
                if slowest.is_none_or(|(_, t)| took > t) {
                    *slowest = Some((index, took));
                }
                drop(slowest);
                if let Some(f) = IN_FLIGHT.get(worker) {
                    f.store(u64::MAX, Ordering::SeqCst);
                }
                shared.done.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }));
    }
    let mut hangs = vec![];
    loop {
        std::thread::sleep(Duration::from_millis(100));
        progress(shared.done.load(Ordering::SeqCst));
        for slot in &current {
            if let Some((index, since)) = *slot.lock().unwrap_or_else(|e| e.into_inner()) {
                if since.elapsed() > o.hang_after {
                    let m = mutant(&fx, o.seed, index);
                    hangs.push(Failure {
                        seed: o.seed,
                        index,
                        fixture: fx[m.fixture].name.clone(),
                        ops: m.ops,
                        message: format!("still running after {:?}", since.elapsed()),
                    });
                }
            }
        }
        if !hangs.is_empty() {
            shared.stop.store(true, Ordering::SeqCst);
            break;
        }
        if o.time_limit.is_some_and(|t| start.elapsed() > t) {
            shared.stop.store(true, Ordering::SeqCst);
        }
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
    }
    // A worker that could not set up its folder ran nothing: a harness failure, reported with
    // the panics so that a run cannot pass without running its mutants.
    let mut setup = vec![];
    if hangs.is_empty() {
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => setup.push(format!("worker could not start: {e}")),
                Err(_) => setup.push("worker panicked outside a mutant".into()),
            }
        }
    }
    let mut panics = std::mem::take(&mut *shared.panics.lock().unwrap_or_else(|e| e.into_inner()));
    let slowest = *shared.slowest.lock().unwrap_or_else(|e| e.into_inner());
    panics.extend(setup.into_iter().map(|message| Failure {
        seed: o.seed,
        index: u64::MAX,
        fixture: String::new(),
        ops: vec![],
        message,
    }));
    Summary {
        mutants: shared.done.load(Ordering::SeqCst),
        refused: shared.refused.load(Ordering::SeqCst),
        compile_errors: shared.compile_errors.load(Ordering::SeqCst),
        compiled: shared.compiled.load(Ordering::SeqCst),
        panics,
        hangs,
        peak_rss_bytes: peak_rss_bytes(),
        seconds: start.elapsed().as_secs_f64(),
        slowest,
    }
}

/// The repository's `models/` folder, from this crate's manifest directory.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}
