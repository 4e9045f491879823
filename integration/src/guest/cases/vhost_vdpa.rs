//! The vhost-vdpa backend on a kernel vDPA device: QEMU's storage daemon
//! exports a pattern image as a VDUSE block device, `vdpa dev add` puts it
//! on the vDPA bus, and the same blk code as the VFIO cases runs on
//! `/dev/vhost-vdpa-N` (see `bridge::blk_io_on`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use vdpa_bridge::vhost_vdpa::VhostVdpaDevice;
use vdpa_bridge::VdpaOps;
use vdpa_bridge_cli::info::{decode_config, ConfigInfo};
use vdpa_testkit::driver::{Driver, DriverOptions, KickMode};

use super::bridge::blk_io_on;
use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::pattern;

const NAME: &str = "vduse0";
/// The VDUSE export's image name (pattern seed).
pub(crate) const IMAGE: &str = "vduse";

/// The suite.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "vhost_vdpa_vduse_blk_io_and_reset_cycles".to_string(),
            needs: None,
            run: vduse_blk,
        },
        Case {
            name: "vhost_vdpa_vduse_through_plugin".to_string(),
            needs: None,
            run: vduse_plugin,
        },
        Case {
            name: "vhost_vdpa_vduse_moves_to_shadow_rings_pauses_and_logs_dirty_pages".to_string(),
            needs: None,
            run: vduse_shadow,
        },
        Case {
            name: "cli_lists_and_reads_vhost_vdpa_node".to_string(),
            needs: None,
            run: vduse_cli,
        },
    ]
}

/// The export and the vDPA device; torn down (device deleted, daemon
/// killed by pid) on drop.
pub(crate) struct Export {
    daemon: Child,
    added: bool,
}

impl Drop for Export {
    fn drop(&mut self) {
        if self.added {
            let _ = Command::new("vdpa").args(["dev", "del", NAME]).status();
        }
        // SAFETY: plain kill(2) of the child we spawned, by its pid.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = self.daemon.wait();
    }
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(p) = f() {
            return Ok(p);
        }
        if Instant::now() > end {
            bail!("{what} did not appear within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vhost_node(dev: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dev).ok()?.flatten().find_map(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        n.starts_with("vhost-vdpa-")
            .then(|| Path::new("/dev").join(n))
    })
}

