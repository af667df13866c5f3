//! `bidora sweep` and `bidora analyze` through the CLI: a sweep's cells, tables and reruns; a
//! killed sweep resumes to the uninterrupted one's results; the analysis against ΔM and ΔD
//! computed by hand from a constructed tensors file.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::bidora;

/// Writes `train.toml` (BiDoRA on 20 RTE pairs, hashed words) and `sweep.toml` (q/v
/// adapters on the BERT fixture, lower.lr 1e-2, `ablation`: one `xi = 0` ablation) into `dir`.
fn write_sweep(
    dir: &Path,
    steps: usize,
    retrain: usize,
    seeds: &str,
    methods: &str,
    ablation: bool,
) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/rte-train-head21.tsv");
    std::fs::write(
        dir.join("train.toml"),
        format!(
            "method = 'bidora'\nsteps = {steps}\nretrain_steps = {retrain}\nbatch_size = 4\n\
             eval_batch_size = 8\neval_every = 0\ncheckpoint_every = 2\n[data]\n\
             format = 'glue-tsv'\ntrain = '{0}'\ntest = '{0}'\ntext_a = 'sentence1'\n\
             text_b = 'sentence2'\ntokenizer = 'hash:100'\nmax_len = 32\n",
            data.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("sweep.toml"),
        format!(
            "config = 'train.toml'\nmodel = '{}'\ntargets = ['query,value']\n\
             task = 'seq-cls'\nrank = 4\nalpha = 8.0\nseeds = {seeds}\nmethods = {methods}\n\
             set = ['lower.lr=1e-2']\n{}",
            common::root().join("models/bert_legacy17.onnx").display(),
            if ablation {
                "[[ablations]]\nname = 'bidora xi=0'\nset = ['xi=0']\n"
            } else {
                ""
            }
        ),
    )
    .unwrap();
}

/// `bidora sweep` of `dir/sweep.toml` into `out`, `jobs` cells at a time on one thread.
fn sweep_cmd(dir: &Path, out: &Path, jobs: usize) -> std::process::Command {
    let mut c = bidora();
    c.args(["sweep", "--threads", "1", "--jobs", &jobs.to_string()])
        .arg(dir.join("sweep.toml"))
        .arg("-o")
        .arg(out);
    c
}

