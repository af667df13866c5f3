//! `bidora analyze`: the weight-decomposition analysis of the DoRA paper's Figure 2 and the
//! BiDoRA paper's Figure 3. For each adapted layer of a trained tensors file, against the
//! pre-trained weight `W0` (columns `j` are output features, `[in, out]` layout):
//!
//! - `ΔM = mean_j |‖W'_j‖ − ‖W0_j‖|`, the change of the column magnitudes (DoRA: `m_j`
//!   against its initial `‖W0_j‖`; LoRA: the merged `W' = W0 + s·A·B`);
//! - `ΔD = mean_j (1 − cos(W'_j, W0_j))`, the change of direction (`W'_j` points along
//!   `V'_j = W0_j + s·(A·B)_j` for DoRA).
//!
//! Over all layers and tensors files of a method, the least-squares slope of ΔM on ΔD and
//! Pearson's r say whether magnitude and direction move together (LoRA: positive in both
//! papers) or in opposition (DoRA, BiDoRA: negative).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bidora_compiler::export::{self, ManifestFile, Trained};
use serde::Serialize;

/// One layer of one tensors file.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// The method or sweep label.
    pub label: String,
    pub seed: Option<u64>,
    /// The tensors file's stem: `search`, `best`, `final`.
    pub stage: String,
    pub module: String,
    pub delta_m: f64,
    pub delta_d: f64,
}

/// An artifact's manifest and source model, read once for all its tensors files.
pub struct Source {
    artifact: PathBuf,
    manifest: ManifestFile,
    model_path: PathBuf,
    model: bidora_compiler::ir::Model,
}

impl Source {
    pub fn open(artifact: &Path, model: Option<&Path>) -> Result<Source> {
        let manifest = export::manifest::read(artifact)?;
        let model_path = export::manifest::model_path(&manifest, model)?;
        let model = export::load_source(&model_path)?;
        Ok(Source {
            artifact: artifact.to_path_buf(),
            manifest,
            model_path,
            model,
        })
    }
}

/// ΔM and ΔD of every adapter in `tensors` (trained for `src`'s artifact).
pub fn points(src: &Source, tensors: &Path, label: &str, seed: Option<u64>) -> Result<Vec<Point>> {
    let trained = Trained::read(tensors, &src.manifest.trainable_names())?;
    let resolved = export::resolve(&src.manifest, &src.model, &src.model_path, &trained)
        .with_context(|| format!("{} against {}", tensors.display(), src.artifact.display()))?;
    let stage = tensors
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(resolved
        .adapters
        .iter()
        .map(|a| {
            let (delta_m, delta_d) = deltas(
                Layer {
                    w0: &a.w0,
                    a: &a.a,
                    b: &a.b,
                    m: a.m.as_deref(),
                    scaling: a.scaling,
                },
                (a.din, a.dout, a.rank),
            );
            Point {
                label: label.to_string(),
                seed,
                stage: stage.clone(),
                module: export::resolve::label(&a.record),
                delta_m,
                delta_d,
            }
        })
        .collect())
}

/// One adapter's tensors: `w0` `[in, out]`, `a` `[in, r]`, `b` `[r, out]`, `m` `[out]`.
struct Layer<'a> {
    w0: &'a [f64],
    a: &'a [f64],
    b: &'a [f64],
    m: Option<&'a [f64]>,
    scaling: f64,
}

/// (ΔM, ΔD) of one adapter of `(in, out, rank)`, as the module's header defines them.
fn deltas(a: Layer, (din, dout, r): (usize, usize, usize)) -> (f64, f64) {
    let (mut dm, mut dd) = (0.0, 0.0);
    for j in 0..dout {
        let (mut w0w0, mut vv, mut w0v) = (0.0, 0.0, 0.0);
        for i in 0..din {
            let ab: f64 = (0..r).map(|k| a.a[i * r + k] * a.b[k * dout + j]).sum();
            let w0 = a.w0[i * dout + j];
            let v = w0 + a.scaling * ab;
            w0w0 += w0 * w0;
            vv += v * v;
            w0v += w0 * v;
        }
        let (n0, nv) = (w0w0.sqrt(), vv.sqrt());
        // LoRA has no magnitude: the merged column's norm is its magnitude.
        let mag = a.m.map_or(nv, |m| m[j]);
        dm += (mag - n0).abs();
        dd += 1.0 - w0v / (n0 * nv).max(f64::MIN_POSITIVE);
    }
    (dm / dout as f64, dd / dout as f64)
}