/// Export `image` as a VDUSE block device on vhost-vdpa: the export (torn
/// down on drop) and its `/dev/vhost-vdpa-N` node.
pub(crate) fn setup(image: &Path) -> anyhow::Result<(Export, PathBuf)> {
    let daemon = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={}", image.display()),
            "--export",
            &format!("type=vduse-blk,id=e0,node-name=f0,name={NAME},num-queues=1,writable=on"),
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("start qemu-storage-daemon (qemu-utils)")?;
    let mut ex = Export {
        daemon,
        added: false,
    };
    wait_for("/dev/vduse/vduse0", Duration::from_secs(20), || {
        let p = Path::new("/dev/vduse").join(NAME);
        p.exists().then_some(p)
    })?;
    let st = Command::new("vdpa")
        .args(["dev", "add", "name", NAME, "mgmtdev", "vduse"])
        .status()
        .context("run `vdpa` (iproute2)")?;
    ensure!(st.success(), "vdpa dev add failed: {st}");
    ex.added = true;
    let sys = Path::new("/sys/bus/vdpa/devices").join(NAME);
    // virtio_vdpa may have claimed it: move it to vhost_vdpa.
    let driver = std::fs::read_link(sys.join("driver"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
    if driver.as_deref() != Some("vhost_vdpa") {
        if driver.is_some() {
            std::fs::write(sys.join("driver/unbind"), NAME)?;
        }
        std::fs::write(sys.join("driver_override"), "vhost_vdpa")?;
        std::fs::write("/sys/bus/vdpa/drivers/vhost_vdpa/bind", NAME)
            .context("bind to vhost_vdpa")?;
    }
    let node = wait_for("/dev/vhost-vdpa-N", Duration::from_secs(10), || {
        vhost_node(&sys).filter(|p| p.exists())
    })?;
    Ok((ex, node))
}

fn vduse_blk(ctx: &Ctx) -> CaseResult {
    let image = ctx
        .manifest
        .vduse_image
        .clone()
        .context("the host prepared no VDUSE image")?;
    let sectors = std::fs::metadata(&image)?.len() / 512;
    let (_export, node) = setup(&image)?;
    let mut d =
        VhostVdpaDevice::open(&node, None).with_context(|| format!("open {}", node.display()))?;
    ensure!(d.device_id() == 2, "device id {}", d.device_id());
    match decode_config(&mut d)? {
        ConfigInfo::Block {
            capacity_sectors, ..
        } => ensure!(
            capacity_sectors == sectors,
            "capacity {capacity_sectors}, image {sectors} sectors"
        ),
        other => bail!("decoded as {other:?}"),
    }
    let nq = d.num_queues();
    blk_io_on(&mut d, IMAGE, KickMode::EventFd, 64, nq)?;
    for i in 0..20u64 {
        let mut drv = Driver::bring_up(
            &mut d,
            DriverOptions {
                kick: KickMode::EventFd,
                ..DriverOptions::default()
            },
        )
        .with_context(|| format!("cycle {i}"))?;
        let lba = 1000 + i;
        ensure!(
            drv.blk_read(0, lba, 512)? == pattern::sector(IMAGE, lba),
            "cycle {i}: wrong data"
        );
        drv.release(&mut d)?;
    }
    ensure!(d.status()? == 0, "device not reset");
    Ok(Outcome::Pass)
}

/// The plugin on the VDUSE node, selected from `path=` like a VMM would:
/// activation, blk I/O through guest memory, reset/re-activate cycles.
fn vduse_plugin(ctx: &Ctx) -> CaseResult {
    use vdpa_plugin::{BridgeDevice, VdpaDeviceConfig};
    use vdpa_testkit::driver::blk::{T_IN, T_OUT};
    use vdpa_testkit::harness::{Guest, TestInterrupt};

    let image = ctx
        .manifest
        .vduse_image
        .clone()
        .context("the host prepared no VDUSE image")?;
    let (_export, node) = setup(&image)?;
    let cfg: VdpaDeviceConfig = format!("path={}", node.display()).parse()?;
    let backend = cfg.open()?;
    ensure!(
        backend.backend_name() == "vhost-vdpa",
        "{}",
        backend.backend_name()
    );
    let mut g = Guest::new(32 << 20, 64)?;
    let mut d = BridgeDevice::new(backend, g.mem.clone(), cfg.device_options(false))?;
    let want = vdpa_bridge::types::features::bit(vdpa_bridge::types::features::VERSION_1)
        | vdpa_bridge::types::features::bit(vdpa_bridge::types::features::ACCESS_PLATFORM);
    for i in 0..10u64 {
        d.ack_features(d.features() & want)?;
        let irq = TestInterrupt::new(1, true)?;
        let queues = g.queues_sized(&d.queue_max_sizes()[..1])?;
        d.activate(g.mem.clone(), irq.clone(), queues)
            .with_context(|| format!("activation {i}"))?;
        let w = d.wiring().context("not active")?.clone();
        ensure!(
            !w.needs_relay(),
            "cycle {i}: relay used on vhost-vdpa: {w:?}"
        );
        let lba = 3000 + i;
        let mut buf = vec![0u8; 512];
        ensure!(
            g.blk(0, T_IN, lba, &mut buf, &irq.queues[0])? == 0,
            "cycle {i}: read"
        );
        ensure!(
            buf == pattern::sector(IMAGE, lba),
            "cycle {i}: wrong data at {lba}"
        );
        let sector = 200 + 8 * i;
        let mut data = pattern::written(IMAGE, sector * 512, 4096);
        let written = g.blk(0, T_OUT, sector, &mut data, &irq.queues[0]);
        crate::guest::declare_write_to(IMAGE, sector * 512, 4096);
        ensure!(written? == 0, "cycle {i}: write");
        let mut back = vec![0u8; 4096];
        ensure!(
            g.blk(0, T_IN, sector, &mut back, &irq.queues[0])? == 0,
            "cycle {i}: read back"
        );
        ensure!(back == data, "cycle {i}: read back differs");
        d.reset()?;
    }
    Ok(Outcome::Pass)
}

/// The plugin on the VDUSE node moves an active device onto shadow rings
/// (reset through vhost-vdpa, shadow rings mapped through its IOTLB),
/// logs the pages its reads wrote, pauses and resumes it: the kernel's
/// vDPA stack with a device we did not write, and no SUSPEND needed.
fn vduse_shadow(ctx: &Ctx) -> CaseResult {
    use vdpa_plugin::{BridgeDevice, DataPath, VdpaDeviceConfig, DIRTY_PAGE};
    use vdpa_testkit::driver::blk::{T_IN, T_OUT};
    use vdpa_testkit::harness::{Guest, TestInterrupt};

    let image = ctx
        .manifest
        .vduse_image
        .clone()
        .context("the host prepared no VDUSE image")?;
    let (_export, node) = setup(&image)?;
    let cfg: VdpaDeviceConfig = format!("path={}", node.display()).parse()?;
    let backend = cfg.open()?;
    let mut g = Guest::new(32 << 20, 64)?;
    let mut d = BridgeDevice::new(backend, g.mem.clone(), cfg.device_options(false))?;
    let want = vdpa_bridge::types::features::bit(vdpa_bridge::types::features::VERSION_1)
        | vdpa_bridge::types::features::bit(vdpa_bridge::types::features::ACCESS_PLATFORM);
    d.ack_features(d.features() & want)?;
    let irq = TestInterrupt::new(1, true)?;
    let queues = g.queues_sized(&d.queue_max_sizes()[..1])?;
    d.activate(g.mem.clone(), irq.clone(), queues)?;
    let read = |g: &mut Guest, lba: u64| -> anyhow::Result<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        ensure!(
            g.blk(0, T_IN, lba, &mut buf, &irq.queues[0])? == 0,
            "read {lba}"
        );
        Ok(buf)
    };
    ensure!(
        read(&mut g, 5000)?[..512] == pattern::sector(IMAGE, 5000),
        "direct read"
    );
    let t = std::time::Instant::now();
    d.start_dirty_log()?;
    let switched = t.elapsed();
    ensure!(
        d.data_path() == Some(DataPath::Shadow),
        "{:?}",
        d.data_path()
    );
    ensure!(
        read(&mut g, 5100)?[..512] == pattern::sector(IMAGE, 5100),
        "shadowed read"
    );
    let buf_page = Guest::buffer(0) / DIRTY_PAGE * DIRTY_PAGE;
    let logged = d.dirty_log();
    ensure!(
        logged
            .iter()
            .any(|r| r.gpa <= buf_page && buf_page < r.gpa + r.len),
        "the read's buffer page {buf_page:#x} is not in the dirty log {logged:?}"
    );
    // Sectors no other case writes (vhost_vdpa_vduse_through_plugin writes
    // from 200 on).
    let sector = 6000;
    let mut data = pattern::written(IMAGE, sector * 512, 4096);
    let written = g.blk(0, T_OUT, sector, &mut data, &irq.queues[0]);
    crate::guest::declare_write_to(IMAGE, sector * 512, 4096);
    ensure!(written? == 0, "shadowed write");
    let paused = d.pause()?;
    let st = d.state()?;
    d.resume()?;
    ensure!(read(&mut g, sector)? == data, "read back after resume");
    d.reset()?;
    Ok(Outcome::PassWith(format!(
        "switched in {} ms, paused in {} ms, state version {} with {} queue(s)",
        switched.as_millis(),
        paused.took.as_millis(),
        st.version,
        st.queues.len()
    )))
}

/// `vdpa-bridge list` shows the node with its type; `info` reads it.
fn vduse_cli(ctx: &Ctx) -> CaseResult {
    let image = ctx
        .manifest
        .vduse_image
        .clone()
        .context("the host prepared no VDUSE image")?;
    let sectors = std::fs::metadata(&image)?.len() / 512;
    let (_export, node) = setup(&image)?;
    let cli = std::env::current_exe()?.with_file_name("vdpa-bridge");
    let out = Command::new(&cli).args(["list", "--json"]).output()?;
    ensure!(
        out.status.success(),
        "list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let nodes = v["vhost_vdpa"].as_array().context("no vhost_vdpa list")?;
    let me = nodes
        .iter()
        .find(|n| n["node"] == node.display().to_string())
        .with_context(|| format!("{} not listed: {v}", node.display()))?;
    ensure!(
        me["vdpa_device"] == NAME && me["device_type"] == "block",
        "{me}"
    );
    let out = Command::new(&cli)
        .args(["info", "--json", &node.display().to_string()])
        .output()?;
    ensure!(
        out.status.success(),
        "info: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["backend"] == "vhost-vdpa" && v["device_type"] == "block",
        "{v}"
    );
    ensure!(
        v["config"]["capacity_sectors"] == sectors,
        "{}",
        v["config"]
    );
    Ok(Outcome::Pass)
}
