//! `bench limits`: what this machine can do at most, measured on it, so that a sync's
//! throughput can be read against the physical limits instead of only against peers.
//!
//! Each figure is one resource alone, on one core where it is CPU work:
//!
//! - **warm read**: sequential `read(2)` of a file in the page cache, 1 MiB at a time;
//! - **write + fsync**: writing a new file of the same size and `fsync`ing it (what a
//!   replica must do before renaming a received file into place);
//! - **loopback TCP**: one stream over 127.0.0.1, a sender and a receiver thread, 1 MiB
//!   writes (the ceiling of a one-machine bench; a real link is slower);
//! - **AES-128-GCM / AES-256-GCM**: `ring`'s sealing (what rustls uses here) of 16 KiB
//!   records, the TLS maximum, one core;
//! - **BLAKE3**: hashing, one core (the daemon hashes every file it scans and sends);
//! - **zstd -3**: compressing the W1-like mix (text-like and random), one core.
//!
//! A sync from a source to one replica on this machine cannot be faster than the
//! slowest of read, TCP, cipher and write: [`Limits::bound`].

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, Algorithm, LessSafeKey, Nonce, UnboundKey};
use serde_json::{Value, json};

use crate::USAGE;
use crate::args::Options;
use crate::table::Table;

const MIB: f64 = 1024.0 * 1024.0;
/// TLS's largest record.
const RECORD: usize = 16 << 10;
const IO: usize = 1 << 20;

/// Options of `bench limits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Bytes per measurement.
    pub size: u64,
    pub dir: Option<PathBuf>,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut out = Self {
            size: 1 << 30,
            dir: None,
        };
        let mut o = Options::new(args, USAGE);
        while let Some(name) = o.next_name() {
            match name {
                "--size" => out.size = o.value(name)?,
                "--dir" => out.dir = Some(o.value(name)?),
                _ => return Err(o.unknown(name)),
            }
        }
        ensure!(out.size >= 1 << 20, "--size must be at least 1 MiB");
        Ok(out)
    }
}

/// Throughputs in bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub bytes: u64,
    pub warm_read: f64,
    pub write_fsync: f64,
    pub loopback_tcp: f64,
    pub aes128_gcm: f64,
    pub aes256_gcm: f64,
    pub blake3: f64,
    pub zstd3: f64,
}

impl Limits {
    /// The slowest resource a one-machine transfer needs (read, TCP, cipher, write),
    /// and its name: no sync here can move bytes faster.
    pub fn bound(&self) -> (&'static str, f64) {
        [
            ("warm read", self.warm_read),
            ("loopback TCP", self.loopback_tcp),
            ("AES-128-GCM", self.aes128_gcm),
            ("write+fsync", self.write_fsync),
        ]
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("none", 0.0))
    }

    fn rows(&self) -> [(&'static str, f64); 7] {
        [
            ("warm read", self.warm_read),
            ("write + fsync", self.write_fsync),
            ("loopback TCP, one stream", self.loopback_tcp),
            ("AES-128-GCM, one core", self.aes128_gcm),
            ("AES-256-GCM, one core", self.aes256_gcm),
            ("BLAKE3, one core", self.blake3),
            ("zstd -3, one core", self.zstd3),
        ]
    }

    pub fn json(&self) -> Value {
        let (name, v) = self.bound();
        json!({
            "bytes": self.bytes,
            "warm_read_mib_s": self.warm_read / MIB,
            "write_fsync_mib_s": self.write_fsync / MIB,
            "loopback_tcp_mib_s": self.loopback_tcp / MIB,
            "aes128_gcm_mib_s": self.aes128_gcm / MIB,
            "aes256_gcm_mib_s": self.aes256_gcm / MIB,
            "blake3_mib_s": self.blake3 / MIB,
            "zstd3_mib_s": self.zstd3 / MIB,
            "bound": name,
            "bound_mib_s": v / MIB,
        })
    }

    pub fn render(&self) -> String {
        let mut t = Table::new(vec!["limit".into(), "MiB/s".into()]);
        for (name, v) in self.rows() {
            t.row(name, vec![format!("{:.0}", v / MIB)]);
        }
        let (name, v) = self.bound();
        t.row(
            &format!("bound of a 1→1 sync here ({name})"),
            vec![format!("{:.0}", v / MIB)],
        );
        t.render()
    }
}

fn rate(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64().max(1e-9)
}