/// (slope of ΔM on ΔD, Pearson's r) over `pts`; NaN with fewer than two distinct ΔD.
pub fn fit(pts: &[&Point]) -> (f64, f64) {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return (f64::NAN, f64::NAN);
    }
    let (mx, my) = (
        pts.iter().map(|p| p.delta_d).sum::<f64>() / n,
        pts.iter().map(|p| p.delta_m).sum::<f64>() / n,
    );
    let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
    for p in pts {
        let (dx, dy) = (p.delta_d - mx, p.delta_m - my);
        sxx += dx * dx;
        syy += dy * dy;
        sxy += dx * dy;
    }
    if sxx == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    (sxy / sxx, sxy / (sxx * syy).sqrt())
}

/// A tensors file to analyse and what it belongs to.
pub struct Input {
    pub artifact: PathBuf,
    pub tensors: PathBuf,
    pub label: String,
    pub seed: Option<u64>,
}

/// The search and final tensors of every finished cell of a sweep folder.
pub fn sweep_inputs(dir: &Path) -> Result<Vec<Input>> {
    let cells = dir.join("cells");
    let mut out = vec![];
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&cells)
        .with_context(|| format!("cannot read {} (not a sweep folder?)", cells.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for cell in entries {
        let Ok(bytes) = std::fs::read(cell.join("cell.json")) else {
            continue;
        };
        let rec: crate::sweep::report::Record = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}/cell.json", cell.display()))?;
        if !rec.ok {
            continue;
        }
        // Cells of sweeps before the record named its artifact: the only one of its kind.
        let Some(artifact) = rec
            .artifact
            .clone()
            .or_else(|| guess_artifact(dir, &rec.method))
        else {
            continue;
        };
        for stage in ["search", "final"] {
            let t = cell.join("run").join(format!("{stage}.safetensors"));
            if t.is_file() {
                out.push(Input {
                    artifact: dir.join("artifacts").join(&artifact),
                    tensors: t,
                    label: rec.label.clone(),
                    seed: Some(rec.seed),
                });
            }
        }
    }
    Ok(out)
}

