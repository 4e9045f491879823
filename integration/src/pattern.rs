//! The known content the host writes into every disk image.
//!
//! Both sides compute it: the host when it creates the image, a guest case
//! when it checks what it read through the device (or when it asks the host
//! to verify a region with `LAB-CHECK-IMAGE`).
//!
//! Each 512-byte sector is `b"VDPALAB1"`, the sector number as a
//! little-endian `u64`, then a 496-byte body that depends only on the image
//! name. So every sector differs from every other one, and a read from the
//! wrong image or the wrong sector is told apart from a right one.

use sha2::{Digest, Sha256};

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

/// Sector `lba` of `image` (the image's file name, e.g. `blk0.img`).
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

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_spanning_sectors_equals_concatenated_sectors() {
        let mut want = sector("blk0.img", 3)[100..].to_vec();
        want.extend_from_slice(&sector("blk0.img", 4));
        want.extend_from_slice(&sector("blk0.img", 5)[..10]);

        let got = region("blk0.img", 3 * 512 + 100, want.len());

        assert_eq!(got, want);
    }

    #[test]
    fn images_and_sectors_have_distinct_content() {
        assert_ne!(sector("blk0.img", 0), sector("blkmq.img", 0));
        assert_ne!(sector("blk0.img", 0), sector("blk0.img", 1));
    }

    #[test]
    fn sha256_hex_matches_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
