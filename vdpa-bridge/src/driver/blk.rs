//! virtio-blk requests (virtio 1.2 §5.2.6) on top of [`Driver`].
//!
//! Each request uses the queue's buffer area: a 16-byte header at its
//! start, the status byte at +16 and data from +512.

use vm_memory::{Bytes, GuestAddress};

use super::ring::Buf;
use super::{Driver, DriverError, Result};
use crate::types::DeviceType;

/// Read sectors.
pub const T_IN: u32 = 0;
/// Write sectors.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Device id string (20 bytes).
pub const T_GET_ID: u32 = 8;
/// Request completed.
pub const S_OK: u8 = 0;
/// Request failed.
pub const S_IOERR: u8 = 1;
/// Request type unsupported.
pub const S_UNSUPP: u8 = 2;

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
