//! The block format of `l3-stream` (the innermost guest's verified write
//! stream), shared with the host, which checks the image after the VM
//! exits.
//!
//! A 4 KiB block: `L3STREAM`, the write's sequence number, the block's
//! index in the streamed region, an FNV-1a checksum of the body, and a body
//! derived from the sequence number (xorshift). A block of the region
//! either still holds the image's pattern or is exactly one such write.

/// Bytes per block.
pub const BLOCK: usize = 4096;
/// Byte offset of the streamed region in the disk: its upper 8 MiB.
pub const REGION: u64 = 8 << 20;
/// Bytes of the region.
pub const REGION_LEN: u64 = 8 << 20;
/// Blocks in the region.
pub const BLOCKS: u64 = REGION_LEN / BLOCK as u64;
const MAGIC: &[u8; 8] = b"L3STREAM";

/// FNV-1a.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Fill `buf` (one block) with write `seq` to block `block`.
pub fn fill(buf: &mut [u8], seq: u64, block: u64) {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in buf[32..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&block.to_le_bytes());
    let sum = checksum(&buf[32..]);
    buf[24..32].copy_from_slice(&sum.to_le_bytes());
}

fn field(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The sequence number of the stream write `buf` holds for block `block`,
/// if it is exactly one.
pub fn parse(buf: &[u8], block: u64) -> Option<u64> {
    if buf.len() != BLOCK || &buf[0..8] != MAGIC || field(buf, 16) != block {
        return None;
    }
    let seq = field(buf, 8);
    let mut want = vec![0u8; BLOCK];
    fill(&mut want, seq, block);
    (want == buf).then_some(seq)
}

/// Check `buf` is write `seq` to block `block`.
///
/// # Errors
/// Which part differs.
pub fn check(buf: &[u8], seq: u64, block: u64) -> Result<(), String> {
    if buf.len() != BLOCK || &buf[0..8] != MAGIC {
        return Err(format!("block {block}: no stream block (want seq {seq})"));
    }
    let (s, k) = (field(buf, 8), field(buf, 16));
    if s != seq || k != block {
        return Err(format!(
            "block {block}: holds seq {s} of block {k}, want seq {seq}"
        ));
    }
    if checksum(&buf[32..]) != field(buf, 24) {
        return Err(format!("block {block}: seq {seq}: checksum mismatch"));
    }
    match parse(buf, block) {
        Some(_) => Ok(()),
        None => Err(format!("block {block}: seq {seq}: body differs")),
    }
}

/// The first byte of `data` (an image of `image`'s pattern) inside the
/// streamed region at `range` that holds neither the pattern nor a whole
/// stream write for its block.
pub fn first_bad(image: &str, data: &[u8], range: std::ops::Range<u64>) -> Option<u64> {
    let mut at = range.start;
    while at < range.end.min(data.len() as u64) {
        let s = at as usize;
        let e = (s + BLOCK).min(data.len());
        let block = (at - REGION) / BLOCK as u64;
        let blk = &data[s..e];
        let pattern = crate::pattern::region(image, at, e - s);
        if blk != pattern.as_slice() && parse(blk, block).is_none() {
            let off = blk
                .iter()
                .zip(&pattern)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Some(at + off as u64);
        }
        at += BLOCK as u64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_checks_only_as_the_write_it_is() {
        let mut b = vec![0u8; BLOCK];
        fill(&mut b, 77, 5);
        assert!(check(&b, 77, 5).is_ok());
        assert_eq!(parse(&b, 5), Some(77));
        assert!(check(&b, 78, 5).is_err());
        assert!(check(&b, 77, 6).is_err());
        assert_eq!(parse(&b, 6), None);
        b[100] ^= 1;
        assert!(check(&b, 77, 5).is_err());
        assert_eq!(parse(&b, 5), None);
        assert!(check(&[0u8; BLOCK], 0, 0).is_err());
    }

    #[test]
    fn the_host_accepts_pattern_or_whole_writes_only() {
        let len = (REGION + 4 * BLOCK as u64) as usize;
        let mut img = crate::pattern::region("blk0", 0, len);
        let r = REGION..REGION + 4 * BLOCK as u64;
        assert_eq!(first_bad("blk0", &img, r.clone()), None);
        let at = (REGION + BLOCK as u64) as usize;
        fill(&mut img[at..at + BLOCK], 9, 1);
        assert_eq!(first_bad("blk0", &img, r.clone()), None);
        // A write for another block, or a torn one.
        let at2 = (REGION + 2 * BLOCK as u64) as usize;
        fill(&mut img[at2..at2 + BLOCK], 9, 1);
        assert_eq!(first_bad("blk0", &img, r.clone()), Some(at2 as u64));
        fill(&mut img[at2..at2 + BLOCK], 10, 2);
        img[at2 + 2048] ^= 1;
        // (the first byte that differs from the pattern)
        assert_eq!(first_bad("blk0", &img, r), Some(at2 as u64));
    }
}
