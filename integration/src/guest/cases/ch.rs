//! Cloud Hypervisor end to end (needs `CLOUD_HYPERVISOR`, a build with
//! `patches/`): inside the lab VM (nested KVM), Cloud Hypervisor boots a
//! small guest whose disk is QEMU's virtio-blk-pci claimed through
//! `--vdpa path=<PCI address>`. The inner guest checks sector 0 against the
//! host's pattern, writes sector 8 (declared; the host checks the image
//! afterwards) and prints its negotiated features, which must lack the
//! bit masked with `features_mask=`.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::Variant;

/// The suite.
pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "ch_blk0_inner_guest_io_and_masked_feature".to_string(),
        needs: Some(Variant::Blk0),
        run: ch_blk,
    }]
}

fn ch_blk(ctx: &Ctx) -> CaseResult {
    let Some(ch) = &ctx.manifest.ch else {
        return Ok(Outcome::Skip(
            ctx.manifest
                .ch_skip
                .clone()
                .unwrap_or_else(|| "no Cloud Hypervisor configured".into()),
        ));
    };
    let dev = ctx.dev()?;
    ensure!(
        std::path::Path::new("/dev/kvm").exists(),
        "no /dev/kvm (nested KVM) in the lab VM"
    );
    // All features but the masked one.
    let mask = !(1u64 << ch.masked_bit);
    // Boot files on the guest's tmpfs: Landlock rules (`--landlock`) do
    // not hold on the 9p share, whose inodes are not stable.
    let dir = std::path::Path::new("/tmp/ch-l3");
    std::fs::create_dir_all(dir)?;
    let kernel = dir.join("vmlinuz");
    let initramfs = dir.join("initramfs.cpio.gz");
    std::fs::copy(&ch.kernel, &kernel).context("copy the inner kernel")?;
    std::fs::copy(&ch.initramfs, &initramfs).context("copy the inner initramfs")?;
    ctx.declare_write(8 * 512, 512)?;
    let mut child = Command::new(&ch.binary)
        .args([
            "--kernel",
            &kernel.display().to_string(),
            "--initramfs",
            &initramfs.display().to_string(),
            "--cmdline",
            "console=ttyS0 quiet panic=-1",
            "--serial",
            "tty",
            "--console",
            "off",
            "--cpus",
            "boot=1",
            "--memory",
            "size=512M,shared=on",
            "--landlock",
            "--vdpa",
            &format!("path={},num_queues=1,features_mask={mask:#x}", dev.bdf),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", ch.binary.display()))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().context("no stdout")?;
    let err = child.stderr.take().context("no stderr")?;
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("ch-stderr: {l}"));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut lines = Vec::new();
    let mut done = false;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                let fin = l.contains("L3-DONE");
                println!("  | {l}");
                lines.push(l);
                if fin {
                    done = true;
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Give the inner guest a moment to power off, then stop CH by its pid.
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end && !matches!(child.try_wait(), Ok(Some(_))) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !matches!(child.try_wait(), Ok(Some(_))) {
        // SAFETY: kill(2) of the child we spawned, by its pid.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = child.wait();
    }
    let has = |s: &str| lines.iter().any(|l| l.contains(s));
    if !done {
        bail!(
            "the inner guest did not finish; last lines: {:?}",
            lines.iter().rev().take(12).collect::<Vec<_>>()
        );
    }
    ensure!(has("L3-READ-OK"), "inner guest read wrong data: {lines:?}");
    ensure!(has("L3-WRITE-OK"), "inner guest write failed: {lines:?}");
    // The block device (virtio id 2); Cloud Hypervisor adds others (rng).
    let bits = lines
        .iter()
        .filter_map(|l| l.split("L3-FEATURES ").nth(1))
        .find_map(|f| f.strip_prefix("0x0002 "))
        .context("no features line of a block device")?
        .trim();
    let bit = |n: u32| bits.as_bytes().get(n as usize).copied() == Some(b'1');
    ensure!(
        !bit(ch.masked_bit),
        "masked bit {} negotiated: {bits}",
        ch.masked_bit
    );
    ensure!(bit(32), "VERSION_1 not negotiated: {bits}");
    Ok(Outcome::PassWith(format!("inner guest features {bits}")))
}
