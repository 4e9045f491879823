//! `vdpa-bridge`: list, bind, inspect and exercise virtio-pci devices for
//! the userspace vDPA bridge.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use vdpa_bridge::backend::AnyDevice;
use vdpa_bridge::vp_vdpa::{OpenOptions, VpVdpa};
use vdpa_bridge_cli::info::{self, ConfigInfo, DeviceInfo};
use vdpa_bridge_cli::{selftest, sysfs, vhost};
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
    /// net: ARP for --arp-target; rng: read entropy; console: send
    /// --console-text on port 0, read what arrives). Other device types
    /// are brought up only: outcome "bring-up only", exit status 0.
    /// Without a device, the emulated device.
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
        /// Text sent on a console device's port 0.
        #[arg(long, default_value = "vdpa-bridge selftest\n")]
        console_text: String,
        /// How long to wait for data from a console's other side, in ms.
        #[arg(long, default_value_t = 1000)]
        console_wait_ms: u64,
        /// Soak: repeat the round (activation, I/O, reset) for this many
        /// seconds, and check that file descriptors, threads, locked and
        /// pinned memory and DMA mappings do not grow.
        #[arg(long, value_name = "SECONDS")]
        duration: Option<u64>,
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

fn selftest(device: &Option<String>, opts: &selftest::Options) -> Result<selftest::Report> {
    let (name, dev) = open(device, None)?;
    match dev {
        Opened::Real(d) => {
            let backend = d.backend_name();
            selftest::run(name, backend, d, opts)
        }
        Opened::Emulated(d) => {
            let opts = selftest::Options {
                allow_write: true,
                ..opts.clone()
            };
            selftest::run(name, EMULATED, d, &opts)
        }
    }
}

fn print_selftest(r: &selftest::Report) {
    let sizes: Vec<String> = r.queue_sizes.iter().map(u16::to_string).collect();
    println!(
        "{} ({}, {}): features {}, {} queues (sizes {})",
        r.device,
        r.backend,
        r.device_type,
        r.negotiated_features,
        r.queues,
        sizes.join(",")
    );
    println!("  wiring: {}", r.wiring);
    for c in &r.checks {
        println!(
            "  {} {}: {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
        if let Some(data) = &c.data {
            println!("       {data:?}");
        }
    }
    if let Some(s) = &r.soak {
        println!(
            "  soak: {} rounds in {:.0} s, {} with a failed check",
            s.rounds, s.seconds, s.failed_rounds
        );
    }
    println!(
        "{}: {} passed, {} failed",
        r.outcome.as_str(),
        r.passed,
        r.failed
    );
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
            console_text,
            console_wait_ms,
            duration,
            json,
        } => {
            let opts = selftest::Options {
                allow_write,
                arp_target,
                arp_source,
                relay_kicks,
                console_text,
                console_wait: Duration::from_millis(console_wait_ms),
                duration: duration.map(Duration::from_secs),
            };
            let r = selftest(&device, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_selftest(&r);
            }
            Ok(r.outcome.is_success())
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
