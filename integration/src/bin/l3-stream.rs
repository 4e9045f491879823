//! `l3-stream`: a continuous stream of verified writes inside the innermost
//! guest, for the pause, snapshot and migration cases.
//!
//! `l3-stream <device> <seconds>` opens the device with O_DIRECT and, for
//! `<seconds>`, writes 4 KiB blocks one after the other into the upper
//! half of a 16 MiB disk ([`REGION`], wrapping), in the format of
//! `vdpa_integration::stream`, which the host checks after the VM exits. Every eighth write it also reads a block
//! written before into a fresh buffer, which it keeps and checks only at
//! the end: a read that completed before a migration is verified after it,
//! so the pages the device wrote must have been carried over. At the end
//! it reads back every block it wrote and checks it holds the last write.
//!
//! Lines: `L3-STREAM-START <region offset> <blocks>`, then about every
//! 50 ms `L3-SEQ <seq> <uptime centiseconds>`, each failed request as
//! `L3-STREAM-IOERR <seq> <what>`, and at the end `L3-STREAM-OK writes=<n>
//! reads=<k> ioerrors=<e>` or `L3-STREAM-BAD <what>`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use vdpa_integration::stream::{check, fill, BLOCK, BLOCKS, REGION};

/// Reads kept for the final check.
const MAX_READS: usize = 256;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("L3-STREAM-BAD {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A 4 KiB buffer aligned for O_DIRECT.
struct Buf {
    backing: Vec<u8>,
    off: usize,
}

impl Buf {
    fn new() -> Buf {
        let backing = vec![0u8; 2 * BLOCK];
        let off = backing.as_ptr().align_offset(BLOCK);
        Buf { backing, off }
    }

    fn get(&self) -> &[u8] {
        &self.backing[self.off..self.off + BLOCK]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.backing[self.off..self.off + BLOCK]
    }
}

fn uptime_cs() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .and_then(|s| s.replace('.', "").parse().ok())
        .unwrap_or(0)
}

fn run() -> anyhow::Result<bool> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(secs)) = (args.get(1), args.get(2)) else {
        bail!("usage: l3-stream <device> <seconds>");
    };
    let secs: u64 = secs.parse().context("seconds")?;
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("open {path} with O_DIRECT"))?;
    println!("L3-STREAM-START {REGION} {BLOCKS}");
    let mut last: Vec<Option<u64>> = vec![None; BLOCKS as usize];
    let mut kept: Vec<(Buf, u64, u64)> = Vec::new();
    let mut buf = Buf::new();
    let (mut seq, mut ioerrors) = (0u64, 0u64);
    let start = Instant::now();
    let mut printed = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        let block = seq % BLOCKS;
        fill(buf.get_mut(), seq, block);
        match file.write_all_at(buf.get(), REGION + block * BLOCK as u64) {
            Ok(()) => last[block as usize] = Some(seq),
            Err(e) => {
                ioerrors += 1;
                // The block's content is unknown now.
                last[block as usize] = None;
                println!("L3-STREAM-IOERR {seq} write: {e}");
            }
        }
        if seq % 8 == 7 && kept.len() < MAX_READS {
            let back = (seq.saturating_sub(100)) % BLOCKS;
            if let Some(s) = last[back as usize] {
                let mut r = Buf::new();
                match file.read_exact_at(r.get_mut(), REGION + back * BLOCK as u64) {
                    Ok(()) => kept.push((r, s, back)),
                    Err(e) => {
                        ioerrors += 1;
                        println!("L3-STREAM-IOERR {seq} read: {e}");
                    }
                }
            }
        }
        if printed.elapsed() >= Duration::from_millis(50) {
            println!("L3-SEQ {seq} {}", uptime_cs());
            printed = Instant::now();
        }
        seq += 1;
    }
    println!("L3-SEQ {} {} end", seq.saturating_sub(1), uptime_cs());
    let mut bad = Vec::new();
    for (r, s, b) in &kept {
        if let Err(e) = check(r.get(), *s, *b) {
            bad.push(format!("read during the stream: {e}"));
        }
    }
    for (b, s) in last.iter().enumerate() {
        let Some(s) = s else { continue };
        let b = b as u64;
        let mut r = Buf::new();
        file.read_exact_at(r.get_mut(), REGION + b * BLOCK as u64)
            .with_context(|| format!("read back block {b}"))?;
        if let Err(e) = check(r.get(), *s, b) {
            bad.push(e);
        }
    }
    if bad.is_empty() && ioerrors == 0 {
        println!("L3-STREAM-OK writes={seq} reads={} ioerrors=0", kept.len());
        Ok(true)
    } else {
        println!(
            "L3-STREAM-BAD ioerrors={ioerrors} {} mismatches, first: {}",
            bad.len(),
            bad.first().map_or("-", String::as_str)
        );
        Ok(false)
    }
}
