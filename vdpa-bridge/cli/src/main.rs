//! `vdpa-bridge`: list, bind, inspect and exercise virtio-pci devices for
//! the userspace vDPA bridge.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use vdpa_bridge::backend::AnyDevice;
use vdpa_bridge::types::{features, DeviceType};
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_bridge::{DmaMapper, VdpaOps};
use vdpa_bridge_cli::info::{self, ConfigInfo, DeviceInfo};
use vdpa_bridge_cli::{sysfs, vhost};
use vdpa_testkit::driver::net;
use vdpa_testkit::emu::{EmuConfig, EmulatedFunction};

#[derive(Parser)]
#[command(
    name = "vdpa-bridge",
    version,
    about = "Userspace vp_vdpa: virtio-pci devices as vDPA devices"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List virtio-pci functions (sysfs) and vhost-vdpa nodes.
    List {
        /// JSON output.
        #[arg(short, long)]
        json: bool,
    },
    /// Move a PCI function to vfio-pci (like driverctl).
    Bind {
        /// PCI address (0000:00:04.0 or 00:04.0) or sysfs path.
        device: String,
    },
    /// Show what the bridge sees of a device. Without a device, the
    /// built-in emulated virtio-blk device.
    Info {
        /// PCI address or sysfs path of a function bound to vfio-pci, or a
        /// /dev/vhost-vdpa-N node.
        device: Option<String>,
        /// JSON output.
        #[arg(short, long)]
        json: bool,
        /// Provisioning mask for the device's features (hex or decimal).
        #[arg(long, value_parser = parse_u64)]
        features_mask: Option<u64>,
    },
    /// Bring the device up through the plugin, as a VMM would, and do real
    /// I/O through guest rings (blk: reads, writes only with --allow-write;
    /// net: ARP for --arp-target). Without a device, the emulated device.
    Selftest {
        /// PCI address or sysfs path.
        device: Option<String>,
        /// Allow writes to a blk device (a sector is written and restored).
        #[arg(long)]
        allow_write: bool,
        /// IPv4 address to ARP for on a net device.
        #[arg(long, default_value = "10.0.2.2")]
        arp_target: std::net::Ipv4Addr,
        /// Our IPv4 address in the ARP request.
        #[arg(long, default_value = "10.0.2.15")]
        arp_source: std::net::Ipv4Addr,
        /// Relay kicks through the plugin's relay thread instead of handing
        /// them to the kernel.
        #[arg(long)]
        relay_kicks: bool,
        /// JSON output.
        #[arg(short, long)]
        json: bool,
    },
}

fn parse_u64(s: &str) -> std::result::Result<u64, String> {
    vdpa_bridge::types::parse_u64(s)
        .ok_or_else(|| format!("`{s}` is not a number (hex with 0x, or decimal)"))
}

/// The name the CLI gives the built-in emulated device.
const EMULATED: &str = "emulated";

/// A device the CLI opened: a real backend, or the built-in emulated
/// device of the test kit (the no-hardware default).
enum Opened {
    Real(AnyDevice),
    Emulated(VpVdpa<EmulatedFunction>),
}

fn open(device: &Option<String>, mask: Option<u64>) -> Result<(String, Opened)> {
    let opts = OpenOptions {
        features_mask: mask,
        ..OpenOptions::default()
    };
    let name = match device {
        Some(d) => d.clone(),
        None => {
            eprintln!("no device given: using the built-in emulated virtio-blk device");
            EMULATED.to_owned()
        }
    };
    let dev = if name == EMULATED {
        let f = std::sync::Arc::new(EmulatedFunction::new(EmuConfig::default()));
        Opened::Emulated(VpVdpa::open(f, opts).context("cannot open the emulated device")?)
    } else {
        Opened::Real(AnyDevice::open(&name, opts).with_context(|| format!("cannot open {name}"))?)
    };
    Ok((name, dev))
}

fn print_info(i: &DeviceInfo) {
    println!("device:       {} ({})", i.device, i.backend);
    println!(
        "type:         {} (virtio id {}, vendor {:#06x})",
        i.device_type, i.device_id, i.vendor_id
    );
    println!(
        "features:     device {} provisioned {}",
        i.features.device.hex, i.features.provisioned.hex
    );
    println!("              {}", i.features.provisioned.names.join(" "));
    let sizes: Vec<String> = i.queues.iter().map(|q| q.max_size.to_string()).collect();
    println!(
        "queues:       {} (max sizes {})",
        i.queues.len(),
        sizes.join(",")
    );
    if let Some(v) = i.msix_vectors {
        let shared = if i.vectors_shared { ", shared" } else { "" };
        println!("msix vectors: {v}{shared}");
    }
    if let Some(n) = &i.notify {
        println!(
            "notify:       BAR{} +{:#x}, multiplier {}",
            n.bar, n.offset, n.multiplier
        );
    }
    match &i.config {
        ConfigInfo::Block {
            capacity_sectors,
            blk_size,
            num_queues,
        } => println!(
            "config:       capacity {capacity_sectors} sectors, blk_size {blk_size}, num_queues {num_queues}"
        ),
        ConfigInfo::Net {
            mac,
            mtu,
            max_queue_pairs,
            status,
        } => println!(
            "config:       mac {} mtu {} max_queue_pairs {max_queue_pairs} status {}",
            mac.as_deref().unwrap_or("-"),
            mtu.map_or("-".into(), |m| m.to_string()),
            status.map_or("-".into(), |s| s.to_string())
        ),
        ConfigInfo::Other { size } => println!("config:       {size} bytes"),
    }
}

