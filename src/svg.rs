//! The little SVG that ember's plots need (`ember simulate --plot`, `ember bench --plot`): a
//! document with a title, log-scale axes with decade grid lines, escaped text. Text is left to the
//! viewer's fonts, so nothing here needs a font file.

use std::fmt::Write;

/// Escapes text for an SVG text node or attribute.
pub fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The whole decades that cover `lo..=hi` (both > 0), at least one decade wide.
pub fn decades(lo: f64, hi: f64) -> (f64, f64) {
    let lo = lo.log10().floor();
    (lo, hi.log10().ceil().max(lo + 1.0))
}

/// A document being written: `w` x `h`, white, with `title` centred over the plot area.
pub struct Doc {
    s: String,
}

impl Doc {
    pub fn new(w: f64, h: f64, title: &str, title_x: f64) -> Self {
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(s, r#"<text x="{title_x}" y="24" text-anchor="middle" font-size="14">{}</text>"#, esc(title));
        Self { s }
    }

    /// Vertical grid lines and labels at 1, 2 and 5 of each decade from `x0` to `x1` (powers of
    /// ten), placed by `x`, over the plot area `top..top + ph`; `label` names a value.
    pub fn log_x_grid(
        &mut self,
        (x0, x1): (f64, f64),
        x: impl Fn(f64) -> f64,
        (top, ph): (f64, f64),
        label: impl Fn(f64, i32, f64) -> String,
    ) {
        for d in x0 as i32..=x1 as i32 {
            for m in [1.0, 2.0, 5.0] {
                let v = m * 10f64.powi(d);
                if v > 10f64.powf(x1) * 1.001 {
                    break;
                }
                let px = x(v);
                let _ = writeln!(
                    self.s,
                    r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{}" stroke="#ddd"/>"##,
                    top + ph
                );
                let _ = writeln!(
                    self.s,
                    r#"<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"#,
                    top + ph + 18.0,
                    esc(&label(m, d, v))
                );
            }
        }
    }

    /// A text label.
    pub fn text(&mut self, x: f64, y: f64, anchor: &str, extra: &str, t: &str) {
        let _ = writeln!(self.s, r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}"{extra}>{}</text>"#, esc(t));
    }

    /// Any element, written as given.
    pub fn raw(&mut self, element: std::fmt::Arguments<'_>) {
        let _ = self.s.write_fmt(element);
        self.s.push('\n');
    }

    pub fn finish(mut self) -> String {
        self.s.push_str("</svg>\n");
        self.s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decades_cover_the_range() {
        assert_eq!(decades(0.5, 30.0), (-1.0, 2.0));
        assert_eq!(decades(1.0, 1.0), (0.0, 1.0));
        assert_eq!(esc(r#"a<b & "c">"#), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
