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
    build_with(kernel, modules, work, out, INIT, &[])
}

/// The `/init` of the innermost guest of the Cloud Hypervisor cases (L3,
/// booted by Cloud Hypervisor inside the lab VM): load the virtio modules,
/// check sector 0 of `/dev/vda` against `/expect0-<serial>.bin`, write
/// `/write8-<serial>.bin` to sector 8 (the files of the image whose name
/// the disk carries as its virtio-blk serial, so any lab disk can be the
/// one bridged), print the device's negotiated features, and
/// power off; other modes (`l3=` on the command line) measure read
/// throughput of one disk (`perf`) or of the disks with serials `blk0` and
/// `blk1` side by side (`perfpair`), wait for a hot-plugged device, or
/// stream verified writes for `l3.secs=` seconds (`stream`, `l3-stream`:
/// the pause, snapshot and migration cases).
/// Every result is one `L3-...` line on the serial console.
pub const L3_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
echo "L3-UP $(cut -d' ' -f1 /proc/uptime)"
mode=blk
reps=6
secs=60
for w in $(cat /proc/cmdline); do case "$w" in l3=*) mode=${w#l3=} ;; l3.reps=*) reps=${w#l3.reps=} ;; l3.secs=*) secs=${w#l3.secs=} ;; esac; done
cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }
wait_for() { i=0; while [ ! -e "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; }
# The pattern files of vda's image, named by its virtio-blk serial.
pat() { s=$(cat /sys/block/vda/serial 2>/dev/null); exp0=/expect0-$s.bin; w8=/write8-$s.bin; }
case "$mode" in
blk)
	wait_for /dev/vda
	if [ -b /dev/vda ]; then
		pat
		dd if=/dev/vda of=/tmp/s0 bs=512 count=1 2>/dev/null
		if cmp -s /tmp/s0 "$exp0"; then echo "L3-READ-OK"; else echo "L3-READ-BAD serial '$s' $(od -An -tx1 /tmp/s0 | head -1)"; fi
		if [ -f "$w8" ]; then
			dd if="$w8" of=/dev/vda bs=512 seek=8 count=1 conv=fsync 2>/dev/null && sync
			dd if=/dev/vda of=/tmp/s8 bs=512 skip=8 count=1 iflag=direct 2>/dev/null
			if cmp -s /tmp/s8 "$w8"; then echo "L3-WRITE-OK"; else echo "L3-WRITE-BAD"; fi
		else
			echo "L3-WRITE-BAD no pattern for serial '$s'"
		fi
	else
		echo "L3-NO-DISK"
	fi
	;;
reboot)
	# Read, then reboot: Cloud Hypervisor rebuilds the VM and its devices.
	wait_for /dev/vda
	pat
	dd if=/dev/vda of=/tmp/s0 bs=512 count=1 2>/dev/null
	if cmp -s /tmp/s0 "$exp0"; then echo "L3-READ-OK"; else echo "L3-READ-BAD"; fi
	echo "L3-REBOOTING"
	reboot -f
	;;
stream)
	wait_for /dev/vda
	/bin/l3-stream /dev/vda "$secs"
	;;
netping)
	# One ping after the other for l3.secs= seconds, each result a line
	# (the lab stamps them: the longest gap is the outage).
	wait_for /sys/class/net/eth0
	ip link set eth0 up
	ip addr add 10.0.2.15/24 dev eth0
	echo "L3-NETPING-START"
	end=$(( $(cut -d. -f1 /proc/uptime) + secs )); n=0; ok=0
	while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
		n=$((n+1))
		if ping -c 1 -W 1 10.0.2.2 >/dev/null 2>&1; then ok=$((ok+1)); echo "L3-PONG $n"; else echo "L3-LOST $n"; fi
	done
	echo "L3-NETPING-DONE sent=$n received=$ok"
	;;
perf)
	wait_for /dev/vda
	/bin/l3-blkperf "$reps" blk0=/dev/vda
	;;
