#!/usr/bin/env bash
# Larder's full test run: formatting, lints, and every test of the workspace.
# Works on a fresh machine with only the Rust toolchain; later suites that need outside programs
# (Prometheus, Redis, wrk, varnishtest) install and start them here, and under CI=true a missing
# program fails the run instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== toolchain: $(rustc --version)"
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --workspace --all-targets --locked
