//! `l3-blkperf`: block read throughput inside the innermost guest of the
//! Cloud Hypervisor throughput cases, without a process per request (a dd
//! per 4 KiB read measured process creation, not I/O).
//!
//! `l3-blkperf <reps> <image>=<device>...` opens each device with O_DIRECT and,
//! `reps` times, for each device reads all of it 16 times in 1 MiB
//! requests, then for each device does 2000 4 KiB reads at pseudo-random
//! aligned offsets (one request in flight, like
//! `fio --rw=randread --iodepth=1`), timed with the monotonic clock. With
//! several devices the order rotates from one measurement to the next
//! (A B, B A, ...), so drift within a boot hits every device alike.
//! Every request is checked against the lab's pattern of `<image>`
//! (`blk0`, ...): the header and the start of the body of the last sector
//! it read, so a request that moved no data, or data of another sector or
//! disk, fails the run instead of making it look fast.
//! It prints `L3-PERF-DEV <dev> <image> <path>` once per device, then per
//! measurement `L3-PERF-SEQ <rep> <dev> <bytes> <ns>` or
//! `L3-PERF-RAND4K <rep> <dev> <ops> <ns>`, `<dev>` being the index of the
//! device in the argument list.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{ensure, Context as _};
use vdpa_integration::pattern::{self, SECTOR};

const CHUNK: usize = 1 << 20;
const SMALL: usize = 4096;
const RANDOM_OPS: u64 = 2000;
const SEQ_PASSES: u64 = 16;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("L3-PERF-ERROR {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One device under test.
struct Disk {
    file: File,
    size: u64,
    image: String,
    /// The start of the body of every sector of `image`'s pattern, and of
    /// the pattern earlier lab cases write (`pattern::written`, same
    /// header): a sector may hold either.
    bodies: [[u8; 16]; 2],
}

impl Disk {
    fn open(image: &str, path: &str) -> anyhow::Result<Disk> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .with_context(|| format!("open {path} with O_DIRECT"))?;
        let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
            .with_context(|| format!("size of {path}"))?;
        ensure!(
            size >= CHUNK as u64,
            "{path}: {size} bytes, need at least 1 MiB"
        );
        Ok(Disk {
            file,
            size,
            image: image.to_string(),
            bodies: Disk::bodies(image),
        })
    }

    fn bodies(image: &str) -> [[u8; 16]; 2] {
        let head = |s: &[u8]| {
            let mut b = [0; 16];
            b.copy_from_slice(&s[16..32]);
            b
        };
        [
            head(&pattern::sector(image, 0)),
            head(&pattern::written(image, 0, 32)),
        ]
    }

    /// The last sector of `data`, read at byte `offset`, against the
    /// pattern: magic, sector number, start of the body. No allocation, so
    /// it costs the timed loop next to nothing.
    fn check(&self, data: &[u8], offset: u64) -> anyhow::Result<()> {
        let lba = (offset + data.len() as u64) / SECTOR as u64 - 1;
        let got = &data[data.len() - SECTOR..][..32];
        ensure!(
            &got[..8] == pattern::MAGIC
                && got[8..16] == lba.to_le_bytes()
                && self.bodies.iter().any(|b| got[16..32] == b[..]),
            "{}: sector {lba} read back {got:02x?}",
            self.image
        );
        Ok(())
    }

    /// Read the whole device `SEQ_PASSES` times in 1 MiB requests; bytes read.
    fn sequential(&self, buf: &mut [u8]) -> anyhow::Result<u64> {
        let mut bytes = 0u64;
        for _ in 0..SEQ_PASSES {
            for c in 0..self.size / CHUNK as u64 {
                let n = self
                    .file
                    .read_at(&mut buf[..CHUNK], c * CHUNK as u64)
                    .context("sequential read")?;
                ensure!(n == CHUNK, "short read: {n}");
                self.check(&buf[..CHUNK], c * CHUNK as u64)?;
                bytes += n as u64;
            }
        }
        Ok(bytes)
    }

    /// `RANDOM_OPS` 4 KiB reads at offsets drawn from `seed`.
    fn random(&self, buf: &mut [u8], seed: u64) -> anyhow::Result<()> {
        let blocks = self.size / SMALL as u64;
        let mut x = 0x9e37_79b9_7f4a_7c15 ^ seed;
        for _ in 0..RANDOM_OPS {
            // xorshift64: a different offset every request, no locality.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % blocks) * SMALL as u64;
            let n = self
                .file
                .read_at(&mut buf[..SMALL], at)
                .context("random read")?;
            ensure!(n == SMALL, "short read: {n}");
            self.check(&buf[..SMALL], at)?;
        }
        Ok(())
    }
}

/// The device order of measurement `k`: rotated by one each time.
fn order(n: usize, k: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + k) % n)
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let reps: usize = args
        .next()
        .context("usage: l3-blkperf <reps> <image>=<device>...")?
        .parse()
        .context("reps")?;
    let disks = args
        .enumerate()
        .map(|(i, a)| {
            let (image, path) = a
                .split_once('=')
                .with_context(|| format!("{a}: want <image>=<device>"))?;
            let d = Disk::open(image, path)?;
            println!("L3-PERF-DEV {i} {image} {path}");
            Ok(d)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure!(
        !disks.is_empty(),
        "usage: l3-blkperf <reps> <image>=<device>..."
    );
    // O_DIRECT wants the buffer aligned to the logical block size.
    let mut backing = vec![0u8; CHUNK + SMALL];
    let off = backing.as_ptr().align_offset(SMALL);
    let buf = &mut backing[off..off + CHUNK];
    let n = disks.len();
    for rep in 0..reps {
        for d in order(n, rep) {
            let t = Instant::now();
            let bytes = disks[d].sequential(buf)?;
            println!("L3-PERF-SEQ {rep} {d} {bytes} {}", t.elapsed().as_nanos());
        }
        for d in order(n, rep + 1) {
            let t = Instant::now();
            disks[d].random(buf, rep as u64)?;
            println!(
                "L3-PERF-RAND4K {rep} {d} {RANDOM_OPS} {}",
                t.elapsed().as_nanos()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(image: &str) -> Disk {
        Disk {
            file: File::open("/dev/null").unwrap(),
            size: 1 << 24,
            image: image.to_string(),
            bodies: Disk::bodies(image),
        }
    }

    #[test]
    fn check_takes_the_last_sector_of_a_read_and_its_image() {
        let data = pattern::region("blk1", 4096, SMALL);

        assert!(disk("blk1").check(&data, 4096).is_ok());
        let rewritten = pattern::written("blk1", 4096, SMALL);
        assert!(disk("blk1").check(&rewritten, 4096).is_ok());
        // Another offset, another image, or a buffer that was not filled.
        assert!(disk("blk1").check(&data, 8192).is_err());
        assert!(disk("blk0").check(&data, 4096).is_err());
        assert!(disk("blk1").check(&[0; SMALL], 4096).is_err());
    }

    #[test]
    fn two_devices_alternate_which_goes_first() {
        let firsts: Vec<usize> = (0..4).map(|k| order(2, k).next().unwrap()).collect();
        assert_eq!(firsts, [0, 1, 0, 1]);
        assert_eq!(order(2, 1).collect::<Vec<_>>(), [1, 0]);
        assert_eq!(order(1, 3).collect::<Vec<_>>(), [0]);
    }
}