/// The sweep's artifact for `method` when exactly one fits (`lora`, or one `dora-*`).
fn guess_artifact(dir: &Path, method: &str) -> Option<String> {
    let names: Vec<String> = std::fs::read_dir(dir.join("artifacts"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .filter(|n| {
            if method == "lora" {
                n == "lora"
            } else {
                n.starts_with("dora-")
            }
        })
        .collect();
    (names.len() == 1).then(|| names[0].clone())
}

/// The labels of `pts`, in first-seen order.
fn labels(pts: &[Point]) -> Vec<&str> {
    let mut out: Vec<&str> = vec![];
    for p in pts {
        if !out.contains(&p.label.as_str()) {
            out.push(&p.label);
        }
    }
    out
}

/// `analysis.md`: the fit per label.
pub fn markdown(pts: &[Point]) -> String {
    let labels = labels(pts);
    let mut md = String::from(
        "# Weight decomposition: ΔM against ΔD\n\nOne point per adapted layer and tensors \
         file. Slope: least squares of ΔM on ΔD (the DoRA paper's Figure 2 reading; the \
         BiDoRA paper reports −1.784 for DoRA and −8.042 for BiDoRA on GPT-2 medium / E2E); \
         r: Pearson's correlation.\n\n| method | points | mean ΔD | mean ΔM | slope | r |\n\
         |---|---|---|---|---|---|\n",
    );
    for l in labels {
        let sel: Vec<&Point> = pts.iter().filter(|p| p.label == l).collect();
        let n = sel.len() as f64;
        let (md_, mm) = (
            sel.iter().map(|p| p.delta_d).sum::<f64>() / n,
            sel.iter().map(|p| p.delta_m).sum::<f64>() / n,
        );
        let (slope, r) = fit(&sel);
        md.push_str(&format!(
            "| {l} | {} | {md_:.3e} | {mm:.3e} | {slope:.3} | {r:.3} |\n",
            sel.len()
        ));
    }
    md
}

/// `analysis.svg`: the scatter, one colour per label.
pub fn plot(pts: &[Point], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    if pts.is_empty() {
        return Ok(());
    }
    let (x1, y1) = pts.iter().fold((0f64, 0f64), |(a, b), p| {
        (a.max(p.delta_d), b.max(p.delta_m))
    });
    let root = SVGBackend::new(path, (720, 480)).into_drawing_area();
    let labels = labels(pts);
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("ΔM against ΔD per adapted layer", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x1.max(1e-12) * 1.1, 0.0..y1.max(1e-12) * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("ΔD (mean 1 − cos)")
            .y_desc("ΔM (mean |Δ magnitude|)")
            .draw()?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (k, l) in labels.iter().enumerate() {
            let c = colors[k % colors.len()];
            chart
                .draw_series(
                    pts.iter()
                        .filter(|p| p.label == *l)
                        .map(|p| Circle::new((p.delta_d, p.delta_m), 3, c.filled())),
                )?
                .label(*l)
                .legend(move |(x, y)| Circle::new((x, y), 4, c.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(d: f64, m: f64) -> Point {
        Point {
            label: "x".into(),
            seed: None,
            stage: "final".into(),
            module: "q".into(),
            delta_m: m,
            delta_d: d,
        }
    }

    #[test]
    fn the_fit_is_the_least_squares_slope_and_pearson_r() {
        // ΔM = 3 − 2·ΔD exactly: slope −2, r −1.
        let pts = [p(0.0, 3.0), p(1.0, 1.0), p(2.0, -1.0)];
        let refs: Vec<&Point> = pts.iter().collect();
        let (s, r) = fit(&refs);
        assert!(
            (s + 2.0).abs() < 1e-12 && (r + 1.0).abs() < 1e-12,
            "{s} {r}"
        );
        assert!(fit(&refs[..1]).0.is_nan());
    }

    /// A 2×2 layer with rank 1, worked by hand. W0 = [[3, 0], [4, 1]] (`[in, out]`: column 0
    /// is (3, 4), column 1 is (0, 1)); A = [1, 0]ᵀ, B = [0, 2], s = 0.5, so s·A·B adds 1 to
    /// W0[0][1]: V's columns are (3, 4) and (1, 1).
    /// - DoRA with m = (5.5, 1): ΔM = (|5.5 − 5| + |1 − 1|)/2 = 0.25; ΔD = (0 + 1 − 1/√2)/2.
    /// - LoRA (m = ‖V_j‖ = (5, √2)): ΔM = (0 + √2 − 1)/2, the same ΔD.
    #[test]
    fn deltas_match_a_hand_computed_layer() {
        let layer = |m| Layer {
            w0: &[3.0, 0.0, 4.0, 1.0],
            a: &[1.0, 0.0],
            b: &[0.0, 2.0],
            m,
            scaling: 0.5,
        };
        let dd = (1.0 - 0.5f64.sqrt()) / 2.0;
        let (m, d) = deltas(layer(Some(&[5.5, 1.0])), (2, 2, 1));
        assert!(
            (m - 0.25).abs() < 1e-12 && (d - dd).abs() < 1e-12,
            "{m} {d}"
        );
        let (m, d) = deltas(layer(None), (2, 2, 1));
        assert!(
            (m - (2f64.sqrt() - 1.0) / 2.0).abs() < 1e-12 && (d - dd).abs() < 1e-12,
            "{m} {d}"
        );
    }
}
