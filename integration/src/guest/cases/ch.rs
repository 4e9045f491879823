//! Cloud Hypervisor end to end (needs `CLOUD_HYPERVISOR`, a build with
//! `patches/`, and `CH_REMOTE` for hot-plug): inside the lab VM (nested
//! KVM, TCG outside), Cloud Hypervisor with its default seccomp filters and
//! `--landlock` boots a small guest (`host::initramfs::L3_INIT`) whose
//! device is one of QEMU's virtio-pci devices claimed through
//! `--vdpa path=<PCI address>`:
//!
//! * blk: the inner guest checks sector 0 against the host's pattern,
//!   writes sector 8 (declared; the host checks the image afterwards) and
//!   its negotiated features lack the bit masked with `features_mask=`;
//! * net: DHCP lease from QEMU's user-mode network, ping 10.0.2.2;
//! * reboot of the inner guest: the bridged device is built anew;
//! * hot-plug and unplug of the blk and net devices through `ch-remote`;
//! * the host takes blk0 away under the inner guest's I/O (an ordered
//!   removal): Cloud Hypervisor releases it within two seconds, unplugs it
//!   from the guest, and goes on running the guest.
//!
//! Throughput is measured apart, as benchmarks (`cases/ch_bench.rs`).
//!
//! Every case starts Cloud Hypervisor through [`crate::guest::ch`].

use std::time::Duration;

use anyhow::{ensure, Context as _};

use crate::guest::cases::faults::{remove_timed, restore, RELEASE_WITHIN};
use crate::guest::ch::{
    not_configured, Ch, ChVm, Vdpa, BOOT_TIMEOUT, DOORBELLS_MAPPED, VIRTIO_ID_BLOCK,
};
use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::manifest::{Device, Variant};

/// The inner guest's line just before it writes sector 8 (`L3-READ-OK`
/// or `L3-READ-BAD`, `host::initramfs::L3_INIT`, mode `blk`).
const WRITE_FOLLOWS: &str = "L3-READ-";

/// The suite.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |name: &str, v: Variant, run: fn(&Ctx) -> CaseResult| {
        out.push(Case {
            name: name.to_string(),
            needs: Some(v),
            run,
        })
    };
    add(
        "ch_blk0_inner_guest_io_and_masked_feature",
        Variant::Blk0,
        ch_blk,
    );
    add(
        "ch_net_user_inner_guest_dhcp_and_ping",
        Variant::NetUser,
        ch_net,
    );
    add(
        "ch_blk0_guest_reboot_reopens_the_bridged_device",
        Variant::Blk0,
        ch_reboot,
    );
    add(
        "ch_blk0_hotplug_and_unplug_through_the_api",
        Variant::Blk0,
        ch_hotplug,
    );
    add(
        "ch_net_user_hotplug_and_unplug_through_the_api",
        Variant::NetUser,
        ch_hotplug_net,
    );
    add(
        "ch_blk_mq_relay_runs_under_its_own_seccomp_filter",
        Variant::BlkMq,
        ch_relay,
    );
    add(
        "ch_blk0_behind_the_viommu_strict_reads_writes_and_dma_follow",
        Variant::Blk0,
        ch_viommu_blk,
    );
    add(
        "ch_net_user_hotplug_on_a_viommu_segment",
        Variant::NetUser,
        ch_viommu_hotplug_net,
    );
    add(
        "ch_net_user_on_a_viommu_segment_at_boot_dhcp_and_ping",
        Variant::NetUser,
        ch_viommu_net,
    );
    add(
        "ch_blk_mq_hotplug_behind_the_viommu_relayed_vector",
        Variant::BlkMq,
        ch_viommu_hotplug_blk_mq,
    );
    add(
        "ch_blk0_host_removal_releases_it_and_unplugs_it_from_the_guest",
        Variant::Blk0,
        ch_host_removal,
    );
    add(
        "ch_blk_mq_host_removal_with_a_relayed_vector",
        Variant::BlkMq,
        ch_host_removal_relayed,
    );
    out
}

