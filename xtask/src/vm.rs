//! Run one of our test binaries inside a qemu guest that boots **Debian's own kernel**.
//!
//! Privileged tests (eBPF programs, later kernel TLS) must run on the kernels that web
//! farms actually use, not on whatever kernel the build host has. This module boots the
//! `linux-image-6.1.0-<abi>-amd64` kernel from Debian 12 "bookworm" (the package that
//! `linux-image-amd64` points at in bookworm / bookworm-security, never the backports
//! kernel) with a throw-away initramfs and runs one command in it:
//!
//! 1. [`ensure_tools`] installs what the host needs, once, with apt (as root):
//!    `qemu-system-x86` from bookworm-backports (qemu 10 runs TCG about twice as fast as
//!    bookworm's 7.2; falls back to bookworm's), `busybox-static` (the guest's userland),
//!    `kmod` (`depmod`), `binutils` (`strip`), `gzip`, `xz-utils` and `zstd`. The system's
//!    apt sources are not changed: backports is reached through a private apt list
//!    directory in [`BACKPORTS_APT_DIR`]. Packages already installed are skipped, and
//!    `apt-get update` runs at most once per process, only when something is missing.
//! 2. [`run_in_guest`] fetches the kernel with `apt-get download` and unpacks it with
//!    `dpkg-deb -x` into `<work_dir>/kernels/<package>_<version>/`, runs `depmod` there (the
//!    package's `modules.dep` is generated at install time) and unpacks the ELF `vmlinux`
//!    from the bzImage next to it. That cache is reused across runs and is keyed by the
//!    package version, so a new bookworm point release is fetched once; it takes about
//!    470 MB (400 MB modules tree, 66 MB `vmlinux`). When apt cannot name a kernel (no
//!    network) the newest cached one is used.
//! 3. It writes a newc cpio (gzip) initramfs with busybox and its applet links, the
//!    requested binaries plus the shared libraries `ldd` lists for them (the dynamic loader
//!    included), optionally `strip --strip-debug`ed, the requested kernel modules and their
//!    dependencies (from `modules.dep`, decompressed if the package compresses them), and an
//!    `/init` script. `/init` mounts proc, sysfs, devtmpfs, devpts, tmpfs (`/tmp`, `/run`,
//!    `/dev/shm`), cgroup2, bpffs, debugfs and tracefs, brings `lo` up, `insmod`s the
//!    modules in dependency order, runs the command with its output on the serial console,
//!    prints `CDSYNC-GUEST-EXIT <code>` and powers off.
//! 4. It boots `qemu-system-x86_64 -machine q35 -accel tcg -cpu max` with the console on the
//!    serial port, captures it to `console.log`, parses the exit marker and kills qemu when
//!    the timeout passes. `-kernel` gets the uncompressed `vmlinux` (PVH entry, Debian builds
//!    `CONFIG_PVH=y`) rather than the xz bzImage: decompressing the kernel inside a TCG guest
//!    costs about 4 s of an 8 s boot; the bzImage is the fallback.
//!
//! **Why TCG**: this host's `/dev/kvm` is nested PVM, and Debian kernels hang under it, so
//! the guest is always emulated (`-accel tcg`): about 4-6 s from qemu start to `/init` on an
//! idle 2-core host (more under load), and guest code runs several times slower than natively.
//!
//! Every run gets its own directory `<work_dir>/run-<pid>-<n>/` (initramfs, staged binaries,
//! `console.log`, `qemu.stderr`). It is removed when the run succeeds and the guest command
//! exits 0, and kept otherwise for inspection (errors name it). The guest's root file system
//! is the initramfs itself (tmpfs): fanotify, bpffs and tracing work there, block-device file
//! systems (ext4 on a disk) are not provided.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// The line the guest's `/init` prints after the command: `CDSYNC-GUEST-EXIT <code>`.
pub const EXIT_MARKER: &str = "CDSYNC-GUEST-EXIT";
/// The line `/init` prints first; its arrival ends [`GuestOutcome::boot_secs`].
const BOOT_MARKER: &str = "CDSYNC-GUEST-BOOTED";
/// Private apt state (sources list, package lists, downloaded .debs) used to install qemu
/// from bookworm-backports without touching the system's apt sources.
pub const BACKPORTS_APT_DIR: &str = "/var/cache/cdsync-vm-apt";
/// Exit code `/init` reports when a kernel module fails to load (the command is not run).
pub const MODULE_LOAD_FAILED: i32 = 125;
/// Kernel command line: serial console, reboot (= qemu exits, `-no-reboot`) on panic.
const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// How long qemu may take to exit after the exit marker before it is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(20);
/// How much of the console an error message quotes.
const TAIL_LINES: usize = 40;

