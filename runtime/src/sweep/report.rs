//! A sweep's results: one [`Record`] per cell, and the tables and plot made from them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::Cell;

/// One cell's outcome, as `results.jsonl` holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub cell: String,
    pub label: String,
    /// The artifact key under the sweep's `artifacts/`.
    #[serde(default)]
    pub artifact: Option<String>,
    pub method: String,
    pub seed: u64,
    pub set: Vec<String>,
    pub ok: bool,
    /// The task's main metric, e.g. `accuracy`.
    pub metric: Option<String>,
    pub val: BTreeMap<String, f64>,
    pub test: BTreeMap<String, f64>,
    pub test_loss: Option<f64>,
    /// Optimiser steps the run took (search + retrain, from its log).
    pub steps: usize,
    /// Wall-clock of the cell's process.
    pub seconds: f64,
    pub peak_rss_mb: f64,
}

impl Record {
    /// The record of a cell that finished in an earlier sweep run.
    pub fn finished(c: &Cell, dir: &Path) -> Option<Record> {
        let r: Record = serde_json::from_slice(&std::fs::read(dir.join("cell.json")).ok()?).ok()?;
        (r.ok && r.set == c.set).then_some(r)
    }

    /// The record of a cell whose process just ended.
    pub fn after_run(c: &Cell, dir: &Path, ok: bool, seconds: f64, rss_kb: u64) -> Record {
        let run = dir.join("run");
        let summary: Option<serde_json::Value> = std::fs::read(run.join("summary.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let scores = |key: &str| -> BTreeMap<String, f64> {
            summary
                .as_ref()
                .and_then(|s| s[key]["metrics"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_f64()?)))
                .collect()
        };
        let steps = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"kind\":\"step\""))
            .count();
        Record {
            cell: c.dir_name(),
            label: c.label.clone(),
            artifact: Some(c.artifact.clone()),
            method: format!("{:?}", c.method).to_lowercase(),
            seed: c.seed,
            set: c.set.clone(),
            ok: ok && summary.is_some(),
            metric: summary
                .as_ref()
                .and_then(|s| s["metric_name"].as_str().map(str::to_string)),
            val: scores("final_val"),
            test: scores("final_test"),
            test_loss: summary
                .as_ref()
                .and_then(|s| s["final_test"]["loss"].as_f64()),
            steps,
            seconds,
            peak_rss_mb: rss_kb as f64 / 1024.0,
        }
    }
}

/// Mean and sample standard deviation.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, f64::NAN);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

/// Student's t quantile at 0.975 for `df` degrees of freedom (two-sided 95 %), from the
/// standard table; the normal 1.96 past 30.
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        _ => 1.96,
    }
}

/// (mean, half-width of the 95 % interval) of paired differences.
pub fn paired(diffs: &[f64]) -> (f64, f64) {
    let (m, sd) = mean_sd(diffs);
    let n = diffs.len();
    if n < 2 {
        return (m, f64::NAN);
    }
    (m, t975(n - 1) * sd / (n as f64).sqrt())
}

/// Per label, in first-seen order: the ok records.
fn by_label(records: &[Record]) -> Vec<(String, Vec<&Record>)> {
    let mut out: Vec<(String, Vec<&Record>)> = vec![];
    for r in records.iter().filter(|r| r.ok) {
        match out.iter_mut().find(|(l, _)| *l == r.label) {
            Some((_, v)) => v.push(r),
            None => out.push((r.label.clone(), vec![r])),
        }
    }
    out
}

fn fmt(m: f64, sd: f64) -> String {
    if m.is_nan() {
        // No value: e.g. the baselines' validation split, which they train on.
        "–".into()
    } else if sd.is_nan() {
        format!("{m:.4}")
    } else {
        format!("{m:.4} ± {sd:.4}")
    }
}