perfpair)
	# Two disks, told apart by their virtio-blk serials (blk0, blk1).
	wait_for /dev/vda
	wait_for /dev/vdb
	a=; b=
	for s in /sys/block/vd*/serial; do
		d=${s%/serial}
		case "$(cat "$s")" in blk0) a=/dev/${d##*/} ;; blk1) b=/dev/${d##*/} ;; esac
	done
	if [ -n "$a" ] && [ -n "$b" ]; then
		/bin/l3-blkperf "$reps" "blk0=$a" "blk1=$b"
	else
		echo "L3-PERF-ERROR disks blk0 and blk1 not both found: $(cat /sys/block/vd*/serial 2>&1)"
	fi
	;;
hotplug)
	echo "L3-READY"
	i=0; while [ ! -b /dev/vda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
	if [ -b /dev/vda ]; then
		echo "L3-PLUGGED"
		pat
		dd if=/dev/vda of=/tmp/s0 bs=512 count=1 2>/dev/null
		if cmp -s /tmp/s0 "$exp0"; then echo "L3-READ-OK"; else echo "L3-READ-BAD"; fi
		i=0; while [ -b /dev/vda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
		[ -b /dev/vda ] && echo "L3-STILL-PLUGGED" || echo "L3-UNPLUGGED"
	else
		echo "L3-NO-DISK"
	fi
	;;
hostremove)
	# The host takes the disk away under I/O: reads go on until it is
	# gone (failed ones counted), then the guest shows it still runs.
	wait_for /dev/vda
	if [ -b /dev/vda ]; then
		pat
		dd if=/dev/vda of=/tmp/s0 bs=512 count=1 iflag=direct 2>/dev/null
		if cmp -s /tmp/s0 "$exp0"; then echo "L3-READ-OK"; else echo "L3-READ-BAD"; fi
		echo "L3-IO-LOOP"
		ok=0; bad=0; i=0
		while [ -b /dev/vda ] && [ $i -lt 3000 ]; do
			if dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$((i % 64)) iflag=direct 2>/dev/null; then ok=$((ok+1)); else bad=$((bad+1)); fi
			i=$((i+1))
			sleep 0.05
		done
		if [ -b /dev/vda ]; then echo "L3-STILL-PLUGGED"; else echo "L3-UNPLUGGED reads ok=$ok failed=$bad"; fi
		# Alive for a while: the host asks Cloud Hypervisor meanwhile.
		for i in 1 2 3 4 5 6 7 8 9 10; do sleep 1; echo "L3-ALIVE $(cut -d' ' -f1 /proc/uptime)"; done
	else
		echo "L3-NO-DISK"
	fi
	;;
hotplugnet)
	echo "L3-READY"
	i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
	if [ -e /sys/class/net/eth0 ]; then
		echo "L3-PLUGGED"
		ip link set eth0 up
		ip addr add 10.0.2.15/24 dev eth0
		if ping -c 3 -W 2 10.0.2.2 >/dev/null 2>&1; then echo "L3-PING-OK"; else echo "L3-PING-BAD"; fi
		echo "L3-IO-DONE"
		i=0; while [ -e /sys/class/net/eth0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
		[ -e /sys/class/net/eth0 ] && echo "L3-STILL-PLUGGED" || echo "L3-UNPLUGGED"
	else
		echo "L3-NO-NIC"
	fi
	;;
fleet)
	# Every disk, told apart by its serial: its sector 0 against the
	# host's pattern, its sector-8 pattern written and read back; then
	# held for l3.secs= seconds (the lab reads the VMM's locked memory).
	want=$(grep -o 'l3.disks=[0-9]*' /proc/cmdline | cut -d= -f2)
	i=0; while [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt "${want:-1}" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
	echo "L3-FLEET-SEEN $(ls -d /sys/block/vd* 2>/dev/null | wc -l) at $(cut -d' ' -f1 /proc/uptime)"
	ok=0; n=0
	for b in /sys/block/vd*; do
		d=/dev/${b##*/}; s=$(cat "$b/serial"); n=$((n+1))
		dd if="$d" of=/tmp/s0 bs=512 count=1 iflag=direct 2>/dev/null
		dd if="/write8-$s.bin" of="$d" bs=512 seek=8 count=1 oflag=direct conv=fsync 2>/dev/null
		dd if="$d" of=/tmp/s8 bs=512 skip=8 count=1 iflag=direct 2>/dev/null
		if cmp -s /tmp/s0 "/expect0-$s.bin" && cmp -s /tmp/s8 "/write8-$s.bin"; then ok=$((ok+1)); else echo "L3-FLEET-BAD $s"; fi
	done
	echo "L3-FLEET-DONE ok=$ok of $n"
	echo "L3-FLEET-HOLD"
	sleep "$secs"
	;;
net)
	wait_for /sys/class/net/eth0
	ip link set eth0 up
	if udhcpc -i eth0 -n -q -t 5 -s /bin/true 2>&1 | grep -q "lease of"; then echo "L3-DHCP-OK"; else echo "L3-DHCP-BAD"; fi
	ip addr add 10.0.2.15/24 dev eth0
	if ping -c 3 -W 2 10.0.2.2 >/dev/null 2>&1; then echo "L3-PING-OK"; else echo "L3-PING-BAD"; fi
	;;
esac
for d in /sys/bus/virtio/devices/*; do echo "L3-FEATURES $(cat $d/device) $(cat $d/features)"; done
# l3.unbind=1: let every virtio device but the IOMMU (id 0x0017) go
# first; its driver resets it.
case " $(cat /proc/cmdline) " in *" l3.unbind=1 "*)
	for d in /sys/bus/virtio/devices/*; do
		[ "$(cat "$d/device")" = "0x0017" ] && continue
		[ -e "$d/driver" ] && echo "${d##*/}" > "$d/driver/unbind"
	done ;;
