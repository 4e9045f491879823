//! Devices handed in as descriptors to an unprivileged process, as an
//! orchestrator hands them to a VMM that runs without root.
//!
//! * `devices_handed_in_as_fds_to_an_unprivileged_process`: the lab (root)
//!   opens two fleet disks' VFIO groups, one VFIO container and a VDUSE
//!   block device's `/dev/vhost-vdpa-N` node, and starts a copy of
//!   `lab-guest` as `nobody` ([`crate::guest::handoff`]) with those
//!   descriptors inherited and a tmpfs over `/sys` and `/dev/vfio` in its
//!   own mount namespace (so it cannot open anything there, and opening a
//!   disk by its PCI address fails, which it checks). The child opens all
//!   three through the plugin's configuration (`group_fd=`, `container_fd=`,
//!   `fd=`), the two disks into the one container handed in, and reads each
//!   device's pattern and writes a block on every queue. Then it drops the
//!   devices and opens them again from the same descriptors (what a reboot
//!   of the VM does) and reads again. The lab checks the report: uid 65534,
//!   nothing under `/sys` and `/dev/vfio`, one mapping for two disks, and
//!   finds the disks' writes in their image files (the VDUSE writes are
//!   declared to the host, which checks its image).
//! * `ch_unprivileged_with_devices_handed_in_as_fds` (needs
//!   `CLOUD_HYPERVISOR`): Cloud Hypervisor as `nobody` (uid and gid 65534;
//!   `/dev/kvm` granted through a group of its own, RLIMIT_MEMLOCK 1 GiB),
//!   default seccomp and `--landlock`, with a tmpfs over `/dev/vfio` in its
//!   mount namespace. One fleet disk comes on the command line as
//!   `--vdpa path=<bdf>,group_fd=N,container_fd=M` (descriptors the lab
//!   opened and the VMM inherited); a second is hot-plugged while the
//!   inner guest waits for it, by `ch-remote add-vdpa ...,group_fd=9`,
//!   which sends the group's descriptor with the request. The inner guest
//!   reads both disks' patterns and writes their sector 8 (found in the
//!   image files); VmLck is guest RAM once; `send-migration` is refused,
//!   naming the device; after `ch-remote reboot` the inner guest reads and
//!   writes both disks again (opened again from the descriptors the VMM
//!   kept); a container sent with the hot-plug is not used (the VM has
//!   one); removing the hot-plugged disk closes its group (another open
//!   of the group then succeeds).

use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde::{Deserialize, Serialize};
use vdpa_bridge::types::features;
use vdpa_plugin::{open_container_from, BridgeDevice, VdpaDeviceConfig};
use vdpa_testkit::driver::blk::T_IN;
use vdpa_testkit::harness::{Guest, TestInterrupt};

use crate::guest::cases::bridge::proc_status;
use crate::guest::cases::fleet::{bind_fleet, images_hold_the_writes, INNER_RAM_KIB};
use crate::guest::cases::plugin::blk_queue_roundtrip;
use crate::guest::cases::vhost_vdpa;
use crate::guest::ch::{not_configured, Ch, ChVm, Vdpa, BOOT_TIMEOUT};
use crate::guest::handoff::{runnable_self_copy, Handoff, NOBODY};
use crate::guest::{declare_write_to, sys, Case, CaseResult, Ctx, Outcome};
use crate::pattern;

/// The argument that makes `lab-guest` run [`child`].
pub const CHILD_ARG: &str = "--handed-child";

/// The child's line for a write it made: `WROTE <image> <offset> <len>`.
const WROTE: &str = "WROTE";

/// The suite.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "devices_handed_in_as_fds_to_an_unprivileged_process".to_string(),
            needs: None,
            run: handed,
        },
        Case {
            name: "ch_unprivileged_with_devices_handed_in_as_fds".to_string(),
            needs: None,
            run: ch_handed,
        },
    ]
}

