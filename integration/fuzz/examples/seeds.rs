//! Writes the hand-made seed inputs of the corpus (`corpus/<target>/seed-*`):
//! `cargo run -p vdpa-fuzz --example seeds`, and the regression inputs
//! of findings (`regress-*`) that can be written by hand. Inputs that
//! fuzzing found are kept beside them under their own names.

use std::path::Path;

use vdpa_bridge::fake::ConfigBuilder;
use vdpa_fuzz::caps::{bar_byte, CapsInput};
use vdpa_fuzz::dma::iova_info_bytes;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = vdpa_fuzz::replay::corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    let name = if name.starts_with("regress-") {
        name.to_string()
    } else {
        format!("seed-{name}")
    };
    std::fs::write(Path::new(&dir).join(name), bytes).unwrap();
}

/// A `caps` input: `config` with BAR 4 of `bar4_size` (mapped when
/// `mapped`), `queues` queues of 256 whose `queue_notify_off` reads
/// `notify_off`, VERSION_1 offered, host pages selected by `page`.
fn caps(
    cfg: ConfigBuilder,
    mapped: bool,
    exp: u8,
    queues: u16,
    notify_off: u16,
    page: u8,
) -> Vec<u8> {
    let mut bars = [0u8; 6];
    bars[4] = bar_byte(if mapped { 2 } else { 1 }, exp);
    bars[1] = bar_byte(2, 8);
    CapsInput {
        raw_header: false,
        page,
        bars,
        device_feature: 1,
        num_queues: queues,
        queue_size: 256,
        queue_notify_off: notify_off,
        status: 0,
        config: cfg.build()[..256].to_vec(),
    }
    .encode()
}

fn caps_seeds() {
    // 0x4000 = 16 << 10.
    let qemu = || ConfigBuilder::qemu_like(0x1042);
    write("caps", "qemu-mapped", &caps(qemu(), true, 10, 3, 0, 0));
    write("caps", "qemu-unmapped", &caps(qemu(), false, 10, 1, 0, 0));
    write(
        "caps",
        "msix-in-doorbell-page",
        &caps(qemu().msix_cap(4, 4, 0x3800, 4, 0x3c00), true, 10, 1, 0, 0),
    );
    write(
        "caps",
        "msix-elsewhere",
        &caps(qemu().msix_cap(4, 1, 0, 1, 0x800), true, 10, 1, 0, 0),
    );
    write(
        "caps",
        "shm-in-page",
        &caps(qemu().shm_cap(4, 0x3c00, 0x400), true, 10, 1, 0, 0),
    );
    write(
        "caps",
        "vendor-data",
        &caps(qemu().vendor_data_cap(8), true, 10, 1, 0, 0),
    );
    write(
        "caps",
        "duplicate-isr-in-page",
        &caps(qemu().virtio_cap(3, 4, 0x3800, 0x10), true, 10, 2, 1, 0),
    );
    // Page per queue: multiplier 0x1000 over a 0x4000 notify region.
    let ppv = ConfigBuilder::virtio(0x1042)
        .virtio_cap(1, 4, 0, 0x1000)
        .virtio_cap(3, 4, 0x1000, 0x1000)
        .virtio_cap(4, 4, 0x2000, 0x1000)
        .notify_cap(4, 0x4000, 0x4000, 0x1000)
        .msix_cap(2, 1, 0, 1, 0x800);
    // 0x8000 = 16 << 11.
    write("caps", "page-per-vq", &caps(ppv, true, 11, 1, 2, 0));
    // 64 KiB pages: a 64 KiB doorbell region in a 128 KiB BAR.
    let big = ConfigBuilder::virtio(0x1042)
        .virtio_cap(1, 4, 0, 0x1000)
        .virtio_cap(3, 4, 0x1000, 0x1000)
        .virtio_cap(4, 4, 0x2000, 0x1000)
        .notify_cap(4, 0x1_0000, 0x1_0000, 4)
        .msix_cap(2, 1, 0, 1, 0x800);
    write("caps", "64k-pages", &caps(big, true, 13, 2, 0, 2));
    write(
        "caps",
        "page-size-not-power-of-two",
        &caps(qemu(), true, 10, 1, 0, 4),
    );
    let looping = qemu();
    let last = looping.next_pos() - 20;
    write(
        "caps",
        "looping-list",
        &caps(looping.poke(last + 1, 0x40), true, 10, 1, 0, 0),
    );
    write(
        "caps",
        "short-cap",
        &caps(qemu().poke(0x42, 8), true, 10, 1, 0, 0),
    );
    write(
        "caps",
        "too-many-queues",
        &caps(qemu(), true, 10, 1025, 0, 0),
    );
}

