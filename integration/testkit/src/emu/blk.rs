//! virtio-blk request handling (virtio 1.2 §5.2.6) for the emulated device.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress};

use super::dma::DevMem as GuestMemoryMmap;

use std::mem::offset_of;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

/// Length of the device config we expose: `struct virtio_blk_config` up
/// to the secure-erase fields (discard and write-zeroes fields zero), the
/// size QEMU's virtio-blk exposes without secure erase or zoned mode.
pub(super) const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);
const _: () = assert!(CONFIG_LEN == 0x3c);

const T_IN: u32 = VIRTIO_BLK_T_IN;
const T_OUT: u32 = VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = VIRTIO_BLK_T_GET_ID;
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The id string of `VIRTIO_BLK_T_GET_ID`.
pub(super) const ID: &[u8] = b"vdpa-bridge-emu";

/// `struct virtio_blk_config` for a disk of `capacity` sectors.
pub(super) fn config(capacity: u64, num_queues: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, b: &[u8]| c[off..off + b.len()].copy_from_slice(b);
    put(
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, size_max),
        &(1u32 << 20).to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &126u32.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &512u32.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, num_queues),
        &num_queues.to_le_bytes(),
    );
    c
}

/// A chain the device cannot even complete (no status byte to write).
#[derive(Debug)]
pub(super) struct Broken;

/// Handle one request; returns the bytes written to device-writable
/// buffers (the used length).
pub(super) fn handle(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: &mut [u8],
    capacity: u64,
) -> Result<u32, Broken> {
    let descs: Vec<Descriptor> = chain.collect();
    let (status_desc, body) = match descs.split_last() {
        Some((s, b)) if s.is_write_only() && s.len() >= 1 && !b.is_empty() => (s, b),
        _ => return Err(Broken),
    };
    let hdr = &body[0];
    let mut h = [0u8; 16];
    let readable = !hdr.is_write_only() && hdr.len() >= 16;
    let (status, written) = if !readable || mem.read_slice(&mut h, hdr.addr()).is_err() {
        (S_IOERR, 0)
    } else {
        let ty = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        run(mem, ty, sector, &body[1..], disk, capacity)
    };
    mem.write_obj(status, status_desc.addr())
        .map_err(|_| Broken)?;
    Ok(written + 1)
}

fn run(
    mem: &GuestMemoryMmap,
    ty: u32,
    sector: u64,
    data: &[Descriptor],
    disk: &mut [u8],
    capacity: u64,
) -> (u8, u32) {
    let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    let in_range = || {
        sector
            .checked_mul(512)
            .and_then(|s| s.checked_add(total))
            .is_some_and(|end| end <= capacity * 512 && end <= disk.len() as u64)
    };
    match ty {
        T_IN | T_OUT => {
            if !in_range() {
                return (S_IOERR, 0);
            }
            let mut pos = (sector * 512) as usize;
            let mut written = 0u32;
            for d in data {
                let len = d.len() as usize;
                let chunk = &mut disk[pos..pos + len];
                let ok = if ty == T_IN {
                    d.is_write_only() && mem.write_slice(chunk, d.addr()).is_ok()
                } else {
                    !d.is_write_only() && mem.read_slice(chunk, d.addr()).is_ok()
                };
                if !ok {
                    return (S_IOERR, written);
                }
                if ty == T_IN {
                    written += d.len();
                }
                pos += len;
            }
            (S_OK, written)
        }
        T_FLUSH => (S_OK, 0),
        T_GET_ID => match data.first() {
            Some(d) if d.is_write_only() => {
                let mut id = [0u8; 20];
                id[..ID.len()].copy_from_slice(ID);
                let n = (d.len() as usize).min(20);
                match mem.write_slice(&id[..n], GuestAddress(d.addr().0)) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_IOERR, 0),
        },
        _ => (S_UNSUPP, 0),
    }
}
