//! Printing results: an aligned table, or JSON lines.

use serde_json::{Map, Value};

/// Where rows go.
pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Output { json }
    }

    /// Prints a table (or JSON lines) of `rows`, each a list of (column, value).
    pub fn table(&self, title: &str, rows: &[Vec<(&str, Value)>]) {
        if self.json {
            for r in rows {
                let mut m = Map::new();
                m.insert("bench".into(), Value::String(title.into()));
                for (k, v) in r {
                    m.insert((*k).into(), v.clone());
                }
                println!("{}", Value::Object(m));
            }
            return;
        }
        let Some(first) = rows.first() else {
            println!("{title}: no rows");
            return;
        };
        let cols: Vec<&str> = first.iter().map(|(k, _)| *k).collect();
        let cell = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() => format!("{f:.2}"),
                _ => n.to_string(),
            },
            other => other.to_string(),
        };
        let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
        for r in rows {
            for (i, (_, v)) in r.iter().enumerate() {
                widths[i] = widths[i].max(cell(v).len());
            }
        }
        println!("{title}");
        let line: Vec<String> = cols
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        println!("{}", line.join("  "));
        for r in rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|((_, v), w)| format!("{:>w$}", cell(v)))
                .collect();
            println!("{}", line.join("  "));
        }
    }
}

/// Percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
