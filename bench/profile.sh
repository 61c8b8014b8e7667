#!/usr/bin/env bash
# Profiles Larder alone on one load scenario, the way BENCHMARKS.md's gap analysis was made:
#
#   bench/profile.sh perf hit|hit-browser|hit16k|hit256k|pass|fill  # perf (cpu-clock): user/kernel split, top symbols
#     (fill: 16 KiB misses into 1 GiB; fill1k: 1 KiB misses; budget: 1 KiB misses into 16 MiB,
#     each one evicting; every tool takes these three)
#   bench/profile.sh callgrind hit|hit-browser|pass|h2c  # valgrind: instructions per request, top functions
#                                                   # (inclusive, then self cost: bench/callgrind_self.py)
#   bench/profile.sh syscalls hit|pass              # strace: system calls per request, by name
#   bench/profile.sh stat hit|pass                  # perf stat: CPU time and context switches per request
#
# Same origin (nginx, one worker) and Larder config as bench/run.sh, on free loopback ports,
# load from `wrk -t1` (h2c: `h2load -m10`, HTTP/2 hits). Needs nginx, wrk, curl, h2load for h2c,
# and perf or valgrind (Debian: nginx wrk curl nghttp2-client linux-perf valgrind); uses target/release/larder (or $LARDER_BIN). Every process it starts is
# stopped on exit. PROFILE_SECONDS (default 5) bounds the measured load; PROFILE_OUT=DIR keeps the
# raw profile (perf.data, callgrind.out) there for perf report / callgrind_annotate;
# PROFILE_CONNECTIONS (default 50) sets wrk's connections (hit, hit16k, hit256k, pass);
# PROFILE_CALLGRAPH=1 makes perf record call chains (read them with perf report -g from PROFILE_OUT);
# PROFILE_CALLGRIND_OPTS adds callgrind options ("--cache-sim=yes --branch-sim=yes": cache misses).
# PROFILE_PROXY=haproxy profiles HAProxy instead (bench/run.sh's cache config): the peer's counts
# taken the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/haproxy_cfg.sh
source bench/haproxy_cfg.sh

tool=${1:?usage: bench/profile.sh perf|callgrind|syscalls|stat hit|hit-browser|hit16k|hit256k|h2c|pass|fill|fill1k|budget}
scenario=${2:?usage: bench/profile.sh perf|callgrind|syscalls|stat hit|hit-browser|hit16k|hit256k|h2c|pass|fill|fill1k|budget}
seconds=${PROFILE_SECONDS:-5}
connections=${PROFILE_CONNECTIONS:-50}
LARDER_BIN=${LARDER_BIN:-target/release/larder}
[[ ${PROFILE_PROXY:-larder} != larder || -x $LARDER_BIN ]] ||
  { echo "no $LARDER_BIN: run cargo build --release first" >&2; exit 1; }
for tool_bin in nginx wrk curl; do
  command -v "$tool_bin" >/dev/null || { echo "needs $tool_bin" >&2; exit 1; }
done
case $tool in
  perf) command -v perf >/dev/null || { echo "needs perf (linux-perf)" >&2; exit 1; } ;;
  callgrind) command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 1; } ;;
  syscalls) command -v strace >/dev/null || { echo "needs strace" >&2; exit 1; } ;;
  stat) command -v perf >/dev/null || { echo "needs perf (linux-perf)" >&2; exit 1; } ;;
  *) echo "unknown tool $tool" >&2; exit 1 ;;
esac

