//! A small Prometheus text-format registry: labelled counters, gauges and histograms. Enough for
//! winmesh's handful of series without pulling in a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug)]
struct Family {
    help: &'static str,
    kind: Kind,
    /// Rendered label set → value (counters, gauges).
    values: BTreeMap<String, f64>,
    /// Rendered label set → histogram state.
    hists: BTreeMap<String, Hist>,
}

#[derive(Debug, Clone)]
struct Hist {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Latency buckets (seconds) for push-to-ACK and CA calls.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_family<R>(
        &self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        f: impl FnOnce(&mut Family) -> R,
    ) -> R {
        let mut fams = match self.families.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let fam = fams.entry(name).or_insert_with(|| Family {
            help,
            kind,
            values: BTreeMap::new(),
            hists: BTreeMap::new(),
        });
        f(fam)
    }

    pub fn inc(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], by: f64) {
        let key = render_labels(labels);
        self.with_family(name, help, Kind::Counter, |f| {
            *f.values.entry(key).or_insert(0.0) += by;
        });
    }

    pub fn set(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], v: f64) {
        let key = render_labels(labels);
        self.with_family(name, help, Kind::Gauge, |f| {
            f.values.insert(key, v);
        });
    }

    pub fn add(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], by: f64) {
        let key = render_labels(labels);
        self.with_family(name, help, Kind::Gauge, |f| {
            *f.values.entry(key).or_insert(0.0) += by;
        });
    }

    /// Removes one labelled series (e.g. a gauge for an identity that no longer exists).
    pub fn remove(&self, name: &'static str, labels: &[(&str, &str)]) {
        let key = render_labels(labels);
        let mut fams = match self.families.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(f) = fams.get_mut(name) {
            f.values.remove(&key);
        }
    }

    pub fn observe(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], v: f64) {
        let key = render_labels(labels);
        self.with_family(name, help, Kind::Histogram, |f| {
            let h = f.hists.entry(key).or_insert_with(|| Hist {
                counts: vec![0; LATENCY_BUCKETS.len()],
                sum: 0.0,
                count: 0,
            });
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                if v <= *b {
                    h.counts[i] += 1;
                }
            }
            h.sum += v;
            h.count += 1;
        });
    }

    /// Current value of a counter or gauge series (tests and status output).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let key = render_labels(labels);
        let fams = match self.families.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        fams.get(name).and_then(|f| f.values.get(&key).copied())
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let fams = match self.families.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut out = String::new();
        for (name, f) in fams.iter() {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in &f.values {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
            for (labels, h) in &f.hists {
                let inner = labels.trim_start_matches('{').trim_end_matches('}');
                let sep = if inner.is_empty() { "" } else { "," };
                for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{inner}{sep}le=\"{b}\"}} {}",
                        h.counts[i]
                    );
                }
                let _ = writeln!(out, "{name}_bucket{{{inner}{sep}le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "{name}_sum{labels} {}", h.sum);
                let _ = writeln!(out, "{name}_count{labels} {}", h.count);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.inc("x_total", "Things.", &[("type", "CDS")], 1.0);
        m.inc("x_total", "Things.", &[("type", "CDS")], 2.0);
        m.set("g", "A gauge.", &[], 5.0);
        m.observe("lat_seconds", "Latency.", &[("type", "EDS")], 0.003);
        let text = m.render();
        assert!(text.contains("# TYPE x_total counter"));
        assert!(text.contains("x_total{type=\"CDS\"} 3"));
        assert!(text.contains("g 5"));
        assert!(text.contains("lat_seconds_bucket{type=\"EDS\",le=\"0.0025\"} 0"));
        assert!(text.contains("lat_seconds_bucket{type=\"EDS\",le=\"0.005\"} 1"));
        assert!(text.contains("lat_seconds_count{type=\"EDS\"} 1"));
        assert_eq!(m.value("x_total", &[("type", "CDS")]), Some(3.0));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.inc("e_total", "E.", &[("msg", "a\"b\nc")], 1.0);
        assert!(m.render().contains(r#"e_total{msg="a\"b\nc"} 1"#));
    }
}