#[derive(Serialize)]
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

#[derive(Serialize)]
struct SelftestReport {
    device: String,
    backend: &'static str,
    device_type: &'static str,
    negotiated_features: String,
    queues: usize,
    /// How the plugin wired kicks and interrupts.
    wiring: String,
    checks: Vec<Check>,
    passed: usize,
    failed: usize,
}

fn selftest(
    device: &Option<String>,
    allow_write: bool,
    arp: (std::net::Ipv4Addr, std::net::Ipv4Addr),
    relay_kicks: bool,
) -> Result<SelftestReport> {
    let (name, dev) = open(device, None)?;
    match dev {
        Opened::Real(d) => {
            let backend = d.backend_name();
            selftest_on(name, backend, d, allow_write, arp, relay_kicks)
        }
        Opened::Emulated(d) => selftest_on(name, EMULATED, d, true, arp, relay_kicks),
    }
}

/// Bring `dev` up through the plugin and do real I/O.
fn selftest_on<B: VdpaOps + DmaMapper + Send + 'static>(
    name: String,
    backend: &'static str,
    dev: B,
    allow_write: bool,
    arp: (std::net::Ipv4Addr, std::net::Ipv4Addr),
    relay_kicks: bool,
) -> Result<SelftestReport> {
    use vdpa_plugin::{BridgeDevice, DeviceOptions, KickPolicy};
    use vdpa_testkit::driver::blk::{T_GET_ID, T_IN, T_OUT};
    use vdpa_testkit::harness::{Guest, TestInterrupt};

    let t = DeviceType::from_id(dev.device_id());
    // Exactly what a VMM does: guest memory (shared, 32 MiB), the device
    // through the plugin's BridgeDevice, guest rings, kick eventfds in and
    // irqfd-like eventfds out.
    let mut g = Guest::new(32 << 20, 128)?;
    let opts = DeviceOptions {
        kick: if relay_kicks {
            KickPolicy::Relay
        } else {
            KickPolicy::Auto
        },
        ..DeviceOptions::default()
    };
    let mut d = BridgeDevice::new(dev, g.mem.clone(), opts).context("open through the plugin")?;
    let mut want = features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM);
    if t == DeviceType::Net {
        want |= features::bit(net::F_MAC);
    }
    d.ack_features(d.features() & want)?;
    let nq = match t {
        DeviceType::Net => 2,
        _ => d.queue_max_sizes().len() as u16,
    };
    let irq = TestInterrupt::new(usize::from(nq), true)?;
    let queues = g.queues(nq, d.queue_max_sizes()[0])?;
    d.activate(g.mem.clone(), irq.clone(), queues)
        .context("activation (DRIVER_OK) failed")?;
    let wiring = d.wiring().map(|w| format!("{w:?}")).unwrap_or_default();
    let mut checks = Vec::new();
    let mut check = |name: &str, r: Result<String>| {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        checks.push(Check {
            name: name.to_owned(),
            ok,
            detail,
        });
    };
    match t {
        DeviceType::Block => {
            for q in 0..nq {
                let fd = &irq.queues[usize::from(q)];
                let start = Instant::now();
                let mut buf = vec![0u8; 4096];
                let r = g
                    .blk(q, T_IN, 0, &mut buf, fd)
                    .map_err(anyhow::Error::from)
                    .and_then(|st| match st {
                        0 => Ok(format!(
                            "4 KiB at sector 0 in {:?}, first bytes {:02x?}",
                            start.elapsed(),
                            &buf[..8]
                        )),
                        s => Err(anyhow::anyhow!("status {s}")),
                    });
                check(&format!("blk read queue {q}"), r);
            }
            let mut id = vec![0u8; 20];
            let r = g.blk(0, T_GET_ID, 0, &mut id, &irq.queues[0]);
            match r {
                Ok(0) => {
                    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
                    check(
                        "blk get id",
                        Ok(String::from_utf8_lossy(&id[..end]).into_owned()),
                    )
                }
                Ok(2) => check("blk get id", Ok("unsupported by the device".into())),
                Ok(s) => check("blk get id", Err(anyhow::anyhow!("status {s}"))),
                Err(e) => check("blk get id", Err(e.into())),
            }
            if allow_write {
                let fd = &irq.queues[0];
                let r = (|| -> Result<String> {
                    let sector = 8;
                    let mut orig = vec![0u8; 512];
                    ensure_ok(g.blk(0, T_IN, sector, &mut orig, fd)?)?;
                    let mut pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
                    ensure_ok(g.blk(0, T_OUT, sector, &mut pattern, fd)?)?;
                    let mut back = vec![0u8; 512];
                    ensure_ok(g.blk(0, T_IN, sector, &mut back, fd)?)?;
                    ensure_ok(g.blk(0, T_OUT, sector, &mut orig, fd)?)?;
                    if back != pattern {
                        bail!("read back differs from what was written");
                    }
                    Ok(format!("sector {sector} written, read back, restored"))
                })();
                check("blk write/read", r);
            } else {
                check(
                    "blk write/read",
                    Ok("skipped: read-only without --allow-write".into()),
                );
            }
        }
        DeviceType::Net => {
            let r = (|| -> Result<String> {
                let mut mac = [0u8; 6];
                d.read_config(0, &mut mac)?;
                g.net_fill_rx(0)?;
                let req = net::arp_request(mac, arp.1.octets(), arp.0.octets());
                for _ in 0..10 {
                    g.net_send(1, &req, &irq.queues[1])?;
                    if let Some(f) = g.net_recv(0, &irq.queues[0], Duration::from_millis(500))? {
                        if let Some(peer) = net::parse_arp_reply(&f, arp.0.octets()) {
                            return Ok(format!("{} is at {:02x?}", arp.0, peer));
                        }
                    }
                }
                bail!("no ARP reply from {} within 5 s", arp.0)
            })();
            check("net arp", r);
        }
        other => check(
            "io",
            Err(anyhow::anyhow!("no self test for {} devices", other.name())),
        ),
    }
    let negotiated = d.acked_features();
    d.reset().context("reset")?;
    let failed = checks.iter().filter(|c| !c.ok).count();
    Ok(SelftestReport {
        device: name,
        backend,
        device_type: t.name(),
        negotiated_features: format!("{negotiated:#x}"),
        queues: usize::from(nq),
        wiring,
        passed: checks.len() - failed,
        failed,
        checks,
    })
}