WORK=$(mktemp -d /tmp/larder-profile.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -n ${PROFILE_OUT:-} ]]; then
    mkdir -p "$PROFILE_OUT"
    cp "$WORK"/perf.data "$WORK"/callgrind.out* "$PROFILE_OUT"/ 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_for() {
  for _ in $(seq 1 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "nothing answers at $1" >&2
  exit 1
}

ORIGIN_PORT=$(free_port); PROXY_PORT=$(free_port); ADMIN_PORT=$(free_port)
mkdir -p "$WORK/www/obj" "$WORK/www/pass" "$WORK/tmp"
head -c 1024 /dev/urandom >"$WORK/www/obj/1k"
head -c 16384 /dev/urandom >"$WORK/www/obj/16k"
head -c 262144 /dev/urandom >"$WORK/www/obj/256k"
head -c 1024 /dev/urandom >"$WORK/www/pass/1k"
user_line=""; [[ $(id -u) -eq 0 ]] && user_line="user root;"
cat >"$WORK/nginx.conf" <<EOF
$user_line
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  default_type application/octet-stream;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/tmp/body;
  proxy_temp_path $WORK/tmp/proxy;
  fastcgi_temp_path $WORK/tmp/fastcgi;
  uwsgi_temp_path $WORK/tmp/uwsgi;
  scgi_temp_path $WORK/tmp/scgi;
  server {
    listen 127.0.0.1:$ORIGIN_PORT;
    root $WORK/www;
    location /obj/ { add_header Cache-Control "max-age=3600"; }
    location /pass/ { add_header Cache-Control "no-store"; }
    location ~ ^/k16/[0-9]+\$ { add_header Cache-Control "max-age=3600"; try_files /obj/16k =404; }
    location ~ ^/k1/[0-9]+\$ { add_header Cache-Control "max-age=3600"; try_files /obj/1k =404; }
  }
}
EOF
nginx -p "$WORK" -e "$WORK/error.log" -c "$WORK/nginx.conf" >/dev/null 2>&1 &
PIDS+=($!)
# budget: like bench/run.sh's budget-64mib, 1 KiB objects into a small cache that the warm-up
# load fills (16 MiB; 2 MiB under callgrind, which runs ~50 times slower), so every measured
# fill also evicts.
cache_mib=1024
max_object_size=8MiB max_object_bytes=8388608
if [[ $scenario == budget ]]; then
  cache_mib=16 max_object_size=1MiB max_object_bytes=1048576
  [[ $tool == callgrind ]] && cache_mib=2 max_object_size=256KiB max_object_bytes=262144
fi
cat >"$WORK/larder.yaml" <<EOF
listeners:
  - address: 127.0.0.1:$PROXY_PORT
admin:
  address: 127.0.0.1:$ADMIN_PORT
access_log: { enabled: false }
virtual_hosts:
  - name: bench
    domains: ["*"]
    routes:
      - match: { prefix: "/" }
        cluster: origin
clusters:
  - name: origin
    endpoints: ["127.0.0.1:$ORIGIN_PORT"]
    max_idle_connections: 64
cache:
  cache_size: ${cache_mib}MiB
resource_types:
  - name: default
    config:
      cache_size: ${cache_mib}MiB
      max_object_size: ${max_object_size}
EOF
wait_for "http://127.0.0.1:$ORIGIN_PORT/obj/1k"

# PROFILE_PROXY=haproxy profiles HAProxy (bench/run.sh's cache config, one process, its
# default threads) in Larder's place: a peer's numbers taken the same way.
proxy_cmd=("$LARDER_BIN" --config "$WORK/larder.yaml")
if [[ ${PROFILE_PROXY:-larder} == haproxy ]]; then
  command -v haproxy >/dev/null || { echo "needs haproxy" >&2; exit 1; }
  write_haproxy_cfg "$WORK/haproxy.cfg" "$PROXY_PORT" "$ORIGIN_PORT" "$cache_mib" "$max_object_bytes"
  proxy_cmd=(haproxy -db -f "$WORK/haproxy.cfg")
elif [[ ${PROFILE_PROXY:-larder} != larder ]]; then
  echo "PROFILE_PROXY is larder or haproxy" >&2; exit 1
fi
case $tool in
  perf | syscalls | stat) "${proxy_cmd[@]}" >"$WORK/larder.log" 2>&1 & ;;
  callgrind)
    # PROFILE_CALLGRIND_OPTS: more callgrind options, say "--cache-sim=yes --branch-sim=yes".
    # shellcheck disable=SC2086
    valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" ${PROFILE_CALLGRIND_OPTS:-} \
      "${proxy_cmd[@]}" >"$WORK/larder.log" 2>&1 & ;;
esac
LARDER_PID=$!
PIDS+=("$LARDER_PID")
URL=http://127.0.0.1:$PROXY_PORT
case $scenario in
  hit | hit-browser) path=/obj/1k ;;
  hit16k) path=/obj/16k ;;
  hit256k) path=/obj/256k ;;
  h2c)
    command -v h2load >/dev/null || { echo "needs h2load (nghttp2-client)" >&2; exit 1; }
    path=/obj/1k ;;
  pass) path=/pass/1k ;;
  fill) path=/k16/0 ;;
  fill1k | budget) path=/k1/0 ;;
  *) echo "unknown scenario $scenario" >&2; exit 1 ;;
esac
wait_for "$URL$path"

