//! `vdpa-bridge`: list, bind, inspect and exercise virtio-pci devices for
//! the userspace vDPA bridge.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use vdpa_bridge::backend::{AnyDevice, EMULATED};
use vdpa_bridge::driver::{net, Driver, DriverOptions, KickMode};
use vdpa_bridge::info::{ConfigInfo, DeviceInfo};
use vdpa_bridge::sysfs;
use vdpa_bridge::types::{features, DeviceType};
use vdpa_bridge::vp_vdpa::OpenOptions;
use vdpa_bridge::VdpaOps;

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
    /// Bring the device up and do real I/O (blk: reads, writes only with
    /// --allow-write; net: ARP for --arp-target). Without a device, the
    /// emulated device.
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
        /// Kick through the in-kernel eventfd path instead of the doorbell.
        #[arg(long)]
        kick_eventfd: bool,
        /// JSON output.
        #[arg(short, long)]
        json: bool,
    },
}

fn parse_u64(s: &str) -> std::result::Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| e.to_string())
}

fn open(device: &Option<String>, mask: Option<u64>) -> Result<(String, AnyDevice)> {
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
    let dev = AnyDevice::open(&name, opts).with_context(|| format!("cannot open {name}"))?;
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
    checks: Vec<Check>,
    passed: usize,
    failed: usize,
}

fn selftest(
    device: &Option<String>,
    allow_write: bool,
    arp: (std::net::Ipv4Addr, std::net::Ipv4Addr),
    kick_eventfd: bool,
) -> Result<SelftestReport> {
    let (name, mut dev) = open(device, None)?;
    let emulated = matches!(dev, AnyDevice::Emulated(_));
    let t = DeviceType::from_id(dev.device_id());
    let extra = match t {
        DeviceType::Net => features::bit(net::F_MAC),
        _ => 0,
    };
    let opts = DriverOptions {
        kick: if kick_eventfd {
            KickMode::EventFd
        } else {
            KickMode::Doorbell
        },
        extra_features: extra,
        queues: (t == DeviceType::Net).then_some(2),
        ..DriverOptions::default()
    };
    let mut drv = Driver::bring_up(&mut dev, opts).context("bring-up to DRIVER_OK failed")?;
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
            let nq = drv.queues.len() as u16;
            for q in 0..nq {
                let start = Instant::now();
                let r = drv
                    .blk_read(q, 0, 4096)
                    .map(|d| {
                        format!(
                            "4 KiB at sector 0 in {:?}, first bytes {:02x?}",
                            start.elapsed(),
                            &d[..8]
                        )
                    })
                    .map_err(anyhow::Error::from);
                check(&format!("blk read queue {q}"), r);
            }
            match drv.blk_get_id(0) {
                Ok(id) => check("blk get id", Ok(id)),
                Err(vdpa_bridge::driver::DriverError::BlkStatus(2)) => {
                    check("blk get id", Ok("unsupported by the device".into()))
                }
                Err(e) => check("blk get id", Err(e.into())),
            }
            if allow_write || emulated {
                let r = (|| -> Result<String> {
                    let sector = 8;
                    let orig = drv.blk_read(0, sector, 512)?;
                    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
                    drv.blk_write(0, sector, &pattern)?;
                    let back = drv.blk_read(0, sector, 512)?;
                    drv.blk_write(0, sector, &orig)?;
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
                drv.net_fill_rx(0)?;
                let mac = {
                    let mut m = [0u8; 6];
                    dev.get_config(0, &mut m)?;
                    m
                };
                let req = net::arp_request(mac, arp.1.octets(), arp.0.octets());
                let deadline = Instant::now() + Duration::from_secs(5);
                drv.net_send(0, &req)?;
                while Instant::now() < deadline {
                    if let Some((_, f)) = drv.net_recv(1, Duration::from_millis(500))? {
                        if let Some(peer) = net::parse_arp_reply(&f, arp.0.octets()) {
                            return Ok(format!("{} is at {:02x?}", arp.0, peer));
                        }
                    } else {
                        drv.net_send(0, &req)?;
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
    let negotiated = drv.features;
    let queues = drv.queues.len();
    drv.release(&mut dev).context("release")?;
    let failed = checks.iter().filter(|c| !c.ok).count();
    Ok(SelftestReport {
        device: name,
        backend: dev.backend_name(),
        device_type: t.name(),
        negotiated_features: format!("{negotiated:#x}"),
        queues,
        passed: checks.len() - failed,
        failed,
        checks,
    })
}

fn run(cli: Cli) -> Result<bool> {
    match cli.cmd {
        Cmd::List { json } => {
            let list = sysfs::SysfsPci::default()
                .list_virtio()
                .context("cannot read sysfs")?;
            let vdpa = vdpa_bridge::vhost_vdpa::list(
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
                    "{:<20} vDPA device {:<10} type {:<8} {}",
                    n.node,
                    n.vdpa_device,
                    n.device_type.unwrap_or("?"),
                    n.probe_error.as_deref().unwrap_or("")
                );
            }
            if list.is_empty() {
                println!("no virtio-pci functions");
            } else {
                println!(
                    "{:<14} {:<10} {:<8} {:<8} {:<12} GROUP",
                    "ADDRESS", "ID", "TYPE", "MODERN", "DRIVER"
                );
                for f in &list {
                    println!(
                        "{:<14} {:04x}:{:04x} {:<8} {:<8} {:<12} {}",
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
            let (name, mut dev) = open(&device, features_mask)?;
            let info = dev.info(&name)?;
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
            kick_eventfd,
            json,
        } => {
            let r = selftest(&device, allow_write, (arp_target, arp_source), kick_eventfd)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} ({}, {}): features {:#}, {} queues",
                    r.device, r.backend, r.device_type, r.negotiated_features, r.queues
                );
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
