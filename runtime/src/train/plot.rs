//! `curves.svg`: training curves like the paper's Figure 2, drawn from `metrics.jsonl`:
//! losses on the left (training loss smoothed, upper-level validation loss, evaluated
//! losses), the task metric on the right (validation and test), against the global step.

use std::path::Path;

use plotters::prelude::*;

use super::TrainError;

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
}

fn read(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn series(
    rows: &[serde_json::Value],
    kind: &str,
    key: &str,
    split: Option<&str>,
) -> Vec<(f64, f64)> {
    rows.iter()
        .filter(|r| r["kind"] == kind && split.is_none_or(|s| r["split"] == s))
        .filter_map(|r| Some((r["global_step"].as_f64()?, r[key].as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

/// Exponential moving average, so a noisy per-step loss reads as a curve.
fn smooth(points: Vec<(f64, f64)>, alpha: f64) -> Vec<(f64, f64)> {
    let mut acc = None;
    points
        .into_iter()
        .map(|(x, y)| {
            let s = match acc {
                None => y,
                Some(a) => alpha * y + (1.0 - alpha) * a,
            };
            acc = Some(s);
            (x, s)
        })
        .collect()
}

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    all: &[Series],
) -> Result<(), String> {
    let pts: Vec<(f64, f64)> = all.iter().flat_map(|s| s.points.iter().copied()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .draw()
        .map_err(|e| e.to_string())?;
    for s in all.iter().filter(|s| !s.points.is_empty()) {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        if s.points.len() < 40 {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// Draws `out` (SVG) from the log at `metrics`; `metric` names the task metric.
pub fn curves(metrics: &Path, out: &Path, metric: &str) -> Result<(), TrainError> {
    let rows = read(metrics);
    let losses = vec![
        Series {
            name: "train loss (smoothed)".into(),
            points: smooth(series(&rows, "step", "loss", None), 0.1),
            color: BLUE,
        },
        Series {
            name: "upper: val loss at V̄".into(),
            points: smooth(series(&rows, "step", "upper_val_loss", None), 0.1),
            color: MAGENTA,
        },
        Series {
            name: "val loss".into(),
            points: series(&rows, "eval", "loss", Some("val")),
            color: RED,
        },
        Series {
            name: "test loss".into(),
            points: series(&rows, "eval", "loss", Some("test")),
            color: GREEN,
        },
    ];
    let scores = vec![
        Series {
            name: format!("val {metric}"),
            points: series(&rows, "eval", "metric", Some("val")),
            color: RED,
        },
        Series {
            name: format!("test {metric}"),
            points: series(&rows, "eval", "metric", Some("test")),
            color: GREEN,
        },
    ];
    let tmp = out.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (1100, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(out, e))?;
        let (l, r) = root.split_horizontally(550);
        panel(&l, "loss", &losses).map_err(|e| plot_err(out, e))?;
        panel(&r, metric, &scores).map_err(|e| plot_err(out, e))?;
        root.present().map_err(|e| plot_err(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| plot_err(out, e))
}

fn plot_err(out: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: out.to_path_buf(),
        message: format!("cannot draw the curves: {e}"),
    }
}
