//! Cloud Hypervisor inside the lab VM: the one launcher of every `ch_`
//! case and benchmark.
//!
//! [`Ch`] builds the command line: the inner guest's kernel and initramfs
//! (`host::initramfs::L3_INIT`) with its `l3=` mode, `-v` (the bridge logs
//! how its doorbells are wired), Cloud Hypervisor's default seccomp
//! filters (never a `--seccomp` flag), `--landlock` unless turned off, an API
//! socket and Landlock rules for hot-plug, and the devices ([`Vdpa`] for
//! the bridge, [`Ch::passthrough`] for Cloud Hypervisor's own VFIO
//! passthrough). [`Ch::start`] copies the boot files and starts it.
//!
//! [`ChVm`] is the running VMM. Its console (the inner guest's serial
//! port) and stderr arrive line by line; [`ChVm::wait`] waits for an
//! `L3-...` marker, [`ChVm::expect`] checks one was seen, [`ChVm::remote`]
//! drives the API through `ch-remote`. Dropping it gives Cloud Hypervisor
//! 10 s to exit (the inner guest powers off after `L3-DONE`), then kills it
//! by pid.

use std::fmt;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

use crate::guest::handoff::Handoff;
use crate::guest::{Ctx, Outcome};
use crate::manifest::ChRun;

/// The bridge's log line when Cloud Hypervisor maps the device's doorbell
/// page over its notification area (patch 0005).
pub const DOORBELLS_MAPPED: &str = "doorbells mapped into the guest";

/// How long one inner boot may take to reach a marker.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

/// virtio device id of a block device, as the inner guest's sysfs prints
/// it in `L3-FEATURES` lines.
pub const VIRTIO_ID_BLOCK: &str = "0x0002";

/// Boot files and the API socket live on the lab VM's tmpfs: Landlock
/// rules do not hold on the 9p share, whose inodes are not stable.
const WORK_DIR: &str = "/tmp/ch-l3";

/// The skip outcome of a Cloud Hypervisor case when the run has none
/// (with the host's reason).
pub fn not_configured(ctx: &Ctx) -> Outcome {
    Outcome::Skip(
        ctx.manifest
            .ch_skip
            .clone()
            .unwrap_or_else(|| "no Cloud Hypervisor configured".into()),
    )
}

/// A bridged device: the value of `--vdpa` and of `ch-remote add-vdpa`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vdpa {
    bdf: String,
    num_queues: u16,
    features_mask: Option<u64>,
    id: Option<String>,
    iommu: bool,
    pci_segment: Option<u16>,
    shadow: bool,
    group_fd: Option<i32>,
    container_fd: Option<i32>,
}

impl Vdpa {
    /// The device at PCI address `bdf` with `num_queues` virtqueues.
    pub fn new(bdf: &str, num_queues: u16) -> Self {
        Self {
            bdf: bdf.to_string(),
            num_queues,
            features_mask: None,
            id: None,
            iommu: false,
            pci_segment: None,
            shadow: false,
            group_fd: None,
            container_fd: None,
        }
    }

    /// Run it on shadow virtqueues from the start (`shadow=on`).
    pub fn shadow(mut self) -> Self {
        self.shadow = true;
        self
    }

    /// Put the device behind Cloud Hypervisor's vIOMMU (`iommu=on`).
    pub fn iommu(mut self) -> Self {
        self.iommu = true;
        self
    }

    /// Put the device on PCI segment `n` (`pci_segment=`).
    pub fn pci_segment(mut self, n: u16) -> Self {
        self.pci_segment = Some(n);
        self
    }

    /// Offer the inner guest only the feature bits set in `mask`.
    pub fn features_mask(mut self, mask: u64) -> Self {
        self.features_mask = Some(mask);
        self
    }

