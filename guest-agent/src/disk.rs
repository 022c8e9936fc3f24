//! `pleiades-agent disk-bench`: how fast a block device reads inside the guest, for the
//! benchmarks that compare a redirected USB stick with the same image as a virtio disk:
//! sequential reads in 1 MiB requests, then 4 KiB reads at scattered block offsets. The page
//! cache is dropped for the device first and read-ahead is turned off for the random part, so
//! every read reaches the device.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use serde::Serialize;

/// One run's figures (`PLEIADES-DISK {json}`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiskReport {
    pub device_bytes: u64,
    pub sequential_bytes: u64,
    pub sequential_mb_s: f64,
    pub random_reads: u64,
    pub random_iops: f64,
}

const SEQUENTIAL_CHUNK: usize = 1 << 20;
const BLOCK: u64 = 4096;

/// Reads up to `sequential` bytes from the start of `path`, then `random` 4 KiB blocks spread
/// over the whole device (each block once: a fixed stride coprime with the block count).
pub fn bench(path: &Path, sequential: u64, random: u64) -> std::io::Result<DiskReport> {
    let file = File::open(path)?;
    let size = device_size(&file)?;
    if size < BLOCK {
        return Err(std::io::Error::other(format!("{} holds less than one 4 KiB block", path.display())));
    }
    let _ = posix_fadvise(file.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    let sequential = sequential.min(size);
    let mut buf = vec![0u8; SEQUENTIAL_CHUNK];
    let started = Instant::now();
    let mut at = 0;
    while at < sequential {
        let n = (sequential - at).min(SEQUENTIAL_CHUNK as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        at += n as u64;
    }
    let sequential_s = started.elapsed().as_secs_f64();

    let _ = posix_fadvise(file.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    let _ = posix_fadvise(file.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_RANDOM);
    let blocks = size / BLOCK;
    let stride = coprime_stride(blocks);
    let random = random.min(blocks);
    let started = Instant::now();
    let mut block = 0u64;
    for _ in 0..random {
        block = (block + stride) % blocks;
        file.read_exact_at(&mut buf[..BLOCK as usize], block * BLOCK)?;
    }
    let random_s = started.elapsed().as_secs_f64();
    Ok(DiskReport {
        device_bytes: size,
        sequential_bytes: sequential,
        sequential_mb_s: sequential as f64 / 1e6 / sequential_s.max(1e-9),
        random_reads: random,
        random_iops: random as f64 / random_s.max(1e-9),
    })
}

/// The device's (or file's) size: seeking to its end works for both.
fn device_size(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut file = file;
    file.seek(std::io::SeekFrom::End(0))
}

/// A step through `n` blocks that visits each once, far from its neighbours: near the golden
/// ratio of `n`, made coprime with it.
fn coprime_stride(n: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let mut stride = ((n as f64 * 0.618_033_988_7) as u64).max(1);
    while gcd(stride, n) != 1 {
        stride += 1;
    }
    stride
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stride_visits_every_block_once() {
        for n in [1u64, 2, 7, 100, 4096, 8191] {
            let stride = coprime_stride(n);
            let mut seen = std::collections::HashSet::new();
            let mut b = 0;
            for _ in 0..n {
                b = (b + stride) % n;
                assert!(seen.insert(b), "n {n} stride {stride}");
            }
        }
    }

    #[test]
    fn a_file_is_read_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![7u8; 3 << 20]).unwrap();
        let report = bench(&path, 2 << 20, 100).unwrap();
        assert_eq!(
            (report.device_bytes, report.sequential_bytes, report.random_reads),
            (3 << 20, 2 << 20, 100)
        );
        assert!(report.sequential_mb_s > 0.0 && report.random_iops > 0.0);
        assert!(bench(&dir.path().join("missing"), 1, 1).is_err());
    }
}
