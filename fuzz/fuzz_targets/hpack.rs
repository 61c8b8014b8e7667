#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_proxy::fuzz_checks::hpack(data));