    /// Name the device (for `ch-remote remove-device`).
    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.to_string());
        self
    }

    /// `group_fd=<fd>`: the device's VFIO group, handed in.
    pub fn group_fd(mut self, fd: i32) -> Self {
        self.group_fd = Some(fd);
        self
    }

    /// `container_fd=<fd>`: the VM's VFIO container, handed in.
    pub fn container_fd(mut self, fd: i32) -> Self {
        self.container_fd = Some(fd);
        self
    }

    /// `path=<bdf>,num_queues=<n>[,features_mask=<hex>][,id=<id>][,iommu=on][,pci_segment=<n>][,shadow=on][,group_fd=<fd>][,container_fd=<fd>]`.
    pub fn arg(&self) -> String {
        let mut s = format!("path={},num_queues={}", self.bdf, self.num_queues);
        if let Some(mask) = self.features_mask {
            s.push_str(&format!(",features_mask={mask:#x}"));
        }
        if let Some(id) = &self.id {
            s.push_str(&format!(",id={id}"));
        }
        if self.iommu {
            s.push_str(",iommu=on");
        }
        if let Some(n) = self.pci_segment {
            s.push_str(&format!(",pci_segment={n}"));
        }
        if self.shadow {
            s.push_str(",shadow=on");
        }
        if let Some(fd) = self.group_fd {
            s.push_str(&format!(",group_fd={fd}"));
        }
        if let Some(fd) = self.container_fd {
            s.push_str(&format!(",container_fd={fd}"));
        }
        s
    }
}

/// How to start Cloud Hypervisor for one inner boot.
#[derive(Clone, Debug)]
pub struct Ch<'a> {
    lab: &'a ChRun,
    /// `l3=` of the inner command line, and further `l3.*` words.
    inner_cmdline: Vec<String>,
    landlock: bool,
    max_vcpus: u8,
    api_socket: bool,
    landlock_rules: Vec<String>,
    devices: Vec<String>,
    /// Start it as an orchestrator starts an unprivileged VMM.
    handoff: Option<Handoff>,
}

impl<'a> Ch<'a> {
    /// Boot the inner guest in `mode` (`l3=<mode>`: `blk`, `net`,
    /// `reboot`, `hotplug`, ...), with `--landlock` and no device yet.
    pub fn new(lab: &'a ChRun, mode: &str) -> Self {
        Self {
            lab,
            inner_cmdline: vec![format!("l3={mode}")],
            landlock: true,
            max_vcpus: 1,
            api_socket: false,
            landlock_rules: Vec::new(),
            devices: Vec::new(),
            handoff: None,
        }
    }

    /// Start Cloud Hypervisor as `nobody` with the descriptors, limits
    /// and groups of `h` ([`Handoff`]); its work directory (boot files, API
    /// socket) is made its to use.
    pub fn handoff(mut self, h: Handoff) -> Self {
        self.handoff = Some(h);
        self
    }

    /// Bridge a device (`--vdpa`).
    pub fn vdpa(mut self, dev: &Vdpa) -> Self {
        self.devices.extend(["--vdpa".to_string(), dev.arg()]);
        self
    }

    /// Give the inner guest Cloud Hypervisor's own emulated virtio-blk on
    /// the image file at `path` (`--disk`).
    pub fn disk(mut self, path: &Path) -> Self {
        self.devices
            .extend(["--disk".to_string(), format!("path={}", path.display())]);
        self
    }

    /// Hand the device at `bdf` to the inner guest through Cloud
    /// Hypervisor's own VFIO passthrough (`--device`).
    pub fn passthrough(mut self, bdf: &str) -> Self {
        self.devices
            .extend(["--device".to_string(), passthrough_arg(bdf, None)]);
        self
    }

    /// [`Ch::passthrough`] with the device id `id`.
    pub fn passthrough_named(mut self, bdf: &str, id: &str) -> Self {
        self.devices
            .extend(["--device".to_string(), passthrough_arg(bdf, Some(id))]);
        self
    }

    /// Add `word` to the inner guest's kernel command line.
    pub fn cmdline(mut self, word: &str) -> Self {
        self.inner_cmdline.push(word.to_string());
        self
    }

    /// `--platform <arg>` (e.g. `num_pci_segments=2,iommu_segments=1`).
    pub fn platform(mut self, arg: &str) -> Self {
        self.devices
            .extend(["--platform".to_string(), arg.to_string()]);
        self
    }

    /// Run without `--landlock`.
    pub fn without_landlock(mut self) -> Self {
        self.landlock = false;
        self
    }

    /// Let the inner guest see `n` possible CPUs while one runs
    /// (`--cpus boot=1,max=n`): Linux's virtio-blk uses one request queue
    /// per possible CPU, so `n` queues get activated without the cost of
    /// running more vCPUs in the nested guest.
    pub fn possible_cpus(mut self, n: u8) -> Self {
        self.max_vcpus = n.max(1);
        self
    }

    /// Measurements per boot of the perf modes (`l3.reps=`).
    pub fn reps(mut self, n: usize) -> Self {
        self.inner_cmdline.push(format!("l3.reps={n}"));
        self
    }