/// `results.md`: one row per method or ablation, the best test mean in bold, the paired
/// differences against DoRA, time against LoRA.
pub fn markdown(records: &[Record], title: &str) -> String {
    let metric = records
        .iter()
        .find_map(|r| r.metric.clone())
        .unwrap_or_else(|| "metric".into());
    let lower_better = ["perplexity", "mse", "loss"].contains(&metric.as_str());
    let groups = by_label(records);
    // (label, runs, test mean/sd, validation mean/sd, mean seconds, peak RSS)
    type Row = (String, usize, (f64, f64), (f64, f64), f64, f64);
    let stats: Vec<Row> = groups
        .iter()
        .map(|(l, rs)| {
            let test: Vec<f64> = rs
                .iter()
                .filter_map(|r| r.test.get(&metric).copied())
                .collect();
            let val: Vec<f64> = rs
                .iter()
                .filter_map(|r| r.val.get(&metric).copied())
                .collect();
            let secs = mean_sd(&rs.iter().map(|r| r.seconds).collect::<Vec<_>>()).0;
            let rss = rs.iter().map(|r| r.peak_rss_mb).fold(0.0, f64::max);
            (
                l.clone(),
                rs.len(),
                mean_sd(&test),
                mean_sd(&val),
                secs,
                rss,
            )
        })
        .collect();
    let best =
        stats
            .iter()
            .map(|s| s.2 .0)
            .filter(|m| m.is_finite())
            .fold(None, |b: Option<f64>, m| match b {
                None => Some(m),
                Some(b) if (lower_better && m < b) || (!lower_better && m > b) => Some(m),
                Some(b) => Some(b),
            });
    let lora_secs = stats.iter().find(|s| s.0 == "lora").map(|s| s.4);
    let mut md = format!("# {title}\n\n");
    md.push_str(&format!(
        "Final tensors of each run on the test split; mean ± sample standard deviation over \
         seeds; **bold**: the best test mean ({}).\n\n",
        if lower_better {
            "lower is better"
        } else {
            "higher is better"
        }
    ));
    md.push_str(&format!(
        "| method | seeds | test {metric} | validation {metric} | seconds per run | time / LoRA | peak RSS MB |\n|---|---|---|---|---|---|---|\n"
    ));
    for (l, n, test, val, secs, rss) in &stats {
        let t = fmt(test.0, test.1);
        let t = if Some(test.0) == best {
            format!("**{t}**")
        } else {
            t
        };
        let ratio = lora_secs
            .map(|ls| format!("{:.2}", secs / ls))
            .unwrap_or_else(|| "–".into());
        md.push_str(&format!(
            "| {l} | {n} | {t} | {} | {secs:.1} | {ratio} | {rss:.0} |\n",
            fmt(val.0, val.1)
        ));
    }
    // Paired by seed: each non-DoRA DoRA-family row against DoRA.
    if let Some((_, dora)) = groups.iter().find(|(l, _)| l == "dora") {
        let mut rows = vec![];
        for (l, rs) in groups.iter().filter(|(l, _)| l != "dora" && l != "lora") {
            let diffs: Vec<f64> = rs
                .iter()
                .filter_map(|r| {
                    let d = dora.iter().find(|d| d.seed == r.seed)?;
                    Some(r.test.get(&metric)? - d.test.get(&metric)?)
                })
                .collect();
            if diffs.is_empty() {
                continue;
            }
            let (m, hw) = paired(&diffs);
            let ci = if hw.is_nan() {
                "– (one seed)".to_string()
            } else {
                format!("[{:+.4}, {:+.4}]", m - hw, m + hw)
            };
            rows.push(format!(
                "| {l} − dora | {} | {m:+.4} | {ci} |\n",
                diffs.len()
            ));
        }
        if !rows.is_empty() {
            md.push_str(&format!(
                "\nPaired by seed (the seed sets the data split and order; the adapters start from the artifact's initialisation in every run):\n\n| difference | pairs | mean test {metric} | 95 % interval (t) |\n|---|---|---|---|\n"
            ));
            for r in rows {
                md.push_str(&r);
            }
        }
    }
    let failed: Vec<&str> = records
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.cell.as_str())
        .collect();
    if !failed.is_empty() {
        md.push_str(&format!(
            "\nFailed cells (see their log.txt): {}\n",
            failed.join(", ")
        ));
    }
    md
}