esac
echo "L3-DONE"
poweroff -f
"#;

/// A dynamically linked program and the shared libraries `ldd` lists for
/// it, as initramfs entries: the program at `name`, each library at its
/// host path (so the program's interpreter and library paths hold).
///
/// # Errors
///
/// The program is missing (build it: `cargo build --release -p
/// vdpa-integration --bins`), `ldd` fails, or a library cannot be read.
pub fn program_with_libraries(
    program: &Path,
    name: &str,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let bytes = std::fs::read(program)
        .with_context(|| format!("read {} (cargo build --release --bins)", program.display()))?;
    let mut out = vec![(name.to_string(), bytes)];
    let ldd = Command::new("ldd")
        .arg(program)
        .output()
        .context("run ldd")?;
    // A static program: "not a dynamic executable", nothing to add.
    if !ldd.status.success() {
        return Ok(out);
    }
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let lib = std::fs::read(path).with_context(|| format!("read {path}"))?;
        out.push((path.trim_start_matches('/').to_string(), lib));
    }
    Ok(out)
}

/// Build an initramfs with `init` as `/init` and `files` (path, bytes)
/// under the root; ELF files are made executable.
pub fn build_with(
    kernel: &Kernel,
    modules: &Resolution,
    work: &Path,
    out: &Path,
    init_script: &str,
    files: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    if work.exists() {
        std::fs::remove_dir_all(work).with_context(|| format!("clear {}", work.display()))?;
    }
    for d in ["bin", "dev", "lib/modules"] {
        std::fs::create_dir_all(work.join(d))?;
    }
    std::fs::copy(BUSYBOX, work.join("bin/busybox"))
        .with_context(|| format!("copy {BUSYBOX} (install busybox-static)"))?;
    let init = work.join("init");
    std::fs::write(&init, init_script)?;
    let exec = std::fs::Permissions::from_mode(0o755);
    for (name, bytes) in files {
        let path = work.join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, bytes)?;
        if bytes.starts_with(b"\x7fELF") {
            std::fs::set_permissions(&path, exec.clone())?;
        }
    }
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
