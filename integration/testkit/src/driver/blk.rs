//! virtio-blk requests (virtio 1.2 §5.2.6) on top of [`Driver`].
//!
//! Each request uses the queue's buffer area: a 16-byte header at its
//! start, the status byte at +16 and data from +512.

use vm_memory::{Bytes, GuestAddress};

use super::ring::Buf;
use super::{Driver, DriverError, Result};
use vdpa_bridge::types::DeviceType;

use virtio_bindings::virtio_blk as vb;

/// Read sectors (`VIRTIO_BLK_T_IN`).
pub const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
/// Write sectors (`VIRTIO_BLK_T_OUT`).
pub const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
/// Flush (`VIRTIO_BLK_T_FLUSH`).
pub const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
/// Device id string, 20 bytes (`VIRTIO_BLK_T_GET_ID`).
pub const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
/// Request completed (`VIRTIO_BLK_S_OK`, as the status byte it is).
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
/// Request failed (`VIRTIO_BLK_S_IOERR`).
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
/// Request type unsupported (`VIRTIO_BLK_S_UNSUPP`).
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// Sector size of the request interface (independent of `blk_size`).
pub const SECTOR: u64 = 512;

const DATA_OFF: u64 = 512;

impl Driver {
    fn blk_check(&self) -> Result<()> {
        if self.device_id != DeviceType::Block.id() {
            return Err(DriverError::WrongDevice(self.device_id));
        }
        Ok(())
    }

    /// Submit one request on queue `q` and wait for it. `out` is written
    /// to the device after the header; `in_len` bytes are read back.
    /// Returns the status byte and the data the device wrote.
    pub fn blk_request(
        &mut self,
        q: u16,
        ty: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> Result<(u8, Vec<u8>)> {
        self.blk_check()?;
        let base = self.buffer(q);
        let data_len = out.len() as u64 + u64::from(in_len);
        if DATA_OFF + data_len > self.opts.buffer_size {
            return Err(DriverError::TooLarge {
                len: data_len,
                max: self.opts.buffer_size - DATA_OFF,
            });
        }
        let mem = self.memory.mem();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(base))
            .map_err(|_| DriverError::Memory { addr: base })?;
        // A status the device must overwrite.
        mem.write_obj(0xffu8, GuestAddress(base + 16))
            .map_err(|_| DriverError::Memory { addr: base + 16 })?;
        let mut bufs = vec![Buf {
            addr: base,
            len: 16,
            write: false,
        }];
        let data = base + DATA_OFF;
        if !out.is_empty() {
            mem.write_slice(out, GuestAddress(data))
                .map_err(|_| DriverError::Memory { addr: data })?;
            bufs.push(Buf {
                addr: data,
                len: out.len() as u32,
                write: false,
            });
        }
        if in_len > 0 {
            bufs.push(Buf {
                addr: data,
                len: in_len,
                write: true,
            });
        }
        bufs.push(Buf {
            addr: base + 16,
            len: 1,
            write: true,
        });
        let head = self.queues[usize::from(q)].ring.post(mem, &bufs)?;
        self.kick(q)?;
        let (id, _len) = self.wait_used(q)?;
        if id != head {
            return Err(DriverError::BadUsedId {
                queue: q,
                id: u32::from(id),
            });
        }
        let mem = self.memory.mem();
        let status: u8 = mem
            .read_obj(GuestAddress(base + 16))
            .map_err(|_| DriverError::Memory { addr: base + 16 })?;
        let mut buf = vec![0u8; in_len as usize];
        mem.read_slice(&mut buf, GuestAddress(data))
            .map_err(|_| DriverError::Memory { addr: data })?;
        Ok((status, buf))
    }

    /// Read `len` bytes (a multiple of 512) from `sector` on queue `q`.
    pub fn blk_read(&mut self, q: u16, sector: u64, len: u32) -> Result<Vec<u8>> {
        let (status, data) = self.blk_request(q, T_IN, sector, &[], len)?;
        match status {
            S_OK => Ok(data),
            s => Err(DriverError::BlkStatus(s)),
        }
    }

    /// Write `data` (a multiple of 512 bytes) at `sector` on queue `q`.
    pub fn blk_write(&mut self, q: u16, sector: u64, data: &[u8]) -> Result<()> {
        match self.blk_request(q, T_OUT, sector, data, 0)?.0 {
            S_OK => Ok(()),
            s => Err(DriverError::BlkStatus(s)),
        }
    }

    /// Flush the device's write cache.
    pub fn blk_flush(&mut self, q: u16) -> Result<()> {
        match self.blk_request(q, T_FLUSH, 0, &[], 0)?.0 {
            S_OK => Ok(()),
            s => Err(DriverError::BlkStatus(s)),
        }
    }

    /// The device's id string (`VIRTIO_BLK_T_GET_ID`), NULs trimmed.
    pub fn blk_get_id(&mut self, q: u16) -> Result<String> {
        let (status, data) = self.blk_request(q, T_GET_ID, 0, &[], 20)?;
        if status != S_OK {
            return Err(DriverError::BlkStatus(status));
        }
        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
        Ok(String::from_utf8_lossy(&data[..end]).into_owned())
    }
}

/// A read load for [`blk_read_load`].
#[derive(Clone, Copy, Debug)]
pub struct ReadLoad {
    /// Requests kept in flight.
    pub depth: u16,
    /// Bytes per request (a multiple of 512).
    pub block: u32,
    /// Requests to complete.
    pub ops: u64,
    /// Sectors the reads are spread over (pseudo-random, block-aligned).
    pub span_sectors: u64,
}