load() { # load SECONDS: prints wrk's output
  if [[ $scenario == h2c ]]; then
    # The same shape as bench/run.sh's h2c scenario; prints wrk's "N requests in" line.
    h2load -c"$connections" -m"${PROFILE_STREAMS:-10}" -D "$1" "$URL$path" | awk '/^requests:/ { print $8, "requests in" }'
  elif [[ $scenario == fill || $scenario == fill1k || $scenario == budget ]]; then
    # Every load starts past the keys of the loads before it (loads run in subshells: the
    # count lives in a file), so each request is a miss.
    local first; first=$(($(cat "$WORK/next_key" 2>/dev/null || echo 0) + 10000000))
    echo "$first" >"$WORK/next_key"
    FILL_PREFIX=${path%0} FILL_FIRST=$first FILL_COUNT=10000000 \
      wrk -t1 -c16 -d"${1}s" -s bench/lua/fill.lua "$URL"
  elif [[ $scenario == hit-browser ]]; then
    # 1 KiB hits for requests with a browser's dozen fields (bench/lua/browser.lua).
    wrk -t1 -c"$connections" -d"${1}s" -s bench/lua/browser.lua "$URL$path"
  else
    wrk -t1 -c"$connections" -d"${1}s" "$URL$path"
  fi
}
requests() { awk '/requests in/ {print $1}'; }
no_requests_is_an_error() {
  [[ ${n:-0} -gt 0 ]] || { echo "no request completed under load: see $WORK/larder.log" >&2; exit 1; }
}
# traced TRACER ARGS...: the tracer attached to Larder around one measured load, stopped with
# SIGINT (so it prints its totals); sets n, the requests served meanwhile.
traced() {
  load 1 >/dev/null
  "$@" &
  local tracer=$!
  sleep 0.5
  n=$(load "$seconds" | requests)
  kill -INT "$tracer"
  wait "$tracer" 2>/dev/null || true
  no_requests_is_an_error
}

case $tool in
  perf)
    load 1 >/dev/null
    load "$seconds" >"$WORK/wrk.txt" &
    wrk_pid=$!
    perf record -q -e cpu-clock -F 2999 ${PROFILE_CALLGRAPH:+-g} -p "$LARDER_PID" -o "$WORK/perf.data" -- sleep "$seconds" \
      2>/dev/null || true
    wait "$wrk_pid"
    echo "== $scenario: $(requests <"$WORK/wrk.txt") requests in ${seconds}s"
    perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -v '^#' | grep . | head -5
    perf report -i "$WORK/perf.data" --no-children --sort sym --stdio 2>/dev/null | grep -v '^#' | grep . | head -40
    ;;
  callgrind)
    # Under valgrind the proxy runs ~50 times slower: fewer connections, the same paths.
    load 2 >/dev/null
    callgrind_control -z "$LARDER_PID" >/dev/null
    n=$(load "$seconds" | requests)
    callgrind_control -d "$LARDER_PID" >/dev/null
    no_requests_is_an_error
    sleep 1
    out=$(ls -t "$WORK"/callgrind.out* | head -1)
    total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "== $scenario: $n requests, $((total / n)) instructions per request"
    callgrind_annotate --inclusive=yes "$out" 2>/dev/null | awk -v n="$n" '
      /^ *[0-9,]+ \(/ { x = $1; gsub(",", "", x); if (x / n >= 300) printf "%8d  %s\n", x / n, substr($0, index($0, $3)) }' |
      sed 's|/root/.cargo/registry/src/[^/]*/||; s|/rustc/[0-9a-f]*/library/||' | cut -c1-180 | head -60
    python3 bench/callgrind_self.py "$out" "$n" 40
    ;;
  stat)
    traced perf stat -x, -e task-clock,context-switches,cpu-migrations,page-faults -p "$LARDER_PID" -o "$WORK/stat.txt"
    echo "== $scenario: $n requests in ${seconds}s; per request:"
    awk -F, -v n="$n" '$3 == "task-clock" { printf "%8.2f  us of CPU\n", $1 * 1000 / n }
      $3 ~ /context-switches|cpu-migrations|page-faults/ { printf "%8.3f  %s\n", $1 / n, $3 }' "$WORK/stat.txt"
    ;;
  syscalls)
    # strace slows every call down; the counts per request are what matter, not the rate.
    traced strace -c -f -p "$LARDER_PID" -o "$WORK/strace.txt"
    echo "== $scenario: $n requests; system calls per request"
    awk -v n="$n" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" {
        printf "%8.3f  %s%s\n", $4 / n, $NF, ($5 ~ /^[0-9]+$/ ? "  (" $5 " errors)" : "") }' \
      "$WORK/strace.txt" | sort -rn | head -20
    ;;
esac
