//! Installs the peers from Debian's packages, so that nothing set up by hand is needed.

use std::process::Command;

use anyhow::{Context, Result, ensure};

/// Whether Debian package `p` is installed.
fn installed(p: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", p])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the packages of `wanted` that are missing (`apt-get update` first only if a
/// plain install fails). Services the packages would start are not started
/// (`policy-rc.d` answers 101 for the duration).
pub fn ensure_packages(wanted: &[&str]) -> Result<()> {
    let missing: Vec<&str> = wanted.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("bench: installing {}", missing.join(" "));
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let had_policy = policy.exists();
    if !had_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let mut ok = install().context("running apt-get")?.success();
    if !ok {
        let update = Command::new("apt-get")
            .args(["update", "-q"])
            .status()
            .context("running apt-get update")?;
        ensure!(update.success(), "apt-get update failed");
        ok = install()?.success();
    }
    if !had_policy {
        std::fs::remove_file(policy).ok();
    }
    ensure!(ok, "apt-get install {} failed", missing.join(" "));
    Ok(())
}
