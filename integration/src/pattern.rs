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

/// What the guest suite writes at `offset` of `image`: a second pattern,
/// as position-dependent as the first, so overlapping or repeated writes
/// agree and the host can tell every written byte.
pub fn written(image: &str, offset: u64, len: usize) -> Vec<u8> {
    region(&format!("{image}/written"), offset, len)
}

/// The first byte offset in `data` (the whole image, read back) that
/// differs from what it must hold: [`written`] inside the declared
/// `written` ranges, `image`'s pattern everywhere else. `None` when it
/// holds exactly that.
pub fn first_mismatch(image: &str, data: &[u8], written_ranges: &[Range<u64>]) -> Option<u64> {
    let mut expected = region(image, 0, data.len());
    for r in written_ranges {
        let start = r.start.min(data.len() as u64) as usize;
        let end = r.end.min(data.len() as u64) as usize;
        if start < end {
            expected[start..end].copy_from_slice(&written(image, start as u64, end - start));
        }
    }
    data.iter()
        .zip(&expected)
        .position(|(a, b)| a != b)
        .map(|i| i as u64)
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
    fn declared_writes_must_hold_the_written_pattern_exactly() {
        let mut data = region("blk0", 0, 4 * SECTOR);
        let w = 512..1024;
        // The written pattern shares each sector's header (magic, lba) with
        // the original; the bodies differ.
        assert_eq!(
            first_mismatch("blk0", &data, std::slice::from_ref(&w)),
            Some(512 + 16),
            "not written yet"
        );
        data[512..1024].copy_from_slice(&written("blk0", 512, 512));
        assert_eq!(
            first_mismatch("blk0", &data, std::slice::from_ref(&w)),
            None
        );
        data[1000] ^= 0xff;
        assert_eq!(
            first_mismatch("blk0", &data, std::slice::from_ref(&w)),
            Some(1000)
        );
        data[1000] ^= 0xff;
        data[1500] ^= 0xff;
        assert_eq!(first_mismatch("blk0", &data, &[w]), Some(1500));
        assert_ne!(written("blk0", 0, 512), region("blk0", 0, 512));
    }

    #[test]
    fn mismatch_outside_declared_writes_is_reported() {
        let mut data = region("blk0", 0, 4 * SECTOR);
        data[1500] ^= 0xff;

        assert_eq!(first_mismatch("blk0", &data, &[]), Some(1500));
    }
}
