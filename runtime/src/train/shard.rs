//! Data parallelism inside the trainer: a rank's share of each global batch, the weight
//! that makes the ranks' weighted sum the global batch's mean, the reduction of gradients
//! and losses, and the start-up copy of rank 0's state to every rank.
//!
//! The global batch is the one a single process would draw (the same seeded stream, the
//! same `batch_size`), padded as that process pads it (to its longest example), and each
//! rank takes a contiguous block of its rows ([`crate::distributed::share`]). So every
//! example goes through the programs with the same padding as in one process, and only the
//! sums over the batch are split.
//!
//! Every loss head averages over counted terms (`bidora_compiler::heads`): examples for
//! `seq-cls`, `regression` and `multi-label` (whose label count per example is fixed),
//! labelled tokens for `token-cls`, scored next-token positions for `causal-lm`. A rank's
//! outputs are means over its own terms, so the global mean is `Σ_r (n_r / N) · mean_r`:
//! each rank scales by its share of the terms and the ranks sum.

use ndarray::{ArrayD, Axis, IxDyn, Slice};

use bidora_compiler::heads::{Head, Task, IGNORE_INDEX};

use super::TrainError;
use crate::backend::HostTensor;
use crate::distributed::Communicator;
use crate::optim::AdamW;

/// Rows `range` of every batch tensor (all have the batch as their first axis).
pub fn rows(
    batch: &[(String, HostTensor)],
    range: std::ops::Range<usize>,
) -> Vec<(String, HostTensor)> {
    let s = Slice::from(range);
    batch
        .iter()
        .map(|(n, t)| {
            let t = match t {
                HostTensor::F32(a) => HostTensor::F32(a.slice_axis(Axis(0), s).to_owned()),
                HostTensor::F64(a) => HostTensor::F64(a.slice_axis(Axis(0), s).to_owned()),
                HostTensor::I64(a) => HostTensor::I64(a.slice_axis(Axis(0), s).to_owned()),
            };
            (n.clone(), t)
        })
        .collect()
}

fn i64_input<'b>(batch: &'b [(String, HostTensor)], name: &str) -> Option<&'b ArrayD<i64>> {
    batch.iter().find_map(|(n, t)| match t {
        HostTensor::I64(a) if n == name => Some(a),
        _ => None,
    })
}

fn batch_rows(batch: &[(String, HostTensor)]) -> usize {
    batch
        .first()
        .map(|(_, t)| match t {
            HostTensor::F32(a) => a.shape().first().copied().unwrap_or(0),
            HostTensor::F64(a) => a.shape().first().copied().unwrap_or(0),
            HostTensor::I64(a) => a.shape().first().copied().unwrap_or(0),
        })
        .unwrap_or(0)
}

/// How many terms `head`'s loss averages over in `batch`: the denominator of its mean, by
/// the head's own rule.
pub fn loss_terms(head: &Head, batch: &[(String, HostTensor)]) -> Result<usize, TrainError> {
    let need = |name: &str| {
        i64_input(batch, name).ok_or_else(|| {
            TrainError::Data(format!(
                "the {} loss counts its terms from an i64 '{name}' input, which the batch lacks",
                head.task.name()
            ))
        })
    };
    // Position t of a causal LM is scored against token t + 1 (heads.rs): the first column
    // never is, the last is ignored by construction.
    let after_first = |a: &ArrayD<i64>| a.slice_axis(Axis(1), Slice::from(1..)).to_owned();
    Ok(match head.task {
        Task::SeqCls | Task::Regression | Task::MultiLabel => batch_rows(batch),
        Task::TokenCls => need("labels")?
            .iter()
            .filter(|&&y| y != IGNORE_INDEX)
            .count(),
        Task::CausalLm if head.labels.iter().any(|l| l == "labels") => after_first(need("labels")?)
            .iter()
            .filter(|&&y| y != IGNORE_INDEX)
            .count(),
        Task::CausalLm => after_first(need("attention_mask")?)
            .iter()
            .filter(|&&m| m > 0)
            .count(),
    })
}

