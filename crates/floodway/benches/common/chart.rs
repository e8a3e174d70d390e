//! Charts for BENCHMARKS.md, drawn as SVG by the benchmarks themselves: a few bars or lines
//! need no plotting library. Files go to `docs/bench/`; tables to `target/bench/results/` (from
//! where `scripts/bench` puts them into BENCHMARKS.md).

use std::fmt::Write as _;
use std::path::PathBuf;

const WIDTH: f64 = 760.0;
const COLORS: [&str; 10] = [
    "#2f6fbf", "#e07b28", "#3a9a5b", "#b8404a", "#7d5ab5", "#8a8a8a", "#c9a227", "#2aa1b3",
    "#d66fa7", "#6b4a35",
];
/// A legend row's height: a legend wider than the chart goes on in rows below.
const LEGEND_ROW: f64 = 16.0;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What the benchmark printed with `out!`.
static REPORT: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Prints a line of the report and keeps it.
pub(crate) fn emit(line: String) {
    println!("{line}");
    if let Ok(mut report) = REPORT.lock() {
        report.push_str(&line);
        report.push('\n');
    }
}

/// Writes the report printed so far to `target/bench/results/<name>.md`, where `scripts/bench`
/// takes it for BENCHMARKS.md.
pub(crate) fn save_table(name: &str) {
    let dir = repo().join("target/bench/results");
    let report = REPORT.lock().map(|r| r.clone()).unwrap_or_default();
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("{name}.md")), report);
    }
}

fn save_svg(name: &str, svg: &str) {
    let dir = repo().join("docs/bench");
    if std::fs::create_dir_all(&dir).is_ok() {
        let path = dir.join(format!("{name}.svg"));
        match std::fs::write(&path, svg) {
            Ok(()) => eprintln!("chart: {}", path.display()),
            Err(e) => eprintln!("chart {name} not written: {e}"),
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn header(height: f64, title: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>
"##,
        WIDTH / 2.0,
        escape(title)
    );
    s
}

/// A round step for an axis spanning `max`: 1, 2 or 5 times a power of ten.
fn step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(f64::MIN_POSITIVE);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power)
}

fn number(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{}M", trim(v / 1_000_000.0))
    } else if v >= 1_000.0 {
        format!("{}k", trim(v / 1_000.0))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// One group of bars: a label and its (name, value) bars, drawn in the legend's colours.
pub(crate) struct Group {
    pub label: String,
    pub bars: Vec<(String, f64)>,
}

/// Horizontal bars, one group per row: e.g. a path's throughput beside its reference and
/// limit. `unit` labels the axis.
pub(crate) fn bars(name: &str, title: &str, unit: &str, groups: &[Group]) {
    let left = 230.0;
    let right = WIDTH - 90.0;
    let bar_h = 16.0;
    let gap = 14.0;
    let rows: usize = groups.iter().map(|g| g.bars.len()).sum();
    let mut names: Vec<&str> = Vec::new();
    for (bar, _) in groups.iter().flat_map(|g| &g.bars) {
        if !names.contains(&bar.as_str()) {
            names.push(bar);
        }
    }
    let plot_top = 44.0 + (legend_rows(&names) - 1) as f64 * LEGEND_ROW;
    let height = plot_top + rows as f64 * bar_h + groups.len() as f64 * gap + 48.0;
    let max = groups
        .iter()
        .flat_map(|g| g.bars.iter().map(|b| b.1))
        .fold(0.0, f64::max)
        .max(1.0);
    let tick = step(max, 5.0);
    let top = (max / tick).ceil() * tick;
    let x = |v: f64| left + (right - left) * v / top;
    let mut s = header(height, title);
    let bottom = height - 40.0;
    let mut t = 0.0;
    while t <= top + tick / 2.0 {
        let _ = writeln!(
            s,
            r##"<line x1="{0}" x2="{0}" y1="{plot_top}" y2="{bottom}" stroke="#ddd"/><text x="{0}" y="{1}" text-anchor="middle" fill="#555">{2}</text>"##,
            x(t),
            bottom + 14.0,
            number(t)
        );
        t += tick;
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">{}</text>"##,
        (left + right) / 2.0,
        bottom + 30.0,
        escape(unit)
    );
    let mut y = plot_top + gap / 2.0;
    for group in groups {
        let group_h = group.bars.len() as f64 * bar_h;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text>"##,
            left - 8.0,
            y + group_h / 2.0 + 4.0,
            escape(&group.label)
        );
        for (bar, value) in &group.bars {
            let i = names.iter().position(|n| n == bar).unwrap_or(0);
            let color = COLORS[i % COLORS.len()];
            let _ = writeln!(
                s,
                r##"<rect x="{left}" y="{y}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" fill="#333">{}</text>"##,
                (x(*value) - left).max(0.5),
                bar_h - 2.0,
                x(*value) + 4.0,
                y + bar_h - 5.0,
                number(*value)
            );
            y += bar_h;
        }
        y += gap;
    }
    legend(&mut s, &names, 34.0);
    s.push_str("</svg>\n");
    save_svg(name, &s);
}

