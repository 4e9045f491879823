//! The transport and `VpVdpa` against the emulated device: full bring-up
//! and I/O through the driver harness, feature provisioning, config
//! generation retry, reset time limit, removed devices, MSI-X sharing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vdpa_bridge::types::{features, status};
use vdpa_bridge::virtio_pci::TransportError;
use vdpa_bridge::vp_vdpa::{FunctionReset, OpenOptions, VpVdpa};
use vdpa_bridge::{OpsError, QueueIndex, VdpaOps, VpVdpaError as Error};
use vdpa_testkit::driver::{CompletionMode, Driver, DriverOptions, KickMode};
use vdpa_testkit::emu::{EmuConfig, EmulatedFunction};

/// Tests of this file run one at a time: some count the process's file
/// descriptors, which parallel tests would disturb.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn open(cfg: EmuConfig) -> (Arc<EmulatedFunction>, VpVdpa<EmulatedFunction>) {
    let f = Arc::new(EmulatedFunction::new(cfg));
    let d = VpVdpa::open(f.clone(), OpenOptions::default()).expect("open");
    (f, d)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn full_bring_up_to_driver_ok_and_blk_io() {
    let _serial = serial();
    let (emu, mut d) = open(EmuConfig::default());
    let mut drv = Driver::bring_up(&mut d, DriverOptions::default()).unwrap();
    let st = d.status().unwrap();
    assert_eq!(
        st,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    assert_ne!(drv.features & features::bit(features::VERSION_1), 0);
    assert_ne!(drv.features & features::bit(features::ACCESS_PLATFORM), 0);
    assert_eq!(d.driver_features(), drv.features);
    let data = pattern(7, 8192);
    drv.blk_write(0, 40, &data).unwrap();
    assert_eq!(emu.disk_read(40 * 512, 8192), data);
    assert_eq!(drv.blk_read(0, 40, 8192).unwrap(), data);
    assert_eq!(drv.blk_get_id(0).unwrap(), "vdpa-bridge-emu");
    drv.blk_flush(0).unwrap();
    // Past the end of the disk: the device says IOERR, we say so.
    let sectors = EmuConfig::default().disk_size / 512;
    assert!(matches!(
        drv.blk_read(0, sectors, 512),
        Err(vdpa_testkit::driver::DriverError::BlkStatus(1))
    ));
    assert!(emu.stats().interrupts > 0, "completions came by MSI-X");
    drv.release(&mut d).unwrap();
    assert_eq!(d.status().unwrap(), 0);
}

#[test]
fn kicks_through_the_ioeventfd_path_and_polled_completions() {
    let _serial = serial();
    let (emu, mut d) = open(EmuConfig::default());
    let opts = DriverOptions {
        kick: KickMode::EventFd,
        completion: CompletionMode::Poll,
        ..DriverOptions::default()
    };
    let mut drv = Driver::bring_up(&mut d, opts).unwrap();
    let data = pattern(1, 512);
    drv.blk_write(0, 2, &data).unwrap();
    assert_eq!(drv.blk_read(0, 2, 512).unwrap(), data);
    assert!(emu.stats().notifies >= 2);
    drv.release(&mut d).unwrap();
}

#[test]
fn provisioning_mask_hides_features_but_not_required_ones() {
    let _serial = serial();
    let f = Arc::new(EmulatedFunction::new(EmuConfig::default()));
    let keep = features::bit(features::VERSION_1) | features::bit(features::ACCESS_PLATFORM);
    let mut d = VpVdpa::open(
        f.clone(),
        OpenOptions {
            features_mask: Some(keep),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_ne!(d.raw_device_features() & !keep, 0, "the device offers more");
    assert_eq!(d.device_features(), keep);
    // Asking for a masked feature is refused before the device sees it.
    let flush = features::bit(9);
    assert_ne!(d.raw_device_features() & flush, 0);
    d.set_status(status::ACKNOWLEDGE | status::DRIVER).unwrap();
    assert!(matches!(
        d.set_driver_features(keep | flush),
        Err(Error::Ops(OpsError::FeaturesNotOffered { .. }))
    ));
    let drv = Driver::bring_up(
        &mut d,
        DriverOptions {
            extra_features: flush,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    assert_eq!(drv.features, keep);
    drv.release(&mut d).unwrap();

    for bit in [features::VERSION_1, features::ACCESS_PLATFORM] {
        let e = VpVdpa::open(
            f.clone(),
            OpenOptions {
                features_mask: Some(!features::bit(bit)),
                ..OpenOptions::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Ops(OpsError::MaskRemovesRequired { bit: b, .. }) if b == bit),
            "{e}"
        );
    }
}

#[test]
fn config_reads_retry_until_the_generation_is_stable() {
    let _serial = serial();
    let (emu, mut d) = open(EmuConfig::default());
    let sectors = EmuConfig::default().disk_size / 512;
    let g0 = d.config_generation().unwrap();
    emu.bump_config_generation_during_reads(3);
    let mut b = [0u8; 8];
    d.get_config(0, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), sectors);
    assert!(d.config_generation().unwrap() != g0, "the generation moved");
    // A device whose generation never settles is an error, not a hang.
    emu.bump_config_generation_during_reads(10_000);
    let t = Instant::now();
    assert!(d.get_config(0, &mut b).is_err());
    assert!(t.elapsed() < Duration::from_secs(2));
}

fn quick_reset() -> OpenOptions {
    OpenOptions {
        reset_timeout: Duration::from_millis(100),
        ..OpenOptions::default()
    }
}

#[test]
fn a_device_that_never_finishes_reset_is_cut_off_from_dma_and_refused() {
    let _serial = serial();
    let f = Arc::new(EmulatedFunction::new(EmuConfig {
        never_finish_reset: true,
        ..EmuConfig::default()
    }));
    let t = Instant::now();
    let e = VpVdpa::open(f.clone(), quick_reset()).unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(
            e,
            Error::ResetFailed {
                function_reset: FunctionReset::DidNotHelp,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(1),
        "{took:?}"
    );
    assert!(!f.bus_master(), "a device that cannot be reset may not DMA");
    assert_eq!(f.stats().function_resets, 1);
}

#[test]
fn without_a_function_reset_the_failure_says_so() {
    let _serial = serial();
    let f = Arc::new(EmulatedFunction::new(EmuConfig {
        never_finish_reset: true,
        no_function_reset: true,
        ..EmuConfig::default()
    }));
    let e = VpVdpa::open(f.clone(), quick_reset()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ResetFailed {
                function_reset: FunctionReset::Unavailable,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("no function-level reset"), "{e}");
    assert!(!f.bus_master());
}

#[test]
fn a_function_reset_recovers_a_device_stuck_in_reset() {
    let _serial = serial();
    let f = Arc::new(EmulatedFunction::new(EmuConfig {
        never_finish_reset: true,
        flr_recovers: true,
        ..EmuConfig::default()
    }));
    let mut d = VpVdpa::open(f.clone(), quick_reset()).expect("open after FLR");
    assert!(f.bus_master());
    assert!(f.stats().function_resets >= 1);
    let mut drv = Driver::bring_up(&mut d, DriverOptions::default()).unwrap();
    let data = pattern(3, 4096);
    drv.blk_write(0, 8, &data).unwrap();
    assert_eq!(drv.blk_read(0, 8, 4096).unwrap(), data);
}

#[test]
fn a_device_stuck_while_running_stops_dma_and_later_resets_do_not_wait() {
    let _serial = serial();
    let f = Arc::new(EmulatedFunction::new(EmuConfig::default()));
    let mut d = VpVdpa::open(f.clone(), quick_reset()).unwrap();
    let mut drv = Driver::bring_up(&mut d, DriverOptions::default()).unwrap();
    drv.blk_write(0, 8, &pattern(5, 512)).unwrap();
    let requests = f.stats().requests;
    let flrs = f.stats().function_resets;
    f.set_reset_stuck(true);

    let t = Instant::now();
    let e = d.reset().unwrap_err();
    let first = t.elapsed();
    assert!(
        matches!(
            e,
            Error::ResetFailed {
                function_reset: FunctionReset::Deferred,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(first < Duration::from_secs(1), "{first:?}");
    assert!(!f.bus_master());
    // No function-level reset where a reset runs (a vCPU thread).
    assert_eq!(f.stats().function_resets, flrs);
    // The device still believes it runs: a kick finds no bus mastering.
    d.kick(QueueIndex(0)).unwrap();
    assert!(f.stats().dma_refused >= 1);
    assert_eq!(f.stats().requests, requests);

    let t = Instant::now();
    assert!(d.reset().is_err());
    let second = t.elapsed();
    assert!(second < Duration::from_millis(50), "{second:?}");
    let t = Instant::now();
    drop(drv);
    drop(d);
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
}

#[test]
fn a_removed_device_reads_all_ones_and_is_reported() {
    let _serial = serial();
    let (emu, mut d) = open(EmuConfig::default());
    emu.surprise_remove();
    let e = d.status().unwrap_err();
    assert!(
        matches!(e, Error::Transport(TransportError::DeviceRemoved)),
        "{e:?}"
    );
    let mut b = [0u8; 8];
    assert!(d.get_config(0, &mut b).is_err());
    assert!(d.reset().is_err());
    let e = VpVdpa::open(emu, OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Transport(_)), "{e:?}");
}

#[test]
fn devices_without_version_1_and_legacy_only_devices_are_refused() {
    let _serial = serial();
    let f = Arc::new(EmulatedFunction::new(EmuConfig {
        offer_version_1: false,
        ..EmuConfig::default()
    }));
    let e = VpVdpa::open(f, OpenOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Ops(OpsError::NoVersion1)), "{e:?}");
    let f = Arc::new(EmulatedFunction::new(EmuConfig {
        legacy_only: true,
        ..EmuConfig::default()
    }));
    let e = VpVdpa::open(f, OpenOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::Transport(TransportError::LegacyOnly { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("legacy") || format!("{e:#?}").contains("Legacy"));
}

#[test]
fn queue_sizes_of_zero_or_too_large_are_refused() {
    let _serial = serial();
    let (_emu, mut d) = open(EmuConfig {
        queue_max_size: 0,
        ..EmuConfig::default()
    });
    assert_eq!(d.vring_max_size(QueueIndex(0)).unwrap(), 0);
    assert!(Driver::bring_up(&mut d, DriverOptions::default()).is_err());
    let (_emu, mut d) = open(EmuConfig::default());
    d.set_status(status::ACKNOWLEDGE | status::DRIVER).unwrap();
    d.set_driver_features(features::bit(features::VERSION_1))
        .unwrap();
    d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK)
        .unwrap();
    for bad in [0u16, 3, 512] {
        assert!(matches!(
            d.set_vring_num(QueueIndex(0), bad),
            Err(Error::Ops(OpsError::InvalidQueueSize { .. }))
        ));
    }
    assert!(matches!(
        d.set_vring_num(QueueIndex(9), 64),
        Err(Error::Ops(OpsError::InvalidQueue(_)))
    ));
}

#[test]
fn fewer_vectors_than_queues_share_and_io_works_on_every_queue() {
    let _serial = serial();
    for vectors in [2u32, 1] {
        let (emu, mut d) = open(EmuConfig {
            num_queues: 4,
            msix_vectors: Some(vectors),
            ..EmuConfig::default()
        });
        let plan = d.irq_plan();
        assert!(plan.is_shared());
        assert_eq!(plan.groups.len(), vectors as usize);
        let mut drv = Driver::bring_up(&mut d, DriverOptions::default()).unwrap();
        for q in 0..4u16 {
            let data = pattern(q as u8, 512);
            drv.blk_write(q, 10 + u64::from(q), &data).unwrap();
            assert_eq!(drv.blk_read(q, 10 + u64::from(q), 512).unwrap(), data);
        }
        assert!(emu.stats().interrupts >= 8);
        drv.release(&mut d).unwrap();
    }
}

#[test]
fn notification_data_doorbells_carry_the_avail_index() {
    let _serial = serial();
    let (emu, mut d) = open(EmuConfig {
        extra_features: features::bit(features::NOTIFICATION_DATA),
        ..EmuConfig::default()
    });
    let mut drv = Driver::bring_up(
        &mut d,
        DriverOptions {
            extra_features: features::bit(features::NOTIFICATION_DATA),
            ..DriverOptions::default()
        },
    )
    .unwrap();
    assert_ne!(drv.features & features::bit(features::NOTIFICATION_DATA), 0);
    drv.blk_read(0, 0, 512).unwrap();
    drv.blk_read(0, 0, 512).unwrap();
    assert_eq!(emu.last_notify_data(0), Some(2 << 16));
    drv.release(&mut d).unwrap();
}

#[test]
fn hundred_reset_cycles_leak_nothing() {
    let _serial = serial();
    let (emu, mut d) = open(EmuConfig::default());
    let mut base = None;
    for i in 0..100u64 {
        let mut drv = Driver::bring_up(
            &mut d,
            DriverOptions {
                kick: if i % 2 == 0 {
                    KickMode::EventFd
                } else {
                    KickMode::Doorbell
                },
                ..DriverOptions::default()
            },
        )
        .unwrap();
        let data = pattern(i as u8, 512);
        drv.blk_write(0, i, &data).unwrap();
        drv.release(&mut d).unwrap();
        assert_eq!(emu.dma_mapping_count(), 0);
        let now = open_fds();
        match base {
            None => base = Some(now),
            Some(b) => assert_eq!(now, b, "fds grew at cycle {i}"),
        }
    }
}
