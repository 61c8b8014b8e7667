//! Replays every committed fuzz input (fuzz/corpus/<target>/) through the property its fuzz
//! target checks, so CI holds each case the fuzzers found without running a fuzzer.

use std::path::Path;

#[test]
fn every_committed_fuzz_input_still_holds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    type Check = fn(&[u8]);
    let checks: [(&str, Check); 6] = [
        ("cache_key", larder_cache::fuzz_checks::cache_key),
        ("cache_control", larder_cache::fuzz_checks::cache_control),
        ("vary", larder_cache::fuzz_checks::vary),
        ("range", larder_proxy::fuzz_checks::range),
        ("hpack", larder_proxy::fuzz_checks::hpack),
        ("config", larder_config::fuzz_checks::load),
    ];
    for (target, check) in checks {
        let dir = root.join(target);
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "{target}: {} fails its property",
                path.display()
            );
            inputs += 1;
        }
        assert!(inputs > 0, "{target}: empty corpus");
    }
}