const APT_SOURCES: &str = "\
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bookworm-backports main
";
/// Host packages besides qemu (see the module doc for what each is for).
const HOST_PACKAGES: &[&str] = &[
    "busybox-static",
    "kmod",
    "binutils",
    "gzip",
    "xz-utils",
    "zstd",
];
/// Where `busybox-static` puts the binary.
const BUSYBOX: &str = "/bin/busybox";

/// Which kernel the guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// `linux-image-amd64` of Debian 12 bookworm (incl. bookworm-security): Linux 6.1.x.
    DebianBookworm,
}

/// What to run in the guest.
#[derive(Debug, Clone)]
pub struct GuestSpec<'a> {
    pub kernel: KernelChoice,
    /// Host files and the absolute guest paths to put them at; their shared libraries
    /// (per `ldd`) are copied to the same paths they have on the host.
    pub binaries: &'a [(&'a Path, &'a str)],
    /// The command `/init` runs (argv; `argv[0]` is looked up in `PATH` if not absolute).
    pub command: &'a [&'a str],
    /// Kernel modules to load before the command (e.g. `"tls"`), with their dependencies.
    pub modules: &'a [&'a str],
    pub memory_mb: u32,
    pub cpus: u32,
    /// Hard limit for the whole boot + run; qemu is killed after it.
    pub timeout: Duration,
    /// `strip --strip-debug` the binaries (not the libraries) before packing them.
    pub strip: bool,
}

/// What happened in the guest.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// Exit status of the command (128 + n when killed by signal n, as `sh` reports it).
    pub exit_code: i32,
    /// Everything the guest printed on its serial console (`\r` removed).
    pub console: String,
    /// qemu start until `/init` ran (firmware, kernel decompression and boot, initramfs).
    pub boot_secs: f64,
    /// qemu start until qemu exited.
    pub total_secs: f64,
    /// The `uname -r` of the kernel that was booted, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// Debian package version of that kernel, e.g. `6.1.192-2`.
    pub kernel_package_version: String,
    /// Size of the initramfs.
    pub initramfs_bytes: u64,
    /// The run directory (`console.log`, initramfs, `qemu.stderr`) when it was kept,
    /// i.e. when the command failed; `None` once removed.
    pub kept_dir: Option<PathBuf>,
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);
static RUN_SEQ: AtomicU32 = AtomicU32::new(0);

/// Installs the host tools the harness needs (see the module doc). Idempotent: does
/// nothing when they are all installed; needs root otherwise.
pub fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    let qemu_missing = !dpkg_installed("qemu-system-x86");
    if missing.is_empty() && !qemu_missing {
        return Ok(());
    }
    let mut wanted = missing.clone();
    if qemu_missing {
        wanted.push("qemu-system-x86");
    }
    ensure!(
        is_root(),
        "vm: missing host packages {wanted:?}; run as root or install them with apt-get \
         (qemu-system-x86 preferably from bookworm-backports)"
    );
    ensure_packages(&missing)?;
    if qemu_missing {
        eprintln!("vm: installing qemu-system-x86 from bookworm-backports");
        if let Err(e) = install_qemu_from_backports() {
            eprintln!("vm: backports install failed ({e:#}); using bookworm's qemu-system-x86");
            apt_update_once()?;
            let mut cmd = apt_get();
            cmd.args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "qemu-system-x86",
            ]);
            run_cmd(&mut cmd)?;
        }
    }
    Ok(())
}

