//! PNG charts for results a person would rather see than read (size-vs-perplexity frontiers, loss
//! curves, speed-vs-quality, pipeline timelines). x/y series as lines and/or points, and rows of
//! bars over time ([`Timeline`]), drawn with plotters and a font embedded in the binary so charts
//! render on machines without fonts. Written atomically like every other output.

use crate::{atomic_file, Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Line,
    Points,
    LineAndPoints,
}

/// One named series of (x, y) points.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, style: Style) -> Series {
        Series {
            name: name.into(),
            points,
            style,
        }
    }
}

/// A chart: titles and the series to draw. `log_y` plots log10(y) (the axis label says so).
#[derive(Clone, Debug, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
}

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is compiled in and known to parse (tested), so failure cannot happen at run time.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// One bar of a [`Timeline`]: a span of x on one row, in one colour class.
#[derive(Clone, Debug)]
pub struct Bar {
    pub row: usize,
    pub start: f64,
    pub end: f64,
    /// Index into [`Timeline::classes`] (the colour and legend entry).
    pub class: usize,
    /// Written inside the bar when it is wide enough.
    pub label: String,
}

/// Rows of bars over x (e.g. pipeline stages over time, forward and backward steps coloured).
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub title: String,
    pub x_label: String,
    /// Row names, top to bottom.
    pub rows: Vec<String>,
    /// Legend names of the colour classes.
    pub classes: Vec<String>,
    pub bars: Vec<Bar>,
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Draws `chart` as a PNG at `path` (800×500), atomically.
pub fn write_png(path: &Path, chart: &Chart) -> Result<()> {
    write_atomically(path, |tmp| draw(tmp, chart))
}

/// Draws `timeline` as a PNG at `path` (1000×100 + 70 per row), atomically.
pub fn write_timeline_png(path: &Path, timeline: &Timeline) -> Result<()> {
    write_atomically(path, |tmp| draw_timeline(tmp, timeline))
}

fn write_atomically(path: &Path, draw: impl FnOnce(&Path) -> DrawResult) -> Result<()> {
    // The encoder picks PNG by the file's extension, so the temporary name keeps it.
    let mut tmp = atomic_file::temp_path(path)?.into_os_string();
    tmp.push(".png");
    let tmp = std::path::PathBuf::from(tmp);
    let guard = atomic_file::RemoveOnDrop(Some(tmp.clone()));
    draw(&tmp).map_err(|e| Error::Invalid(format!("drawing {}: {e}", path.display())))?;
    atomic_file::persist(&tmp, path)?;
    guard.disarm();
    Ok(())
}