/// A small page-multiple address or size as the `dma` target reads it.
fn pages(n: u8) -> [u8; 2] {
    [2, n]
}

fn dma_seeds() {
    let mut v = Vec::new();
    // Two usable IOVA ranges, [0, 15 pages) and [32 pages, 47 pages).
    v.extend([0, 2]);
    v.extend(pages(0));
    v.extend(pages(15));
    v.extend(pages(32));
    v.extend(pages(15));
    // A 16 KiB region with the MMAP flag and two sparse areas.
    v.extend([2, 4, 4, 0, 0, 0, 0, 0, 1, 2]);
    v.extend(pages(0));
    v.extend(pages(1));
    v.extend(pages(2));
    v.extend(pages(2));
    // Layout helpers: window_pos, msix_request, irq_set_words, ioeventfd_arg.
    v.extend(pages(1));
    v.extend(pages(4));
    v.extend(pages(1));
    v.extend([0x10, 0, 3, 4, 1, 7, 0, 0, 0]);
    v.extend([0; 8 + 16]);
    // Guest memory: 2 regions, 4 pages then 2 pages, adjacent; vIOMMU.
    v.extend([0, 1, 3, 0, 1, 1, 1]);
    // Map 6 pages at GPA 0 (spans both regions), IOVA = GPA.
    v.extend([0]);
    v.extend(pages(0));
    v.extend([1]);
    v.extend(pages(6));
    // Unmap part of it (splits: refused), then all of it.
    v.extend([2]);
    v.extend(pages(0));
    v.extend(pages(1));
    v.extend([2]);
    v.extend(pages(0));
    v.extend(pages(6));
    // The next map fails in the backend after its first piece.
    v.extend([7, 2, 0]);
    v.extend(pages(0));
    v.extend([1]);
    v.extend(pages(6));
    // Refuse unmaps, unmap all, hotplug, map guest memory, unplug.
    v.extend([8, 1, 4, 5, 40, 3, 3, 6, 0, 8, 0, 4]);
    write("dma", "two-ranges-spanning-map", &v);

    // A reply whose second range lies inside the first (the envelope
    // used to end at 0x1fff), then identity maps of all RAM.
    let mut w = vec![1];
    let info = iova_info_bytes(&[(0, 0xffff_ffff), (0x1000, 0x1fff)], true);
    w.push(info.len() as u8);
    w.extend(&info);
    w.extend([0; 48]);
    w.extend([1, 0, 1, 0, 0]);
    w.extend([3, 4]);
    write("dma", "regress-envelope-nested", &w);
}

fn ops_seeds() {
    // EmuConfig: no extra features, `queues` queues of 256, vectors,
    // multiplier 4, resets finish, FLR does not help, FLR present,
    // VERSION_1, modern, full IOVA range, DRIVER_OK taken, no ioeventfd
    // limit. DeviceOptions: split only, no vIOMMU, all queues, `kick`,
    // no notification data. No provisioning mask; rings of 64.
    let head = |queues: u8, msix: u8, kick: u8, fail_driver_ok: u8| {
        vec![
            0,
            0,
            queues,
            0,
            msix,
            0,
            1,
            0,
            1,
            1,
            1,
            0,
            fail_driver_ok,
            0,
            0,
            1,
            0,
            kick,
            0,
            1,
            0,
        ]
    };
    let ack = [3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1];
    let activate = |n: u8| [0, n, 0, 1];
    let kick = |q: u8| [12, q, 1, 5];

    let mut a = head(1, 0, 0, 1);
    a.extend(ack);
    a.extend(activate(1));
    a.extend(kick(0));
    a.extend([6]);
    a.extend(ack);
    a.extend(activate(1));
    a.extend([7, 6]);
    write("ops", "activate-kick-reset-remove", &a);

    // Two queues on one shared vector, kicks relayed.
    let mut b = head(2, 3, 2, 1);
    b.extend(ack);
    b.extend(activate(2));
    b.extend(kick(0));
    b.extend(kick(1));
    b.extend([10, 4, 6]);
    write("ops", "shared-vector-relay", &b);

    // DRIVER_OK refused: the failed activation must leave it reset.
    let mut c = head(1, 0, 2, 0);
    c.extend(ack);
    c.extend(activate(1));
    c.extend(ack);
    c.extend(activate(1));
    write("ops", "driver-ok-refused", &c);

    // The reset stops finishing while running; then a new activation.
    let mut d = head(1, 0, 0, 1);
    d.extend(ack);
    d.extend(activate(1));
    d.extend([9, 0, 6]);
    d.extend(ack);
    d.extend(activate(1));
    d.extend([8, 1]);
    write("ops", "stuck-reset-then-activate", &d);
}

fn main() {
    caps_seeds();
    dma_seeds();
    ops_seeds();
}