/// Installs the Debian `packages` that are not installed yet (`apt-get update` first,
/// at most once per process). Needs root when something is missing.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    ensure!(
        is_root(),
        "missing Debian packages {missing:?}; run as root or install them with apt-get"
    );
    eprintln!("installing {missing:?}");
    apt_update_once()?;
    let mut cmd = apt_get();
    cmd.args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing);
    run_cmd(&mut cmd)?;
    Ok(())
}

/// Boots the guest described by `spec` and runs its command. `work_dir` holds the kernel
/// cache (`kernels/`) and the per-run directories. Returns `Err` when the harness failed
/// (no kernel, qemu did not start, timeout, guest died without the exit marker); a command
/// that ran and failed is `Ok` with a non-zero [`GuestOutcome::exit_code`].
pub fn run_in_guest(spec: &GuestSpec, work_dir: &Path) -> Result<GuestOutcome> {
    ensure!(!spec.command.is_empty(), "vm: empty guest command");
    ensure!(
        spec.cpus >= 1 && spec.memory_mb >= 128,
        "vm: need >= 1 cpu and >= 128 MB"
    );
    fs::create_dir_all(work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let kernel = prepare_kernel(spec.kernel, &work_dir.join("kernels"))?;

    let run_dir = work_dir.join(format!(
        "run-{}-{}",
        std::process::id(),
        RUN_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir)?;
    }
    fs::create_dir_all(&run_dir)?;

    let initramfs = run_dir.join("initramfs.cpio.gz");
    if let Err(e) = build_initramfs(spec, &kernel, &run_dir, &initramfs) {
        let _ = fs::remove_dir_all(&run_dir);
        return Err(e.context("building the initramfs"));
    }
    let initramfs_bytes = fs::metadata(&initramfs)?.len();

    let run = boot(spec, &kernel, &initramfs, &run_dir)
        .with_context(|| format!("guest run (files kept in {})", run_dir.display()))?;
    let kept_dir = if run.exit_code == 0 {
        // Best effort: a leftover run directory only costs disk space.
        let _ = fs::remove_dir_all(&run_dir);
        None
    } else {
        Some(run_dir)
    };
    Ok(GuestOutcome {
        exit_code: run.exit_code,
        console: run.console,
        boot_secs: run.boot_secs,
        total_secs: run.total_secs,
        kernel_release: kernel.release,
        kernel_package_version: kernel.package_version,
        initramfs_bytes,
        kept_dir,
    })
}

// ---------------------------------------------------------------------------------------
// Host tools

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        // Downloads into directories `_apt` cannot write to would warn on every call.
        .args(["-o", "APT::Sandbox::User=root"]);
    cmd
}

fn apt_update_once() -> Result<()> {
    if !APT_UPDATED.load(Ordering::Relaxed) {
        run_cmd(apt_get().args(["update", "-q"]))?;
        APT_UPDATED.store(true, Ordering::Relaxed);
    }
    Ok(())
}

fn install_qemu_from_backports() -> Result<()> {
    let dir = Path::new(BACKPORTS_APT_DIR);
    for sub in ["lists/partial", "archives/partial"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let sources = dir.join("sources.list");
    fs::write(&sources, APT_SOURCES)?;
    let opts = [
        format!("Dir::Etc::sourcelist={}", sources.display()),
        "Dir::Etc::sourceparts=-".to_owned(),
        format!("Dir::State::lists={}", dir.join("lists").display()),
        format!("Dir::Cache::archives={}", dir.join("archives").display()),
    ];
    let private = || {
        let mut cmd = apt_get();
        for o in &opts {
            cmd.args(["-o", o]);
        }
        cmd
    };
    run_cmd(private().args(["update", "-q"]))?;
    run_cmd(private().args([
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-t",
        "bookworm-backports",
        "qemu-system-x86",
    ]))?;
    // The .debs are not needed again.
    run_cmd(private().arg("clean"))?;
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"install ok installed")
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Runs `cmd`, returns its stdout; fails with its stderr when it exits non-zero.
fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stderr), 20)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------
// Kernel

