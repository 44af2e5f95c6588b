//! Option parsing shared by the benchmarks (`--name value` pairs and flags).

use std::str::FromStr;

use anyhow::{Context, Result, bail};

/// Walks `--name value` options.
#[derive(Debug)]
pub struct Options<'a> {
    it: std::slice::Iter<'a, String>,
    usage: &'static str,
}

impl<'a> Options<'a> {
    pub fn new(args: &'a [String], usage: &'static str) -> Self {
        Self {
            it: args.iter(),
            usage,
        }
    }

    /// The next option name, if any.
    pub fn next_name(&mut self) -> Option<&'a str> {
        self.it.next().map(String::as_str)
    }

    /// The value of option `name`, parsed.
    pub fn value<T: FromStr>(&mut self, name: &str) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let v = self
            .it
            .next()
            .with_context(|| format!("{name} needs a value"))?;
        v.parse().with_context(|| format!("{name} {v}"))
    }

    /// The error for an option nobody knows.
    pub fn unknown(&self, name: &str) -> anyhow::Error {
        if matches!(name, "-h" | "--help") {
            return anyhow::anyhow!("{}", self.usage);
        }
        anyhow::anyhow!("unknown option `{name}`\n\n{}", self.usage)
    }
}

/// Fails unless `v >= min`.
pub fn at_least(name: &str, v: usize, min: usize) -> Result<usize> {
    if v < min {
        bail!("{name} must be at least {min}");
    }
    Ok(v)
}
