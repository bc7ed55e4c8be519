//! A small self-contained SVG line chart (no fonts or native libraries
//! needed), for `eval --plot`.

use std::fmt::Write;

pub struct Series {
    pub name: String,
    /// (x, y) in drawing order.
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Lines with markers over a y range of 0–100 and an x range from 0 to the
/// largest x, with gridlines, axis labels and a legend.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (720.0, 440.0);
    let (left, right, top, bottom) = (70.0, 190.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let x_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).fold(1.0f64, f64::max);
    let sx = |x: f64| left + pw * x / x_max;
    let sy = |y: f64| top + ph * (1.0 - y.clamp(0.0, 100.0) / 100.0);
    let mut svg = String::new();
    let _ = writeln!(svg, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#, left + pw / 2.0, escape(title));
    for i in 0..=5 {
        let y = 20.0 * i as f64;
        let (x2, yy, tx, ty) = (left + pw, sy(y), left - 6.0, sy(y) + 4.0);
        let _ = writeln!(svg, r##"<line x1="{left}" x2="{x2}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{tx}" y="{ty}" text-anchor="end">{y}</text>"##);
    }
    let ticks = 5;
    for i in 0..=ticks {
        let x = x_max * i as f64 / ticks as f64;
        let label = if x_max >= 10.0 { format!("{}", x.round()) } else { format!("{x:.1}") };
        let _ = writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#, sx(x), top + ph + 18.0);
    }
    let _ = writeln!(svg, r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    let _ = writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, left + pw / 2.0, h - 15.0, escape(x_label));
    let _ = writeln!(svg, r#"<text transform="translate(20 {}) rotate(-90)" text-anchor="middle">{}</text>"#, top + ph / 2.0, escape(y_label));
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = writeln!(svg, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, path.join(" "));
        for &(x, y) in &s.points {
            let _ = writeln!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{}: {y:.1} at {x}</title></circle>"#, sx(x), sy(y), escape(&s.name));
        }
        let ly = top + 10.0 + 20.0 * i as f64;
        let _ = writeln!(svg, r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#, left + pw + 12.0, left + pw + 32.0, left + pw + 38.0, ly + 4.0, escape(&s.name));
    }
    svg.push_str("</svg>\n");
    svg
}
