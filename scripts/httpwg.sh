#!/usr/bin/env bash
# HTTP/2 conformance (RFC 9113) with httpwg-cli from crates.io, against a Larder in demo mode on
# free loopback ports. Fails on any failed case not justified in
# tests/attack/httpwg-expected-failures.txt.
# Usage: scripts/httpwg.sh [path/to/larder]   (default target/debug/larder)
set -euo pipefail
cd "$(dirname "$0")/.."
LARDER=${1:-target/debug/larder}
VERSION=0.2.5
ROOT=target/httpwg
if [ ! -x "$ROOT/bin/httpwg" ]; then
  cargo install httpwg-cli --locked --version "$VERSION" --root "$ROOT" --quiet
fi
read -r proxy_port admin_port < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# httpwg starts the server, waits for the port, runs every case, and stops it.
NO_COLOR=1 timeout 300 "$ROOT/bin/httpwg" -a "127.0.0.1:$proxy_port" -- \
  "$LARDER" --listen "127.0.0.1:$proxy_port" --admin "127.0.0.1:$admin_port" >"$out" 2>&1 || true
summary=$(sed 's/\x1b\[[0-9;]*m//g' "$out" | grep -E 'Passed [0-9]+/[0-9]+ tests' || true)
[ -n "$summary" ] || { tail -40 "$out" >&2; echo "httpwg did not run" >&2; exit 1; }
echo "$summary"
# A case can also end without a pass or fail line (the harness itself failing): count passes too.
passed=$(echo "$summary" | sed -E 's/.*Passed ([0-9]+)\/([0-9]+).*/\1/')
total=$(echo "$summary" | sed -E 's/.*Passed ([0-9]+)\/([0-9]+).*/\2/')
listed=$(grep -vc '^#' tests/attack/httpwg-expected-failures.txt)
if [ "$passed" -lt $((total - listed - 1)) ]; then
  echo "only $passed of $total cases passed; $listed failures are justified" >&2
  exit 1
fi
expected=$(grep -v '^#' tests/attack/httpwg-expected-failures.txt | sed 's/ | .*//' | sort)
failed=$(sed 's/\x1b\[[0-9;]*m//g' "$out" | sed -n 's/^❌ Test failed: RFC 9113 :: //p' | sort)
unexpected=$(comm -13 <(echo "$expected") <(echo "$failed") | sed '/^$/d')
fixed=$(comm -23 <(echo "$expected") <(echo "$failed") | sed '/^$/d')
if [ -n "$fixed" ]; then
  echo "now passing (remove from the expected list):"; echo "$fixed" | sed 's/^/  /'
fi
if [ -n "$unexpected" ]; then
  echo "unexpected failures:" >&2; echo "$unexpected" | sed 's/^/  /' >&2
  exit 1
fi
echo "httpwg: every failure is a justified one ($(echo "$failed" | sed '/^$/d' | wc -l) listed)"