/// Seeded bytes resembling the W1 mix: half text-like (compressible), half random.
fn sample(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let words: [&[u8]; 8] = [
        b"<div class=\"item\">",
        b"</div>\n",
        b"content ",
        b"sync ",
        b"the ",
        b"farm ",
        b"{\"id\": ",
        b"},\n",
    ];
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (out.len() / (64 << 10)) % 2 == 0 {
            out.extend_from_slice(words[(x % 8) as usize]);
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// Measures every limit with `bytes` per figure, files in `dir`.
pub fn measure(dir: &Path, bytes: u64) -> Result<Limits> {
    std::fs::create_dir_all(dir)?;
    let chunk = sample(IO);
    let path = dir.join("limits-read.bin");
    let t0 = Instant::now();
    write_file(&path, &chunk, bytes)?;
    let write_fsync = rate(bytes, t0.elapsed());
    // Once to be sure it is cached, once measured.
    read_file(&path)?;
    let t0 = Instant::now();
    let n = read_file(&path)?;
    let warm_read = rate(n, t0.elapsed());
    std::fs::remove_file(&path)?;

    let loopback_tcp = tcp(bytes, &chunk)?;
    let aes128_gcm = seal(&AES_128_GCM, bytes)?;
    let aes256_gcm = seal(&AES_256_GCM, bytes)?;

    let t0 = Instant::now();
    let mut h = blake3::Hasher::new();
    let mut done = 0u64;
    while done < bytes {
        h.update(&chunk);
        done += chunk.len() as u64;
    }
    std::hint::black_box(h.finalize());
    let blake3 = rate(done, t0.elapsed());

    // zstd is slower: a quarter of the bytes is plenty.
    let t0 = Instant::now();
    let mut done = 0u64;
    let mut c = zstd::bulk::Compressor::new(3)?;
    while done < (bytes / 4).max(IO as u64) {
        std::hint::black_box(c.compress(&chunk)?);
        done += chunk.len() as u64;
    }
    let zstd3 = rate(done, t0.elapsed());

    Ok(Limits {
        bytes,
        warm_read,
        write_fsync,
        loopback_tcp,
        aes128_gcm,
        aes256_gcm,
        blake3,
        zstd3,
    })
}

fn write_file(path: &Path, chunk: &[u8], bytes: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut done = 0u64;
    while done < bytes {
        let n = chunk.len().min((bytes - done) as usize);
        f.write_all(&chunk[..n])?;
        done += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

fn read_file(path: &Path) -> Result<u64> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; IO];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            return Ok(n);
        }
        n += r as u64;
    }
}

fn tcp(bytes: u64, chunk: &[u8]) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; IO];
        let mut n = 0u64;
        loop {
            let r = s.read(&mut buf)?;
            if r == 0 {
                return Ok(n);
            }
            n += r as u64;
        }
    });
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let mut done = 0u64;
    while done < bytes {
        s.write_all(chunk)?;
        done += chunk.len() as u64;
    }
    drop(s);
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    ensure!(got == done, "loopback TCP: sent {done}, received {got}");
    Ok(rate(got, t0.elapsed()))
}

fn seal(alg: &'static Algorithm, bytes: u64) -> Result<f64> {
    let key_bytes = vec![7u8; alg.key_len()];
    let key = LessSafeKey::new(
        UnboundKey::new(alg, &key_bytes).map_err(|_| anyhow::anyhow!("AEAD key"))?,
    );
    let mut record = sample(RECORD);
    let t0 = Instant::now();
    let mut done = 0u64;
    let mut seq = 0u64;
    while done < bytes {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&seq.to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from([23u8, 3, 3, 0x40, 0x11]),
                &mut record,
            )
            .map_err(|_| anyhow::anyhow!("AEAD seal"))?;
        let _ = std::hint::black_box(tag);
        seq += 1;
        done += RECORD as u64;
    }
    Ok(rate(done, t0.elapsed()))
}

/// `bench limits`: prints the table and the JSON.
pub fn run(args: &Args) -> Result<()> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let l = measure(&dir, args.size)?;
    println!(
        "physical limits of this machine ({} per figure)",
        cd_testkit::human_bytes(args.size)
    );
    print!("{}", l.render());
    println!("{}", serde_json::to_string_pretty(&l.json())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        let l = measure(dir.path(), 4 << 20).unwrap();
        for (name, v) in l.rows() {
            assert!(v.is_finite() && v > 0.0, "{name}: {v}");
        }
        let (_, bound) = l.bound();
        assert!(bound <= l.warm_read && bound <= l.loopback_tcp && bound <= l.write_fsync);
        assert_eq!(l.json()["bytes"], 4 << 20);
    }
}
