#!/usr/bin/env bash
# Larder's full test run: formatting, lints, and every test of the workspace.
# Works on a fresh machine with only the Rust toolchain: outside programs the tests need
# (redis-server, prometheus/promtool) are installed here from Debian's packages and started by
# the tests themselves; under CI=true a missing program fails the run instead of being skipped.
# The conformance gate (scripts/cache-tests.sh) needs node and npm, and installs the public HTTP
# caching suite from the npm registry.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== toolchain: $(rustc --version)"
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

# Outside programs the tests use: redis-server for the Redis purge bus (feature `redis`),
# prometheus and promtool (Debian package prometheus) for the metrics and alert-rule tests.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (Debian packages)"
  APT="apt-get"; [ "$(id -u)" = 0 ] || APT="sudo env DEBIAN_FRONTEND=noninteractive apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! { $APT install -y -qq "${missing[@]}" >/dev/null 2>&1 \
         || { $APT update -qq && $APT install -y -qq "${missing[@]}" >/dev/null; }; }; then
    echo "could not install ${missing[*]}" >&2
    if [ "${CI:-}" = "true" ]; then exit 1; fi
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "== cargo deny (licenses, bans, sources; advisories with LARDER_DENY_ADVISORIES=1)"
if ! command -v cargo-deny >/dev/null && [ ! -x target/tools/bin/cargo-deny ]; then
  cargo install cargo-deny --locked --version 0.20.2 --root target/tools --quiet
fi
DENY=$(command -v cargo-deny || echo target/tools/bin/cargo-deny)
checks="licenses bans sources"
[ "${LARDER_DENY_ADVISORIES:-}" = 1 ] && checks="$checks advisories"
# shellcheck disable=SC2086
"$DENY" --log-level error check $checks

echo "== cargo test (every feature: the Redis tests start their own redis-server)"
cargo test --workspace --all-targets --all-features --locked

echo "== Kubernetes manifests (kustomize render, schema validation, the config in each ConfigMap)"
./scripts/k8s-check.sh target/debug/larder

echo "== HTTP/2 conformance (httpwg-cli from crates.io; failures must be justified in tests/attack/httpwg-expected-failures.txt)"
./scripts/httpwg.sh target/debug/larder

echo "== image promises without an engine (distroless libraries, runs as 65532 with nothing writable)"
./scripts/image-check.sh target/debug/larder

echo "== cache-tests (public HTTP caching conformance suite, http-cache-tests@0.4.5, via npm)"
if command -v node >/dev/null && command -v npm >/dev/null; then
  ./scripts/cache-tests.sh target/debug/larder
elif [ "${CI:-}" = "true" ]; then
  echo "cache-tests: node and npm are required under CI=true (the conformance gate cannot be skipped)" >&2
  exit 1
else
  echo "== cache-tests skipped: node not installed (needs node and npm; required under CI=true)"
fi