#[derive(Debug)]
struct Kernel {
    /// `uname -r`, also the directory name under `lib/modules`.
    release: String,
    package_version: String,
    /// What `-kernel` gets: the uncompressed ELF `vmlinux` (PVH boot) when the kernel
    /// supports it, else the bzImage.
    boot_image: PathBuf,
    /// `<root>/lib/modules/<release>`.
    modules: PathBuf,
}

fn prepare_kernel(choice: KernelChoice, cache: &Path) -> Result<Kernel> {
    match choice {
        KernelChoice::DebianBookworm => {}
    }
    fs::create_dir_all(cache)?;
    let (package, version) = match resolve_bookworm_kernel() {
        Ok(found) => found,
        Err(e) => {
            return newest_cached_kernel(cache)
                .with_context(|| format!("no cached kernel either ({e:#})"));
        }
    };
    let dir = cache.join(format!("{package}_{version}"));
    if !dir.join(".complete").exists() {
        fetch_kernel(&package, &version, cache, &dir)?;
    }
    load_kernel(&dir)
}

/// Finds the bookworm 6.1 kernel package `linux-image-amd64` depends on, and its version.
fn resolve_bookworm_kernel() -> Result<(String, String)> {
    let show = || run_cmd(Command::new("apt-cache").args(["show", "linux-image-amd64"]));
    let text = match show() {
        Ok(t) if !t.trim().is_empty() => t,
        _ => {
            apt_update_once()?;
            show()?
        }
    };
    // One stanza per version known to apt; the 6.1 ABI packages are named
    // linux-image-6.1.0-<abi>-amd64. Take the highest ABI (backports' 6.x kernels are
    // ignored by the name filter).
    let mut best: Option<(u32, String)> = None;
    for stanza in text.split("\n\n") {
        let Some(deps) = stanza.lines().find_map(|l| l.strip_prefix("Depends: ")) else {
            continue;
        };
        for dep in deps.split(',') {
            let name = dep.split_whitespace().next().unwrap_or("");
            let abi = name
                .strip_prefix("linux-image-6.1.0-")
                .and_then(|r| r.strip_suffix("-amd64"))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(abi) = abi
                && best.as_ref().is_none_or(|(b, _)| abi > *b)
            {
                best = Some((abi, name.to_owned()));
            }
        }
    }
    let (_, package) = best.context("apt-cache show linux-image-amd64: no 6.1 kernel")?;
    let policy = run_cmd(Command::new("apt-cache").args(["policy", &package]))?;
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .with_context(|| format!("apt-cache policy {package}: no candidate"))?
        .to_owned();
    Ok((package, version))
}

fn fetch_kernel(package: &str, version: &str, cache: &Path, dir: &Path) -> Result<()> {
    eprintln!("vm: fetching {package} {version}");
    let tmp = cache.join(format!(".tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    run_cmd(
        apt_get()
            .current_dir(&tmp)
            .args(["download", "-q", &format!("{package}={version}")]),
    )?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let root = tmp.join("root");
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::remove_file(&deb)?;
    let release = single_subdir(&root.join("lib/modules"))?;
    // The package ships no modules.dep: its postinst runs depmod.
    run_cmd(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    fs::write(root.join(".package"), format!("{package}\n{version}\n"))?;
    fs::write(root.join(".complete"), "")?;
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::rename(&root, dir)?;
    fs::remove_dir_all(&tmp)?;
    Ok(())
}

fn newest_cached_kernel(cache: &Path) -> Result<Kernel> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(cache)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(".complete").exists())
        .collect();
    dirs.sort_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
    let dir = dirs.pop().context("no kernel cached")?;
    eprintln!("vm: apt lookup failed, using cached {}", dir.display());
    load_kernel(&dir)
}