fn ensure_ok(status: u8) -> Result<()> {
    match status {
        0 => Ok(()),
        s => bail!("blk request failed with status {s}"),
    }
}

fn run(cli: Cli) -> Result<bool> {
    match cli.cmd {
        Cmd::List { json } => {
            let list = sysfs::SysfsPci::default()
                .list_virtio()
                .context("cannot read sysfs")?;
            let vdpa = vhost::list(
                std::path::Path::new("/sys/bus/vdpa/devices"),
                std::path::Path::new("/dev"),
            );
            if json {
                let v = serde_json::json!({ "pci": list, "vhost_vdpa": vdpa });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(true);
            }
            for n in &vdpa {
                println!(
                    "{:<20} vDPA device {:<10} type {:<14} {}",
                    n.node,
                    n.vdpa_device,
                    n.device_type.unwrap_or("?"),
                    n.probe_error.as_deref().unwrap_or("")
                );
            }
            if list.is_empty() {
                println!("no virtio-pci functions");
            } else {
                // TYPE fits the longest name (`mac80211-hwsim`).
                println!(
                    "{:<14} {:<10} {:<14} {:<8} {:<12} GROUP",
                    "ADDRESS", "ID", "TYPE", "MODERN", "DRIVER"
                );
                for f in &list {
                    println!(
                        "{:<14} {:04x}:{:04x} {:<14} {:<8} {:<12} {}",
                        f.address,
                        f.vendor,
                        f.device,
                        f.virtio_type.map_or("?", |t| t.name()),
                        if f.modern { "modern" } else { "legacy" },
                        f.driver.as_deref().unwrap_or("-"),
                        f.iommu_group.map_or("-".into(), |g| g.to_string())
                    );
                }
            }
            Ok(true)
        }
        Cmd::Bind { device } => {
            let pci = sysfs::SysfsPci::default();
            let bdf = pci.resolve(&device)?;
            pci.bind_vfio(&bdf)
                .with_context(|| format!("cannot bind {bdf} to vfio-pci"))?;
            println!("{bdf} bound to vfio-pci");
            Ok(true)
        }
        Cmd::Info {
            device,
            json,
            features_mask,
        } => {
            let (name, dev) = open(&device, features_mask)?;
            let info = match dev {
                Opened::Real(mut d) => info::gather_any(&mut d, &name)?,
                Opened::Emulated(mut d) => info::gather_pci(&mut d, &name, EMULATED)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_info(&info);
            }
            Ok(true)
        }
        Cmd::Selftest {
            device,
            allow_write,
            arp_target,
            arp_source,
            relay_kicks,
            json,
        } => {
            let r = selftest(&device, allow_write, (arp_target, arp_source), relay_kicks)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} ({}, {}): features {:#}, {} queues",
                    r.device, r.backend, r.device_type, r.negotiated_features, r.queues
                );
                println!("  wiring: {}", r.wiring);
                for c in &r.checks {
                    println!(
                        "  {} {}: {}",
                        if c.ok { "ok  " } else { "FAIL" },
                        c.name,
                        c.detail
                    );
                }
                println!("{} passed, {} failed", r.passed, r.failed);
            }
            Ok(r.failed == 0)
        }
    }
}

fn main() -> ExitCode {
    vdpa_bridge_cli::logging::init();
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