    /// Open the API socket and give Landlock, up front, what a bridged
    /// device hot-plugged later at `bdf`, in IOMMU group `group`, will open
    /// (Cloud Hypervisor asks for that with any hot-plugged device): the
    /// four paths the patches derive for a device given at boot, that
    /// group's only.
    pub fn hotplug_of(mut self, bdf: &str, group: u32) -> Self {
        self.api_socket = true;
        self.landlock_rules = vec![
            "path=/dev/vfio/vfio,access=rw".to_string(),
            format!("path=/dev/vfio/{group},access=rw"),
            format!("path=/sys/bus/pci/devices/{bdf},access=r"),
            format!("path=/sys/kernel/iommu_groups/{group},access=r"),
        ];
        self
    }

    /// A further `--landlock-rules` entry (`path=...,access=r|rw`).
    pub fn landlock_rule(mut self, rule: &str) -> Self {
        self.landlock_rules.push(rule.to_string());
        self
    }

    /// Open the API socket (pause, snapshot, migration).
    pub fn api(mut self) -> Self {
        self.api_socket = true;
        self
    }

    /// Where the API socket of [`Ch::api`] is.
    pub fn api_socket_path() -> PathBuf {
        Path::new(WORK_DIR).join("api.sock")
    }

    /// A Cloud Hypervisor with no VM, only its API socket at `name` in the
    /// work directory: a migration's destination, or the VMM a snapshot is
    /// restored in (`restore`: `--restore <restore>`).
    ///
    /// # Errors
    /// As [`Ch::start`].
    pub fn empty(lab: &'a ChRun, name: &str, restore: Option<&str>) -> anyhow::Result<ChVm<'a>> {
        let sock = Path::new(WORK_DIR).join(name);
        let _ = std::fs::remove_file(&sock);
        let mut args = vec![
            "-v".to_string(),
            "--api-socket".to_string(),
            format!("path={}", sock.display()),
        ];
        if let Some(r) = restore {
            args.extend(["--restore".to_string(), r.to_string()]);
        }
        spawn(lab, &args, Some(sock), None)
    }

    /// The command line, booting `kernel` and `initramfs`.
    pub fn args(&self, kernel: &Path, initramfs: &Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "-v",
            "--kernel",
            &kernel.display().to_string(),
            "--initramfs",
            &initramfs.display().to_string(),
            "--cmdline",
            &format!(
                "console=ttyS0 quiet panic=-1 {}",
                self.inner_cmdline.join(" ")
            ),
            "--serial",
            "tty",
            "--console",
            "off",
            "--cpus",
            &format!("boot=1,max={}", self.max_vcpus),
            "--memory",
            "size=512M,shared=on",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.landlock {
            a.push("--landlock".into());
        }
        if self.api_socket {
            a.push("--api-socket".into());
            a.push(format!("path={}", Self::api_socket_path().display()));
        }
        if !self.landlock_rules.is_empty() {
            a.push("--landlock-rules".into());
            a.extend(self.landlock_rules.iter().cloned());
        }
        a.extend(self.devices.iter().cloned());
        a
    }

    /// Copy the boot files to the lab VM's tmpfs and start Cloud
    /// Hypervisor.
    ///
    /// # Errors
    /// No `/dev/kvm` in the lab VM, a copy fails, or the binary does not
    /// start.
    pub fn start(self) -> anyhow::Result<ChVm<'a>> {
        ensure!(
            Path::new("/dev/kvm").exists(),
            "no /dev/kvm (nested KVM) in the lab VM"
        );
        let dir = Path::new(WORK_DIR);
        std::fs::create_dir_all(dir)?;
        let kernel = dir.join("vmlinuz");
        let initramfs = dir.join("initramfs.cpio.gz");
        std::fs::copy(&self.lab.kernel, &kernel).context("copy the inner kernel")?;
        std::fs::copy(&self.lab.initramfs, &initramfs).context("copy the inner initramfs")?;
        let api_socket = self.api_socket.then(Self::api_socket_path);
        if let Some(sock) = &api_socket {
            let _ = std::fs::remove_file(sock);
        }
        if self.handoff.is_some() {
            use std::os::unix::fs::PermissionsExt as _;
            // The lab VM's tmpfs, for this boot only: nobody may create
            // the API socket there.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
        }
        spawn(
            self.lab,
            &self.args(&kernel, &initramfs),
            api_socket,
            self.handoff.as_ref(),
        )
    }
}

