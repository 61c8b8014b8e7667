#![forbid(unsafe_code)]
//! Larder's configuration: loading, validation and the resulting model.
//!
//! [`load_file`] and [`load_str`] read YAML (JSON works too, being a subset of YAML 1.2),
//! reject unknown keys, validate the meaning of every value and return a [`Config`] whose
//! fields are ready to use. On failure they return [`ConfigErrors`]: a syntax or type
//! error stops parsing at the first one, while semantic problems are all collected, each
//! with file, line, column and key path:
//!
//! ```text
//! larder.yaml:12:7: resource_types[1].config.ttl: invalid duration "5x": expected a number followed by ms, s, m, h or d
//! ```
//!
//! `larder.example.yaml` at the repository root documents every key.
//!
//! # Units
//! Durations are `250ms`, `300s`, `5m`, `1h`, `1d`, combinations like `1h30m`, or a bare
//! integer of seconds. Sizes are a bare integer of bytes or a number with a unit: `B`,
//! `KB`/`MB`/`GB`/`TB` (powers of 1000), `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024), where
//! the single letters `K`/`M`/`G`/`T` also mean powers of 1024; units are
//! case-insensitive, and fractions are allowed when they come out as whole bytes
//! (`1.5MiB`).
//!
//! # Cache budget
//! Each resource type may set `config.cache_size`, and `cache.cache_size` may set a total.
//! With a total, the explicit sizes must fit in it and the types without one share the
//! remainder equally; without a total, such types get [`DEFAULT_TYPE_CACHE_SIZE`] each.
//! `max_object_size` may be at most a quarter of its type's `cache_size`; its default
//! (8 MiB) shrinks to that quarter for small budgets.

mod build;
#[doc(hidden)]
pub mod fuzz_checks;
mod locate;
mod model;
mod raw;
mod units;

use std::fmt;
use std::path::Path;

use serde_saphyr::MessageFormatter;

pub use model::*;

/// Name of the cluster in [`EMBEDDED_DEFAULT`] whose endpoint is a placeholder.
///
/// The `larder` binary, when started without a config file, loads [`EMBEDDED_DEFAULT`] and
/// then replaces this cluster's `endpoints` with the address of its built-in demo origin
/// (e.g. via [`Config::cluster_mut`]), whose port is only known once it is listening.
pub const DEMO_CLUSTER: &str = "demo";

/// Configuration used when `larder` runs without arguments: a proxy on 127.0.0.1:8080
/// (admin on 127.0.0.1:9901) that sends every request to the [`DEMO_CLUSTER`] and caches
/// it for 60 s within 64 MiB. The demo endpoint `127.0.0.1:9` (the discard port) is a
/// placeholder that the binary overwrites at start-up.
pub const EMBEDDED_DEFAULT: &str = r#"# Larder's built-in configuration, used when it is started without a config file.
listeners:
  - name: http
    address: 127.0.0.1:8080
admin:
  address: 127.0.0.1:9901
virtual_hosts:
  - name: demo
    domains: ["*"]
    routes:
      - match: { prefix: "/" }
        cluster: demo
clusters:
  - name: demo
    # Placeholder: replaced with the built-in demo origin's address at start-up.
    endpoints: ["127.0.0.1:9"]
resource_types:
  - name: default
    config:
      ttl: 60s
      cache_size: 64MiB
"#;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The origin name given to [`load_str`], or the path given to [`load_file`].
    pub file: String,
    /// 1-based; `None` when the problem has no place in the file (e.g. it could not be read).
    pub line: Option<u64>,
    pub column: Option<u64>,
    /// Key path like `virtual_hosts[0].routes[2].cluster`; empty for the whole document.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found, in file order; never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors {
            errors: vec![error],
        }
    }
}

/// Loads and validates a config file; `path` is used as the file name in messages.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(&text, &origin),
        Err(e) => Err(ConfigError {
            file: origin,
            line: None,
            column: None,
            path: String::new(),
            message: format!("cannot read config file: {e}"),
        }
        .into()),
    }
}

/// Loads and validates config text (YAML or JSON); `origin` names it in messages.
pub fn load_str(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
    let raw = parse(text, origin)?;
    let locations = locate::Locations::from_text(text);
    let mut cx = build::Ctx {
        file: origin,
        locations: &locations,
        errors: Vec::new(),
    };
    let config = build::build(raw, &mut cx);
    if cx.errors.is_empty() {
        return Ok(config);
    }
    let mut errors = cx.errors;
    // Stable, so problems at the same spot keep the order they were found in.
    errors.sort_by_key(|e| (e.line.is_none(), e.line, e.column));
    Err(ConfigErrors { errors })
}

fn parse(text: &str, origin: &str) -> Result<raw::RawConfig, ConfigError> {
    // An empty document is "nothing configured": let validation say what is missing
    // instead of reporting a parse error.
    if text.trim().is_empty() {
        return Ok(raw::RawConfig::default());
    }
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| {
        let pos = e.location().and_then(locate::pos);
        ConfigError {
            file: origin.to_owned(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            path: clean_path(&path),
            message: parse_message(&e),
        }
    })
}

/// serde_path_to_error writes the root as `.` and keys it could not name as `?`.
fn clean_path(path: &str) -> String {
    let mut p = path;
    while let Some(parent) = p.strip_suffix(".?") {
        p = parent;
    }
    if p == "." || p == "?" {
        String::new()
    } else {
        p.to_owned()
    }
}

/// The parser's message without its own location suffix and source snippet, which
/// [`ConfigError`]'s Display already provides in the `file:line:col` form.
fn parse_message(err: &serde_saphyr::Error) -> String {
    let mut inner = err;
    while let serde_saphyr::Error::WithSnippet { error, .. }
    | serde_saphyr::Error::AliasError { error, .. } = inner
    {
        inner = error;
    }
    // The parser words type mismatches in its own terms; say what the config expects.
    let message = match inner {
        serde_saphyr::Error::Unexpected { expected, .. } => match *expected {
            "sequence start" => "expected a list".into(),
            "mapping start" => "expected a mapping of keys to values".into(),
            "string scalar" => "expected a single value, not a list or mapping \
                                (quote values that start with \"[\" or \"{\", like \"[::1]:80\")"
                .into(),
            _ => serde_saphyr::UserMessageFormatter.format_message(inner),
        },
        serde_saphyr::Error::InvalidScalar { ty, .. } if ty.starts_with('u') => {
            "expected a whole number of at least 0".into()
        }
        serde_saphyr::Error::InvalidScalar { ty, .. } if ty.starts_with("bool") => {
            "expected true or false".into()
        }
        _ => serde_saphyr::UserMessageFormatter.format_message(inner),
    };
    // `*` starts a YAML alias, which bites domains like *.example.com.
    let message = if matches!(inner, serde_saphyr::Error::UnknownAnchor { .. })
        || message.contains("anchor or alias")
    {
        format!("{message} (quote values that start with \"*\" or \"&\", like \"*.example.com\")")
            .into()
    } else {
        message
    };
    message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
