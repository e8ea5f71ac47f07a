//! The SVG of `inspect`: heatmaps (kv heads × segments) of entropy and budgets, each with its
//! colour scale, and per kv head the map of the key blocks each query segment keeps.

use std::fmt::Write as _;

use entropy_kernels::{EntropyConfig, HeadClass};

use super::{Cell, KeptMap, Layer, kept_map};

type Rgb = (u8, u8, u8);

/// Stops of a perceptual-ish colour ramp (dark blue → teal → yellow).
const RAMP: [(f32, Rgb); 4] =
    [(0.0, (68, 1, 84)), (0.35, (49, 104, 142)), (0.65, (53, 183, 121)), (1.0, (253, 231, 37))];
/// Heatmap cell of segment 0, which has no candidate blocks.
const NO_CANDIDATES: &str = "#cccccc";

/// Kept-block map colours.
const KEPT: Rgb = (194, 65, 12);
const SKIPPED: Rgb = (229, 231, 235);
const DENSE: &str = "#6f9fd8";
const OWN: &str = "#f5c89a";
const MASKED: &str = "url(#masked)";

/// Kept-block maps wider than this many blocks draw several blocks per column.
const MAX_COLUMNS: usize = 240;
/// Target size of one kv head's kept-block map, in pixels.
const MAP_WIDTH: f32 = 360.0;
const MAP_HEIGHT: f32 = 240.0;
/// Width the kept-block maps are laid out in.
const GRID_WIDTH: f32 = 1100.0;

/// Heatmap geometry: kv-head rows of `ROW_H`, labels in the left margin.
const LEFT: f32 = 90.0;
const ROW_H: f32 = 18.0;

