//! HTML for the console: the page frame, tables and SVG bar charts, as [`maud`] markup (checked at compile time,
//! every interpolated value escaped unless wrapped in `PreEscaped`). Pure functions of their inputs.

use std::fmt::Write;

use chrono::{DateTime, NaiveDateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::auth::Session;

pub const STYLE: &str = include_str!("style.css");

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
pub fn csrf_field(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

/// The page frame: navigation, the body, a footer with the server time.
pub fn page(title: &str, active: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width";
                title { (title) " · recap" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    span.brand { "recap" }
                    nav {
                        @for (href, label) in [
                            ("/console", "Overview"),
                            ("/console/conversations", "Conversations"),
                            ("/console/dead", "Dead letters"),
                        ] {
                            a href=(href) class=[(label == active).then_some("active")] { (label) }
                        }
                    }
                    @if let Some(s) = session {
                        form method="post" action="/console/logout" class="logout" {
                            (csrf_field(s))
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A simple table: header cells and rows of cells (markup, escaped where built).
pub fn table(id: &str, head: &[&str], rows: &[Vec<Markup>], empty: &str) -> Markup {
    html! {
        @if rows.is_empty() {
            p.empty id=(id) { (empty) }
        } @else {
            table id=(id) {
                thead { tr { @for h in head { th { (h) } } } }
                tbody {
                    @for r in rows {
                        tr { @for c in r { td { (c) } } }
                    }
                }
            }
        }
    }
}

/// An SVG bar chart. `bars`: (label, value); `limit`: a dashed line (e.g. the daily budget) with its label.
/// Every `label_every`-th bar gets its label under the axis; every bar has a tooltip. SVG elements get an explicit
/// (empty) body: inside HTML, `<line ...>` without one would hold the elements after it.
pub fn bar_chart(
    id: &str,
    bars: &[(String, f64)],
    limit: Option<(f64, String)>,
    fmt: &dyn Fn(f64) -> String,
    label_every: usize,
) -> Markup {
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
    let f1 = |v: f64| format!("{v:.1}");
    html! {
        svg id=(id) class="chart" viewBox={ "0 0 " (w) " " (h) } role="img" xmlns="http://www.w3.org/2000/svg" {
            @for frac in [0.0, 0.5, 1.0] {
                @let v = max / 1.1 * frac;
                line x1=(left) x2=(w - 4.0) y1=(f1(y(v))) y2=(f1(y(v))) class="grid" {}
                text x=(left - 4.0) y=(f1(y(v) + 4.0)) class="axis" text-anchor="end" { (fmt(v)) }
            }
            @for (i, (label, v)) in bars.iter().enumerate() {
                @let x = left + i as f64 * slot + slot * 0.15;
                @let top_y = y(*v);
                rect x=(f1(x)) y=(f1(top_y)) width=(f1(slot * 0.7)) height=(f1((top + plot_h - top_y).max(0.0))) class="bar" {
                    title { (label) ": " (fmt(*v)) }
                }
                @if label_every > 0 && i % label_every == 0 {
                    text x=(f1(x + slot * 0.35)) y=(h - 10.0) class="axis" text-anchor="middle" { (label) }
                }
            }
            @if let Some((l, label)) = &limit {
                line x1=(left) x2=(w - 4.0) y1=(f1(y(*l))) y2=(f1(y(*l))) class="limit" {}
                text x=(w - 6.0) y=(f1(y(*l) - 4.0)) class="limit-label" text-anchor="end" { (label) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_numbers() {
        let hostile = r#"<a href="x">'&'</a>"#;
        let html = page(
            hostile,
            "",
            None,
            table("t", &["h"], &[vec![html! { (hostile) }]], ""),
        )
        .into_string();
        assert!(
            html.contains("<title>&lt;a href=&quot;x&quot;&gt;'&amp;'&lt;/a&gt; · recap</title>"),
            "{html}"
        );
        assert!(
            html.contains("<td>&lt;a href=&quot;x&quot;&gt;'&amp;'&lt;/a&gt;</td>"),
            "{html}"
        );
        assert!(!html.contains(hostile));
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
        let svg =
            bar_chart("c", &bars, Some((20.0, "budget".into())), &|v| usd(v), 2).into_string();
        assert_eq!(svg.matches("<rect").count(), 14);
        assert!(svg.contains(r#"class="limit""#) && svg.contains("budget"));
        assert!(
            !bar_chart("c", &[], None, &|v| v.to_string(), 1)
                .into_string()
                .contains("<rect")
        );
        // every SVG element is closed, so no element holds the ones after it
        assert_eq!(svg.matches("<line").count(), svg.matches("</line>").count());
    }
}
