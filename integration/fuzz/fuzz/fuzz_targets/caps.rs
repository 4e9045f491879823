//! libFuzzer entry of target `caps` (see `vdpa_fuzz::caps`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vdpa_fuzz::caps::run(data));