/// The value of `--device` and of `ch-remote add-device` for Cloud
/// Hypervisor's own passthrough of `bdf`.
pub fn passthrough_arg(bdf: &str, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("path=/sys/bus/pci/devices/{bdf},id={id}"),
        None => format!("path=/sys/bus/pci/devices/{bdf}"),
    }
}

/// Start Cloud Hypervisor with `args`; its output lines are stamped with
/// their arrival time.
fn spawn<'a>(
    lab: &'a ChRun,
    args: &[String],
    api_socket: Option<PathBuf>,
    handoff: Option<&Handoff>,
) -> anyhow::Result<ChVm<'a>> {
    let mut cmd = Command::new(&lab.binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(h) = handoff {
        h.apply(&mut cmd)?;
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", lab.binary.display()))?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let out = child.stdout.take().context("no stdout")?;
    let err = child.stderr.take().context("no stderr")?;
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), l));
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send((Instant::now(), format!("ch-stderr: {l}")));
        }
    });
    Ok(ChVm {
        started: Instant::now(),
        child,
        lines: rx,
        seen: Vec::new(),
        seen_at: Vec::new(),
        remote: lab.remote.as_deref(),
        api_socket,
    })
}

/// A running Cloud Hypervisor; killed by pid on drop.
pub struct ChVm<'a> {
    /// When Cloud Hypervisor was started.
    started: Instant,
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<String>,
    /// When each line of `seen` arrived.
    seen_at: Vec<Instant>,
    remote: Option<&'a Path>,
    api_socket: Option<PathBuf>,
}

impl Drop for ChVm<'_> {
    fn drop(&mut self) {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
    }
}