fn load_kernel(dir: &Path) -> Result<Kernel> {
    let release = single_subdir(&dir.join("lib/modules"))?;
    let boot = dir.join("boot");
    let vmlinuz = boot.join(format!("vmlinuz-{release}"));
    ensure!(vmlinuz.is_file(), "{} missing", vmlinuz.display());
    let vmlinux = boot.join(format!("vmlinux-{release}"));
    let config = fs::read_to_string(boot.join(format!("config-{release}"))).unwrap_or_default();
    let boot_image = if vmlinux.is_file() {
        vmlinux
    } else if config.lines().any(|l| l == "CONFIG_PVH=y") {
        match extract_vmlinux(&vmlinuz, &vmlinux) {
            Ok(()) => vmlinux,
            Err(e) => {
                eprintln!("vm: booting the bzImage, no vmlinux: {e:#}");
                vmlinuz
            }
        }
    } else {
        vmlinuz
    };
    let meta = fs::read_to_string(dir.join(".package")).unwrap_or_default();
    Ok(Kernel {
        modules: dir.join("lib/modules").join(&release),
        package_version: meta.lines().nth(1).unwrap_or("?").to_owned(),
        release,
        boot_image,
    })
}

/// Unpacks the ELF `vmlinux` from a bzImage. qemu boots it through its PVH entry point,
/// skipping the BIOS real-mode setup and the in-guest decompression: Debian compresses the
/// kernel with xz, which alone takes about 4 s under TCG (measured: ~8.4 s -> ~4 s to /init).
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let image = fs::read(vmlinuz)?;
    let formats: [(&[u8], &str, &[&str]); 3] = [
        (b"\xfd7zXZ\0", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dc"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    ];
    for (magic, tool, args) in formats {
        let Some(at) = image.windows(magic.len()).position(|w| w == magic) else {
            continue;
        };
        let mut child = Command::new(tool)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {tool}"))?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let payload = image[at..].to_vec();
        // Trailing data after the stream makes some tools exit early: ignore write errors.
        let feeder = thread::spawn(move || {
            let _ = stdin.write_all(&payload);
        });
        let output = child.wait_with_output()?;
        let _ = feeder.join();
        // Exit status is not trusted either way (gzip warns about trailing garbage): the
        // output must be an ELF image.
        if output.stdout.starts_with(b"\x7fELF") {
            let name = out.file_name().context("vmlinux path")?.to_string_lossy();
            let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
            fs::write(&tmp, &output.stdout)?;
            fs::rename(&tmp, out)?;
            return Ok(());
        }
    }
    bail!("no compressed ELF found in {}", vmlinuz.display())
}

fn single_subdir(dir: &Path) -> Result<String> {
    let names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel release in {}, found {names:?}",
            dir.display()
        ),
    }
}

/// The module files (relative to the modules dir) to `insmod`, dependencies first.
fn module_load_order(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<String>> {
    let dep_text = fs::read_to_string(kernel.modules.join("modules.dep"))?;
    let deps: BTreeMap<&str, Vec<&str>> = dep_text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m, d.split_whitespace().collect()))
        .collect();
    let builtin = fs::read_to_string(kernel.modules.join("modules.builtin")).unwrap_or_default();
    let by_name: BTreeMap<String, &str> = deps.keys().map(|p| (module_name(p), *p)).collect();

    fn visit<'d>(
        path: &'d str,
        deps: &BTreeMap<&'d str, Vec<&'d str>>,
        seen: &mut BTreeSet<&'d str>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(path) {
            return;
        }
        for dep in deps.get(path).into_iter().flatten() {
            visit(dep, deps, seen, order);
        }
        order.push(path.to_owned());
    }

    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for name in wanted {
        let norm = name.replace('-', "_");
        if let Some(path) = by_name.get(&norm) {
            visit(path, &deps, &mut seen, &mut order);
        } else if builtin.lines().any(|p| module_name(p) == norm) {
            eprintln!("vm: module {name} is built into {}", kernel.release);
        } else {
            bail!("kernel {} has no module {name}", kernel.release);
        }
    }
    Ok(order)
}

/// `kernel/net/tls/tls.ko.xz` -> `tls` (with `-` normalised to `_`, as the kernel does).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

// ---------------------------------------------------------------------------------------
// Initramfs

