#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_cache::fuzz_checks::vary(data));
