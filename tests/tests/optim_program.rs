//! The compiler's AdamW program (`bidora_compiler::optim`, what resident training runs on the
//! device) against the runtime's host AdamW (`bidora_runtime::optim`), over several steps with
//! a changing learning rate, weight decay and gradients of every sign and scale, in tract and
//! ONNX Runtime.

use std::collections::HashMap;

use bidora_compiler::optim::{adamw_program, grad_name, m_name, next_name, v_name};
use bidora_runtime::backend::HostTensor;
use bidora_runtime::optim::{AdamW, AdamWConfig};
use bidora_tests::*;
use ndarray::ArrayD;

fn random(shape: &[usize], seed: u64, scale: f32) -> ArrayD<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    ArrayD::from_shape_fn(shape, |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    })
}

#[test]
fn the_adamw_program_matches_the_host_adamw() {
    let shapes = [("a.lora_A", vec![6, 4]), ("a.lora_magnitude", vec![5])];
    let params: Vec<(String, Vec<usize>)> = shapes
        .iter()
        .map(|(n, s)| (n.to_string(), s.clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adamw.onnx");
    let proto = bidora_compiler::ir::convert::model_to_proto(&adamw_program(&params));
    bidora_compiler::onnx_io::write_model_auto(&proto, &path).unwrap();
    let cfg = AdamWConfig {
        lr: 0.0,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.01,
    };
    let mut backends = vec![tract1()];
    backends.extend(ort1());
    for b in &backends {
        let mut program = b.load(&path).unwrap();
        let mut host = AdamW::new(cfg);
        let mut dev = AdamW::new(cfg);
        let mut p_host: Vec<(String, ArrayD<f32>)> = params
            .iter()
            .enumerate()
            .map(|(i, (n, s))| (n.clone(), random(s, i as u64 + 1, 1.0)))
            .collect();
        let mut p_prog = p_host.clone();
        let mut moments: HashMap<String, (ArrayD<f32>, ArrayD<f32>)> = p_prog
            .iter()
            .map(|(n, a)| {
                (
                    n.clone(),
                    (ArrayD::zeros(a.raw_dim()), ArrayD::zeros(a.raw_dim())),
                )
            })
            .collect();
        let mut worst = 0.0f32;
        for step in 0..5u64 {
            let lr = 1e-2 * (1.0 + step as f32);
            // Gradients from 1e-4 to 10 in size, so eps and the bias corrections all matter.
            let grads: HashMap<String, ArrayD<f32>> = p_host
                .iter()
                .enumerate()
                .map(|(i, (n, a))| {
                    let scale = 10f32.powi(i as i32 * 3 - 2 - step as i32 % 3);
                    (
                        n.clone(),
                        random(a.shape(), 100 + step * 7 + i as u64, scale),
                    )
                })
                .collect();
            host.step(&mut p_host, &grads, lr);
            let mut inputs: Vec<(String, HostTensor)> = dev
                .program_scalars(lr)
                .into_iter()
                .map(|(n, v)| (n.to_string(), HostTensor::F32(ndarray::arr0(v).into_dyn())))
                .collect();
            for (n, a) in &p_prog {
                let (m, v) = &moments[n];
                inputs.push((n.clone(), HostTensor::F32(a.clone())));
                inputs.push((grad_name(n), HostTensor::F32(grads[n].clone())));
                inputs.push((m_name(n), HostTensor::F32(m.clone())));
                inputs.push((v_name(n), HostTensor::F32(v.clone())));
            }
            let out = program.run(&inputs).unwrap();
            let get = |name: &str| {
                let i = program
                    .output_names()
                    .iter()
                    .position(|o| o == name)
                    .unwrap();
                out[i].as_f32().unwrap().clone()
            };
            for (n, a) in p_prog.iter_mut() {
                *a = get(&next_name(n));
                moments.insert(
                    n.clone(),
                    (get(&next_name(&m_name(n))), get(&next_name(&v_name(n)))),
                );
            }
            for ((_, x), (_, y)) in p_host.iter().zip(&p_prog) {
                worst = worst.max(max_abs_diff(x, y));
            }
            let (hm, hv) = host.moments();
            for (n, (m, v)) in &moments {
                worst = worst
                    .max(max_abs_diff(&hm[n], m))
                    .max(max_abs_diff(&hv[n], v));
            }
        }
        eprintln!(
            "{}: AdamW program vs host over 5 steps: max |diff| {worst:.2e}",
            b.name()
        );
        assert!(worst <= 1e-6, "{}: {worst:e}", b.name());
    }
}