impl ChVm<'_> {
    /// Cloud Hypervisor's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long after Cloud Hypervisor's start the first line containing
    /// `what` arrived.
    pub fn after_start(&self, what: &str) -> Option<Duration> {
        self.stamped(what)
            .first()
            .map(|(at, _)| at.saturating_duration_since(self.started))
    }

    /// Stop Cloud Hypervisor now (SIGKILL by pid) and reap it.
    pub fn kill(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Wait for a console line containing `what`, echoing every line.
    ///
    /// # Errors
    /// Cloud Hypervisor exits first or `timeout` passes; the error carries
    /// the last console lines.
    pub fn wait(&mut self, what: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok((at, l)) => {
                    println!("  | {l}");
                    let hit = l.contains(what);
                    self.seen.push(l);
                    self.seen_at.push(at);
                    if hit {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        bail!(
                            "Cloud Hypervisor exited ({st}) before {what}: {}",
                            self.tail()
                        );
                    }
                }
                // Both pipes closed: Cloud Hypervisor is exiting.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.exit_status(deadline);
                    bail!(
                        "Cloud Hypervisor closed its output ({st}) before {what}: {}",
                        self.tail()
                    );
                }
            }
        }
        bail!("no {what} within {timeout:?}: {}", self.tail())
    }

    /// Take the lines that arrived so far (echoing them), without waiting.
    pub fn pump(&mut self) {
        while let Ok((at, l)) = self.lines.try_recv() {
            println!("  | {l}");
            self.seen.push(l);
            self.seen_at.push(at);
        }
    }

    /// The lines so far containing `what`, with their arrival times.
    pub fn stamped(&self, what: &str) -> Vec<(Instant, &str)> {
        self.seen
            .iter()
            .zip(&self.seen_at)
            .filter(|(l, _)| l.contains(what))
            .map(|(l, &at)| (at, l.as_str()))
            .collect()
    }

    /// Whether Cloud Hypervisor exited; waits up to `timeout`.
    pub fn exited(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            self.pump();
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                self.pump();
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Cloud Hypervisor's exit status, waiting for it until `deadline`.
    fn exit_status(&mut self, deadline: Instant) -> String {
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return st.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => return "still running".to_string(),
                Err(e) => return format!("status unknown: {e}"),
            }
        }
    }

    /// Wait for the inner guest's last marker, `L3-DONE`.
    ///
    /// # Errors
    /// As [`ChVm::wait`].
    pub fn wait_done(&mut self) -> anyhow::Result<()> {
        self.wait("L3-DONE", BOOT_TIMEOUT)
    }

    /// The last console lines, for error messages.
    pub fn tail(&self) -> String {
        let n = self.seen.len().saturating_sub(12);
        self.seen[n..].join(" / ")
    }

    /// Whether a console line so far contains `what`.
    pub fn has(&self, what: &str) -> bool {
        self.count(what) > 0
    }

    /// How many console lines so far contain `what`.
    pub fn count(&self, what: &str) -> usize {
        self.seen.iter().filter(|l| l.contains(what)).count()
    }

    /// The first console line so far containing `what`.
    pub fn line(&self, what: &str) -> Option<&str> {
        self.seen
            .iter()
            .find(|l| l.contains(what))
            .map(String::as_str)
    }

    /// The last line so far containing `what`.
    pub fn last_line(&self, what: &str) -> Option<&str> {
        self.seen
            .iter()
            .rev()
            .find(|l| l.contains(what))
            .map(String::as_str)
    }

    /// Check a console line so far contains `what`.
    ///
    /// # Errors
    /// None does: the error is `failure` and the last console lines.
    pub fn expect(&self, what: &str, failure: &str) -> anyhow::Result<()> {
        ensure!(self.has(what), "{failure}: {}", self.tail());
        Ok(())
    }

    /// Check `what` appeared on exactly `n` console lines so far.
    ///
    /// # Errors
    /// It appeared on another number of lines.
    pub fn expect_count(&self, what: &str, n: usize) -> anyhow::Result<()> {
        let got = self.count(what);
        ensure!(
            got == n,
            "{what:?} seen {got} times, want {n}: {}",
            self.tail()
        );
        Ok(())
    }

    /// Feature bits the inner guest negotiated with its virtio device of
    /// type `id` ([`VIRTIO_ID_BLOCK`], ...).
    ///
    /// # Errors
    /// The inner guest printed no features line for such a device.
    pub fn features(&self, id: &str) -> anyhow::Result<Features> {
        features(&self.seen, id).with_context(|| format!("no features line of a device {id}"))
    }

    /// The numbers of every console line carrying `tag`
    /// (`<tag> <n> <n> ...`).
    pub fn samples(&self, tag: &str) -> Vec<Vec<u64>> {
        self.seen
            .iter()
            .filter_map(|l| l.split(tag).nth(1))
            .map(|r| {
                r.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .collect()
    }

    /// `ch-remote --api-socket <socket> <args>`, to run.
    ///
    /// # Errors
    /// No `CH_REMOTE`, or no API socket ([`Ch::hotplug_of`], [`Ch::api`]).
    pub fn remote_command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let remote = self.remote.context("CH_REMOTE is not set")?;
        let sock = self
            .api_socket
            .as_ref()
            .context("Cloud Hypervisor started without an API socket")?;
        let mut c = Command::new(remote);
        c.arg("--api-socket").arg(sock).args(args);
        Ok(c)
    }

    /// Run `ch-remote --api-socket <socket> <args>`; its stdout.
    ///
    /// # Errors
    /// No `CH_REMOTE`, no API socket ([`Ch::hotplug_of`]), or ch-remote
    /// fails; the error carries its stderr.
    pub fn remote(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .remote_command(args)?
            .output()
            .context("run ch-remote")?;
        ensure!(
            out.status.success(),
            "ch-remote {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A device's feature bits as Linux prints them in sysfs: one `0`/`1`
/// per bit, bit 0 first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features(String);

impl Features {
    /// Whether bit `n` is set.
    pub fn bit(&self, n: u32) -> bool {
        usize::try_from(n)
            .ok()
            .and_then(|n| self.0.as_bytes().get(n))
            == Some(&b'1')
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The features of the first `L3-FEATURES <id> <bits>` line of device
/// type `id` among `lines`.
fn features(lines: &[String], id: &str) -> Option<Features> {
    lines
        .iter()
        .filter_map(|l| l.split("L3-FEATURES ").nth(1))
        .find_map(|f| f.strip_prefix(id)?.strip_prefix(' '))
        .map(|s| Features(s.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab() -> ChRun {
        ChRun {
            binary: "cloud-hypervisor".into(),
            remote: None,
            kernel: "k".into(),
            initramfs: "i".into(),
            masked_bit: 9,
        }
    }

    fn args(ch: &Ch) -> Vec<String> {
        ch.args(Path::new("/k"), Path::new("/i"))
    }

    /// The words after `flag`, up to the next flag.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        let Some(at) = args.iter().position(|a| a == flag) else {
            return Vec::new();
        };
        args[at + 1..]
            .iter()
            .take_while(|a| !a.starts_with("--"))
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn vdpa_arg_lists_path_queues_mask_and_id() {
        let plain = Vdpa::new("0000:00:03.0", 1);
        let full = Vdpa::new("0000:00:10.0", 3)
            .features_mask(!(1 << 9))
            .id("hot");

        assert_eq!(plain.arg(), "path=0000:00:03.0,num_queues=1");
        assert_eq!(
            full.arg(),
            "path=0000:00:10.0,num_queues=3,features_mask=0xfffffffffffffdff,id=hot"
        );
    }

    #[test]
    fn default_launch_is_verbose_under_landlock_with_the_mode_on_the_inner_cmdline() {
        let lab = lab();

        let a = args(&Ch::new(&lab, "blk").vdpa(&Vdpa::new("0000:00:03.0", 1)));

        assert_eq!(a[0], "-v");
        assert_eq!(values(&a, "--kernel"), ["/k"]);
        assert_eq!(values(&a, "--initramfs"), ["/i"]);
        assert_eq!(
            values(&a, "--cmdline"),
            ["console=ttyS0 quiet panic=-1 l3=blk"]
        );
        assert_eq!(values(&a, "--memory"), ["size=512M,shared=on"]);
        assert!(a.iter().any(|x| x == "--landlock"));
        assert!(!a.iter().any(|x| x.starts_with("--seccomp")));
        assert_eq!(values(&a, "--vdpa"), ["path=0000:00:03.0,num_queues=1"]);
        assert!(!a.iter().any(|x| x == "--api-socket" || x == "--device"));
    }

    #[test]
    fn hotplug_launch_has_the_api_socket_and_landlock_rules_for_the_device() {
        let lab = lab();

        let a = args(&Ch::new(&lab, "hotplug").hotplug_of("0000:00:03.0", 7));

        assert_eq!(values(&a, "--api-socket"), ["path=/tmp/ch-l3/api.sock"]);
        assert_eq!(
            values(&a, "--landlock-rules"),
            [
                "path=/dev/vfio/vfio,access=rw",
                "path=/dev/vfio/7,access=rw",
                "path=/sys/bus/pci/devices/0000:00:03.0,access=r",
                "path=/sys/kernel/iommu_groups/7,access=r",
            ]
        );
        assert!(a.iter().any(|x| x == "--landlock"));
        assert!(!a.iter().any(|x| x == "--vdpa"));
    }

    #[test]
    fn passthrough_launch_without_landlock_passes_reps_to_the_inner_guest() {
        let lab = lab();

        let a = args(
            &Ch::new(&lab, "perfpair")
                .without_landlock()
                .reps(9)
                .passthrough("0000:00:08.0")
                .vdpa(&Vdpa::new("0000:00:03.0", 1)),
        );

        assert_eq!(
            values(&a, "--cmdline"),
            ["console=ttyS0 quiet panic=-1 l3=perfpair l3.reps=9"]
        );
        assert!(!a.iter().any(|x| x == "--landlock"));
        assert_eq!(
            values(&a, "--device"),
            ["path=/sys/bus/pci/devices/0000:00:08.0"]
        );
        assert_eq!(values(&a, "--vdpa"), ["path=0000:00:03.0,num_queues=1"]);
    }

    #[test]
    fn one_running_vcpu_and_as_many_possible_ones_as_asked() {
        let lab = lab();
        assert_eq!(
            values(&args(&Ch::new(&lab, "blk")), "--cpus"),
            ["boot=1,max=1"]
        );
        assert_eq!(
            values(&args(&Ch::new(&lab, "blk").possible_cpus(2)), "--cpus"),
            ["boot=1,max=2"]
        );
    }

    #[test]
    fn features_come_from_the_line_of_the_device_type() {
        let lines = [
            "L3-UP 1.2",
            "L3-FEATURES 0x0001 1100",
            "[ 3.0] x L3-FEATURES 0x0002 0000000001",
        ]
        .map(String::from);

        let blk = features(&lines, VIRTIO_ID_BLOCK).unwrap();

        assert!(blk.bit(9) && !blk.bit(0) && !blk.bit(10) && !blk.bit(u32::MAX));
        assert_eq!(features(&lines, "0x0001").unwrap().to_string(), "1100");
        assert_eq!(features(&lines, "0x00"), None);
    }
}