/// The bridge's last `DMA through the vIOMMU at <reset|shutdown>: <maps>
/// maps, <unmaps> unmaps, <live> mappings live` line (a guest reset, when
/// its driver lets the device go, or an unplug).
fn viommu_dma(vm: &ChVm<'_>) -> anyhow::Result<(u64, u64, u64)> {
    let line = vm
        .last_line("DMA through the vIOMMU at")
        .context("no DMA summary from the bridge (at a reset or an unplug)")?;
    let nums: Vec<u64> = line
        .rsplit(": ")
        .next()
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    match nums[..] {
        [maps, unmaps, live] => Ok((maps, unmaps, live)),
        _ => anyhow::bail!("cannot read {line:?}"),
    }
}

/// Check the bridge's DMA summary: the guest's IOMMU in strict mode maps
/// and unmaps for every request, and the device's table holds exactly
/// the mappings not yet removed.
fn viommu_dma_followed(vm: &ChVm<'_>) -> anyhow::Result<String> {
    let (maps, unmaps, live) = viommu_dma(vm)?;
    ensure!(
        maps > 0 && unmaps > 0,
        "maps {maps}, unmaps {unmaps}: the guest's IOMMU did not drive the device's mappings"
    );
    ensure!(
        maps.checked_sub(unmaps) == Some(live),
        "{maps} maps - {unmaps} unmaps != {live} live: a removed mapping is still in the table"
    );
    Ok(format!(
        "{maps} maps, {unmaps} unmaps, {live} live at the end"
    ))
}

/// blk0 behind Cloud Hypervisor's vIOMMU (`iommu=on`, segment 0), the
/// inner guest's IOMMU in strict mode (every unmap reaches the device):
/// the guest reads the host's pattern and writes a sector the host then
/// finds in the image; the device's DMA mappings followed the guest's map
/// and unmap requests.
fn ch_viommu_blk(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    let mut vm = Ch::new(lab, "blk")
        .cmdline("iommu.strict=1")
        .cmdline("l3.unbind=1")
        .vdpa(&Vdpa::new(&dev.bdf, 1).iommu())
        .start()?;
    let done = vm.wait_done();
    if vm.has(WRITE_FOLLOWS) {
        ctx.declare_write(8 * 512, 512)?;
    }
    done?;
    vm.expect("L3-READ-OK", "inner guest read wrong data")?;
    vm.expect("L3-WRITE-OK", "inner guest write failed")?;
    let dma = viommu_dma_followed(&vm)?;
    let mapped = vm.has(DOORBELLS_MAPPED);
    Ok(Outcome::PassWith(format!(
        "{dma}; doorbells {}",
        if mapped { "mapped" } else { "trapped" }
    )))
}

/// The net device hot-plugged onto PCI segment 1, which sits behind the
/// vIOMMU (`--platform num_pci_segments=2,iommu_segments=1`), the inner
/// guest's IOMMU strict: ping through it, then unplug.
fn ch_viommu_hotplug_net(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    if lab.remote.is_none() {
        return Ok(Outcome::Skip("CH_REMOTE is not set".into()));
    }
    let dev = ctx.dev()?;
    let group = iommu_group(dev)?;
    let mut vm = Ch::new(lab, "hotplugnet")
        .cmdline("iommu.strict=1")
        .platform("num_pci_segments=2,iommu_segments=1")
        .hotplug_of(&dev.bdf, group)
        .start()?;
    let net = Vdpa::new(&dev.bdf, 3).iommu().pci_segment(1);
    plug_io_unplug(&mut vm, &net, ("L3-IO-DONE", "L3-PING-OK"), |_| Ok(()))?;
    viommu_dma_followed(&vm).map(Outcome::PassWith)
}

/// net_user given at boot on PCI segment 1, behind the vIOMMU, the inner
/// guest's IOMMU strict: DHCP and ping.
fn ch_viommu_net(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    let mut vm = Ch::new(lab, "net")
        .cmdline("iommu.strict=1")
        .cmdline("l3.unbind=1")
        .platform("num_pci_segments=2,iommu_segments=1")
        .vdpa(&Vdpa::new(&dev.bdf, 3).iommu().pci_segment(1))
        .start()?;
    vm.wait_done()?;
    vm.expect("L3-DHCP-OK", "no DHCP lease through the vIOMMU")?;
    vm.expect("L3-PING-OK", "no ping reply through the vIOMMU")?;
    viommu_dma_followed(&vm).map(Outcome::PassWith)
}

