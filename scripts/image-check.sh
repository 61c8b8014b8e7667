#!/usr/bin/env bash
# What the container image promises, checked without a container engine (none runs here):
# the binary needs only the libraries distroless/cc-debian12 carries (glibc, libm, libgcc_s),
# and it runs as the image's user 65532 with nothing writable (cwd and HOME unwritable, as
# under readOnlyRootFilesystem), answers /ready, and exits 0 on SIGTERM after draining.
# Usage: scripts/image-check.sh [path/to/larder]   (default target/debug/larder)
set -euo pipefail
cd "$(dirname "$0")/.."
LARDER=$(realpath "${1:-target/debug/larder}")

echo "-- shared libraries"
unexpected=$(ldd "$LARDER" | awk '{print $1}' \
  | grep -vE '^(linux-vdso\.so\.1|/lib64/ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1|/lib/ld-linux-aarch64\.so\.1|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1)$' || true)
if [ -n "$unexpected" ]; then
  echo "the binary needs libraries distroless/cc does not have: $unexpected" >&2
  exit 1
fi

echo "-- runs as 65532:65532 with nothing writable"
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
read -r proxy_port admin_port < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
cat >"$work/larder.yaml" <<YAML
listeners: [{ name: http, address: "127.0.0.1:$proxy_port" }]
admin: { address: "127.0.0.1:$admin_port" }
drain: { delay: 0s, timeout: 2s }
virtual_hosts:
  - name: all
    domains: ["*"]
    routes: [{ match: { prefix: / }, cluster: app }]
clusters:
  - name: app
    endpoints: ["127.0.0.1:9"]
YAML
chmod 755 "$work"
chmod 644 "$work/larder.yaml"
cp "$LARDER" "$work/larder" && chmod 755 "$work/larder"
(cd / && HOME=/nonexistent exec setpriv --reuid 65532 --regid 65532 --clear-groups \
  "$work/larder" --config "$work/larder.yaml" >"$work/out.log" 2>&1) &
pid=$!
for _ in $(seq 100); do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$admin_port/ready', timeout=1)" 2>/dev/null; then
    break
  fi
  kill -0 "$pid" 2>/dev/null || { cat "$work/out.log" >&2; echo "larder exited as user 65532" >&2; exit 1; }
  sleep 0.1
done
python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$admin_port/ready', timeout=1)" \
  || { cat "$work/out.log" >&2; echo "larder never became ready as user 65532" >&2; exit 1; }
[ "$(ps -o uid= -p "$pid" | tr -d " ")" = 65532 ] || { echo "larder does not run as 65532" >&2; exit 1; }
kill -TERM "$pid"
wait "$pid" || { rc=$?; cat "$work/out.log" >&2; echo "larder exited $rc after SIGTERM" >&2; exit 1; }
pid=
echo "ok: ready as 65532, drained and exited 0"