/// One device for the child.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChildDev {
    /// `path=`: the PCI address, or the vhost-vdpa node.
    path: String,
    group_fd: Option<i32>,
    fd: Option<i32>,
    /// Pattern seed of its image.
    image: String,
    /// First sector written (queue q writes at `sector + 8 q`).
    sector: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChildSpec {
    container_fd: i32,
    devices: Vec<ChildDev>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ChildReport {
    uid: u32,
    gid: u32,
    /// Entries the child sees in `/sys` and `/dev/vfio`.
    sys_entries: usize,
    dev_vfio_entries: usize,
    /// Why opening the first disk by its address failed.
    by_path: String,
    /// Queues each device has, in order.
    queues: Vec<u16>,
    /// The container: functions, kernel mappings, bytes, with every
    /// device open.
    members: usize,
    mappings: usize,
    mapped_bytes: u64,
    vmlck_kib: u64,
    /// Writes done: (image, byte offset, length).
    writes: Vec<(String, u64, u64)>,
    /// Reads checked after the devices were opened again.
    reread: usize,
}

const RAM: u64 = 64 << 20;

/// The child: runs as `nobody`, from the descriptors in `spec` (JSON).
/// Prints its report (JSON) on stdout.
///
/// # Errors
///
/// Any step failed.
pub fn child(spec: &str) -> anyhow::Result<()> {
    let spec: ChildSpec = serde_json::from_str(spec)?;
    let count = |p: &str| std::fs::read_dir(p).map_or(0, |d| d.count());
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut r = ChildReport {
        uid,
        gid,
        sys_entries: count("/sys"),
        dev_vfio_entries: count("/dev/vfio"),
        ..ChildReport::default()
    };
    let first_pci = spec
        .devices
        .iter()
        .find(|d| d.group_fd.is_some())
        .context("no VFIO device in the spec")?;
    r.by_path = match vdpa_bridge::vfio::VfioFunction::open(&first_pci.path) {
        Ok(_) => bail!("{} opened by its address", first_pci.path),
        Err(e) => e.to_string(),
    };
    let container = open_container_from(Some(spec.container_fd))?;
    let span = Guest::span(2).next_multiple_of(1 << 20);
    let mem = Guest::new(RAM, 64)?.mem;
    let want = features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM);
    for round in 0..2 {
        let mut open = Vec::new();
        for (i, d) in spec.devices.iter().enumerate() {
            let cfg = VdpaDeviceConfig {
                path: d.path.clone(),
                group_fd: d.group_fd,
                container_fd: d.group_fd.map(|_| spec.container_fd),
                fd: d.fd,
                container: d.group_fd.map(|_| container.clone()),
                ..VdpaDeviceConfig::default()
            };
            cfg.check_fds()?;
            let backend = cfg
                .open()
                .with_context(|| format!("round {round}: open {}", d.path))?;
            let mut dev = BridgeDevice::new(backend, mem.clone(), cfg.device_options(false))?;
            ensure!(dev.features() & want == want, "{}: lacks {want:#x}", d.path);
            dev.ack_features(want)?;
            let mut g = Guest::sharing(mem.clone(), 64, span * i as u64);
            let n = dev.queue_max_sizes().len();
            let irq = TestInterrupt::new(n, true)?;
            let queues = g.queues_sized(dev.queue_max_sizes())?;
            dev.activate(mem.clone(), irq.clone(), queues)?;
            open.push((d, dev, g, irq));
        }
        for (d, dev, g, irq) in &mut open {
            let nq = dev.queue_max_sizes().len() as u16;
            if round == 0 {
                r.queues.push(nq);
                for q in 0..nq {
                    let at = d.sector + 8 * u64::from(q);
                    blk_queue_roundtrip(
                        g,
                        &irq.queues[usize::from(q)],
                        q,
                        &d.image,
                        1 + u64::from(q),
                        at,
                        |_, _| Ok(()),
                    )
                    .with_context(|| format!("{} queue {q}", d.path))?;
                    // Told at once, so the lab declares it even if a later
                    // step fails.
                    println!("{WROTE} {} {} 4096", d.image, at * 512);
                    r.writes.push((d.image.clone(), at * 512, 4096));
                }
            } else {
                let mut buf = vec![0u8; 512];
                let lba = 7;
                ensure!(
                    g.blk(0, T_IN, lba, &mut buf, &irq.queues[0])? == 0,
                    "{}: read after reopening failed",
                    d.path
                );
                ensure!(
                    buf == pattern::sector(&d.image, lba),
                    "{}: wrong data after reopening",
                    d.path
                );
                r.reread += 1;
            }
        }
        if round == 0 {
            let st = container.stats();
            (r.members, r.mappings, r.mapped_bytes) = (st.members, st.mappings, st.mapped_bytes);
            r.vmlck_kib = proc_status("self", "VmLck:")?;
        }
        drop(open);
        ensure!(
            container.stats().members == 0,
            "round {round}: {:?} after every device closed",
            container.stats()
        );
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn handed(ctx: &Ctx) -> CaseResult {
    let Some(fleet) = bind_fleet(ctx)? else {
        return Ok(Outcome::Skip("the manifest has no fleet".into()));
    };
    ensure!(fleet.len() >= 2, "a fleet of {}", fleet.len());
    let vduse = ctx
        .manifest
        .vduse_image
        .clone()
        .context("the host prepared no VDUSE image")?;
    let (_export, node) = vhost_vdpa::setup(&vduse)?;
    let disks = &fleet[..2];
    let mut groups = Vec::new();
    for d in disks {
        groups.push(open_rw(&group_node(&d.bdf)?)?);
    }
    let container = open_rw(Path::new("/dev/vfio/vfio"))?;
    let vhost = open_rw(&node)?;
    let mut devices: Vec<ChildDev> = disks
        .iter()
        .zip(&groups)
        .map(|(d, g)| ChildDev {
            path: d.bdf.clone(),
            group_fd: Some(g.as_raw_fd()),
            fd: None,
            image: d.name.clone(),
            sector: 96,
        })
        .collect();
    devices.push(ChildDev {
        path: node.to_string_lossy().into_owned(),
        group_fd: None,
        fd: Some(vhost.as_raw_fd()),
        image: vhost_vdpa::IMAGE.to_owned(),
        sector: 400,
    });
    let spec = ChildSpec {
        container_fd: container.as_raw_fd(),
        devices,
    };
    let handoff = Handoff {
        fds: groups
            .iter()
            .map(|g| g.as_raw_fd())
            .chain([container.as_raw_fd(), vhost.as_raw_fd()])
            .collect(),
        memlock: 4 * RAM,
        groups: Vec::new(),
        hide: vec!["/sys".into(), "/dev/vfio".into()],
    };
    let exe = runnable_self_copy("lab-guest")?;
    let mut cmd = Command::new(&exe);
    cmd.arg(CHILD_ARG)
        .arg(serde_json::to_string(&spec)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    handoff.apply(&mut cmd)?;
    let t0 = Instant::now();
    let child = cmd.spawn().context("start the unprivileged child")?;
    let out = crate::guest::handoff::wait_output(child, Duration::from_secs(120))?;
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Whatever the child did after, the VDUSE writes it made are declared
    // to the host, which checks that image (the disks' are checked below).
    for l in stdout.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if let [WROTE, image, at, len] = f[..] {
            if image == vhost_vdpa::IMAGE {
                declare_write_to(image, at.parse()?, len.parse()?);
            }
        }
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "the child failed ({}): {stdout}{stderr}",
        out.status
    );
    let r: ChildReport = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("the child's report: {stdout}{stderr}"))?;
    ensure!(
        (r.uid, r.gid) == (NOBODY, NOBODY),
        "the child ran as {}:{}",
        r.uid,
        r.gid
    );
    ensure!(
        r.sys_entries == 0 && r.dev_vfio_entries == 0,
        "the child saw {} entries in /sys and {} in /dev/vfio",
        r.sys_entries,
        r.dev_vfio_entries
    );
    ensure!(
        r.by_path.contains("no PCI device"),
        "opening by address failed for another reason: {}",
        r.by_path
    );
    ensure!(
        r.queues == [2, 2, 1],
        "queues {:?} (QEMU gave the disks 2, the VDUSE export 1)",
        r.queues
    );
    ensure!(
        (r.members, r.mappings, r.mapped_bytes) == (2, 1, RAM),
        "the container handed in holds {} functions, {} mappings of {:#x} bytes (want 2, 1, {RAM:#x})",
        r.members,
        r.mappings,
        r.mapped_bytes
    );
    ensure!(
        r.vmlck_kib >= RAM >> 10,
        "VmLck {} KiB < guest RAM",
        r.vmlck_kib
    );
    ensure!(r.reread == 3, "{} devices read after reopening", r.reread);
    let mut checked = 0;
    for (image, at, len) in &r.writes {
        let Some(d) = disks.iter().find(|d| &d.name == image) else {
            continue;
        };
        let f = std::fs::File::open(&d.image)?;
        let mut got = vec![0u8; *len as usize];
        f.read_exact_at(&mut got, *at)?;
        ensure!(
            got == pattern::written(image, *at, *len as usize),
            "{image}: the image file does not hold the child's write at {at:#x}"
        );
        checked += 1;
    }
    ensure!(checked == 4, "{checked} disk writes checked in image files");
    Ok(Outcome::PassWith(format!(
        "as uid {} with 2 VFIO groups, 1 container and 1 vhost-vdpa fd handed in, /sys and /dev/vfio empty: \
         opened, read and wrote every queue ({:?}), 2 functions in 1 mapping, VmLck {} KiB; reopened from the same fds \
         and read again; {checked} disk writes found in the image files; {} ms",
        r.uid,
        r.queues,
        r.vmlck_kib,
        took.as_millis()
    )))
}

/// `/dev/vfio/<group>` of the PCI function `bdf`.
fn group_node(bdf: &str) -> anyhow::Result<PathBuf> {
    sys::vfio_group_node(&Path::new("/sys/bus/pci/devices").join(bdf))
}

/// Open `p` read-write, as an orchestrator opens what it hands over.
fn open_rw(p: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .with_context(|| format!("open {}", p.display()))
}

/// Wait for the inner guest's `round`-th pass over its disks (one per
/// boot) and check it found both right.
fn fleet_round(vm: &mut ChVm<'_>, round: usize) -> anyhow::Result<()> {
    vm.wait("L3-FLEET-HOLD", BOOT_TIMEOUT).with_context(|| {
        format!(
            "boot {round}: the inner guest did not finish its disks: {}",
            vm.tail()
        )
    })?;
    let line = vm
        .last_line("L3-FLEET-DONE")
        .context("no L3-FLEET-DONE line")?
        .to_string();
    ensure!(
        vm.count("L3-FLEET-DONE") == round && line.contains("ok=2 of 2"),
        "boot {round}: the inner guest: {line}: {}",
        vm.tail()
    );
    Ok(())
}

/// `/dev/kvm` for the group `gid` (read-write), given back as it was on
/// drop.
struct KvmGrant {
    mode: u32,
    gid: u32,
}

impl KvmGrant {
    fn new(gid: u32) -> anyhow::Result<Self> {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let m = std::fs::metadata("/dev/kvm").context("/dev/kvm")?;
        // Built first, so a failure below still gives /dev/kvm back.
        let was = KvmGrant {
            mode: m.mode() & 0o7777,
            gid: m.gid(),
        };
        std::os::unix::fs::chown("/dev/kvm", None, Some(gid))?;
        std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o660))?;
        Ok(was)
    }
}