/// What a load measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReadStats {
    /// Requests completed.
    pub ops: u64,
    /// Wall time.
    pub elapsed_ns: u64,
    /// Requests per second.
    pub iops: f64,
    /// Median completion latency.
    pub p50_ns: u64,
    /// 99th percentile completion latency.
    pub p99_ns: u64,
}

/// Bytes of buffer area [`blk_read_load`] needs.
pub fn read_load_area(load: &ReadLoad) -> u64 {
    u64::from(load.depth) * (32 + u64::from(load.block))
}

/// Drive a read load through `ring` in `mem`, buffers from IOVA `area`
/// (see [`read_load_area`]). `kick` notifies the device, `wait` blocks
/// until it may have completed something. The same loop serves the
/// harness on a device directly and a VMM-side harness through the
/// plugin, so their numbers compare.
pub fn blk_read_load(
    mem: &vm_memory::GuestMemoryMmap,
    ring: &mut super::ring::SplitRing,
    area: u64,
    kick: &mut dyn FnMut() -> Result<()>,
    wait: &mut dyn FnMut() -> Result<()>,
    load: &ReadLoad,
) -> Result<ReadStats> {
    use std::time::Instant;
    let depth = load.depth.min(ring.size() / 3).max(1);
    let blocks = (load.span_sectors / (u64::from(load.block) / SECTOR)).max(1);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_sector = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % blocks) * (u64::from(load.block) / SECTOR)
    };
    let hdr = |slot: u16| area + u64::from(slot) * 32;
    let data = |slot: u16| area + u64::from(depth) * 32 + u64::from(slot) * u64::from(load.block);
    let mut head_slot = vec![u16::MAX; usize::from(ring.size())];
    let mut started = vec![Instant::now(); usize::from(depth)];
    let mut lat = Vec::with_capacity(usize::try_from(load.ops).unwrap_or(0).min(1 << 20));
    let post = |ring: &mut super::ring::SplitRing, slot: u16, sector: u64| -> Result<u16> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr(slot)))
            .map_err(|_| DriverError::Memory { addr: hdr(slot) })?;
        ring.post(
            mem,
            &[
                Buf {
                    addr: hdr(slot),
                    len: 16,
                    write: false,
                },
                Buf {
                    addr: data(slot),
                    len: load.block,
                    write: true,
                },
                Buf {
                    addr: hdr(slot) + 16,
                    len: 1,
                    write: true,
                },
            ],
        )
    };
    let t0 = Instant::now();
    let mut issued = 0u64;
    let mut done = 0u64;
    for slot in 0..depth {
        if issued == load.ops {
            break;
        }
        let head = post(ring, slot, next_sector())?;
        head_slot[usize::from(head)] = slot;
        started[usize::from(slot)] = Instant::now();
        issued += 1;
    }
    kick()?;
    while done < load.ops {
        let mut progressed = false;
        while let Some((head, _)) = ring.pop_used(mem)? {
            progressed = true;
            let slot = head_slot
                .get(usize::from(head))
                .copied()
                .unwrap_or(u16::MAX);
            if slot >= depth {
                return Err(DriverError::BadUsedId {
                    queue: 0,
                    id: u32::from(head),
                });
            }
            lat.push(started[usize::from(slot)].elapsed().as_nanos() as u64);
            let st: u8 =
                mem.read_obj(GuestAddress(hdr(slot) + 16))
                    .map_err(|_| DriverError::Memory {
                        addr: hdr(slot) + 16,
                    })?;
            if st != S_OK {
                return Err(DriverError::BlkStatus(st));
            }
            done += 1;
            if issued < load.ops {
                let head = post(ring, slot, next_sector())?;
                head_slot[usize::from(head)] = slot;
                started[usize::from(slot)] = Instant::now();
                issued += 1;
            }
        }
        if progressed && issued > done {
            kick()?;
        }
        if done < load.ops && !progressed {
            wait()?;
        }
    }
    let elapsed = t0.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Ok(ReadStats {
        ops: done,
        elapsed_ns: elapsed.as_nanos() as u64,
        iops: done as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ns: pct(0.50),
        p99_ns: pct(0.99),
    })
}

impl Driver {
    /// Run a read load on queue `q` of a device brought up by the harness.
    pub fn blk_read_load(&mut self, q: u16, load: &ReadLoad) -> Result<ReadStats> {
        self.blk_check()?;
        let need = read_load_area(load);
        if need > self.opts.buffer_size {
            return Err(DriverError::TooLarge {
                len: need,
                max: self.opts.buffer_size,
            });
        }
        let area = self.buffer(q);
        let timeout = self.opts.timeout;
        let (mem, queues) = (self.memory.mem(), &mut self.queues);
        let dq = &mut queues[usize::from(q)];
        let (ring, kick_fd, doorbell, call) = (&mut dq.ring, &dq.kick, &dq.doorbell, &dq.call);
        let mut kick = || -> Result<()> {
            match (kick_fd, doorbell) {
                (Some(k), _) => k.write(1).map_err(|source| DriverError::EventFd {
                    op: "write",
                    source,
                }),
                // The harness never negotiates notification data for loads.
                (None, Some(d)) => d.ring(0).map_err(|source| DriverError::Ops {
                    op: "doorbell",
                    source: Box::new(source),
                }),
                (None, None) => Ok(()),
            }
        };
        let waiter = call.as_ref().map(super::EventWaiter::new).transpose()?;
        let mut wait = || -> Result<()> {
            match &waiter {
                Some(w) => {
                    if !w.wait(timeout)? {
                        return Err(DriverError::Timeout { queue: q, timeout });
                    }
                    Ok(())
                }
                None => {
                    std::hint::spin_loop();
                    Ok(())
                }
            }
        };
        blk_read_load(mem, ring, area, &mut kick, &mut wait, load)
    }
}
