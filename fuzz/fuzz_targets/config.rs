#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_config::fuzz_checks::load(data));
