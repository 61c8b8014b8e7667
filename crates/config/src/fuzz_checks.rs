//! Properties the config fuzz target (fuzz/) checks on arbitrary text, replayed over the
//! committed corpus by a normal test. Panics when a property fails, and only then.

/// Loading: any text loads or is rejected without panicking; every error names a line of the
/// text (or none) and a key path; a config that loads serializes for `/config_dump`.
pub fn load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match crate::load_str(text, "fuzz.yaml") {
        Ok(config) => {
            serde_json::to_string(&config).expect("a loaded config serializes");
        }
        Err(errors) => {
            // YAML breaks lines at CR as well as LF.
            let lines = 1 + text.bytes().filter(|b| matches!(b, b'\n' | b'\r')).count() as u64;
            for e in &errors.errors {
                if let Some(line) = e.line {
                    assert!(
                        line >= 1 && line <= lines + 1,
                        "line {line} of {lines}: {e}"
                    );
                }
                assert!(!e.message.is_empty());
            }
        }
    }
}
