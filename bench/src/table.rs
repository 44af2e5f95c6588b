//! A plain text table: a label column and one column per variant.

use std::fmt::Write as _;

/// Rows of `label | value | value ...`; a row without values is a section heading.
#[derive(Debug, Default)]
pub struct Table {
    head: Vec<String>,
    rows: Vec<(String, Vec<String>)>,
}

impl Table {
    /// A table whose first row is `head` (the label column's title first).
    pub fn new(head: Vec<String>) -> Self {
        Self {
            head,
            rows: Vec::new(),
        }
    }

    /// A row.
    pub fn row(&mut self, label: &str, values: Vec<String>) {
        self.rows.push((label.to_owned(), values));
    }

    /// A section heading.
    pub fn section(&mut self, title: &str) {
        self.rows.push((title.to_owned(), Vec::new()));
    }

    /// The table as text, columns padded to their widest cell.
    pub fn render(&self) -> String {
        let cols = self.head.len();
        let mut w = vec![0; cols];
        let head = (&self.head[0], &self.head[1..]);
        let rows = self.rows.iter().filter(|(_, v)| !v.is_empty());
        for (label, values) in std::iter::once(head).chain(rows.map(|(l, v)| (l, &v[..]))) {
            w[0] = w[0].max(label.chars().count());
            for (i, v) in values.iter().enumerate().take(cols - 1) {
                w[i + 1] = w[i + 1].max(v.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, label: &str, values: &[String]| {
            let _ = write!(out, "{label:<width$}", width = w[0]);
            for (i, v) in values.iter().enumerate().take(cols - 1) {
                // The last column is not padded: no trailing blanks.
                let width = if i + 2 == cols { 0 } else { w[i + 1] };
                let _ = write!(out, " | {v:<width$}");
            }
            out.push('\n');
        };
        line(&mut out, &self.head[0], &self.head[1..]);
        let rule: Vec<String> = w.iter().map(|&n| "-".repeat(n)).collect();
        let _ = writeln!(out, "{}", rule.join("-+-"));
        for (label, values) in &self.rows {
            if values.is_empty() {
                let _ = writeln!(out, "{label}");
            } else {
                line(&mut out, label, values);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded() {
        let mut t = Table::new(vec!["metric".into(), "a".into(), "bb".into()]);
        t.section("latency");
        t.row("  p50", vec!["1.0".into(), "22.5".into()]);
        assert_eq!(
            t.render(),
            "metric | a   | bb\n-------+-----+-----\nlatency\n  p50  | 1.0 | 22.5\n"
        );
    }
}
