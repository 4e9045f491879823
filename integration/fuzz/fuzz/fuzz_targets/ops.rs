//! libFuzzer entry of target `ops` (see `vdpa_fuzz::ops`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vdpa_fuzz::ops::run(data));
