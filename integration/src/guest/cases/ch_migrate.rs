//! Pause, snapshot/restore and live migration of a bridged device under
//! Cloud Hypervisor (needs `CLOUD_HYPERVISOR` and `CH_REMOTE`, like the
//! other `ch_` cases), on QEMU's virtio-blk `blk0`.
//!
//! The inner guest runs `l3-stream` (mode `stream`): O_DIRECT 4 KiB writes
//! one after the other, each with its sequence number and a checksum, and
//! reads of earlier blocks into fresh buffers that it checks only at the
//! end, then a read-back of everything. It prints `L3-SEQ <n>` about every
//! 50 ms; the lab stamps each line as it arrives, so the longest gap is the
//! I/O stall seen from outside the inner guest.
//!
//! Outside reads go through `blk0_twin`, a second QEMU device on blk0's
//! image (`share-rw=on`), driven by the test kit's driver in the lab VM.
//! `blk0_no_event_idx` is a third one without VIRTIO_RING_F_EVENT_IDX.

use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use vdpa_bridge::vfio::VfioFunction;
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_testkit::driver::{Driver, DriverOptions};

use crate::guest::ch::{not_configured, Ch, ChVm, Vdpa, BOOT_TIMEOUT};
use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::{Device, Variant};
use crate::stream;

/// Where `l3-stream` writes: the upper 8 MiB of the 16 MiB disk.
const STREAM_AT: u64 = stream::REGION;
const STREAM_LEN: u64 = stream::REGION_LEN;

/// The lab VM's directory for sockets and snapshots (its tmpfs, like the
/// launcher's work directory).
pub(crate) const DIR: &str = "/tmp/ch-l3";

/// Bridged device id in the migration cases.
pub(crate) const ID: &str = "disk";

/// The suite.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |name: &str, run: fn(&Ctx) -> CaseResult| {
        out.push(Case {
            name: name.to_string(),
            needs: Some(Variant::Blk0),
            run,
        })
    };
    add(
        "ch_blk0_paused_5_s_under_writes_does_no_dma_then_resumes",
        ch_pause,
    );
    add(
        "ch_blk0_live_migration_to_a_second_vmm_on_the_same_device",
        ch_migrate_same_device,
    );
    add(
        "ch_blk0_live_migration_to_a_second_device_on_the_same_image",
        ch_migrate_twin,
    );
    add(
        "ch_blk0_migration_to_a_device_without_event_idx_is_refused_and_the_source_runs_on",
        ch_migrate_refused,
    );
    add(
        "ch_blk0_snapshot_restored_in_a_new_vmm_continues_the_writes",
        ch_snapshot_restore,
    );
    add(
        "ch_blk0_local_migration_to_a_second_vmm_on_the_same_device",
        ch_migrate_local,
    );
    add(
        "ch_blk0_migration_whose_destination_is_killed_mid_way_leaves_the_source_running",
        ch_migrate_killed,
    );
    out.push(Case {
        name: "ch_net_user_live_migration_under_pings".to_string(),
        needs: Some(Variant::NetUser),
        run: ch_migrate_net,
    });
    out
}