/// This rank's rows of a global batch and the weight of its means in the global mean.
pub fn take(
    head: &Head,
    global: Vec<(String, HostTensor)>,
    rank: usize,
    size: usize,
) -> Result<(Vec<(String, HostTensor)>, f64), TrainError> {
    let n = batch_rows(&global);
    let range = crate::distributed::share(n, size, rank);
    let mine = rows(&global, range.clone());
    let total = loss_terms(head, &global)?;
    let weight = if total > 0 {
        loss_terms(head, &mine)? as f64 / total as f64
    } else {
        // Nothing is scored anywhere: every rank's gradients are 0; any weights summing to
        // one keep them so.
        range.len() as f64 / n.max(1) as f64
    };
    Ok((mine, weight))
}

/// Replaces every rank's `tensors` and `scalars` by the weighted sum over the ranks of
/// `weight ·` them: the global batch's means. The scaling is done in f64 and rounded once.
pub fn reduce(
    comm: &dyn Communicator,
    tensors: &mut [&mut ArrayD<f32>],
    scalars: &mut [f64],
    weight: f64,
) -> Result<(), TrainError> {
    let n: usize = tensors.iter().map(|t| t.len()).sum::<usize>() + scalars.len();
    let mut buf = Vec::with_capacity(n);
    for t in tensors.iter() {
        buf.extend(t.iter().map(|&x| (x as f64 * weight) as f32));
    }
    buf.extend(scalars.iter().map(|&x| (x * weight) as f32));
    comm.all_reduce_sum(&mut buf)
        .map_err(|e| TrainError::Distributed(e.to_string()))?;
    let mut at = 0;
    for t in tensors.iter_mut() {
        let len = t.len();
        for (d, s) in t.iter_mut().zip(&buf[at..at + len]) {
            *d = *s;
        }
        at += len;
    }
    for (d, s) in scalars.iter_mut().zip(&buf[at..]) {
        *d = *s as f64;
    }
    Ok(())
}

/// Rank 0's tensors, optimiser state and loop state as bytes: a JSON header, then every f32
/// in the header's order.
pub fn pack(
    params: &[(String, ArrayD<f32>)],
    optims: [&AdamW; 2],
    state: &serde_json::Value,
) -> Vec<u8> {
    let mut header = serde_json::json!({"state": state, "optims": []});
    let mut data: Vec<f32> = vec![];
    for (_, a) in params {
        data.extend(a.iter());
    }
    for opt in optims {
        let (m, v) = opt.moments();
        let names: Vec<&String> = params
            .iter()
            .map(|(n, _)| n)
            .filter(|n| m.contains_key(*n) && v.contains_key(*n))
            .collect();
        for n in &names {
            data.extend(m[*n].iter());
            data.extend(v[*n].iter());
        }
        header["optims"]
            .as_array_mut()
            .expect("an array")
            .push(serde_json::json!({"steps": opt.steps(), "names": names}));
    }
    let head = header.to_string().into_bytes();
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend(head);
    for x in data {
        out.extend(x.to_le_bytes());
    }
    out
}

/// What [`pack`] wrote, applied to this rank's tensors and optimisers; returns the loop
/// state.
pub fn unpack(
    bytes: &[u8],
    params: &mut [(String, ArrayD<f32>)],
    optims: [&mut AdamW; 2],
) -> Result<serde_json::Value, TrainError> {
    let bad =
        |m: &str| TrainError::Distributed(format!("rank 0's state did not arrive whole: {m}"));
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| bad("no header"))?;
    let head = bytes.get(8..8 + len).ok_or_else(|| bad("short header"))?;
    let header: serde_json::Value =
        serde_json::from_slice(head).map_err(|e| bad(&e.to_string()))?;
    let mut floats = bytes[8 + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")));
    let mut next = |shape: &[usize]| -> Result<ArrayD<f32>, TrainError> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = floats.by_ref().take(n).collect();
        if v.len() != n {
            return Err(bad("fewer values than the tensors need"));
        }
        Ok(ArrayD::from_shape_vec(IxDyn(shape), v).expect("sized above"))
    };
    for (_, a) in params.iter_mut() {
        *a = next(a.shape())?;
    }
    let shapes: std::collections::HashMap<String, Vec<usize>> = params
        .iter()
        .map(|(n, a)| (n.clone(), a.shape().to_vec()))
        .collect();
    for (k, opt) in optims.into_iter().enumerate() {
        let o = &header["optims"][k];
        let steps = o["steps"].as_u64().ok_or_else(|| bad("optimiser steps"))? as u32;
        let (mut m, mut v) = (crate::optim::Moments::new(), crate::optim::Moments::new());
        for n in o["names"]
            .as_array()
            .ok_or_else(|| bad("optimiser names"))?
        {
            let n = n.as_str().ok_or_else(|| bad("optimiser names"))?;
            let shape = shapes.get(n).ok_or_else(|| bad("an unknown tensor"))?;
            m.insert(n.to_string(), next(shape)?);
            v.insert(n.to_string(), next(shape)?);
        }
        opt.restore(steps, m, v);
    }
    Ok(header["state"].clone())
}

