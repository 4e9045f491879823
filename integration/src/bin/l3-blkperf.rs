//! `l3-blkperf`: block read throughput inside the innermost guest of the
//! Cloud Hypervisor throughput case, without a process per request (a dd
//! per 4 KiB read measured process creation, not I/O).
//!
//! `l3-blkperf <device> <reps>` opens the device with O_DIRECT and, `reps`
//! times, reads all of it 16 times in 1 MiB requests, then does 2000
//! 4 KiB reads at pseudo-random aligned offsets (one request in flight,
//! like `fio --rw=randread --iodepth=1`), timed with the monotonic clock.
//! Each repetition prints
//! `L3-PERF-SEQ <rep> <bytes> <ns>` and `L3-PERF-RAND4K <rep> <ops> <ns>`.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{ensure, Context as _};

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

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(reps)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: l3-blkperf <device> <reps>");
    };
    let reps: u32 = reps.parse().context("reps")?;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .with_context(|| format!("open {path} with O_DIRECT"))?;
    let size = std::io::Seek::seek(&mut &f, std::io::SeekFrom::End(0)).context("size")?;
    ensure!(
        size >= CHUNK as u64,
        "{path}: {size} bytes, need at least 1 MiB"
    );
    // O_DIRECT wants the buffer aligned to the logical block size.
    let mut backing = vec![0u8; CHUNK + SMALL];
    let off = backing.as_ptr().align_offset(SMALL);
    let buf = &mut backing[off..off + CHUNK];
    let chunks = size / CHUNK as u64;
    let blocks = size / SMALL as u64;
    for rep in 0..reps {
        let t = Instant::now();
        let mut bytes = 0u64;
        for _ in 0..SEQ_PASSES {
            for c in 0..chunks {
                let n = f
                    .read_at(buf, c * CHUNK as u64)
                    .context("sequential read")?;
                ensure!(n == CHUNK, "short read: {n}");
                bytes += n as u64;
            }
        }
        println!("L3-PERF-SEQ {rep} {bytes} {}", t.elapsed().as_nanos());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(rep);
        let t = Instant::now();
        for _ in 0..RANDOM_OPS {
            // xorshift64: a different offset every request, no locality.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % blocks) * SMALL as u64;
            let n = f.read_at(&mut buf[..SMALL], at).context("random read")?;
            ensure!(n == SMALL, "short read: {n}");
        }
        println!(
            "L3-PERF-RAND4K {rep} {RANDOM_OPS} {}",
            t.elapsed().as_nanos()
        );
    }
    Ok(())
}