/// blk_mq hot-plugged behind the vIOMMU with two queues on one MSI-X
/// vector (the relay thread fans it out), two possible CPUs in the inner
/// guest so both queues are used, its IOMMU strict: the disk reads the
/// host's pattern, then is unplugged. Cloud Hypervisor hot-plugs a device
/// behind its vIOMMU only onto a segment of `iommu_segments=` ("Cannot
/// hotplug device behind vIOMMU" on segment 0), so segment 1.
fn ch_viommu_hotplug_blk_mq(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    if lab.remote.is_none() {
        return Ok(Outcome::Skip("CH_REMOTE is not set".into()));
    }
    let dev = ctx.dev()?;
    let group = iommu_group(dev)?;
    let mut vm = Ch::new(lab, "hotplug")
        .cmdline("iommu.strict=1")
        .possible_cpus(2)
        .platform("num_pci_segments=2,iommu_segments=1")
        .hotplug_of(&dev.bdf, group)
        .start()?;
    let disk = Vdpa::new(&dev.bdf, 2).iommu().pci_segment(1);
    plug_io_unplug(&mut vm, &disk, ("L3-READ", "L3-READ-OK"), |vm| {
        vm.expect(
            "interrupts direct 1 relayed 2",
            "the two queues' shared vector was not relayed",
        )
    })?;
    viommu_dma_followed(&vm).map(Outcome::PassWith)
}

/// The inner guest reads blk0 in a loop; the lab VM removes the function
/// (`echo 1 > .../remove`, an ordered removal that waits for vfio-pci's
/// users). Cloud Hypervisor is told through the request interrupt,
/// removes the doorbell mapping, releases the device (the removal
/// finishes within [`RELEASE_WITHIN`]) and unplugs it from the guest,
/// whose later reads fail instead of hanging; the guest sees the disk go
/// and goes on running; Cloud Hypervisor's configuration no longer holds
/// the device. The device is rescanned and bound again afterwards.
fn ch_host_removal(ctx: &Ctx) -> CaseResult {
    host_removal(ctx, 1)
}

/// The same on blk_mq (on the root bus) with two queues on one MSI-X
/// vector, which the relay thread fans out: the release stops the relay
/// first and raises each queue's interrupt itself after the drain, so the
/// guest sees what the device completed meanwhile.
fn ch_host_removal_relayed(ctx: &Ctx) -> CaseResult {
    host_removal(ctx, 2)
}

fn host_removal(ctx: &Ctx, queues: u16) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    let group = iommu_group(dev)?;
    let mut vm = Ch::new(lab, "hostremove")
        .possible_cpus(u8::try_from(queues).unwrap_or(1))
        .hotplug_of(&dev.bdf, group)
        .vdpa(&Vdpa::new(&dev.bdf, queues).id("hostvdpa"))
        .start()?;
    let looping = vm.wait("L3-IO-LOOP", BOOT_TIMEOUT);
    let removal = looping.as_ref().ok().map(|()| {
        // Some reads in flight first.
        std::thread::sleep(Duration::from_secs(2));
        remove_timed(dev)
    });
    let took = match &removal {
        Some(r) => r.wait(Duration::from_secs(60))?,
        None => None,
    };
    if removal.is_some() && took.is_none() {
        // Unblock the removal before failing: end Cloud Hypervisor (ours).
        vm.kill();
    }
    let unplugged = vm.wait("L3-ALIVE", Duration::from_secs(120));
    let config = if unplugged.is_ok() && lab.remote.is_some() {
        Some(vm.remote(&["info"]))
    } else {
        None
    };
    let done = vm.wait_done();
    if removal.is_some() {
        restore(dev)?;
    }
    looping?;
    let took = took.context("the removal was still blocked after 60 s")?;
    unplugged.with_context(|| format!("the guest did not go on: {}", vm.tail()))?;
    done?;
    vm.expect(
        "L3-READ-OK",
        "inner guest read wrong data before the removal",
    )?;
    vm.expect(
        "released to the host",
        "Cloud Hypervisor did not release the device",
    )?;
    ensure!(
        vm.count("L3-ALIVE") >= 10,
        "the guest stopped after the unplug: {}",
        vm.tail()
    );
    let line = vm
        .line("L3-UNPLUGGED")
        .context("the disk did not leave the guest")?
        .to_string();
    ensure!(
        took < RELEASE_WITHIN,
        "the removal took {took:?} (within {RELEASE_WITHIN:?} expected)"
    );
    if let Some(info) = config {
        let info = info?;
        ensure!(
            !info.contains("hostvdpa"),
            "the device is still in the VM's configuration: {info}"
        );
    }
    Ok(Outcome::PassWith(format!(
        "removal finished in {} ms; guest: {}",
        took.as_millis(),
        line.trim()
    )))
}