/// FNV-1a of the streamed region of blk0's image, read through `twin` by
/// the test kit's driver (another device on the same image).
fn outside_hash(twin: &Device) -> anyhow::Result<u64> {
    let f = Arc::new(VfioFunction::open(&twin.bdf).context("claim the twin through VFIO")?);
    let mut d = VpVdpa::open(f, OpenOptions::default()).context("open the twin")?;
    let mut drv = Driver::bring_up(
        &mut d,
        DriverOptions {
            queues: Some(1),
            ..DriverOptions::default()
        },
    )?;
    let chunk: u32 = 64 << 10;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..STREAM_LEN / u64::from(chunk) {
        let sector = (STREAM_AT + i * u64::from(chunk)) / 512;
        for b in drv.blk_read(0, sector, chunk)? {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    drv.release(&mut d)?;
    Ok(h)
}

/// The streaming inner guest on blk0, started and writing.
fn start_stream<'a>(
    ctx: &Ctx,
    lab: &'a crate::manifest::ChRun,
    secs: u64,
) -> anyhow::Result<ChVm<'a>> {
    let dev = ctx.dev()?;
    let mut vm = Ch::new(lab, "stream")
        .cmdline(&format!("l3.secs={secs}"))
        .api()
        // Snapshots are written there (the rule travels with the VM's
        // configuration to a restore or a migration's destination).
        .landlock_rule(&format!("path={DIR},access=rw"))
        .vdpa(&Vdpa::new(&dev.bdf, 1).id(ID))
        .start()?;
    vm.wait("L3-STREAM-START", BOOT_TIMEOUT)?;
    ctx.declare_stream(STREAM_AT, STREAM_LEN)?;
    vm.wait("L3-SEQ", Duration::from_secs(30))?;
    // Writes going for a while.
    std::thread::sleep(Duration::from_secs(3));
    vm.pump();
    Ok(vm)
}