fn build_initramfs(spec: &GuestSpec, kernel: &Kernel, run_dir: &Path, out: &Path) -> Result<()> {
    let mut tree = Tree::default();
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "lib64", "dev", "proc", "sys", "tmp", "run", "root",
        "etc", "mnt",
    ] {
        tree.dir(dir);
    }
    tree.insert(
        "dev/console",
        Node::CharDev {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    );
    tree.insert(
        "etc/passwd",
        Node::Bytes(b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), 0o644),
    );
    tree.insert("etc/group", Node::Bytes(b"root:x:0:\n".to_vec(), 0o644));

    // busybox and its applets.
    tree.insert_host_file("bin/busybox", Path::new(BUSYBOX))?;
    tree.add_shared_libs(Path::new(BUSYBOX))?;
    let list = run_cmd(Command::new(BUSYBOX).arg("--list"))?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        tree.insert(
            &format!("bin/{applet}"),
            Node::Symlink("busybox".to_owned()),
        );
    }

    // The binaries (after busybox: a binary may replace an applet).
    let staging = run_dir.join("staging");
    fs::create_dir_all(&staging)?;
    for (i, (host, guest)) in spec.binaries.iter().enumerate() {
        let guest = guest
            .strip_prefix('/')
            .with_context(|| format!("{guest}: not absolute"))?;
        ensure!(host.is_file(), "{}: not a file", host.display());
        let src = if spec.strip {
            let stripped = staging.join(format!("{i}"));
            run_cmd(
                Command::new("strip")
                    .arg("--strip-debug")
                    .arg("-o")
                    .arg(&stripped)
                    .arg(host),
            )?;
            stripped
        } else {
            host.to_path_buf()
        };
        tree.insert_host_file(guest, &src)?;
        tree.add_shared_libs(host)?;
    }

    // Kernel modules.
    let modules = module_load_order(kernel, spec.modules)?;
    let mut insmod_paths = Vec::new();
    for rel in &modules {
        let host = kernel.modules.join(rel);
        let plain = rel
            .strip_suffix(".xz")
            .or_else(|| rel.strip_suffix(".zst"))
            .or_else(|| rel.strip_suffix(".gz"))
            .unwrap_or(rel);
        let guest = format!("lib/modules/{}/{plain}", kernel.release);
        if plain == rel {
            tree.insert_host_file(&guest, &host)?;
        } else {
            let tool = match &rel[plain.len()..] {
                ".xz" => "xz",
                ".zst" => "zstd",
                _ => "gzip",
            };
            let data = Command::new(tool)
                .arg("-dc")
                .arg(&host)
                .output()
                .with_context(|| format!("running {tool}"))?;
            ensure!(
                data.status.success(),
                "{tool} -dc {} failed",
                host.display()
            );
            tree.insert(&guest, Node::Bytes(data.stdout, 0o644));
        }
        insmod_paths.push(format!("/{guest}"));
    }

    tree.insert(
        "init",
        Node::Bytes(init_script(spec.command, &insmod_paths).into_bytes(), 0o755),
    );
    tree.write_gzip_cpio(out)
}

fn init_script(command: &[&str], insmod: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
echo CDSYNC-GUEST-BOOTED
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
ip link set lo up
hostname cdsync-guest
ulimit -l unlimited 2>/dev/null
",
    );
    for path in insmod {
        let q = sh_quote(path);
        let _ = writeln!(
            s,
            "insmod {q} || {{ dmesg | tail -n 20; echo \"cdsync-guest: insmod {path} failed\"; \
             echo \"{EXIT_MARKER} {MODULE_LOAD_FAILED}\"; poweroff -f; }}"
        );
    }
    let argv: Vec<String> = command.iter().map(|a| sh_quote(a)).collect();
    let _ = write!(
        s,
        "{}\nrc=$?\necho\necho \"{EXIT_MARKER} $rc\"\nsync\npoweroff -f\n",
        argv.join(" ")
    );
    s
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[derive(Debug)]
enum Node {
    Dir,
    /// Host file and mode.
    File(PathBuf, u32),
    Bytes(Vec<u8>, u32),
    Symlink(String),
    CharDev {
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// The initramfs contents, by path without leading `/`. Ordered, so parents come first.
#[derive(Debug, Default)]
struct Tree(BTreeMap<String, Node>);

impl Tree {
    fn dir(&mut self, path: &str) {
        let mut acc = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.0.entry(acc.clone()).or_insert(Node::Dir);
        }
    }

    fn insert(&mut self, path: &str, node: Node) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.0.insert(path.to_owned(), node);
    }