fn hex((r, g, b): Rgb) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// `a` moved a fraction `t` towards `b`.
fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    let m = |u: u8, v: u8| (u as f32 + t * (v as f32 - u as f32)).round() as u8;
    (m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

/// The ramp's colour at `x` in [0, 1].
fn color(x: f32) -> String {
    let x = x.clamp(0.0, 1.0);
    let i = RAMP.iter().rposition(|s| s.0 <= x).unwrap_or(0).min(RAMP.len() - 2);
    let (a, b) = (RAMP[i], RAMP[i + 1]);
    hex(mix(a.1, b.1, (x - a.0) / (b.0 - a.0)))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A colour scale: values `lo..=hi`, in `unit`, onto the ramp.
struct Scale {
    lo: f32,
    hi: f32,
    unit: &'static str,
    decimals: usize,
}

impl Scale {
    /// Entropy from its smallest to its largest value over segments ≥ 1 (segment 0 has no
    /// candidates and is drawn grey).
    fn entropy(layer: &Layer) -> Scale {
        let n = layer.dims.segments;
        let values = layer.entropy.iter().enumerate().filter(|(u, _)| u % n != 0).map(|(_, &e)| e);
        let hi = values.clone().fold(0f32, f32::max);
        // Entropy is non-negative: no `min -0.000 nats` from rounding.
        let lo = values.fold(hi, f32::min).max(0.0);
        Scale { lo, hi, unit: "nats", decimals: 3 }
    }

    /// Budgets over their possible range, `base..=3·base` tokens.
    fn budget(cfg: &EntropyConfig) -> Scale {
        let base = cfg.base_budget as f32;
        Scale { lo: base, hi: 3.0 * base, unit: "tokens", decimals: 0 }
    }

    fn position(&self, x: f32) -> f32 {
        ((x - self.lo) / (self.hi - self.lo).max(1e-9)).clamp(0.0, 1.0)
    }

    fn label(&self, x: f32) -> String {
        format!("{x:.*} {}", self.decimals, self.unit)
    }
}

pub(super) fn render(layer: &Layer, cfg: &EntropyConfig, title: &str) -> String {
    let d = layer.dims;
    let cell = (720.0 / d.segments as f32).clamp(3.0, 28.0);
    let mut body = String::new();
    let mut y = 40.0;
    let panels = [("entropy", Scale::entropy(layer), &layer.entropy), ("budget", Scale::budget(cfg), &layer.budgets)];
    for (name, scale, values) in &panels {
        y = heatmap(&mut body, layer, name, scale, values, y, cell);
    }
    let (kept_width, y) = kept_maps(&mut body, layer, cfg, y + 10.0);
    // Text widths are estimates (~7 px a character at 13 px).
    let title_width = 20.0 + 7.0 * title.chars().count() as f32;
    let width = (LEFT + d.segments as f32 * cell + 40.0).max(kept_width).max(title_width);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{:.0}" font-family="sans-serif" font-size="11">"#,
        y + 20.0
    );
    defs(&mut s);
    let _ = writeln!(s, r#"<text x="10" y="18" font-size="13">{}</text>"#, escape(title));
    s.push_str(&body);
    s.push_str("</svg>\n");
    s
}

/// The ramp as a gradient (for the legends) and the hatching of causally masked cells.
fn defs(s: &mut String) {
    s.push_str(r#"<defs><linearGradient id="ramp">"#);
    for (x, _) in RAMP {
        let _ = write!(s, r#"<stop offset="{x}" stop-color="{}"/>"#, color(x));
    }
    s.push_str(concat!(
        r#"</linearGradient><pattern id="masked" width="4" height="4" patternUnits="userSpaceOnUse">"#,
        r##"<rect width="4" height="4" fill="#ffffff"/><path d="M0,4 l4,-4" stroke="#c8c8c8" stroke-width="0.7"/>"##,
        "</pattern></defs>\n"
    ));
}

/// One heatmap, kv heads (rows, all batch entries) × segments, and its colour scale, from `y0`
/// down; returns where the next element starts.
fn heatmap(s: &mut String, layer: &Layer, name: &str, scale: &Scale, values: &[f32], y0: f32, cell: f32) -> f32 {
    let d = layer.dims;
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{:.1}">{name} ({}; segment 0 grey: no candidate blocks)</text>"#,
        y0 + 12.0,
        scale.unit
    );
    for b in 0..d.batch {
        for h in 0..d.kv_heads {
            let r = b * d.kv_heads + h;
            let y = y0 + 20.0 + r as f32 * ROW_H;
            let _ = writeln!(s, r#"<text x="4" y="{:.1}">b{b} h{h} {}</text>"#, y + 13.0, class_name(layer, r));
            for seg in 0..d.segments {
                let v = values[d.unit(b, h, seg)];
                let fill = if seg == 0 { NO_CANDIDATES.to_string() } else { color(scale.position(v)) };
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{y:.1}" width="{cell:.1}" height="{:.1}" fill="{fill}"><title>b{b} h{h} segment {seg}: {}</title></rect>"#,
                    LEFT + seg as f32 * cell,
                    ROW_H - 1.0,
                    scale.label(v)
                );
            }
        }
    }
    let y = y0 + 20.0 + (d.batch * d.kv_heads) as f32 * ROW_H + 14.0;
    let _ = writeln!(s, r#"<text x="{LEFT}" y="{y:.1}">segment 0 … {}</text>"#, d.segments - 1);
    legend(s, scale, y + 10.0)
}

/// A colour scale's legend: the ramp from its minimum to its maximum, labelled with both.
fn legend(s: &mut String, scale: &Scale, y: f32) -> f32 {
    let (x, w) = (LEFT + 75.0, 240.0);
    let _ = writeln!(
        s,
        r##"<g class="legend"><text x="{LEFT}" y="{:.1}">colour scale</text><rect x="{x}" y="{y:.1}" width="{w}" height="10" fill="url(#ramp)" stroke="#888" stroke-width="0.5"/><text x="{x}" y="{:.1}">min {}</text><text x="{:.1}" y="{:.1}" text-anchor="end">max {}</text></g>"##,
        y + 9.0,
        y + 22.0,
        scale.label(scale.lo),
        x + w,
        y + 22.0,
        scale.label(scale.hi)
    );
    y + 36.0
}

fn class_name(layer: &Layer, row: usize) -> &'static str {
    if layer.head_class[row] == HeadClass::Rigid { "rigid" } else { "dyn" }
}

/// Blocks per drawn column, so that no map is wider than `MAX_COLUMNS`.
fn blocks_per_column(blocks: usize) -> usize {
    blocks.div_ceil(MAX_COLUMNS).max(1)
}

/// The fill of a column's `cells` (one segment's): a dense segment's colour, else the share of
/// its candidate blocks kept (rounded up to quarters, so that one kept block stays visible),
/// else the segment's own keys or the causal mask.
fn fill(cells: &[Cell]) -> String {
    let count = |kind: Cell| cells.iter().filter(|&&c| c == kind).count();
    let (kept, skipped) = (count(Cell::Kept), count(Cell::Skipped));
    if count(Cell::Dense) > 0 {
        DENSE.to_string()
    } else if kept + skipped > 0 {
        let share = (kept as f32 / (kept + skipped) as f32 * 4.0).ceil() / 4.0;
        hex(mix(SKIPPED, KEPT, share))
    } else if count(Cell::Own) > 0 {
        OWN.to_string()
    } else {
        MASKED.to_string()
    }
}

/// The kept-block maps of every (batch entry, kv head), with their caption and legend, from
/// `y0` down; returns the width they take and where the next element starts.
fn kept_maps(s: &mut String, layer: &Layer, cfg: &EntropyConfig, y0: f32) -> (f32, f32) {
    let d = layer.dims;
    s.push_str("<g id=\"kept-blocks\">\n");
    let _ = writeln!(s, r#"<text x="10" y="{:.1}" font-size="13">kept blocks per kv head</text>"#, y0 + 12.0);
    if d.blocks == 0 {
        let _ = writeln!(s, r#"<text x="10" y="{:.1}">no key blocks: a single segment is dense</text>"#, y0 + 30.0);
        s.push_str("</g><!-- end kept-blocks -->\n");
        return (0.0, y0 + 40.0);
    }
    let group = blocks_per_column(d.blocks);
    let y = kept_caption(s, layer, cfg, group, y0 + 30.0);
    let legend_width = kept_legend(s, y - 4.0);
    let mut y = y + 16.0;
    let cols = d.blocks.div_ceil(group);
    let (col_w, row_h) =
        ((MAP_WIDTH / cols as f32).clamp(1.0, 12.0), (MAP_HEIGHT / d.segments as f32).clamp(1.0, 12.0));
    let (panel_w, panel_h) = (cols as f32 * col_w + 20.0, d.segments as f32 * row_h + 24.0);
    let per_row = ((GRID_WIDTH / panel_w) as usize).max(1);
    for r in 0..d.batch * d.kv_heads {
        let (b, h) = (r / d.kv_heads, r % d.kv_heads);
        let x = 10.0 + (r % per_row) as f32 * panel_w;
        let top = y + (r / per_row) as f32 * panel_h;
        let map = kept_map(&layer.blocks, b, h);
        let _ = writeln!(
            s,
            r#"<g id="kept-b{b}-h{h}"><text x="{x}" y="{:.1}">b{b} h{h} {}: reads {:.0}% of candidate blocks</text>"#,
            top + 12.0,
            class_name(layer, r),
            100.0 * read_share(&map)
        );
        map_cells(s, &map, group, x, top + 16.0, col_w, row_h);
        s.push_str("</g>\n");
    }
    y += (d.batch * d.kv_heads).div_ceil(per_row) as f32 * panel_h;
    s.push_str("</g><!-- end kept-blocks -->\n");
    (legend_width.max(10.0 + per_row.min(d.batch * d.kv_heads) as f32 * panel_w), y)
}

/// What the kept-block maps' axes are, and how they are downsampled, from `y` down; returns
/// where the next line starts.
fn kept_caption(s: &mut String, layer: &Layer, cfg: &EntropyConfig, group: usize, mut y: f32) -> f32 {
    let d = layer.dims;
    let mut lines = vec![format!(
        "rows: query segments 0 (top) … {}; columns: key blocks 0 (left) … {} of {} tokens",
        d.segments - 1,
        d.blocks - 1,
        cfg.block_size
    )];
    if group > 1 {
        lines.push(format!(
            "downsampled: each column is {group} blocks, shaded by the share of its candidate blocks kept"
        ));
    }
    for line in lines {
        let _ = writeln!(s, r#"<text x="10" y="{y:.1}">{line}</text>"#);
        y += 16.0;
    }
    y
}

/// Swatches of the kept-block map's colours in one line at `y`; returns its width.
fn kept_legend(s: &mut String, y: f32) -> f32 {
    let items = [
        (hex(KEPT), "kept"),
        (hex(SKIPPED), "not kept (candidate)"),
        (DENSE.to_string(), "dense segment (reads every earlier block)"),
        (OWN.to_string(), "own segment (read causally)"),
        (MASKED.to_string(), "causally masked"),
    ];
    s.push_str("<g class=\"legend\">");
    let mut x = 10.0;
    for (fill, name) in items {
        let _ = write!(
            s,
            r##"<rect x="{x:.1}" y="{y:.1}" width="10" height="10" fill="{fill}" stroke="#888" stroke-width="0.5"/><text x="{:.1}" y="{:.1}">{name}</text>"##,
            x + 14.0,
            y + 9.0
        );
        x += 24.0 + 6.0 * name.chars().count() as f32;
    }
    s.push_str("</g>\n");
    x
}

/// Share of a head's candidate (query segment, key block) pairs that attention reads.
fn read_share(map: &KeptMap) -> f32 {
    let read = map.cells.iter().filter(|&&c| c == Cell::Kept || c == Cell::Dense).count();
    let candidates = map.cells.iter().filter(|&&c| matches!(c, Cell::Kept | Cell::Dense | Cell::Skipped)).count();
    read as f32 / candidates.max(1) as f32
}

/// The cells of one map at (`x0`, `y0`), `group` blocks per column; runs of one fill along a row
/// are one rectangle, which keeps long prompts' SVGs small.
fn map_cells(s: &mut String, map: &KeptMap, group: usize, x0: f32, y0: f32, col_w: f32, row_h: f32) {
    for seg in 0..map.segments {
        let fills: Vec<String> = map.row(seg).chunks(group).map(fill).collect();
        let y = y0 + seg as f32 * row_h;
        let mut start = 0;
        for end in 1..=fills.len() {
            if end == fills.len() || fills[end] != fills[start] {
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{row_h:.1}" fill="{}"/>"#,
                    x0 + start as f32 * col_w,
                    (end - start) as f32 * col_w,
                    fills[start]
                );
                start = end;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_maps_are_downsampled_with_shares() {
        assert_eq!(blocks_per_column(MAX_COLUMNS), 1);
        assert_eq!(blocks_per_column(16_000), 67);
        use Cell::*;
        assert_eq!(fill(&[Skipped; 8]), hex(SKIPPED));
        assert_eq!(
            fill(&[Kept, Skipped, Skipped, Skipped, Skipped, Skipped, Skipped, Skipped]),
            hex(mix(SKIPPED, KEPT, 0.25))
        );
        assert_eq!(fill(&[Kept, Kept, Own]), hex(KEPT));
        assert_eq!(fill(&[Dense, Own]), DENSE);
        assert_eq!(fill(&[Own, Masked]), OWN);
        assert_eq!(fill(&[Masked; 3]), MASKED);
    }
}
