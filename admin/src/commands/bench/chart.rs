//! The bench chart as a self-contained SVG: the TTFT distribution (CDF) of every sweep point,
//! and output tokens/s against tokens/s per user across the sweep.

use std::fmt::Write as _;
use std::path::Path;

use super::stats::PointStats;

const PANEL_WIDTH: f64 = 480.0;
const PANEL_HEIGHT: f64 = 360.0;
const MARGIN: f64 = 56.0;
const TICKS: usize = 5;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// A plot area at `left`, mapping data ranges onto it.
struct Panel {
    left: f64,
    x_max: f64,
    y_max: f64,
}

impl Panel {
    fn x(&self, v: f64) -> f64 {
        self.left + MARGIN + v / self.x_max.max(1e-9) * (PANEL_WIDTH - 1.5 * MARGIN)
    }

    fn y(&self, v: f64) -> f64 {
        PANEL_HEIGHT - MARGIN + 20.0 - v / self.y_max.max(1e-9) * (PANEL_HEIGHT - 1.5 * MARGIN)
    }

    /// Axes, tick labels and titles.
    fn frame(&self, svg: &mut String, title: &str, x_label: &str, y_label: &str) {
        let (x0, y0) = (self.x(0.0), self.y(0.0));
        let (x1, y1) = (self.x(self.x_max), self.y(self.y_max));
        let _ = write!(
            svg,
            r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{title}</text>
<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>
<text x="{}" y="{}" font-size="12" text-anchor="middle">{x_label}</text>
<text x="{}" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 {} {})">{y_label}</text>
"#,
            self.left + PANEL_WIDTH / 2.0,
            (x0 + x1) / 2.0,
            y0 + 36.0,
            self.left + 14.0,
            (y0 + y1) / 2.0,
            self.left + 14.0,
            (y0 + y1) / 2.0,
        );
        for i in 0..=TICKS {
            let f = i as f64 / TICKS as f64;
            let (xv, yv) = (f * self.x_max, f * self.y_max);
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" font-size="10" text-anchor="middle">{}</text><text x="{}" y="{}" font-size="10" text-anchor="end">{}</text>"#,
                self.x(xv),
                y0 + 16.0,
                short(xv),
                x0 - 6.0,
                self.y(yv) + 3.0,
                short(yv),
            );
        }
    }
}

fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Writes the chart of `points` to `path`.
pub(crate) fn write(path: &Path, points: &[PointStats]) -> std::io::Result<()> {
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{PANEL_HEIGHT}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
"#,
        2.0 * PANEL_WIDTH
    );
    let ttft_max = points
        .iter()
        .filter_map(|p| p.ttft_samples_ms.last().copied())
        .fold(0.0, f64::max);
    let cdf = Panel {
        left: 0.0,
        x_max: ttft_max * 1.05,
        y_max: 1.0,
    };
    cdf.frame(
        &mut svg,
        "TTFT distribution",
        "time to first token (ms)",
        "fraction of requests",
    );
    for (i, point) in points.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = point.ttft_samples_ms.len().max(1) as f64;
        let path: Vec<String> = point
            .ttft_samples_ms
            .iter()
            .enumerate()
            .map(|(k, &v)| format!("{:.1},{:.1}", cdf.x(v), cdf.y((k + 1) as f64 / n)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>
<text x="{}" y="{}" font-size="11" fill="{color}">{}</text>
"#,
            path.join(" "),
            cdf.x(0.0) + 10.0,
            52.0 + 14.0 * i as f64,
            point.load
        );
    }
    let throughput = Panel {
        left: PANEL_WIDTH,
        x_max: points
            .iter()
            .map(|p| p.tokens_per_second_per_user)
            .fold(0.0, f64::max)
            * 1.1,
        y_max: points
            .iter()
            .map(|p| p.output_tokens_per_second)
            .fold(0.0, f64::max)
            * 1.1,
    };
    throughput.frame(
        &mut svg,
        "Throughput against per-user speed",
        "tokens/s per user",
        "output tokens/s",
    );
    let line: Vec<String> = points
        .iter()
        .map(|p| {
            format!(
                "{:.1},{:.1}",
                throughput.x(p.tokens_per_second_per_user),
                throughput.y(p.output_tokens_per_second)
            )
        })
        .collect();
    let _ = writeln!(
        svg,
        r##"<polyline fill="none" stroke="#444" stroke-width="1.5" points="{}"/>"##,
        line.join(" ")
    );
    for (i, p) in points.iter().enumerate() {
        let (x, y) = (
            throughput.x(p.tokens_per_second_per_user),
            throughput.y(p.output_tokens_per_second),
        );
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            svg,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
            x + 6.0,
            y - 6.0,
            p.load
        );
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg)
}
