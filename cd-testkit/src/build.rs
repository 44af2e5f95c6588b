//! Building the workspace's binaries from a tool of the workspace (`cargo xtask`,
//! `bench`), with the cargo that runs the tool.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// The workspace root (parent of this crate).
#[must_use]
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// A `cargo` command in the workspace root: the cargo that runs us (`$CARGO`), so that
/// `cargo +toolchain xtask` stays consistent; plain `cargo` otherwise.
#[must_use]
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Builds `cdd` and `cdctl` in release mode (`-j2`); returns their paths in the target
/// directory cargo reports (so `CARGO_TARGET_DIR` is honoured).
pub fn release_daemon() -> Result<(PathBuf, PathBuf)> {
    let status = cargo()
        .args(["build", "-j2", "--release", "-p", "cd-daemon", "--bins"])
        .status()
        .context("starting cargo build")?;
    ensure!(
        status.success(),
        "cargo build of cd-daemon failed ({status})"
    );
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    ensure!(out.status.success(), "cargo metadata failed");
    let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let target = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    let dir = Path::new(target).join("release");
    Ok((dir.join("cdd"), dir.join("cdctl")))
}
