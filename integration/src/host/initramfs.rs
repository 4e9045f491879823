//! The guest's initramfs: a static busybox, the kernel modules the lab
//! needs (decompressed; busybox `insmod` cannot read `.ko.xz`) and `/init`.
//!
//! `/init` mounts proc/sys/devtmpfs, loads the modules in dependency order,
//! mounts the host's root (9p, read-only) at `/host` with a tmpfs on
//! `/host/tmp` and proc/sys/dev inside, then runs
//! `chroot /host <lab.guest> --manifest <lab.manifest>` (both from the
//! kernel command line), prints `@@LAB-EXIT {"rc":N}` and powers off.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context as _};

use super::kernel::{Kernel, Resolution};

/// The `/init` script.
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /host
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "lab-init: $*"; }
finish() {
	echo "@@LAB-EXIT {\"rc\":$1}"
	sync
	poweroff -f
	sleep 10
}
say "up after $(cut -d' ' -f1 /proc/uptime) s"
for m in $(cat /modules.order); do
	insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done
guest=
manifest=
rw=
for w in $(cat /proc/cmdline); do
	case "$w" in
	lab.guest=*) guest=${w#lab.guest=} ;;
	lab.manifest=*) manifest=${w#lab.manifest=} ;;
	lab.rw=*) rw=${w#lab.rw=} ;;
	esac
done
[ -n "$guest" ] && [ -n "$manifest" ] || { say "no lab.guest= or lab.manifest= on the cmdline"; finish -3; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /host || { say "cannot mount the 9p host root"; finish -2; }
mount -t tmpfs tmpfs /host/tmp
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
if [ -n "$rw" ]; then
	mkdir -p "/host$rw" 2>/dev/null
	mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 labrw "/host$rw" || say "cannot mount the read-write target share"
fi
say "modules loaded, host root mounted at $(cut -d' ' -f1 /proc/uptime) s; running $guest"
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin chroot /host "$guest" --manifest "$manifest"
finish $?
"#;

/// Where the static busybox comes from (package `busybox-static`).
const BUSYBOX: &str = "/bin/busybox";

/// Build `out` (a gzip'd newc cpio) in the scratch directory `work`.
///
/// # Errors
/// A module cannot be read or decompressed, busybox is missing, or
/// `cpio`/`gzip` fail.
pub fn build(kernel: &Kernel, modules: &Resolution, work: &Path, out: &Path) -> anyhow::Result<()> {
    if work.exists() {
        std::fs::remove_dir_all(work).with_context(|| format!("clear {}", work.display()))?;
    }
    for d in ["bin", "dev", "lib/modules"] {
        std::fs::create_dir_all(work.join(d))?;
    }
    std::fs::copy(BUSYBOX, work.join("bin/busybox"))
        .with_context(|| format!("copy {BUSYBOX} (install busybox-static)"))?;
    let init = work.join("init");
    std::fs::write(&init, INIT)?;
    let exec = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(&init, exec)?;
    let mut order = String::new();
    for m in &modules.load {
        let bytes = kernel.module_bytes(&m.rel)?;
        std::fs::write(
            work.join("lib/modules").join(format!("{}.ko", m.name)),
            bytes,
        )?;
        order.push_str(&m.name);
        order.push('\n');
    }
    std::fs::write(work.join("modules.order"), order)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(r#"cd "$1" && find . | cpio -o -H newc --quiet -R 0:0 | gzip -1 >"$2""#)
        .arg("sh")
        .arg(work)
        .arg(out)
        .status()
        .context("run sh (cpio, gzip)")?;
    ensure!(
        status.success(),
        "building {} failed: {status}",
        out.display()
    );
    Ok(())
}
