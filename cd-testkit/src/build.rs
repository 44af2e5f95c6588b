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

/// Whether `cargo run` sets variable `name` for the package it runs (its name, version,
/// manifest, binary). Build scripts watch some of them (`ring` reruns on
/// `CARGO_PKG_NAME` and `CARGO_MANIFEST_DIR`), so a nested build that inherited them
/// would rebuild such crates, and all that depends on them, whenever it is started
/// from another tool (`bench` after `xtask`).
fn set_by_cargo_run(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || matches!(
            name,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
        )
}

/// A `cargo` command in the workspace root: the cargo that runs us (`$CARGO`), so that
/// `cargo +toolchain xtask` stays consistent; plain `cargo` otherwise. It does not see
/// the variables `cargo run` set for the running tool, so builds started from any of
/// the workspace's tools share their artifacts.
#[must_use]
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(set_by_cargo_run) {
            c.env_remove(k);
        }
    }
    c
}

/// Builds `cdd` and `cdctl` in release mode (`-j2`); returns their paths in the target
/// directory cargo reports (so `CARGO_TARGET_DIR` is honoured).
pub fn release_daemon() -> Result<(PathBuf, PathBuf)> {
    daemon(true)
}

/// [`release_daemon`] in the dev profile (what `cargo test` has built already).
pub fn debug_daemon() -> Result<(PathBuf, PathBuf)> {
    daemon(false)
}

fn daemon(release: bool) -> Result<(PathBuf, PathBuf)> {
    let mut build = cargo();
    build.args(["build", "-j2", "-p", "cd-daemon", "--bins"]);
    if release {
        build.arg("--release");
    }
    let status = build.status().context("starting cargo build")?;
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
    let dir = Path::new(target).join(if release { "release" } else { "debug" });
    Ok((dir.join("cdd"), dir.join("cdctl")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_cargo_does_not_see_the_running_package() {
        assert!(set_by_cargo_run("CARGO_PKG_NAME"));
        assert!(set_by_cargo_run("CARGO_MANIFEST_DIR"));
        assert!(!set_by_cargo_run("CARGO_TARGET_DIR"));
        assert!(!set_by_cargo_run("CARGO_HOME"));
        assert!(!set_by_cargo_run("CARGO"));
        // `cargo test` sets CARGO_PKG_NAME for this test, as `cargo run` does for a tool.
        let c = cargo();
        let removed = c
            .get_envs()
            .any(|(k, v)| k == "CARGO_PKG_NAME" && v.is_none());
        assert_eq!(removed, std::env::var_os("CARGO_PKG_NAME").is_some());
    }
}
