//! # vdpa-fuzz: the bridge's fuzz targets
//!
//! Each target is a library function taking `&[u8]` that decodes the bytes
//! into a scenario, runs it against the bridge's real code (with the test
//! doubles of `vdpa-bridge`'s `test-utils` and the emulated device of
//! `vdpa-testkit` standing in for hardware) and checks its invariants
//! itself: a violation panics. The same function serves two drivers:
//!
//! * `cargo test -p vdpa-fuzz` replays the checked-in corpus
//!   (`corpus/<target>/*`) and a fixed number of seeded random inputs
//!   ([`replay`]), on stable Rust, in CI;
//! * the cargo-fuzz wrapper in `fuzz/` (nightly, libFuzzer; its own
//!   workspace) runs them for as long as asked: `integration/fuzz/run`.
//!
//! Targets:
//!
//! * [`caps`]: capability parsing, `VpVdpa::open` and the doorbell-page
//!   decision on a raw function built from the bytes;
//! * [`ops`]: operation sequences on `BridgeDevice` over the emulated
//!   device with misbehaviour knobs;
//! * [`dma`]: the plugin's DMA table against a model (guest memory with
//!   holes, a VFIO-like backend with injected failures) and the VFIO
//!   backend's parsers of what the kernel reports.
#![warn(missing_docs)]

pub mod caps;
pub mod dma;
pub mod ops;
pub mod replay;

/// Decodes fuzz bytes: every read succeeds, yielding zeros once the input
/// is used up, so any byte string is a valid input.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte (0 when used up).
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// The next bit of a byte: its lowest.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// Whether the next byte is a multiple of `n` (true one time in `n`).
    pub fn one_in(&mut self, n: u8) -> bool {
        self.u8().is_multiple_of(n)
    }

    /// Little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// Little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    /// Little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// One of `choices`, by the next byte.
    pub fn choose<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[usize::from(self.u8()) % choices.len()]
    }

    /// Up to `n` bytes (fewer when the input ends first).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }
}

/// A small deterministic generator (xorshift64*) for the seeded random
/// inputs of the replay tests: no dependency, same inputs on every run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}