/// blk_mq has two MSI-X vectors for four queues: with two queues exposed,
/// both share one vector, so the relay thread fans that vector out. It runs
/// under its own seccomp filter (Cloud Hypervisor's default action kills
/// the VMM on a syscall the filter does not allow): the inner guest's I/O
/// on both queues and a clean exit say the filter holds what the relay
/// does.
fn ch_relay(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    // Two possible CPUs in the inner guest, so its virtio-blk driver
    // activates both queues.
    let mut vm = Ch::new(lab, "blk")
        .possible_cpus(2)
        .vdpa(&Vdpa::new(&dev.bdf, 2))
        .start()?;
    let done = vm.wait_done();
    if vm.has(WRITE_FOLLOWS) {
        ctx.declare_write(8 * 512, 512)?;
    }
    done?;
    vm.expect("L3-READ-OK", "inner guest read wrong data")?;
    vm.expect("L3-WRITE-OK", "inner guest write failed")?;
    vm.expect(
        "interrupts direct 1 relayed 2",
        "the two queues' shared vector was not relayed",
    )?;
    Ok(Outcome::Pass)
}

/// The inner guest reads sector 0 (the host's pattern) and writes sector 8
/// (declared: the host checks the image after the VM exits) of a bridged
/// disk whose FLUSH bit is masked off, and never negotiates that bit.
fn ch_blk(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    let masked = lab.masked_bit;
    let disk = Vdpa::new(&dev.bdf, 1).features_mask(!(1u64 << masked));
    let mut vm = Ch::new(lab, "blk").vdpa(&disk).start()?;
    let done = vm.wait_done();
    // The inner guest writes sector 8 right after its read line: only from
    // then on can the write have happened (not when Cloud Hypervisor did
    // not start, or the inner guest never got that far).
    if vm.has(WRITE_FOLLOWS) {
        ctx.declare_write(8 * 512, 512)?;
    }
    done?;
    vm.expect("L3-READ-OK", "inner guest read wrong data")?;
    vm.expect("L3-WRITE-OK", "inner guest write failed")?;
    let bits = vm.features(VIRTIO_ID_BLOCK)?;
    ensure!(!bits.bit(masked), "masked bit {masked} negotiated: {bits}");
    ensure!(
        bits.bit(32) && bits.bit(33),
        "VERSION_1/ACCESS_PLATFORM not negotiated: {bits}"
    );
    vm.expect(DOORBELLS_MAPPED, "doorbells not mapped into the guest")?;
    Ok(Outcome::PassWith(format!(
        "inner guest blk features {bits}"
    )))
}

/// The inner guest reads its disk and reboots; Cloud Hypervisor tears the
/// VM down and builds it again, so the bridged device is dropped and the
/// same VFIO group opened anew: the second boot must read the disk too.
fn ch_reboot(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    let mut vm = Ch::new(lab, "reboot")
        .vdpa(&Vdpa::new(&dev.bdf, 1))
        .start()?;
    for boot in 1..=2 {
        vm.wait("L3-REBOOTING", BOOT_TIMEOUT)
            .with_context(|| format!("boot {boot}"))?;
    }
    vm.kill();
    vm.expect_count("L3-READ-OK", 2)
        .context("a good read in each of two boots")?;
    // The bridged device is built (and its doorbells mapped) once per boot.
    vm.expect_count(DOORBELLS_MAPPED, 2)
        .context("doorbells mapped once in each of two boots")?;
    Ok(Outcome::Pass)
}