/// A digest of the tensors' bits: ranks compare theirs with rank 0's to prove they hold the
/// same values.
pub fn digest(params: &[(String, ArrayD<f32>)]) -> u64 {
    // FNV-1a: stable across processes and builds, unlike the standard library's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (_, a) in params {
        for x in a.iter() {
            for b in x.to_bits().to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i64s(shape: &[usize], v: Vec<i64>) -> HostTensor {
        HostTensor::I64(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
    }

    fn head(task: Task, labels: &[&str]) -> Head {
        Head {
            task,
            logits: "logits".into(),
            loss: "loss".into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn terms_follow_each_heads_denominator() {
        let mask = i64s(&[2, 3], vec![1, 1, 1, 1, 1, 0]);
        let tok = i64s(&[2, 3], vec![3, -100, 4, -100, -100, 1]);
        let b = vec![
            ("attention_mask".to_string(), mask),
            ("labels".to_string(), tok),
        ];
        assert_eq!(loss_terms(&head(Task::SeqCls, &["labels"]), &b).unwrap(), 2);
        assert_eq!(
            loss_terms(&head(Task::TokenCls, &["labels"]), &b).unwrap(),
            3
        );
        // Without labels: positions 0..2 of row 0 (tokens 1, 2 follow), position 0 of row 1.
        assert_eq!(loss_terms(&head(Task::CausalLm, &[]), &b).unwrap(), 3);
        // With labels: the labels after the first column that are kept: 4 and 1.
        assert_eq!(
            loss_terms(&head(Task::CausalLm, &["labels"]), &b).unwrap(),
            2
        );
    }

    #[test]
    fn shards_weigh_by_their_terms() {
        let labels = i64s(&[3, 2], vec![1, 1, -100, -100, 2, -100]);
        let b = vec![("labels".to_string(), labels)];
        let h = head(Task::TokenCls, &["labels"]);
        let (s0, w0) = take(&h, b.clone(), 0, 2).unwrap();
        let (s1, w1) = take(&h, b, 1, 2).unwrap();
        assert_eq!(batch_rows(&s0), 2);
        assert_eq!(batch_rows(&s1), 1);
        assert_eq!((w0, w1), (2.0 / 3.0, 1.0 / 3.0));
    }

    #[test]
    fn pack_and_unpack_round_trip() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0f32, -2.5]).unwrap();
        let params = vec![("a".to_string(), a.clone())];
        let mut opt = AdamW::new(Default::default());
        let mut g = std::collections::HashMap::new();
        g.insert("a".to_string(), a.clone());
        let mut p = params.clone();
        opt.step(&mut p, &g, 0.1);
        let bytes = pack(
            &p,
            [&opt, &AdamW::new(Default::default())],
            &serde_json::json!(7),
        );
        let mut q = vec![("a".to_string(), ArrayD::zeros(IxDyn(&[2])))];
        let (mut o1, mut o2) = (
            AdamW::new(Default::default()),
            AdamW::new(Default::default()),
        );
        let st = unpack(&bytes, &mut q, [&mut o1, &mut o2]).unwrap();
        assert_eq!(st, serde_json::json!(7));
        assert_eq!(q, p);
        assert_eq!(o1.steps(), 1);
        assert_eq!(o1.moments().0, opt.moments().0);
        assert_eq!(digest(&q), digest(&p));
    }
}
