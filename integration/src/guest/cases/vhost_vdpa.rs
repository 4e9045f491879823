//! The vhost-vdpa backend on a kernel vDPA device: QEMU's storage daemon
//! exports a pattern image as a VDUSE block device, `vdpa dev add` puts it
//! on the vDPA bus, and the same blk code as the VFIO cases runs on
//! `/dev/vhost-vdpa-N` (see `bridge::blk_io_on`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use vdpa_bridge::driver::{Driver, DriverOptions, KickMode};
use vdpa_bridge::info::{decode_config, ConfigInfo};
use vdpa_bridge::vhost_vdpa::VhostVdpaDevice;
use vdpa_bridge::VdpaOps;

use super::bridge::blk_io_on;
use crate::guest::{Case, CaseResult, Ctx, Outcome};
use crate::pattern;

const NAME: &str = "vduse0";
const IMAGE: &str = "vduse";

/// The suite.
pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "vhost_vdpa_vduse_blk_io_and_reset_cycles".to_string(),
        needs: None,
        run: vduse_blk,
    }]
}

/// The export and the vDPA device; torn down (device deleted, daemon
/// killed by pid) on drop.
struct Export {
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

fn setup(image: &Path) -> anyhow::Result<(Export, PathBuf)> {
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