/// The stream's verdict on `vm` (waits for it), its written count, and no
/// I/O error on any of `others`.
fn stream_ok(vm: &mut ChVm<'_>, within: Duration, others: &[&ChVm<'_>]) -> anyhow::Result<String> {
    vm.wait("L3-STREAM-", within)?;
    let line = vm.last_line("L3-STREAM-").unwrap_or_default().to_string();
    ensure!(line.contains("L3-STREAM-OK"), "the stream failed: {line}");
    for v in others.iter().copied().chain([&*vm]) {
        ensure!(
            !v.has("L3-STREAM-IOERR"),
            "an I/O error in the inner guest: {}",
            v.line("L3-STREAM-IOERR").unwrap_or_default()
        );
    }
    Ok(line
        .split("L3-STREAM-OK")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// The longest gap between `L3-SEQ` lines arriving, over several VMMs'
/// output (the inner guest moved from one to the next).
fn longest_gap(vms: &[&ChVm<'_>]) -> Duration {
    let mut at: Vec<Instant> = vms
        .iter()
        .flat_map(|v| v.stamped("L3-SEQ").into_iter().map(|(t, _)| t))
        .collect();
    at.sort();
    at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

fn twin_of<'a>(ctx: &'a Ctx<'a>, v: Variant) -> anyhow::Result<&'a Device> {
    ctx.manifest
        .device(v)
        .with_context(|| format!("no {} in this lab", v.name()))
}

fn ch_pause(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let twin = twin_of(ctx, Variant::Blk0Twin)?;
    let mut vm = start_stream(ctx, lab, 45)?;
    vm.remote(&["pause"])?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let first = outside_hash(twin);
    let wait = (t0 + Duration::from_millis(4500)).saturating_duration_since(Instant::now());
    std::thread::sleep(wait);
    let second = outside_hash(twin);
    let t1 = Instant::now();
    vm.pump();
    let during = vm
        .stamped("L3-SEQ")
        .iter()
        .filter(|(at, _)| *at > t0 + Duration::from_millis(300))
        .count();
    vm.remote(&["resume"])?;
    let result = stream_ok(&mut vm, Duration::from_secs(240), &[]);
    let done = vm.wait_done();
    let (first, second) = (first?, second?);
    ensure!(
        first == second,
        "blk0's image changed while the VM was paused ({:?} apart)",
        t1 - t0
    );
    ensure!(during == 0, "{during} progress line(s) while paused");
    let written = result?;
    done?;
    vm.expect("paused in", "the bridge did not pause")?;
    vm.expect(
        "resumed on shadow rings",
        "the bridge did not resume on shadow rings",
    )?;
    let paused = vm.line("paused in").unwrap_or_default().to_string();
    Ok(Outcome::PassWith(format!(
        "image unchanged from pause + 0.5 s to + 4.5 s; longest gap {} ms; {written}; {}",
        longest_gap(&[&vm]).as_millis(),
        paused.split("bridge").nth(1).unwrap_or_default().trim()
    )))
}

/// Start `receive-migration` on `dst` (with further options `receive`)
/// at the migration socket, and wait (at most 20 s) until it listens.
fn receive_on(dst: &ChVm<'_>, receive: &str) -> anyhow::Result<(std::path::PathBuf, Child)> {
    let sock = Path::new(DIR).join("mig.sock");
    let _ = std::fs::remove_file(&sock);
    let recv: Child = dst
        .remote_command(&[
            "receive-migration",
            &format!("receiver_url=unix:{}{receive}", sock.display()),
        ])?
        .spawn()
        .context("start receive-migration")?;
    let end = Instant::now() + Duration::from_secs(20);
    while !sock.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((sock, recv))
}

/// `send-migration` to `dst`, which receives with `receive`; returns
/// send-migration's result and receive-migration's exit status.
pub(crate) fn migrate(
    src: &ChVm<'_>,
    dst: &ChVm<'_>,
    receive: &str,
) -> anyhow::Result<(anyhow::Result<String>, std::process::ExitStatus)> {
    migrate_with(src, dst, receive, "")
}

/// [`migrate`] with further send-migration options (`,local=on`).
fn migrate_with(
    src: &ChVm<'_>,
    dst: &ChVm<'_>,
    receive: &str,
    send: &str,
) -> anyhow::Result<(anyhow::Result<String>, std::process::ExitStatus)> {
    let (sock, mut recv) = receive_on(dst, receive)?;
    let sent = src.remote(&[
        "send-migration",
        &format!(
            "destination_url=unix:{},downtime_ms=1000,timeout_s=60,timeout_strategy=ignore{send}",
            sock.display()
        ),
    ]);
    let status = recv.wait().context("receive-migration")?;
    Ok((sent, status))
}

/// The CH log's `Migration completed after <s>s with a downtime of <ms>ms`.
fn downtime(src: &ChVm<'_>) -> String {
    src.line("Migration completed after")
        .and_then(|l| l.split("Migration completed").nth(1))
        .unwrap_or("(no completion line)")
        .trim()
        .to_string()
}

fn migrate_to(ctx: &Ctx, target: Option<Variant>) -> CaseResult {
    migrate_to_with(ctx, target, "")
}

fn migrate_to_with(ctx: &Ctx, target: Option<Variant>, send: &str) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let paths = match target {
        Some(v) => format!(",vdpa_paths=[{ID}@{}]", twin_of(ctx, v)?.bdf),
        None => String::new(),
    };
    let mut src = start_stream(ctx, lab, 75)?;
    let mut dst = Ch::empty(lab, "dst.sock", None)?;
    let (sent, status) = migrate_with(&src, &dst, &paths, send)?;
    let sent = sent.with_context(|| format!("send-migration failed: {}", src.tail()));
    let src_gone = src.exited(Duration::from_secs(30));
    let result = stream_ok(&mut dst, Duration::from_secs(300), &[&src]);
    let done = dst.wait_done();
    sent?;
    ensure!(status.success(), "receive-migration: {status}");
    ensure!(src_gone, "the source VMM did not exit after the migration");
    let written = result?;
    done?;
    src.expect(
        "handed over for the migration",
        "the source did not hand the device over",
    )?;
    // Cloud Hypervisor's shutdown resumes the devices to wake their
    // threads: the migrated device must stay closed.
    ensure!(
        !src.has("taken back after"),
        "the source opened the device again after the migration: {}",
        src.line("taken back after").unwrap_or_default()
    );
    if send.is_empty() {
        src.expect(
            "dirty logging on shadow rings",
            "the source did not log dirty pages through shadow rings",
        )?;
    }
    dst.expect("restored (features", "the destination did not restore")?;
    dst.expect(
        "resumed on shadow rings",
        "the destination did not resume the device",
    )?;
    Ok(Outcome::PassWith(format!(
        "{}; longest gap {} ms; {written}",
        downtime(&src),
        longest_gap(&[&src, &dst]).as_millis()
    )))
}

fn ch_migrate_same_device(ctx: &Ctx) -> CaseResult {
    migrate_to(ctx, None)
}

fn ch_migrate_twin(ctx: &Ctx) -> CaseResult {
    migrate_to(ctx, Some(Variant::Blk0Twin))
}

/// The destination's device lacks EVENT_IDX, which the source's guest
/// negotiated: the destination refuses the state, the migration fails,
/// and the source takes its device back and goes on writing.
fn ch_migrate_refused(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let lacking = twin_of(ctx, Variant::Blk0NoEventIdx)?;
    let mut src = start_stream(ctx, lab, 75)?;
    let mut dst = Ch::empty(lab, "dst.sock", None)?;
    let paths = format!(",vdpa_paths=[{ID}@{}]", lacking.bdf);
    let (sent, status) = migrate(&src, &dst, &paths)?;
    // send-migration returns once the migration started; the source's
    // log says how it ended.
    let failed = sent.and_then(|_| src.wait("Migration failed", Duration::from_secs(180)));
    dst.pump();
    dst.kill();
    failed.with_context(|| format!("the migration did not fail (receive-migration: {status})"))?;
    ensure!(!src.has("Migration completed"), "the migration completed");
    let result = stream_ok(&mut src, Duration::from_secs(300), &[]);
    let done = src.wait_done();
    let written = result?;
    done?;
    ensure!(
        dst.has("does not offer the negotiated feature bit(s) 29"),
        "the destination did not name the missing EVENT_IDX: {}",
        dst.tail()
    );
    src.expect(
        "taken back after",
        "the source did not take its device back",
    )?;
    let back = src
        .line("taken back after")
        .unwrap_or_default()
        .split("taken back")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(Outcome::PassWith(format!(
        "refused; source device taken back {back}; longest gap {} ms; {written}",
        longest_gap(&[&src]).as_millis()
    )))
}

fn ch_snapshot_restore(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let snap = Path::new(DIR).join("snapshot");
    let _ = std::fs::remove_dir_all(&snap);
    std::fs::create_dir_all(&snap)?;
    let url = format!("file://{}", snap.display());
    let mut src = start_stream(ctx, lab, 60)?;
    src.remote(&["pause"])?;
    src.remote(&["snapshot", &url])?;
    src.remote(&["shutdown-vmm"])?;
    ensure!(
        src.exited(Duration::from_secs(30)),
        "the first VMM did not exit"
    );
    let mut dst = Ch::empty(lab, "restore.sock", Some(&format!("source_url={url}")))?;
    dst.wait("restored (features", Duration::from_secs(120))?;
    // The restored VM waits, paused, for its resume.
    std::thread::sleep(Duration::from_secs(1));
    dst.remote(&["resume"])?;
    let result = stream_ok(&mut dst, Duration::from_secs(300), &[&src]);
    let done = dst.wait_done();
    let _ = std::fs::remove_dir_all(&snap);
    let written = result?;
    done?;
    dst.expect(
        "resumed on shadow rings",
        "the restored device did not resume",
    )?;
    Ok(Outcome::PassWith(format!(
        "restored and resumed; {written}"
    )))
}

/// The plugin's log line when a net device's control state was set again.
const REPLAYED: &str = "net control state replayed";

/// Pings through the bridged net device (QEMU's user-mode network) one
/// after the other while the VM migrates to a second VMM on the same
/// device: how many were lost, and the longest gap between answers. The
/// device's control-queue state (receive modes, MAC filters, VLAN filters
/// negotiated) is replayed after the switch to shadow rings and on the
/// destination, every command accepted by QEMU's device.
fn ch_migrate_net(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    let mut src = Ch::new(lab, "netping")
        .cmdline("l3.secs=90")
        .api()
        .vdpa(
            // Receive, transmit and control queue.
            &Vdpa::new(&dev.bdf, 3).id(ID),
        )
        .start()?;
    src.wait("L3-NETPING-START", BOOT_TIMEOUT)?;
    src.wait("L3-PONG", Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(3));
    src.pump();
    let mut dst = Ch::empty(lab, "dst.sock", None)?;
    let (sent, status) = migrate(&src, &dst, "")?;
    sent?;
    let src_gone = src.exited(Duration::from_secs(180));
    let done = dst.wait("L3-NETPING-DONE", Duration::from_secs(300));
    let end = dst.wait_done();
    ensure!(status.success(), "receive-migration: {status}");
    ensure!(src_gone, "the source VMM did not exit after the migration");
    done?;
    end?;
    let line = dst
        .last_line("L3-NETPING-DONE")
        .unwrap_or_default()
        .to_string();
    let count = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (sent_n, received) = (count("sent="), count("received="));
    ensure!(
        received > 0 && dst.has("L3-PONG"),
        "no answer after the migration: {line}"
    );
    let mut at: Vec<Instant> = [&src, &dst]
        .iter()
        .flat_map(|v| v.stamped("L3-PONG").into_iter().map(|(t, _)| t))
        .collect();
    at.sort();
    let gap = at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    // The control state set again, on the source at the switch to shadow
    // rings and on the destination, QEMU's device refusing nothing.
    let replayed = |vm: &ChVm| -> anyhow::Result<String> {
        let line = vm
            .last_line(REPLAYED)
            .ok_or_else(|| anyhow::anyhow!("net control state not replayed"))?
            .to_string();
        ensure!(line.contains(" 0 refused"), "replay refused: {line}");
        Ok(line
            .split(REPLAYED)
            .nth(1)
            .unwrap_or_default()
            .trim_start_matches(':')
            .trim()
            .to_string())
    };
    let (on_src, on_dst) = (replayed(&src)?, replayed(&dst)?);
    Ok(Outcome::PassWith(format!(
        "{}; {} of {sent_n} pings lost; longest gap between answers {} ms; control state \
         replayed on the source ({on_src}) and the destination ({on_dst})",
        downtime(&src),
        sent_n - received,
        gap.as_millis()
    )))
}

/// `--local`: guest memory handed over as files, no dirty logging; the
/// source pauses right after the migration starts.
fn ch_migrate_local(ctx: &Ctx) -> CaseResult {
    migrate_to_with(ctx, None, ",local=on")
}

/// The destination VMM dies during pre-copy: the source's migration
/// fails, its device (shadowed since dirty logging began) goes on, and
/// the writes finish verified.
fn ch_migrate_killed(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let mut src = start_stream(ctx, lab, 75)?;
    let mut dst = Ch::empty(lab, "dst.sock", None)?;
    let (sock, mut recv) = receive_on(&dst, "")?;
    src.remote(&[
        "send-migration",
        &format!(
            "destination_url=unix:{},timeout_s=60,timeout_strategy=ignore",
            sock.display()
        ),
    ])?;
    // Pre-copy under way (the device on shadow rings), then the
    // destination dies.
    let shadowed = src.wait("dirty logging on shadow rings", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    dst.kill();
    let _ = recv.wait();
    shadowed?;
    src.wait("Migration failed", Duration::from_secs(180))?;
    let result = stream_ok(&mut src, Duration::from_secs(300), &[]);
    let done = src.wait_done();
    let written = result?;
    done?;
    ensure!(!src.has("handed over"), "the source let go of its device");
    Ok(Outcome::PassWith(format!(
        "destination killed during pre-copy; source ran on; longest gap {} ms; {written}",
        longest_gap(&[&src]).as_millis()
    )))
}
