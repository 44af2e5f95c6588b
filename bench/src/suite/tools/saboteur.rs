//! A tool that copies the tree and then breaks the copy on purpose, for the harness's
//! own test: the bench must report it as not identical, with the damage counted.

use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::{Env, Style, Tool};

/// `cp -a`, then: one byte flipped in a file of the first replica, one file's mode
/// changed on the second, and one file deleted on the last.
#[derive(Debug, Default)]
pub struct Saboteur;

/// The first regular file below `dir` (depth first, sorted), relative to `root`.
fn some_file(dir: &std::path::Path, skip: usize) -> Result<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&d)?.filter_map(Result::ok).collect();
        entries.sort_by_key(fs::DirEntry::file_name);
        for e in entries {
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                found.push(e.path());
            }
        }
    }
    found.sort();
    found.get(skip).cloned().context("no file to break")
}

impl Tool for Saboteur {
    fn name(&self) -> &'static str {
        "saboteur"
    }

    fn style(&self) -> Style {
        Style::OneShot
    }

    fn packages(&self) -> &'static [&'static str] {
        &[]
    }

    fn start(&mut self, _env: &Env) -> Result<()> {
        Ok(())
    }

    fn sync(&mut self, env: &Env) -> Result<()> {
        for (host, root) in &env.replicas {
            let mut cp = env.command(host, "cp");
            cp.arg("-a").arg(env.source_root.join(".")).arg(root);
            env.run_logged(cp, "cp")?;
        }
        let n = env.replicas.len();
        let first = some_file(&env.replicas[0].1, 0)?;
        let mut bytes = fs::read(&first)?;
        if let Some(b) = bytes.get_mut(0) {
            *b ^= 0xff;
        }
        fs::write(&first, bytes)?;
        let second = some_file(&env.replicas[1.min(n - 1)].1, 1)?;
        fs::set_permissions(&second, fs::Permissions::from_mode(0o600 ^ 0o044))?;
        fs::remove_file(some_file(&env.replicas[n - 1].1, 2)?)?;
        Ok(())
    }

    fn stop(&mut self, _env: &Env) -> Result<()> {
        Ok(())
    }
}
