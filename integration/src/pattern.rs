//! The known content the host writes into every disk image.
//!
//! Both sides compute it: the host when it creates the image and when it
//! checks the image after the VM exited, a guest case when it checks what it
//! read through the device.
//!
//! Each 512-byte sector is `b"VDPALAB1"`, the sector number as a
//! little-endian `u64`, then a 496-byte body that depends only on the image
//! name (the device variant, e.g. `blk0`). So every sector differs from every
//! other one, and a read from the wrong image or the wrong sector is told
//! apart from a right one.

use std::ops::Range;

/// Sector size the pattern is laid out in.
pub const SECTOR: usize = 512;
/// First 8 bytes of every pattern sector.
pub const MAGIC: &[u8; 8] = b"VDPALAB1";

/// The 496-byte body shared by all sectors of `image`.
fn body(image: &str) -> [u8; SECTOR - 16] {
    // FNV-1a of the name seeds a small xorshift stream.
    let mut seed = 0xcbf2_9ce4_8422_2325u64;
    for b in image.bytes() {
        seed = (seed ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut out = [0u8; SECTOR - 16];
    for chunk in out.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// Sector `lba` of `image` (the image's name, e.g. `blk0`).
pub fn sector(image: &str, lba: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    s[..8].copy_from_slice(MAGIC);
    s[8..16].copy_from_slice(&lba.to_le_bytes());
    s[16..].copy_from_slice(&body(image));
    s
}

/// Any byte range of `image`'s pattern.
pub fn region(image: &str, offset: u64, len: usize) -> Vec<u8> {
    let body = body(image);
    let mut out = Vec::with_capacity(len);
    let mut pos = offset;
    while out.len() < len {
        let lba = pos / SECTOR as u64;
        let within = (pos % SECTOR as u64) as usize;
        let mut s = [0u8; SECTOR];
        s[..8].copy_from_slice(MAGIC);
        s[8..16].copy_from_slice(&lba.to_le_bytes());
        s[16..].copy_from_slice(&body);
        let take = (SECTOR - within).min(len - out.len());
        out.extend_from_slice(&s[within..within + take]);
        pos += take as u64;
    }
    out
}

/// The first byte offset in `data` (the whole image, read back) that
/// differs from `image`'s pattern, ignoring the byte ranges in `written`.
/// `None` when the image is intact.
pub fn first_mismatch(image: &str, data: &[u8], written: &[Range<u64>]) -> Option<u64> {
    let expected = region(image, 0, data.len());
    data.iter()
        .zip(&expected)
        .enumerate()
        .map(|(i, (a, b))| (i as u64, a, b))
        .find(|&(off, a, b)| a != b && !written.iter().any(|w| w.contains(&off)))
        .map(|(off, _, _)| off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_spanning_sectors_equals_concatenated_sectors() {
        let mut want = sector("blk0", 3)[100..].to_vec();
        want.extend_from_slice(&sector("blk0", 4));
        want.extend_from_slice(&sector("blk0", 5)[..10]);

        let got = region("blk0", 3 * 512 + 100, want.len());

        assert_eq!(got, want);
    }

    #[test]
    fn images_and_sectors_have_distinct_content() {
        assert_ne!(sector("blk0", 0), sector("blk_mq", 0));
        assert_ne!(sector("blk0", 0), sector("blk0", 1));
    }

    #[test]
    fn mismatch_inside_a_declared_write_is_ignored() {
        let mut data = region("blk0", 0, 4 * SECTOR);
        data[1000] ^= 0xff;

        assert_eq!(
            first_mismatch(
                "blk0",
                &data,
                &[Range {
                    start: 512,
                    end: 1024
                }]
            ),
            None
        );
    }

    #[test]
    fn mismatch_outside_declared_writes_is_reported() {
        let mut data = region("blk0", 0, 4 * SECTOR);
        data[1500] ^= 0xff;

        assert_eq!(
            first_mismatch(
                "blk0",
                &data,
                &[Range {
                    start: 512,
                    end: 1024
                }]
            ),
            Some(1500)
        );
    }
}