/// Where each legend entry goes, left to right and in rows below when the chart's width is
/// used up: (x, row).
fn legend_places(names: &[&str]) -> Vec<(f64, usize)> {
    let mut places = Vec::with_capacity(names.len());
    let (mut x, mut row) = (12.0, 0);
    for name in names {
        let wide = 24.0 + 7.0 * name.len() as f64;
        if x > 12.0 && x + wide > WIDTH {
            (x, row) = (12.0, row + 1);
        }
        places.push((x, row));
        x += wide;
    }
    places
}

/// The rows the legend of `names` takes.
fn legend_rows(names: &[&str]) -> usize {
    legend_places(names).last().map_or(1, |p| p.1 + 1)
}

fn legend(s: &mut String, names: &[&str], top: f64) {
    for (i, (name, (x, row))) in names.iter().zip(legend_places(names)).enumerate() {
        let y = top + row as f64 * LEGEND_ROW;
        let _ = write!(
            s,
            r##"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{y}" fill="#333">{}</text>"##,
            y - 9.0,
            COLORS[i % COLORS.len()],
            x + 14.0,
            escape(name)
        );
    }
    s.push('\n');
}

/// A series of points for [`lines`].
pub(crate) struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (a reference: a capacity, a bound).
    pub dashed: bool,
}

/// Lines over a shared x axis: memory over a run, a limit and goodput over time, lag.
pub(crate) fn lines(name: &str, title: &str, x_unit: &str, y_unit: &str, series: &[Series]) {
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    let extra = (legend_rows(&names) - 1) as f64 * LEGEND_ROW;
    let (left, right, top, height) = (70.0, WIDTH - 20.0, 50.0 + extra, 330.0 + extra);
    let bottom = height - 50.0;
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let x_max = xs.fold(0.0, f64::max).max(f64::MIN_POSITIVE);
    let y_max = ys.fold(0.0, f64::max).max(1.0);
    let (x_tick, y_tick) = (step(x_max, 8.0), step(y_max, 5.0));
    let (x_top, y_top) = (
        (x_max / x_tick).ceil() * x_tick,
        (y_max / y_tick).ceil() * y_tick,
    );
    let px = |v: f64| left + (right - left) * v / x_top;
    let py = |v: f64| bottom - (bottom - top) * v / y_top;
    let mut s = header(height, title);
    let mut t = 0.0;
    while t <= y_top + y_tick / 2.0 {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{right}" y1="{0:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{1}" y="{2:.1}" text-anchor="end" fill="#555">{3}</text>"##,
            py(t),
            left - 6.0,
            py(t) + 4.0,
            number(t)
        );
        t += y_tick;
    }
    let mut t = 0.0;
    while t <= x_top + x_tick / 2.0 {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{bottom}" y2="{1}" stroke="#999"/><text x="{0:.1}" y="{2}" text-anchor="middle" fill="#555">{3}</text>"##,
            px(t),
            bottom + 4.0,
            bottom + 17.0,
            number(t)
        );
        t += x_tick;
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">{}</text><text x="16" y="{}" text-anchor="middle" fill="#555" transform="rotate(-90 16 {})">{}</text>"##,
        (left + right) / 2.0,
        bottom + 34.0,
        escape(x_unit),
        (top + bottom) / 2.0,
        (top + bottom) / 2.0,
        escape(y_unit)
    );
    for (i, one) in series.iter().enumerate() {
        let points: Vec<String> = one
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="{}" stroke-width="2"{} points="{}"/>"##,
            COLORS[i % COLORS.len()],
            if one.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            },
            points.join(" ")
        );
    }
    legend(&mut s, &names, 40.0);
    s.push_str("</svg>\n");
    save_svg(name, &s);
}
