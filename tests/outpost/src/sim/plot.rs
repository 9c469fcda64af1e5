//! The plot of a simulation: its curves (agents over seconds) as an SVG file, drawn with
//! `plotters` (text as SVG text: no font files needed).

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

use super::Report;

/// The colours of the curves, in order.
const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Draws `report`'s series to `path` (SVG, 960×540).
pub(super) fn draw(report: &Report, path: &Path) -> anyhow::Result<()> {
    let x_max = report
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.05;
    let y_max = report
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(report.agents as f64, f64::max)
        .max(1.0)
        * 1.05;
    let failed = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&report.plot_title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| failed(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(report.plot_y.as_str())
        .draw()
        .map_err(|e| failed(&e))?;
    for (series, colour) in report.series.iter().zip(COLOURS.iter().cycle()) {
        // A step curve: the count holds until the next point.
        let mut points = Vec::with_capacity(series.points.len() * 2);
        for (i, &(t, n)) in series.points.iter().enumerate() {
            if i > 0 {
                points.push((t, series.points[i - 1].1));
            }
            points.push((t, n));
        }
        let colour = *colour;
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| failed(&e))?
            .label(series.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| failed(&e))?;
    root.present()
        .map_err(|e| failed(&e))
        .with_context(|| format!("writing {}", path.display()))
}