    fn insert_host_file(&mut self, guest: &str, host: &Path) -> Result<()> {
        // Follow symlinks: the guest gets the content at the path asked for.
        let meta = fs::metadata(host).with_context(|| format!("{}", host.display()))?;
        let exec = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0;
        self.insert(
            guest,
            Node::File(host.to_path_buf(), if exec { 0o755 } else { 0o644 }),
        );
        Ok(())
    }

    /// Copies the libraries `ldd` lists for `binary` (loader included) to their host paths.
    fn add_shared_libs(&mut self, binary: &Path) -> Result<()> {
        let out = Command::new("ldd")
            .arg(binary)
            .stdin(Stdio::null())
            .output()
            .context("running ldd")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.contains("statically linked") {
            // "not a dynamic executable": nothing to copy.
            return Ok(());
        }
        for line in text.lines() {
            ensure!(
                !line.contains("not found"),
                "ldd {}: {}",
                binary.display(),
                line.trim()
            );
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-… (0x…)".
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                self.insert_host_file(&path[1..], Path::new(path))?;
            }
        }
        Ok(())
    }

    /// Writes the tree as a newc cpio archive through `gzip`.
    fn write_gzip_cpio(&self, out: &Path) -> Result<()> {
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut gzip = Command::new("gzip")
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(file)
            .spawn()
            .context("starting gzip")?;
        let stdin = gzip.stdin.take().context("gzip stdin")?;
        let mut w = BufWriter::with_capacity(1 << 20, stdin);
        let written = self.write_cpio(&mut w);
        let flushed = w.flush();
        drop(w);
        let status = gzip.wait()?;
        written?;
        flushed?;
        ensure!(status.success(), "gzip failed: {status}");
        Ok(())
    }

    fn write_cpio(&self, w: &mut impl Write) -> Result<()> {
        for (ino, (path, node)) in (1u32..).zip(&self.0) {
            match node {
                Node::Dir => cpio_entry(w, ino, path, 0o040_755, 0, (0, 0), &mut io::empty())?,
                Node::Symlink(target) => cpio_entry(
                    w,
                    ino,
                    path,
                    0o120_777,
                    target.len() as u64,
                    (0, 0),
                    &mut target.as_bytes(),
                )?,
                Node::CharDev { mode, major, minor } => cpio_entry(
                    w,
                    ino,
                    path,
                    0o020_000 | mode,
                    0,
                    (*major, *minor),
                    &mut io::empty(),
                )?,
                Node::Bytes(data, mode) => cpio_entry(
                    w,
                    ino,
                    path,
                    0o100_000 | mode,
                    data.len() as u64,
                    (0, 0),
                    &mut data.as_slice(),
                )?,
                Node::File(host, mode) => {
                    let mut f =
                        File::open(host).with_context(|| format!("opening {}", host.display()))?;
                    let len = f.metadata()?.len();
                    cpio_entry(w, ino, path, 0o100_000 | mode, len, (0, 0), &mut f)?;
                }
            }
        }
        cpio_entry(w, 0, "TRAILER!!!", 0, 0, (0, 0), &mut io::empty())
    }
}

