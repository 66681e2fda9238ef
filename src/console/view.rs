//! HTML for the console: escaping, the page frame, tables and SVG bar charts. Pure functions of their inputs.

use std::fmt::Write;

use chrono::{DateTime, NaiveDateTime, Utc};

use super::auth::Session;

pub const STYLE: &str = include_str!("style.css");

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value.
pub fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

pub fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

pub fn naive(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// "3 s", "4 min", "2.5 h", "3 d".
pub fn age(secs: f64) -> String {
    match secs {
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} d", s / 86_400.0),
    }
}

pub fn num(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

pub fn usd(v: f64) -> String {
    if v == 0.0 {
        "$0".into()
    } else if v < 0.01 {
        format!("${v:.5}")
    } else {
        format!("${v:.2}")
    }
}

/// The hidden CSRF field every POST form carries.
pub fn csrf_field(s: &Session) -> String {
    format!(
        r#"<input type="hidden" name="csrf" value="{}">"#,
        esc(&s.csrf)
    )
}

/// The page frame: navigation, the body, a footer with the server time.
pub fn page(title: &str, active: &str, session: Option<&Session>, body: &str) -> String {
    let mut nav = String::new();
    for (href, label) in [
        ("/console", "Overview"),
        ("/console/conversations", "Conversations"),
        ("/console/dead", "Dead letters"),
    ] {
        let cls = if label == active {
            r#" class="active""#
        } else {
            ""
        };
        let _ = write!(nav, r#"<a href="{href}"{cls}>{label}</a>"#);
    }
    let logout = session
        .map(|s| {
            format!(
                r#"<form method="post" action="/console/logout" class="logout">{}<button type="submit">Log out</button></form>"#,
                csrf_field(s)
            )
        })
        .unwrap_or_default();
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{} · recap</title><style>{STYLE}</style></head>
<body><header><span class="brand">recap</span><nav>{nav}</nav>{logout}</header><main>{body}</main></body></html>"#,
        esc(title)
    )
}

/// A simple table: header cells and rows of already-escaped HTML cells.
pub fn table(id: &str, head: &[&str], rows: &[Vec<String>], empty: &str) -> String {
    if rows.is_empty() {
        return format!(r#"<p class="empty" id="{id}">{}</p>"#, esc(empty));
    }
    let mut out = format!(r#"<table id="{id}"><thead><tr>"#);
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{c}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// An SVG bar chart. `bars`: (label, value); `limit`: a dashed line (e.g. the daily budget) with its label.
/// Every `label_every`-th bar gets its label under the axis; every bar has a tooltip.
pub fn bar_chart(
    id: &str,
    bars: &[(String, f64)],
    limit: Option<(f64, String)>,
    fmt: &dyn Fn(f64) -> String,
    label_every: usize,
) -> String {
    let (w, h, left, bottom, top) = (720.0, 200.0, 56.0, 28.0, 12.0);
    let max = bars
        .iter()
        .map(|(_, v)| *v)
        .chain(limit.as_ref().map(|(l, _)| *l))
        .fold(0.0f64, f64::max);
    let max = if max > 0.0 { max * 1.1 } else { 1.0 };
    let plot_h = h - bottom - top;
    let y = |v: f64| top + plot_h - v / max * plot_h;
    let n = bars.len().max(1) as f64;
    let slot = (w - left - 8.0) / n;
    let mut out = format!(
        r#"<svg id="{id}" class="chart" viewBox="0 0 {w} {h}" role="img" xmlns="http://www.w3.org/2000/svg">"#
    );
    for frac in [0.0, 0.5, 1.0] {
        let v = max / 1.1 * frac;
        let _ = write!(
            out,
            r#"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{}" y="{:.1}" class="axis" text-anchor="end">{}</text>"#,
            w - 4.0,
            left - 4.0,
            y(v) + 4.0,
            esc(&fmt(v)),
            y = y(v)
        );
    }
    for (i, (label, v)) in bars.iter().enumerate() {
        let x = left + i as f64 * slot + slot * 0.15;
        let top_y = y(*v);
        let _ = write!(
            out,
            r#"<rect x="{x:.1}" y="{top_y:.1}" width="{:.1}" height="{:.1}" class="bar"><title>{}: {}</title></rect>"#,
            slot * 0.7,
            (top + plot_h - top_y).max(0.0),
            esc(label),
            esc(&fmt(*v))
        );
        if label_every > 0 && i % label_every == 0 {
            let _ = write!(
                out,
                r#"<text x="{:.1}" y="{}" class="axis" text-anchor="middle">{}</text>"#,
                x + slot * 0.35,
                h - 10.0,
                esc(label)
            );
        }
    }
    if let Some((l, label)) = limit {
        let _ = write!(
            out,
            r#"<line x1="{left}" x2="{}" y1="{ly:.1}" y2="{ly:.1}" class="limit"/><text x="{}" y="{:.1}" class="limit-label" text-anchor="end">{}</text>"#,
            w - 4.0,
            w - 6.0,
            y(l) - 4.0,
            esc(&label),
            ly = y(l)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_numbers() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(q("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(num(1_234_567), "1,234,567");
        assert_eq!(num(-12), "-12");
        assert_eq!(num(0), "0");
        assert_eq!(age(30.0), "30 s");
        assert_eq!(age(7200.0), "2.0 h");
        assert_eq!(usd(1.5), "$1.50");
    }

    #[test]
    fn chart_has_a_bar_per_value_and_the_limit() {
        let bars: Vec<(String, f64)> = (0..14).map(|i| (format!("d{i}"), i as f64)).collect();
        let svg = bar_chart("c", &bars, Some((20.0, "budget".into())), &|v| usd(v), 2);
        assert_eq!(svg.matches("<rect").count(), 14);
        assert!(svg.contains(r#"class="limit""#) && svg.contains("budget"));
        assert!(!bar_chart("c", &[], None, &|v| v.to_string(), 1).contains("<rect"));
    }
}