/// `results.svg`: each run's test metric against its wall-clock, one colour per method, and
/// each method's mean as a larger mark.
pub fn plot(records: &[Record], path: &Path) -> Result<()> {
    let metric = records
        .iter()
        .find_map(|r| r.metric.clone())
        .unwrap_or_else(|| "metric".into());
    let groups = by_label(records);
    let pts: Vec<(f64, f64)> = groups
        .iter()
        .flat_map(|(_, rs)| rs.iter())
        .filter_map(|r| Some((r.seconds, *r.test.get(&metric)?)))
        .collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = |a: f64, b: f64| {
        let d = ((b - a) * 0.1).max(1e-3 * b.abs().max(1.0));
        (a - d, b + d)
    };
    let ((x0, x1), (y0, y1)) = (pad(0.0f64.min(x0), x1), pad(y0, y1));
    let root = SVGBackend::new(path, (720, 480)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("test {metric} vs wall-clock per run"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("seconds per run")
            .y_desc(format!("test {metric}"))
            .draw()?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (k, (label, rs)) in groups.iter().enumerate() {
            let c = colors[k % colors.len()];
            let p: Vec<(f64, f64)> = rs
                .iter()
                .filter_map(|r| Some((r.seconds, *r.test.get(&metric)?)))
                .collect();
            if p.is_empty() {
                continue;
            }
            chart
                .draw_series(p.iter().map(|&xy| Circle::new(xy, 3, c.filled())))?
                .label(label.as_str())
                .legend(move |(x, y)| Circle::new((x, y), 4, c.filled()));
            let n = p.len() as f64;
            let mean = (
                p.iter().map(|q| q.0).sum::<f64>() / n,
                p.iter().map(|q| q.1).sum::<f64>() / n,
            );
            chart.draw_series(std::iter::once(Cross::new(mean, 8, c.stroke_width(2))))?;
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

/// Writes `results.jsonl`, `results.md` and `results.svg` into `out` (each atomically).
pub fn write_all(records: &[Record], out: &Path, title: &str) -> Result<()> {
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let tmp = out.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, out.join(name))
            .with_context(|| format!("writing {}", out.join(name).display()))
    };
    let mut jsonl = String::new();
    for r in records {
        jsonl.push_str(&serde_json::to_string(r)?);
        jsonl.push('\n');
    }
    write("results.jsonl", jsonl.as_bytes())?;
    write("results.md", markdown(records, title).as_bytes())?;
    let tmp = out.join(".results.svg.tmp");
    plot(records, &tmp)?;
    if tmp.exists() {
        std::fs::rename(&tmp, out.join("results.svg"))
            .with_context(|| format!("writing {}", out.join("results.svg").display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(label: &str, seed: u64, acc: f64, secs: f64) -> Record {
        Record {
            cell: format!("{label}-seed{seed}"),
            label: label.into(),
            artifact: None,
            method: label.into(),
            seed,
            set: vec![],
            ok: true,
            metric: Some("accuracy".into()),
            val: BTreeMap::from([("accuracy".into(), acc)]),
            test: BTreeMap::from([("accuracy".into(), acc)]),
            test_loss: None,
            steps: 10,
            seconds: secs,
            peak_rss_mb: 100.0,
        }
    }

    #[test]
    fn statistics_match_hand_computed_values() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12);
        assert!((sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        // Differences 0.01, 0.03, 0.02: mean 0.02, sd 0.01, t(2) = 4.303.
        let (m, hw) = paired(&[0.01, 0.03, 0.02]);
        assert!((m - 0.02).abs() < 1e-12);
        assert!((hw - 4.303 * 0.01 / 3f64.sqrt()).abs() < 1e-9, "{hw}");
        assert!(paired(&[0.1]).1.is_nan());
    }

    #[test]
    fn the_table_marks_the_best_and_pairs_by_seed() {
        let rs = vec![
            rec("lora", 1, 0.70, 10.0),
            rec("lora", 2, 0.72, 10.0),
            rec("dora", 1, 0.71, 11.0),
            rec("dora", 2, 0.73, 11.0),
            rec("bidora", 1, 0.74, 30.0),
            rec("bidora", 2, 0.74, 30.0),
        ];
        let md = markdown(&rs, "t");
        assert!(md.contains("| bidora | 2 | **0.7400 ± 0.0000**"), "{md}");
        assert!(md.contains("| lora | 2 | 0.7100 ± 0.0141"), "{md}");
        assert!(md.contains("| 3.00 |"), "time / LoRA of bidora:\n{md}");
        // Paired differences 0.03 and 0.01: mean +0.02.
        assert!(md.contains("| bidora − dora | 2 | +0.0200 |"), "{md}");
        let dir = tempfile::tempdir().unwrap();
        write_all(&rs, dir.path(), "t").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("results.jsonl"))
                .unwrap()
                .lines()
                .count(),
            6
        );
        let svg = std::fs::read_to_string(dir.path().join("results.svg")).unwrap();
        assert!(svg.contains("<svg") && svg.contains("bidora"), "{svg}");
    }
}