/// One newc ("070701") record; `data` must yield exactly `size` bytes.
fn cpio_entry(
    w: &mut impl Write,
    ino: u32,
    name: &str,
    mode: u32,
    size: u64,
    rdev: (u32, u32),
    data: &mut impl Read,
) -> Result<()> {
    let size32 = u32::try_from(size).map_err(|_| anyhow!("{name}: too large for cpio"))?;
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let name_len = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size32:08x}\
         {dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{name_len:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        dmaj = 0,
        dmin = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    w.write_all(&[0; 3][..pad4(header.len() + name_len)])?;
    let copied = io::copy(&mut data.take(size), w)?;
    ensure!(copied == size, "{name}: file changed while packing");
    w.write_all(&[0; 3][..pad4(usize::try_from(size)?)])?;
    Ok(())
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

// ---------------------------------------------------------------------------------------
// qemu

#[derive(Debug)]
struct Run {
    exit_code: i32,
    console: String,
    boot_secs: f64,
    total_secs: f64,
}

/// Kills and reaps qemu if the run is abandoned (error or panic) before it exited.
#[derive(Debug)]
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn boot(spec: &GuestSpec, kernel: &Kernel, initramfs: &Path, run_dir: &Path) -> Result<Run> {
    let stderr_path = run_dir.join("qemu.stderr");
    let log_path = run_dir.join("console.log");
    let mut log = File::create(&log_path)?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35", "-accel", "tcg", "-cpu", "max"])
        .args([
            "-m",
            &spec.memory_mb.to_string(),
            "-smp",
            &spec.cpus.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&kernel.boot_image)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", KERNEL_CMDLINE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr_path)?);
    let start = Instant::now();
    let mut qemu = Qemu(
        cmd.spawn()
            .context("starting qemu-system-x86_64 (ensure_tools?)")?,
    );
    let mut stdout = qemu.0.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let mut raw = Vec::new();
    let mut boot_at = None;
    let mut exit_seen_at = None;
    let deadline = start + spec.timeout;
    let qemu_status = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(chunk) => {
                log.write_all(&chunk)?;
                let scan_from = raw.len().saturating_sub(EXIT_MARKER.len() + 8);
                raw.extend_from_slice(&chunk);
                let new = &raw[scan_from..];
                if boot_at.is_none() && contains(new, BOOT_MARKER.as_bytes()) {
                    boot_at = Some(start.elapsed());
                }
                if exit_seen_at.is_none() && contains(new, EXIT_MARKER.as_bytes()) {
                    exit_seen_at = Some(Instant::now());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // qemu closed its stdout: it is exiting.
            Err(mpsc::RecvTimeoutError::Disconnected) => thread::sleep(Duration::from_millis(20)),
        }
        if let Some(status) = qemu.0.try_wait()? {
            break Some(status);
        }
        if exit_seen_at.is_some_and(|t| t.elapsed() > POWEROFF_GRACE) {
            // The command finished but the guest did not power off: good enough.
            break None;
        }
        if Instant::now() > deadline {
            drop(qemu);
            let _ = reader.join();
            raw.extend(rx.try_iter().flatten());
            let console = clean_console(&raw);
            bail!(
                "guest timed out after {:?} (console in {}); console tail:\n{}",
                spec.timeout,
                log_path.display(),
                tail(&console, TAIL_LINES)
            );
        }
    };
    drop(qemu);
    let total = start.elapsed();
    let _ = reader.join();
    for chunk in rx.try_iter() {
        log.write_all(&chunk)?;
        raw.extend_from_slice(&chunk);
    }
    let console = clean_console(&raw);
    let Some(exit_code) = parse_exit_code(&console) else {
        let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
        bail!(
            "guest ended without `{EXIT_MARKER}` (qemu: {}); qemu stderr:\n{}\nconsole tail:\n{}",
            qemu_status.map_or_else(|| "killed".to_owned(), |s| s.to_string()),
            tail(&stderr, 10),
            tail(&console, TAIL_LINES)
        );
    };
    Ok(Run {
        exit_code,
        console,
        boot_secs: boot_at.unwrap_or(total).as_secs_f64(),
        total_secs: total.as_secs_f64(),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn clean_console(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).replace('\r', "")
}

/// The code of the last `CDSYNC-GUEST-EXIT <code>` in the console.
fn parse_exit_code(console: &str) -> Option<i32> {
    console.lines().rev().find_map(|line| {
        let rest = &line[line.find(EXIT_MARKER)? + EXIT_MARKER.len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
