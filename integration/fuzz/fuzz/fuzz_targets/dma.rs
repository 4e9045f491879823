//! libFuzzer entry of target `dma` (see `vdpa_fuzz::dma`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vdpa_fuzz::dma::run(data));
