//! Decoding (`bidora_runtime::generate`) over a real compiled program: the GPT-2 fixture's
//! `forward.onnx` (LoRA on q/v at initialisation) in tract. Greedy decoding of a batch with
//! prompts of different lengths equals an independent loop that runs each prompt alone and
//! takes the argmax at its last position; beam search with one beam equals greedy.

use bidora_compiler::load_model;
use bidora_compiler::pipeline;
use bidora_compiler::rewrite::Method;
use bidora_runtime::artifact::Artifact;
use bidora_runtime::backend::{select, BackendKind, BackendOptions, HostTensor, Program};
use bidora_runtime::generate::{beam_search, greedy, GenerateOptions, ProgramLm};
use bidora_tests::*;
use ndarray::{ArrayD, IxDyn};

fn forward() -> (Box<dyn Program>, Vec<(String, HostTensor)>, String) {
    let model = load_model(&repo_root().join("models/gpt2_legacy17.onnx")).unwrap();
    let opts = options(qv_targets("gpt2"), Method::Lora);
    let c = pipeline::compile(&model, &opts).unwrap();
    let art = pipeline::artifact(&c, "gpt2_legacy17.onnx", &opts);
    let dir = tempfile::tempdir().unwrap();
    bidora_compiler::artifact::write(&art, &dir.path().join("a"), false).unwrap();
    let art = Artifact::open(&dir.path().join("a")).unwrap();
    let sig = &art.manifest.programs[&bidora_compiler::artifact::ProgramKey::Forward];
    let backend = select(
        BackendKind::Tract,
        &BackendOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let program = backend.load(&art.dir.join(&sig.file)).unwrap();
    let fixed: Vec<(String, HostTensor)> = art
        .init
        .iter()
        .map(|(n, a)| (n.clone(), HostTensor::F32(a.clone())))
        .collect();
    (program, fixed, sig.outputs[0].name.clone())
}

/// The reference: one prompt at a time, no padding, argmax of the last position's logits.
fn argmax_loop(
    p: &mut dyn Program,
    fixed: &[(String, HostTensor)],
    prompt: &[i64],
    steps: usize,
) -> Vec<i64> {
    let mut seq = prompt.to_vec();
    for _ in 0..steps {
        let s = seq.len();
        let mut inputs = vec![
            (
                "input_ids".to_string(),
                HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, s]), seq.clone()).unwrap()),
            ),
            (
                "attention_mask".to_string(),
                HostTensor::I64(ArrayD::from_elem(IxDyn(&[1, s]), 1)),
            ),
        ];
        inputs.extend(fixed.iter().cloned());
        let out = p.run(&inputs).unwrap();
        let logits = out[0].as_f32().unwrap();
        let v = logits.shape()[2];
        let last: Vec<f32> = (0..v).map(|k| logits[[0, s - 1, k]]).collect();
        let best = (0..v).fold(0, |b, k| if last[k] > last[b] { k } else { b });
        seq.push(best as i64);
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn greedy_and_one_beam_match_an_argmax_loop_on_gpt2() {
    let (mut program, fixed, logits) = forward();
    let prompts = vec![vec![5i64, 6, 7, 8, 9], vec![13, 14]];
    let steps = 4;
    let want: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| argmax_loop(&mut *program, &fixed, p, steps))
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: steps,
        eos: None,
        beam_width: 1,
        length_penalty: 1.0,
        no_repeat_ngram: 0,
    };
    let mut lm = ProgramLm::new(&mut *program, fixed.clone(), &logits, 0).unwrap();
    let got = greedy(&mut lm, &prompts, &opts).unwrap();
    assert_eq!(got, want);
    // Padding every batch to a multiple of 8 (fewer shapes for tract) changes nothing.
    let mut padded = ProgramLm::new(&mut *program, fixed.clone(), &logits, 0)
        .unwrap()
        .pad_to_multiple_of(8);
    assert_eq!(greedy(&mut padded, &prompts, &opts).unwrap(), want);
    let mut lm = ProgramLm::new(&mut *program, fixed.clone(), &logits, 0).unwrap();
    for (p, w) in prompts.iter().zip(&want) {
        let b = beam_search(&mut lm, p, &opts).unwrap();
        assert_eq!(&b[0].tokens, w);
    }
}