type Ctx<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// The series' legend, in the upper right corner.
fn draw_legend<'a, 'b: 'a>(ctx: &mut Ctx<'a, 'b>) -> DrawResult {
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FAMILY, 13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn draw_timeline(path: &Path, tl: &Timeline) -> DrawResult {
    register_font();
    let n = tl.rows.len().max(1);
    let x1 = tl.bars.iter().map(|b| b.end).fold(0.0, f64::max);
    let x1 = if x1 > 0.0 { x1 } else { 1.0 };
    let root = BitMapBackend::new(path, (1000, 100 + 70 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(&tl.title, (FAMILY, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        // Room on the right for the legend.
        .build_cartesian_2d(0.0..x1 * 1.16, 0.0..n as f64)?;
    // Row i is drawn from the top: y = n - 1 - i .. n - i, labelled at its middle.
    let rows = tl.rows.clone();
    ctx.configure_mesh()
        .disable_y_mesh()
        .x_desc(&tl.x_label)
        .y_labels(2 * n + 1)
        .y_label_formatter(&move |y| {
            let k = (2.0 * y).round() as usize;
            match (k % 2 == 1).then(|| n - 1 - k / 2) {
                Some(i) if i < rows.len() => rows[i].clone(),
                _ => String::new(),
            }
        })
        .label_style((FAMILY, 13))
        .draw()?;
    for (c, name) in tl.classes.iter().enumerate() {
        let color = Palette99::pick(c).mix(0.85);
        let bars = tl.bars.iter().filter(|b| b.class == c).map(|b| {
            let y = (n - 1 - b.row) as f64;
            Rectangle::new([(b.start, y + 0.15), (b.end, y + 0.85)], color.filled())
        });
        ctx.draw_series(bars)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    // A white edge, so that back-to-back bars stay apart.
    ctx.draw_series(tl.bars.iter().map(|b| {
        let y = (n - 1 - b.row) as f64;
        Rectangle::new(
            [(b.start, y + 0.15), (b.end, y + 0.85)],
            WHITE.stroke_width(1),
        )
    }))?;
    let px_per_x = 900.0 / (x1 * 1.16);
    ctx.draw_series(
        tl.bars
            .iter()
            .filter(|b| (b.end - b.start) * px_per_x >= 8.0 * b.label.len() as f64 + 4.0)
            .map(|b| {
                let y = (n - 1 - b.row) as f64 + 0.62;
                Text::new(b.label.clone(), (b.start + 2.0 / px_per_x, y), (FAMILY, 12))
            }),
    )?;
    draw_legend(&mut ctx)?;
    root.present()?;
    Ok(())
}

fn finite_points(chart: &Chart, s: &Series) -> Vec<(f64, f64)> {
    s.points
        .iter()
        .map(|&(x, y)| (x, if chart.log_y { y.log10() } else { y }))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

fn span(lo: f64, hi: f64) -> std::ops::Range<f64> {
    if !(lo.is_finite() && hi.is_finite()) {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1.0) * 0.05
    };
    (lo - pad)..(hi + pad)
}

fn draw(path: &Path, chart: &Chart) -> DrawResult {
    register_font();
    let series: Vec<Vec<(f64, f64)>> = chart
        .series
        .iter()
        .map(|s| finite_points(chart, s))
        .collect();
    let all = series.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let y_label = if chart.log_y {
        format!("log10 {}", chart.y_label)
    } else {
        chart.y_label.clone()
    };
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(span(x0, x1), span(y0, y1))?;
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(y_label)
        .label_style((FAMILY, 13))
        .draw()?;
    for (i, (s, pts)) in chart.series.iter().zip(&series).enumerate() {
        if pts.is_empty() {
            continue;
        }
        let color = Palette99::pick(i).mix(0.9);
        let style = color.stroke_width(2);
        let legend_color = color;
        if matches!(s.style, Style::Line | Style::LineAndPoints) {
            ctx.draw_series(LineSeries::new(pts.iter().copied(), style))?
                .label(&s.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], legend_color));
        }
        if matches!(s.style, Style::Points | Style::LineAndPoints) {
            let points = ctx.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            if s.style == Style::Points {
                points
                    .label(&s.name)
                    .legend(move |(x, y)| Circle::new((x + 8, y), 4, legend_color.filled()));
            }
        }
    }
    draw_legend(&mut ctx)?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_with_lines_points_and_a_log_axis() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        let chart = Chart {
            title: "size vs perplexity".into(),
            x_label: "bits per weight".into(),
            y_label: "perplexity".into(),
            log_y: true,
            series: vec![
                Series::new(
                    "uniform",
                    vec![(2.5, 90.0), (4.5, 19.0), (8.5, 16.0)],
                    Style::LineAndPoints,
                ),
                Series::new("optimal", vec![(3.0, 30.0), (5.0, 17.0)], Style::Points),
                Series::new("empty", vec![], Style::Line),
            ],
        };
        write_png(&p, &chart).unwrap();
        if let Ok(keep) = std::env::var("PARE_KEEP_PLOT") {
            std::fs::copy(&p, keep).unwrap();
        }
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 5000, "{} bytes", bytes.len());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn draws_a_timeline_of_rows_of_bars() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.png");
        let bar = |row, start, end, class| Bar {
            row,
            start,
            end,
            class,
            label: "0".into(),
        };
        let tl = Timeline {
            title: "one step".into(),
            x_label: "seconds".into(),
            rows: vec!["stage 0".into(), "stage 1".into()],
            classes: vec!["forward".into(), "backward".into()],
            bars: vec![
                bar(0, 0.0, 1.0, 0),
                bar(1, 1.0, 2.0, 0),
                bar(1, 2.0, 4.0, 1),
            ],
        };
        write_timeline_png(&p, &tl).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