/// A DHCP lease from QEMU's user-mode network and ping replies from
/// 10.0.2.2, through the bridged virtio-net device (three queues).
fn ch_net(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let dev = ctx.dev()?;
    let mut vm = Ch::new(lab, "net").vdpa(&Vdpa::new(&dev.bdf, 3)).start()?;
    vm.wait_done()?;
    vm.expect("L3-DHCP-OK", "no DHCP lease")?;
    vm.expect("L3-PING-OK", "no ping reply from 10.0.2.2")?;
    // A net device with a control queue: its kicks reach the bridge,
    // which records the commands (replayed after a reset it does).
    vm.expect(CONTROL_QUEUE_TRAPPED, "kicks of the net device not trapped")?;
    Ok(Outcome::Pass)
}

fn ch_hotplug(ctx: &Ctx) -> CaseResult {
    hotplug(ctx, "hotplug", 1, "L3-READ", "L3-READ-OK")
}

fn ch_hotplug_net(ctx: &Ctx) -> CaseResult {
    hotplug(ctx, "hotplugnet", 3, "L3-IO-DONE", "L3-PING-OK")
}

/// Cloud Hypervisor's log when a net device's control-queue kicks are
/// kept from the doorbell mapping.
const CONTROL_QUEUE_TRAPPED: &str = "the net control queue's kicks must reach the bridge";

/// Start the inner guest with no device, hot-plug the bridged device
/// through the API, check I/O in the guest, unplug it, check it is gone.
fn hotplug(ctx: &Ctx, mode: &str, queues: u16, io_done: &str, io_ok: &str) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    if lab.remote.is_none() {
        return Ok(Outcome::Skip("CH_REMOTE is not set".into()));
    }
    let dev = ctx.dev()?;
    let group = iommu_group(dev)?;
    let mut vm = Ch::new(lab, mode).hotplug_of(&dev.bdf, group).start()?;
    plug_io_unplug(
        &mut vm,
        &Vdpa::new(&dev.bdf, queues),
        (io_done, io_ok),
        |vm| {
            if queues == 1 {
                vm.expect(
                    DOORBELLS_MAPPED,
                    "hot-plugged device's doorbells not mapped",
                )
            } else {
                vm.expect(
                    CONTROL_QUEUE_TRAPPED,
                    "hot-plugged net device's kicks not trapped",
                )
            }
        },
    )?;
    Ok(Outcome::Pass)
}

/// The IOMMU group of `dev` in the lab VM (what Landlock must allow up
/// front for a hot-plug).
fn iommu_group(dev: &Device) -> anyhow::Result<u32> {
    vdpa_bridge::sysfs::iommu_group_of(&dev.sysfs())
        .with_context(|| format!("{} has no IOMMU group", dev.bdf))
}

/// Once the inner guest is ready: hot-plug `dev` through the API (as
/// `hotvdpa`), wait for the guest's `io_done` line and check its `io_ok`
/// line, run `checks` while the device is plugged, unplug it with
/// `remove-device` and check the guest saw it go.
fn plug_io_unplug(
    vm: &mut ChVm<'_>,
    dev: &Vdpa,
    (io_done, io_ok): (&str, &str),
    checks: impl FnOnce(&ChVm<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    vm.wait("L3-READY", BOOT_TIMEOUT)?;
    vm.remote(&["add-vdpa", &dev.clone().id("hotvdpa").arg()])?;
    vm.wait("L3-PLUGGED", Duration::from_secs(90))?;
    vm.wait(io_done, Duration::from_secs(60))?;
    vm.expect(io_ok, "no I/O on the hot-plugged device")?;
    checks(vm)?;
    vm.remote(&["remove-device", "hotvdpa"])?;
    vm.wait("L3-DONE", Duration::from_secs(90))?;
    vm.expect("L3-UNPLUGGED", "device still present after remove-device")
}