/// `bidora sweep` end to end on 20 RTE pairs: LoRA, DoRA, BiDoRA and one ablation over two
/// seeds; the results files; a rerun skips every finished cell; a third seed runs only its
/// cells; a bad method is refused before anything runs.
#[test]
fn sweep_runs_every_cell_once_and_tabulates_them() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = |seeds: &str, methods: &str| {
        write_sweep(tmp.path(), 4, 2, seeds, methods, true);
        sweep_cmd(tmp.path(), &tmp.path().join("out"), 2)
            .output()
            .unwrap()
    };
    let all = "['lora', 'dora', 'bidora']";
    let out = sweep("[1, 2]", all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    common::assert_ok(&out);
    for row in [
        "| lora | 2 |",
        "| dora | 2 |",
        "| bidora | 2 |",
        "| bidora xi=0 | 2 |",
    ] {
        assert!(stdout.contains(row), "{row}:\n{stdout}");
    }
    assert!(stdout.contains("| bidora − dora | 2 |"), "{stdout}");
    let res = tmp.path().join("out");
    let lines = |f: &str| {
        std::fs::read_to_string(res.join(f))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(lines("results.jsonl"), 8);
    assert!(res.join("results.md").is_file() && res.join("results.svg").is_file());
    // Baselines train on the whole file and get BiDoRA's batch count: 4·2 + 2 steps.
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(res.join("cells/lora-seed1/cell.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rec["steps"], 10, "{rec}");
    assert!(rec["set"].to_string().contains("val_ratio=0"), "{rec}");
    let bidora_log = res.join("cells/bidora-seed1/log.txt");
    let before = std::fs::metadata(&bidora_log).unwrap().len();
    // A rerun runs nothing; a third seed runs only its four cells.
    let out = sweep("[1, 2]", all);
    common::assert_ok(&out);
    assert_eq!(std::fs::metadata(&bidora_log).unwrap().len(), before);
    let out = sweep("[1, 2, 3]", all);
    common::assert_ok(&out);
    assert_eq!(lines("results.jsonl"), 12);
    assert_eq!(std::fs::metadata(&bidora_log).unwrap().len(), before);
    // The weight-decomposition analysis of the sweep: one row per method, LoRA's magnitude
    // and direction changes moving together.
    let out = bidora().arg("analyze").arg(&res).output().unwrap();
    let md = String::from_utf8_lossy(&out.stdout);
    common::assert_ok(&out);
    // Three seeds × 4 adapters; BiDoRA has its search and final tensors.
    for row in ["| lora | 12 |", "| dora | 12 |", "| bidora | 24 |"] {
        assert!(md.contains(row), "{row}:\n{md}");
    }
    assert_eq!(lines("analysis.jsonl"), 12 + 12 + 24 + 24);
    // At initialisation nothing has moved: ΔM and ΔD are 0 for every layer.
    let out = bidora()
        .arg("analyze")
        .arg("--artifact")
        .arg(res.join("artifacts/dora-fd"))
        .arg("--tensors")
        .arg(res.join("artifacts/dora-fd/init.safetensors"))
        .arg("-o")
        .arg(tmp.path().join("init"))
        .output()
        .unwrap();
    common::assert_ok(&out);
    for l in std::fs::read_to_string(tmp.path().join("init/analysis.jsonl"))
        .unwrap()
        .lines()
    {
        let p: serde_json::Value = serde_json::from_str(l).unwrap();
        let (dm, dd) = (
            p["delta_m"].as_f64().unwrap(),
            p["delta_d"].as_f64().unwrap(),
        );
        assert!(dm.abs() < 1e-6 && dd.abs() < 1e-9, "{p}");
    }
    let out = sweep("[1]", "['lora', 'qlora']");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("method \"qlora\""), "{err}");
}

/// What a record says about training, without the wall-clock and memory of its process.
fn outcome(res: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(res.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("peak_rss_mb");
            v
        })
        .collect()
}

/// Processes whose command line names `path` (the cells of a sweep into it).
fn processes_naming(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// A sweep killed (SIGKILL, the sweep process only) while a BiDoRA cell trains: the cell
/// dies with it, the rerun resumes that cell from its last checkpoint, and every record,
/// tensors file and logged number equals an uninterrupted sweep's.
#[test]
fn a_killed_sweep_resumes_to_the_uninterrupted_sweeps_results() {
    let tmp = tempfile::tempdir().unwrap();
    // Long enough that a cell outliving its sweep would still run when the rerun starts.
    write_sweep(tmp.path(), 400, 100, "[1]", "['dora', 'bidora']", false);
    let whole = tmp.path().join("whole");
    let out = sweep_cmd(tmp.path(), &whole, 1).output().unwrap();
    common::assert_ok(&out);

    let killed = tmp.path().join("killed");
    let mut child = sweep_cmd(tmp.path(), &killed, 1)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let cell = killed.join("cells/bidora-seed1/run");
    let start = Instant::now();
    // Past the first checkpoints, into the search.
    let newest = |dir: &Path| -> usize {
        std::fs::read_dir(dir.join("checkpoints"))
            .map(|d| {
                d.filter_map(|e| {
                    let n = e.ok()?.file_name().to_string_lossy().to_string();
                    n.strip_prefix("step-")?.split('-').next()?.parse().ok()
                })
                .max()
                .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    while newest(&cell) < 8 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep ended before BiDoRA's checkpoint at step 8"
        );
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !cell.join("summary.json").exists(),
        "the cell finished before the sweep was killed: lengthen it"
    );
    // The cell must not outlive the sweep (it would hold the run's lock against the rerun).
    let start = Instant::now();
    while !processes_naming(&killed).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the cell still runs 2 s after its sweep was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = sweep_cmd(tmp.path(), &killed, 1).output().unwrap();
    common::assert_ok(&out);
    let log = std::fs::read_to_string(killed.join("cells/bidora-seed1/log.txt")).unwrap();
    assert!(
        log.contains("resumed from"),
        "the cell started again:\n{log}"
    );
    assert_eq!(outcome(&whole), outcome(&killed));
    for cell in ["dora-seed1", "bidora-seed1"] {
        let run = |res: &Path| res.join("cells").join(cell).join("run");
        assert_eq!(
            std::fs::read(run(&whole).join("final.safetensors")).unwrap(),
            std::fs::read(run(&killed).join("final.safetensors")).unwrap(),
            "{cell}/final.safetensors"
        );
        assert_eq!(
            common::logged(&run(&whole)),
            common::logged(&run(&killed)),
            "{cell}/metrics.jsonl"
        );
    }
}

/// `bidora analyze` of a constructed tensors file against ΔM and ΔD computed here from the
/// model's own W0: adapter 0's magnitudes scaled by 1.1 (ΔM = 0.1·mean ‖W0_j‖, ΔD = 0),
/// adapter 1's B set to a known pattern (the direction turns; m stays ‖W0_j‖), the rest as
/// initialised (0 and 0).
#[test]
fn analyze_matches_deltas_computed_by_hand_on_constructed_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("art");
    common::write_bert_dora(&art, false);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(art.join("manifest.json")).unwrap()).unwrap();
    let adapters = manifest["adapters"].as_array().unwrap();
    assert!(adapters.len() >= 3, "{manifest}");
    let init = bidora_compiler::tensor_file::read(&art.join("init.safetensors")).unwrap();
    let value = |name: &str| {
        init.tensors
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} not in init.safetensors"))
            .values
            .clone()
    };
    let mut trained: Vec<(String, Vec<usize>, Vec<f32>)> = init
        .tensors
        .iter()
        .map(|e| (e.name.clone(), e.shape.clone(), e.f32_values()))
        .collect();
    let set =
        |t: &mut Vec<(String, Vec<usize>, Vec<f32>)>, name: &str, f: &dyn Fn(usize, f32) -> f32| {
            let e = t.iter_mut().find(|e| e.0 == name).unwrap();
            for (i, x) in e.2.iter_mut().enumerate() {
                *x = f(i, *x);
            }
        };
    let (a0, a1) = (&adapters[0], &adapters[1]);
    set(&mut trained, a0["magnitude"].as_str().unwrap(), &|_, m| {
        m * 1.1
    });
    let b_pattern = |i: usize| 0.05 * (((i * 7) % 5) as f32 - 2.0);
    set(&mut trained, a1["lora_b"].as_str().unwrap(), &|i, _| {
        b_pattern(i)
    });
    let file = tmp.path().join("constructed.safetensors");
    let refs: Vec<(&str, &[usize], &[f32])> = trained
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice()))
        .collect();
    bidora_compiler::tensor_file::write_f32(&file, &refs, None).unwrap();

    let out = bidora()
        .arg("analyze")
        .arg("--artifact")
        .arg(&art)
        .arg("--tensors")
        .arg(&file)
        .arg("--model")
        .arg(common::root().join("models/bert_legacy17.onnx"))
        .arg("-o")
        .arg(tmp.path().join("analysis"))
        .output()
        .unwrap();
    common::assert_ok(&out);
    let got: Vec<serde_json::Value> =
        std::fs::read_to_string(tmp.path().join("analysis/analysis.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(got.len(), adapters.len());
    let point = |a: &serde_json::Value| {
        let p = got
            .iter()
            .find(|p| p["module"] == a["module"])
            .unwrap_or_else(|| panic!("no point for {}", a["module"]));
        (
            p["delta_m"].as_f64().unwrap(),
            p["delta_d"].as_f64().unwrap(),
        )
    };

    // W0 `[in, out]` of adapter `a`, from the model file.
    let model =
        bidora_compiler::load_model(&common::root().join("models/bert_legacy17.onnx")).unwrap();
    let w0 = |a: &serde_json::Value| -> (usize, usize, Vec<f64>) {
        assert_eq!(a["layout"], "in_out", "{a}");
        let (din, dout) = (
            a["in_features"].as_u64().unwrap() as usize,
            a["out_features"].as_u64().unwrap() as usize,
        );
        let t = model
            .graph
            .constant(a["weight"].as_str().unwrap())
            .unwrap_or_else(|| panic!("{} is not a constant", a["weight"]));
        let raw = t.raw().expect("raw f32 data");
        let w: Vec<f64> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect();
        assert_eq!(w.len(), din * dout);
        (din, dout, w)
    };
    let col_norms = |din: usize, dout: usize, w: &[f64]| -> Vec<f64> {
        (0..dout)
            .map(|j| {
                (0..din)
                    .map(|i| w[i * dout + j].powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    };

    // Adapter 0: every m_j is 1.1·‖W0_j‖, V = W0 (B = 0).
    let (din, dout, w) = w0(a0);
    let n0 = col_norms(din, dout, &w);
    let want = 0.1 * n0.iter().sum::<f64>() / dout as f64;
    let (dm, dd) = point(a0);
    assert!((dm - want).abs() < 1e-5 * want, "ΔM {dm} vs {want}");
    assert!(dd.abs() < 1e-9, "ΔD {dd}");

    // Adapter 1: V = W0 + s·A·B with B the pattern; m unchanged (= ‖W0_j‖ in f32).
    let (din, dout, w) = w0(a1);
    let r = a1["rank"].as_u64().unwrap() as usize;
    let s = a1["scaling"].as_f64().unwrap();
    let a = value(a1["lora_a"].as_str().unwrap());
    assert_eq!(a.len(), din * r);
    let mut v = w.clone();
    for i in 0..din {
        for j in 0..dout {
            for k in 0..r {
                v[i * dout + j] += s * a[i * r + k] * b_pattern(k * dout + j) as f64;
            }
        }
    }
    let (n0, nv) = (col_norms(din, dout, &w), col_norms(din, dout, &v));
    let want_d = (0..dout)
        .map(|j| {
            let dot: f64 = (0..din).map(|i| w[i * dout + j] * v[i * dout + j]).sum();
            1.0 - dot / (n0[j] * nv[j])
        })
        .sum::<f64>()
        / dout as f64;
    let m1 = value(a1["magnitude"].as_str().unwrap());
    let want_m = (0..dout).map(|j| (m1[j] - n0[j]).abs()).sum::<f64>() / dout as f64;
    let (dm, dd) = point(a1);
    assert!(want_d > 1e-4, "the pattern turns the columns: {want_d}");
    assert!(
        (dd - want_d).abs() < 1e-6 * want_d.max(1e-3),
        "ΔD {dd} vs {want_d}"
    );
    assert!(
        (dm - want_m).abs() < 1e-9 + 1e-6 * want_m,
        "ΔM {dm} vs {want_m}"
    );
    assert!(want_m < 1e-5, "m starts at ‖W0_j‖: {want_m}");

    // The others are as initialised.
    for a in &adapters[2..] {
        let (dm, dd) = point(a);
        assert!(
            dm.abs() < 1e-5 && dd.abs() < 1e-9,
            "{}: {dm} {dd}",
            a["module"]
        );
    }
}