impl Drop for KvmGrant {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::os::unix::fs::chown("/dev/kvm", None, Some(self.gid));
        let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(self.mode));
    }
}

fn ch_handed(ctx: &Ctx) -> CaseResult {
    let Some(lab) = &ctx.manifest.ch else {
        return Ok(not_configured(ctx));
    };
    let Some(fleet) = bind_fleet(ctx)? else {
        return Ok(Outcome::Skip("the manifest has no fleet".into()));
    };
    ensure!(fleet.len() >= 4, "a fleet of {}", fleet.len());
    let (boot, plugged) = (&fleet[2], &fleet[3]);
    let group = open_rw(&group_node(&boot.bdf)?)?;
    let container = open_rw(Path::new("/dev/vfio/vfio"))?;
    // A group of its own grants /dev/kvm (the lab VM has no udev rules).
    let kvm_gid = crate::guest::handoff::group_id("kvm").unwrap_or(65533);
    let _kvm = KvmGrant::new(kvm_gid)?;
    let handoff = Handoff {
        fds: vec![group.as_raw_fd(), container.as_raw_fd()],
        memlock: 2 * (INNER_RAM_KIB << 10),
        groups: vec![kvm_gid],
        hide: vec!["/dev/vfio".into()],
    };
    let mut vm = Ch::new(lab, "fleet")
        .cmdline("l3.disks=2")
        .cmdline("l3.secs=25")
        .possible_cpus(2)
        .api()
        .handoff(handoff)
        .vdpa(
            &Vdpa::new(&boot.bdf, 2)
                .id(&boot.name)
                .group_fd(group.as_raw_fd())
                .container_fd(container.as_raw_fd()),
        )
        .start()?;
    // The orchestrator's own copies are not needed any more: the VMM
    // holds the inherited ones.
    drop(group);
    drop(container);
    vm.wait("L3-UP", BOOT_TIMEOUT)
        .with_context(|| format!("the inner guest did not start: {}", vm.tail()))?;
    let uid = proc_status(&vm.pid().to_string(), "Uid:")?;
    // The second disk, while the inner guest waits for it: ch-remote
    // sends the group's descriptor (its fd 9) with the request, and a
    // container (its fd 8), which the VM, having one, does not use.
    let remote = lab.remote.as_deref().context("CH_REMOTE is not set")?;
    let arg = format!(
        "path={},num_queues=2,id={},group_fd=9,container_fd=8",
        plugged.bdf, plugged.name
    );
    let out = Command::new("sh")
        .args([
            "-c",
            r#"exec "$0" --api-socket "$1" add-vdpa "$2" 9<>"$3" 8<>/dev/vfio/vfio"#,
        ])
        .arg(remote)
        .arg(Ch::api_socket_path())
        .arg(&arg)
        .arg(group_node(&plugged.bdf)?)
        .output()
        .context("run ch-remote add-vdpa")?;
    ensure!(
        out.status.success(),
        "ch-remote add-vdpa {arg}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fleet_round(&mut vm, 1)?;
    let pid = vm.pid().to_string();
    let vmlck = proc_status(&pid, "VmLck:")?;
    let refused = vm.remote(&[
        "send-migration",
        "destination_url=unix:/tmp/ch-l3/nowhere.sock,downtime_ms=1000,timeout_s=10",
    ]);
    let refusal = match refused {
        Ok(out) => bail!("send-migration was accepted: {out}"),
        Err(e) => format!("{e:#}"),
    };
    vm.pump();
    ensure!(
        vm.has("was handed in as descriptors") || refusal.contains("handed in as descriptors"),
        "send-migration failed for another reason: {refusal}: {}",
        vm.tail()
    );
    // A reboot builds the VM anew: both disks are opened again from the
    // descriptors the VMM kept (the hot-plugged one's too).
    vm.remote(&["reboot"])?;
    fleet_round(&mut vm, 2)?;
    vm.pump();
    ensure!(
        vm.has("the VM's VFIO container exists already; container_fd="),
        "no line about the hot-plug's container: {}",
        vm.tail()
    );
    vm.remote(&["remove-device", &plugged.name])?;
    // The guest acknowledges the eject; the VMM then closes the device
    // and the group it was handed.
    let end = Instant::now() + Duration::from_secs(20);
    let regrouped = loop {
        match open_rw(&group_node(&plugged.bdf)?) {
            Ok(f) => break Ok(f),
            Err(e) if Instant::now() > end => break Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    if regrouped.is_err() {
        vm.pump();
    }
    let regrouped = regrouped.with_context(|| {
        let lines: Vec<&str> = vm
            .stamped(&plugged.name)
            .into_iter()
            .map(|(_, l)| l)
            .collect();
        format!(
            "the removed disk's group is still open in the VMM: {}",
            lines[lines.len().saturating_sub(15)..].join(" / ")
        )
    })?;
    drop(regrouped);
    vm.wait_done()?;
    images_hold_the_writes(&fleet[2..4])?;
    ensure!(
        uid == u64::from(NOBODY),
        "Cloud Hypervisor ran as uid {uid}"
    );
    ensure!(
        (INNER_RAM_KIB..INNER_RAM_KIB + (16 << 10)).contains(&vmlck),
        "VmLck {vmlck} KiB with 2 bridged disks; the inner guest's RAM is {INNER_RAM_KIB} KiB"
    );
    Ok(Outcome::PassWith(format!(
        "Cloud Hypervisor as uid {uid}, default seccomp, --landlock, /dev/vfio empty: 1 disk by inherited group_fd and container_fd, \
         1 hot-plugged with its group_fd (and an unused container_fd) sent by ch-remote; both read and written by the inner guest \
         (images checked), again after a reboot; VmLck {vmlck} KiB; send-migration refused; the removed disk's group closed"
    )))
}

/// The lab's own check that the report parses (the child's format and the
/// parent's reading of it agree).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_round_trips() {
        let r = ChildReport {
            uid: NOBODY,
            writes: vec![("fleet00".into(), 96 * 512, 4096)],
            ..ChildReport::default()
        };
        let back: ChildReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.uid, NOBODY);
        assert_eq!(back.writes, r.writes);
    }
}
