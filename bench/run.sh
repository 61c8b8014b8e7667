#!/usr/bin/env bash
# Larder benchmark harness: Larder against nginx proxy_cache, Varnish and HAProxy's cache, all in
# front of one nginx origin on loopback. One command on a fresh Debian 12 machine (as root it
# installs wrk, h2load, nginx, varnish and haproxy from Debian). See BENCHMARKS.md.
#
#   bench/run.sh
#   BENCH_DURATION=2s BENCH_REPEATS=1 BENCH_SCENARIOS="hit-1k pass" bench/run.sh
#
# Every server binds 127.0.0.1 only, on ports checked free at start-up, and everything this script
# starts is stopped when it exits. Results: bench/results/latest.md and latest.json.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source=bench/haproxy_cfg.sh
source "$BENCH_DIR/haproxy_cfg.sh"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# Short runs, many rounds: the machine's speed swings within seconds, and pairs of runs close in
# time cancel it (BENCHMARKS.md, Method).
DURATION=${BENCH_DURATION:-1s}
REPEATS=${BENCH_REPEATS:-11}
# The fills take tens of seconds each and vary less.
FILL_REPEATS=${BENCH_FILL_REPEATS:-3}
PROXIES=${BENCH_PROXIES:-larder nginx varnish haproxy static}
SCENARIOS=${BENCH_SCENARIOS:-all}
LARDER_BIN=${LARDER_BIN:-$REPO_DIR/target/release/larder}
# Proxy id `larder-base`: another Larder build (say, the commit before a change), same config,
# for an A/B interleaved in one run.
LARDER_BASE_BIN=${LARDER_BASE_BIN:-}
LARDER_ACCESS_LOG=${BENCH_LARDER_ACCESS_LOG:-0}
CACHE_MIB=${BENCH_CACHE_MIB:-1024}
BUDGET_MIB=${BENCH_BUDGET_MIB:-64}
KEYS=${BENCH_KEYS:-10000}
FILL_KEYS=${BENCH_FILL_KEYS:-10000}
BUDGET_KEYS=${BENCH_BUDGET_KEYS:-200000}
BUDGET_SAMPLE=${BENCH_BUDGET_SAMPLE:-20000}
BUDGET_OBJ=${BENCH_BUDGET_OBJ:-1k}
H2_CONNS=${BENCH_H2_CONNS:-50}
H2_STREAMS=${BENCH_H2_STREAMS:-10}
FILL_CONNS=${BENCH_FILL_CONNS:-16}
FILL_TIMEOUT=${BENCH_FILL_TIMEOUT:-300}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$BENCH_DIR/results}
KEEP_WORK=${BENCH_KEEP_WORK:-0}
# CPU lists (taskset syntax, "0" or "0,1"): the proxy on some cores, the load generator and the
# origin on others, so each proxy has the same cores to itself and nothing it does not run.
PROXY_CPUS=${BENCH_PROXY_CPUS:-}
LOAD_CPUS=${BENCH_LOAD_CPUS:-}

# Scenario id, tool, path, connections. Ids select: BENCH_SCENARIOS="hit-1k pass" runs every id
# equal to or starting with "hit-1k-" or "pass-"; "all" runs everything.
THROUGHPUT_SCENARIOS=(
  "hit-1k-c50 wrk /obj/1k 50"
  "hit-1k-c200 wrk /obj/1k 200"
  "hit-16k-c50 wrk /obj/16k 50"
  "hit-16k-c200 wrk /obj/16k 200"
  "hit-256k-c50 wrk /obj/256k 50"
  "hit-256k-c200 wrk /obj/256k 200"
  "keys10k-c50 wrk-keys /k1/ 50"
  "browser-1k-c50 wrk-browser /obj/1k 50"
  "h2c-1k-c50 h2load /obj/1k $H2_CONNS"
  "pass-1k-c50 wrk /pass/1k 50"
)
FILL_SCENARIO=fill-16k
BUDGET_SCENARIO=budget-64mib

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# wrk's duration syntax (10s, 1m, 2h, or bare seconds) to whole seconds, for h2load and timeouts.
duration_secs() {
  local d=$1
  case $d in
    *h) echo $((${d%h} * 3600)) ;;
    *m) echo $((${d%m} * 60)) ;;
    *s) echo "${d%s}" ;;
    *) echo "$d" ;;
  esac
}

DSECS=$(duration_secs "$DURATION")
is_uint "$DSECS" && ((DSECS > 0)) || die "BENCH_DURATION must be like 10s, 1m or 30 (got '$DURATION')"
for v in REPEATS FILL_REPEATS CACHE_MIB BUDGET_MIB KEYS FILL_KEYS BUDGET_KEYS BUDGET_SAMPLE H2_CONNS H2_STREAMS FILL_CONNS FILL_TIMEOUT; do
  is_uint "${!v}" && ((${!v} > 0)) || die "$v must be a positive integer (got '${!v}')"
done
case $BUDGET_OBJ in 1k | 16k) ;; *) die "BENCH_BUDGET_OBJ must be 1k or 16k" ;; esac
PROXY_PIN=() LOAD_PIN=()
for cpus in "$PROXY_CPUS" "$LOAD_CPUS"; do
  [[ -z $cpus || $cpus =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]] ||
    die "BENCH_PROXY_CPUS and BENCH_LOAD_CPUS are CPU lists like 0 or 0-1,3 (got '$cpus')"
done
if [[ -n $PROXY_CPUS || -n $LOAD_CPUS ]]; then
  [[ -n $PROXY_CPUS && -n $LOAD_CPUS ]] || die "set both BENCH_PROXY_CPUS and BENCH_LOAD_CPUS, or neither"
  command -v taskset >/dev/null || die "pinning needs taskset (util-linux)"
  PROXY_PIN=(taskset -c "$PROXY_CPUS")
  LOAD_PIN=(taskset -c "$LOAD_CPUS")
fi
# nginx's `worker_processes auto` counts the machine's CPUs, not the ones it may run on.
PROXY_WORKERS=auto
# (nproc counts the CPUs it may run on.)
[[ -n $PROXY_CPUS ]] && PROXY_WORKERS=$("${PROXY_PIN[@]}" nproc)
for p in $PROXIES; do
  case $p in larder | larder-threads | larder-prealloc | larder-base | nginx | varnish | haproxy | static) ;; *) die "unknown proxy '$p' in BENCH_PROXIES" ;; esac
done

selected() {
  local id=$1 tok
  for tok in $SCENARIOS; do
    [[ $tok == all || $id == "$tok" || $id == "$tok"-* ]] && return 0
  done
  return 1
}

wants_proxy() { [[ " $PROXIES " == *" $1 "* ]]; }
# The proxies in the order round $1 runs them: the list rotated by one per round.
rotated() {
  local -a list
  read -r -a list <<<"$PROXIES"
  local n=${#list[@]} i
  for ((i = 0; i < n; i++)); do
    printf '%s ' "${list[(i + $1 - 1) % n]}"
  done
}

# --- dependencies ---------------------------------------------------------------------------
install_deps() {
  local missing=() cmd pkg
  local pairs=("wrk:wrk" "h2load:nghttp2-client" "nginx:nginx" "curl:curl" "python3:python3")
  wants_proxy varnish && pairs+=("varnishd:varnish")
  wants_proxy haproxy && pairs+=("haproxy:haproxy")
  for pair in "${pairs[@]}"; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}: run as root, or apt-get install -y ${missing[*]}"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get (this harness expects Debian)"
  log "installing from Debian: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# --- processes --------------------------------------------------------------------------------
STARTED=() # root pids of everything we started, stopped by the exit trap
declare -A RUNNING=()      # proxy name -> "pid url h2-url nginx-cache-dir|-"
declare -A LARDER_PORTS=() # Larder variant -> "listener-port admin-port"

# The pid and all its descendants (nginx workers, varnish's cache process, …), root first.
tree_pids() {
  local root=$1 f line pid rest ppid p c
  local -a fields queue found
  local -A kids=()
  for f in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null <"$f" || continue
    pid=${line%% *}
    rest=${line##*) }
    read -ra fields <<<"$rest"
    ppid=${fields[1]}
    kids[$ppid]+=" $pid"
  done
  queue=("$root")
  found=()
  while ((${#queue[@]})); do
    p=${queue[0]}
    queue=("${queue[@]:1}")
    [[ -e /proc/$p/stat ]] || continue
    found+=("$p")
    for c in ${kids[$p]:-}; do queue+=("$c"); done
  done
  echo "${found[@]}"
}

# "TOTAL USER": utime + stime, and utime alone (clock ticks), summed over the process tree.
cpu_ticks() {
  local total=0 user=0 p line rest
  local -a fields
  for p in $(tree_pids "$1"); do
    read -r line 2>/dev/null <"/proc/$p/stat" || continue
    rest=${line##*) }
    read -ra fields <<<"$rest"
    total=$((total + fields[11] + fields[12]))
    user=$((user + fields[11]))
  done
  echo "$total $user"
}

# "RSS_KIB PSS_KIB" summed over the tree. PSS counts pages shared between the processes (nginx's
# shared zones, text) once, so it is the fair total for multi-process servers.
mem_kib() {
  local pids files_s=() files_r=() p
  pids=$(tree_pids "$1")
  for p in $pids; do
    files_s+=("/proc/$p/status")
    [[ -r /proc/$p/smaps_rollup ]] && files_r+=("/proc/$p/smaps_rollup")
  done
  local rss pss
  rss=$(awk '/^VmRSS:/ {s += $2} END {print s + 0}' "${files_s[@]}" 2>/dev/null || echo 0)
  if ((${#files_r[@]})); then
    pss=$(awk '/^Pss:/ {s += $2} END {print s + 0}' "${files_r[@]}" 2>/dev/null || echo 0)
  else
    pss=$rss
  fi
  echo "$rss $pss"
}

stop_tree() {
  local root=$1 pids i
  pids=$(tree_pids "$root")
  [[ -n $pids ]] || return 0
  kill -TERM "$root" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    local alive=0 p
    for p in $pids; do [[ -e /proc/$p/stat ]] && kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
  wait "$root" 2>/dev/null || true
}

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_tree "${STARTED[i]}"; done
  if [[ -n ${SHM:-} && -d $SHM ]]; then rm -rf "$SHM"; fi
  if [[ -n ${WORK:-} && -d $WORK ]]; then
    if [[ $KEEP_WORK == 1 ]]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
  fi
  exit "$rc"
}

# Picks N ports in 20000-32000 (below Linux's ephemeral range, so no client socket takes them
# between proxy restarts) that nothing is bound to.
pick_ports() {
  python3 - "$1" <<'EOF'
import random, socket, sys
n, ports, p = int(sys.argv[1]), [], random.randrange(20000, 30000)
while len(ports) < n and p < 32000:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", p))
        ports.append(p)
    except OSError:
        pass
    finally:
        s.close()
    p += 1
if len(ports) < n:
    sys.exit("no free ports")
print(" ".join(map(str, ports)))
EOF
}

wait_port() {
  local port=$1 pid=$2 what=$3 i
  for ((i = 0; i < 300; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    kill -0 "$pid" 2>/dev/null || die "$what exited during start-up (see its log under $WORK)"
    sleep 0.1
  done
  die "$what did not listen on 127.0.0.1:$port within 30s"
}

# --- origin -----------------------------------------------------------------------------------
NGINX_USER_LINE=""
[[ $(id -u) -eq 0 ]] && NGINX_USER_LINE="user root;"

nginx_temp_paths() {
  local d=$1
  mkdir -p "$d/tmp"
  cat <<EOF
  client_body_temp_path $d/tmp/body;
  proxy_temp_path $d/tmp/proxy;
  fastcgi_temp_path $d/tmp/fastcgi;
  uwsgi_temp_path $d/tmp/uwsgi;
  scgi_temp_path $d/tmp/scgi;
EOF
}

# nginx_head DIR WORKERS CONNECTIONS SENDFILE: what every nginx config here starts with, up to
# inside its http block (no log, long keep-alive, temp paths in DIR).
nginx_head() {
  local d=$1
  cat <<EOF
$NGINX_USER_LINE
worker_processes $2;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections $3; }
http {
  access_log off;
  default_type application/octet-stream;
  sendfile $4;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
$(nginx_temp_paths "$d")
EOF
}

# What the origin serves, and how long it may be cached (the static ceiling serves the same).
origin_locations() {
  cat <<'EOF'
    location /obj/ { add_header Cache-Control "max-age=3600"; }
    location /pass/ { add_header Cache-Control "no-store"; }
    # Any /k1/<n> or /k16/<n> is the 1 KiB or 16 KiB file: distinct keys without distinct files.
    location ~ ^/k1/[0-9]+$ { add_header Cache-Control "max-age=3600"; try_files /obj/1k =404; }
    location ~ ^/k16/[0-9]+$ { add_header Cache-Control "max-age=3600"; try_files /obj/16k =404; }
EOF
}

# run_nginx DIR WHAT: checks DIR/nginx.conf, then starts nginx on it; sets PROXY_PID.
run_nginx() {
  local d=$1
  nginx -t -q -p "$d" -e "$d/error.log" -c "$d/nginx.conf" 2>"$d/test.log" ||
    die "$2 config rejected: $(cat "$d/test.log")"
  "${PROXY_PIN[@]}" nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf" >"$d/stdout.log" 2>&1 &
  PROXY_PID=$!
}

start_origin() {
  local d=$WORK/origin
  mkdir -p "$d/www/obj" "$d/www/pass"
  head -c 1024 /dev/urandom >"$d/www/obj/1k"
  head -c 16384 /dev/urandom >"$d/www/obj/16k"
  head -c 262144 /dev/urandom >"$d/www/obj/256k"
  head -c 1024 /dev/urandom >"$d/www/pass/1k"
  cat >"$d/nginx.conf" <<EOF
$(nginx_head "$d" 1 4096 on)
  open_file_cache max=64;
  open_file_cache_valid 600s;
  server {
    listen 127.0.0.1:$ORIGIN_PORT;
    root $d/www;
$(origin_locations)
    location = /_status { stub_status; }
  }
}
EOF
  nginx -t -q -p "$d" -e "$d/error.log" -c "$d/nginx.conf" || die "origin nginx config rejected"
  "${LOAD_PIN[@]}" nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf" >"$d/stdout.log" 2>&1 &
  ORIGIN_PID=$!
  STARTED+=("$ORIGIN_PID")
  wait_port "$ORIGIN_PORT" "$ORIGIN_PID" "origin nginx"
  log "origin: nginx on 127.0.0.1:$ORIGIN_PORT (pid $ORIGIN_PID)"
}

# The origin's request counter (stub_status; it counts the status request itself, so two
# readings with nothing in between differ by 1: see origin_delta).
origin_requests() {
  curl -sf --max-time 5 "http://127.0.0.1:$ORIGIN_PORT/_status" | awk 'NR == 3 {print $3}'
}

origin_delta() { echo $(($2 - $1 - 1)); }

# --- proxies ----------------------------------------------------------------------------------
# start_proxy NAME CACHE_MIB: a fresh process with an empty cache of that size. Sets PROXY_PID,
# PROXY_URL (HTTP/1.1) and PROXY_H2_URL (h2c prior knowledge).
start_proxy() {
  local name=$1 mib=$2 d=$WORK/$1
  rm -rf "$d"
  mkdir -p "$d"
  NGINX_CACHE_DIR=""
  # Each Larder variant on its own ports (start_larder reads these): a round runs them all at
  # once.
  local lp=${LARDER_PORTS[$name]:-}
  [[ -z $lp ]] || read -r LARDER_PORT LARDER_ADMIN_PORT <<<"$lp"
  case $name in
    larder) start_larder "$d" "$mib" ;;
    # The same binary and config with connection threads (LARDER_CONNECTION_THREADS=auto).
    larder-threads) start_larder "$d" "$mib" auto ;;
    larder-prealloc) PREALLOCATE=true start_larder "$d" "$mib" ;;
    larder-base) LARDER_BIN=$LARDER_BASE_BIN start_larder "$d" "$mib" ;;
    nginx) start_nginx "$d" "$mib" ;;
    varnish) start_varnish "$d" "$mib" ;;
    haproxy) start_haproxy "$d" "$mib" ;;
    static) start_static "$d" ;;
  esac
  STARTED+=("$PROXY_PID")
  wait_port "$PROXY_PORT" "$PROXY_PID" "$name"
  [[ $PROXY_H2_PORT == "$PROXY_PORT" ]] || wait_port "$PROXY_H2_PORT" "$PROXY_PID" "$name (h2c)"
  PROXY_URL="http://127.0.0.1:$PROXY_PORT"
  PROXY_H2_URL="http://127.0.0.1:$PROXY_H2_PORT"
  RUNNING[$name]="$PROXY_PID $PROXY_URL $PROXY_H2_URL ${NGINX_CACHE_DIR:--}"
  sleep 0.5
}

# use_proxy NAME: makes a proxy started earlier (and still running) the one measured next.
use_proxy() {
  read -r PROXY_PID PROXY_URL PROXY_H2_URL NGINX_CACHE_DIR <<<"${RUNNING[$1]}"
  [[ $NGINX_CACHE_DIR == - ]] && NGINX_CACHE_DIR=""
  return 0
}

# stop_proxy NAME: stops it (the one measured last, for a fill round).
stop_proxy() {
  use_proxy "$1"
  stop_tree "$PROXY_PID"
  local keep=() p
  for p in "${STARTED[@]}"; do [[ $p == "$PROXY_PID" ]] || keep+=("$p"); done
  STARTED=("${keep[@]}")
  if [[ -n $NGINX_CACHE_DIR ]]; then rm -rf "$NGINX_CACHE_DIR"; fi
  unset "RUNNING[$1]"
}

start_larder() {
  local d=$1 mib=$2 threads=${3:-} access="enabled: false"
  if [[ $LARDER_ACCESS_LOG != 0 ]]; then access="{ enabled: true, output: $d/access.log }"; fi
  [[ $access == "enabled: false" ]] && access="{ enabled: false }"
  cat >"$d/larder.yaml" <<EOF
listeners:
  - address: 127.0.0.1:$LARDER_PORT
admin:
  address: 127.0.0.1:$LARDER_ADMIN_PORT
access_log: $access
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
  cache_size: ${mib}MiB${PREALLOCATE:+
  preallocate: $PREALLOCATE}
resource_types:
  - name: default
    config:
      cache_size: ${mib}MiB
      max_object_size: 8MiB
EOF
  "$LARDER_BIN" validate --config "$d/larder.yaml" >"$d/validate.log" 2>&1 ||
    die "larder rejected its config: $(cat "$d/validate.log")"
  if [[ -n $threads ]]; then
    LARDER_CONNECTION_THREADS=$threads RUST_LOG=${RUST_LOG:-warn} "${PROXY_PIN[@]}" "$LARDER_BIN" --config "$d/larder.yaml" \
      >"$d/stdout.log" 2>"$d/stderr.log" &
  else
    "${PROXY_PIN[@]}" env -u LARDER_CONNECTION_THREADS RUST_LOG="${RUST_LOG:-warn}" "$LARDER_BIN" --config "$d/larder.yaml" \
      >"$d/stdout.log" 2>"$d/stderr.log" &
  fi
  PROXY_PID=$!
  PROXY_PORT=$LARDER_PORT
  PROXY_H2_PORT=$LARDER_PORT
}

start_nginx() {
  local d=$1 mib=$2
  NGINX_CACHE_DIR=$SHM/nginx-cache
  rm -rf "$NGINX_CACHE_DIR"
  mkdir -p "$NGINX_CACHE_DIR"
  # Debian 12 ships nginx 1.22: h2c needs its own `listen … http2` (prior knowledge only).
  cat >"$d/nginx.conf" <<EOF
$(nginx_head "$d" "$PROXY_WORKERS" 8192 on)
  # The cache lives in tmpfs ($SHM): memory, like the others, but outside the process's RSS.
  proxy_cache_path $NGINX_CACHE_DIR levels=1:2 keys_zone=bench:32m max_size=${mib}m inactive=1d use_temp_path=off;
  upstream origin {
    server 127.0.0.1:$ORIGIN_PORT;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    listen 127.0.0.1:$NGINX_H2_PORT http2;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_lock on;
      add_header X-Cache-Status \$upstream_cache_status;
    }
  }
}
EOF
  run_nginx "$d" "nginx proxy"
  PROXY_PORT=$NGINX_PORT
  PROXY_H2_PORT=$NGINX_H2_PORT
}

# The ceiling, not a cache: nginx serving the origin's files itself, with the same headers and
# all cores (the issue's "nginx static file" row). Throughput scenarios only: fills and budgets
# are skipped for it.
start_static() {
  local d=$1
  cat >"$d/nginx.conf" <<EOF
$(nginx_head "$d" "$PROXY_WORKERS" 8192 off)
  open_file_cache max=64;
  open_file_cache_valid 600s;
  server {
    listen 127.0.0.1:$STATIC_PORT;
    listen 127.0.0.1:$STATIC_H2_PORT http2;
    root $WORK/origin/www;
$(origin_locations)
  }
}
EOF
  run_nginx "$d" "static nginx"
  PROXY_PORT=$STATIC_PORT
  PROXY_H2_PORT=$STATIC_H2_PORT
}

start_varnish() {
  local d=$1 mib=$2
  # Foreground (-F) with its own working dir (-n): the system's varnish service is never used.
  # The builtin VCL caches what the origin marks cacheable and passes no-store (hit-for-miss).
  "${PROXY_PIN[@]}" varnishd -F -n "$d/n" -a "127.0.0.1:$VARNISH_PORT" -b "127.0.0.1:$ORIGIN_PORT" \
    -s "malloc,${mib}M" -p feature=+http2 -T none \
    >"$d/stdout.log" 2>"$d/stderr.log" &
  PROXY_PID=$!
  PROXY_PORT=$VARNISH_PORT
  PROXY_H2_PORT=$VARNISH_PORT
}

start_haproxy() {
  local d=$1 mib=$2
  write_haproxy_cfg "$d/haproxy.cfg" "$HAPROXY_PORT" "$ORIGIN_PORT" "$mib"
  haproxy -c -q -f "$d/haproxy.cfg" >"$d/check.log" 2>&1 ||
    die "haproxy config rejected: $(cat "$d/check.log")"
  "${PROXY_PIN[@]}" haproxy -db -f "$d/haproxy.cfg" >"$d/stdout.log" 2>"$d/stderr.log" &
  PROXY_PID=$!
  PROXY_PORT=$HAPROXY_PORT
  PROXY_H2_PORT=$HAPROXY_PORT
}

# --- load -------------------------------------------------------------------------------------
RUN_SEQ=0
new_out() {
  RUN_SEQ=$((RUN_SEQ + 1))
  printf '%s/runs/%04d-%s-%s-r%s' "$WORK" "$RUN_SEQ" "$1" "$2" "$3"
}

# Requests each path a few times in sequence so the measured runs are hits; warns when the last
# request still reached the origin (nothing was stored).
warm() {
  local proxy=$1 path before after i
  shift
  for path in "$@"; do
    for i in 1 2 3; do curl -s -o /dev/null --max-time 10 "$PROXY_URL$path" || true; done
    before=$(origin_requests)
    curl -s -o /dev/null --max-time 10 "$PROXY_URL$path" || true
    after=$(origin_requests)
    ((after == before + 1)) || log "WARNING: $proxy did not serve $path from cache after warm-up"
  done
}

# fill PREFIX FIRST COUNT OUT: each key once over FILL_CONNS connections, bounded by FILL_TIMEOUT.
fill() {
  local prefix=$1 first=$2 count=$3 out=$4 conns=$FILL_CONNS wpid i
  local marker=$out.done deadline=$((SECONDS + FILL_TIMEOUT))
  ((conns > count)) && conns=$count
  rm -f "$marker"
  FILL_PREFIX=$prefix FILL_FIRST=$first FILL_COUNT=$count FILL_DONE=$marker \
    "${LOAD_PIN[@]}" wrk -t1 -c"$conns" -d"${FILL_TIMEOUT}s" --timeout 10s --latency \
    -s "$BENCH_DIR/lua/fill.lua" "$PROXY_URL/" >"$out" 2>&1 &
  wpid=$!
  # fill.lua creates the marker after the last key; SIGINT makes wrk report and exit then.
  while kill -0 "$wpid" 2>/dev/null; do
    if [[ -e $marker ]] || ((SECONDS >= deadline)); then
      kill -INT "$wpid" 2>/dev/null || true
      break
    fi
    sleep 0.05
  done
  for ((i = 0; i < 100; i++)); do kill -0 "$wpid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$wpid" 2>/dev/null || true
  wait "$wpid" 2>/dev/null || true
  [[ -e $marker ]] || log "WARNING: fill of $count keys at $prefix$first did not finish (see $out)"
  rm -f "$marker"
}

# One measured run of a throughput scenario against the running proxy; appends a JSON record.
measure() {
  local proxy=$1 rep=$2 id=$3 tool=$4 path=$5 conns=$6 out t0 t1 u0 u1 o0 o1 mem
  out=$(new_out "$id" "$proxy" "$rep")
  if [[ $tool == h2load ]]; then
    # Some caches key h2 requests apart from HTTP/1.1 ones (HAProxy's key includes the
    # authority): warm over h2c too, so the run measures hits.
    timeout 30 h2load -c1 -n3 -m1 "$PROXY_H2_URL$path" >/dev/null 2>&1 || true
  fi
  o0=$(origin_requests)
  read -r t0 u0 <<<"$(cpu_ticks "$PROXY_PID")"
  case $tool in
    wrk)
      timeout $((DSECS + 60)) "${LOAD_PIN[@]}" wrk -t1 -c"$conns" -d"$DURATION" --timeout 5s --latency \
        "$PROXY_URL$path" >"$out.txt" 2>&1 || log "WARNING: wrk failed for $id on $proxy"
      ;;
    wrk-keys)
      KEYS_PREFIX=$path KEYS_COUNT=$KEYS timeout $((DSECS + 60)) \
        "${LOAD_PIN[@]}" wrk -t1 -c"$conns" -d"$DURATION" --timeout 5s --latency -s "$BENCH_DIR/lua/random_keys.lua" \
        "$PROXY_URL/" >"$out.txt" 2>&1 || log "WARNING: wrk failed for $id on $proxy"
      ;;
    wrk-browser)
      timeout $((DSECS + 60)) "${LOAD_PIN[@]}" wrk -t1 -c"$conns" -d"$DURATION" --timeout 5s --latency \
        -s "$BENCH_DIR/lua/browser.lua" "$PROXY_URL$path" >"$out.txt" 2>&1 ||
        log "WARNING: wrk failed for $id on $proxy"
      ;;
    h2load)
      timeout $((DSECS + 60)) "${LOAD_PIN[@]}" h2load -t1 -c"$conns" -m"$H2_STREAMS" -D "$DSECS" \
        --log-file="$out.log" "$PROXY_H2_URL$path" >"$out.txt" 2>&1 ||
        log "WARNING: h2load failed for $id on $proxy"
      ;;
  esac
  read -r t1 u1 <<<"$(cpu_ticks "$PROXY_PID")"
  o1=$(origin_requests)
  mem=$(mem_kib "$PROXY_PID")
  printf '{"kind":"load","scenario":"%s","proxy":"%s","rep":%s,"tool":"%s","path":"%s","connections":%s,"cpu_ticks":%s,"user_ticks":%s,"clk_tck":%s,"origin_requests":%s,"rss_kib":%s,"pss_kib":%s,"output":"%s","latency_log":"%s"}\n' \
    "$id" "$proxy" "$rep" "$tool" "$path" "$conns" "$((t1 - t0))" "$((u1 - u0))" "$CLK_TCK" "$(origin_delta "$o0" "$o1")" \
    "${mem% *}" "${mem#* }" "$out.txt" "$([[ $tool == h2load ]] && echo "$out.log")" >>"$RUNS"
  log "  $id $proxy: $(grep -Eo '^Requests/sec: +[0-9.]+|finished in [^,]+, [0-9.]+ req/s' "$out.txt" | head -1 || echo 'no result')"
}

nginx_cache_kib() {
  # nginx's cache manager deletes files while du walks the tree: ignore those vanishing entries.
  if [[ -n $NGINX_CACHE_DIR && -d $NGINX_CACHE_DIR ]]; then
    { du -sk "$NGINX_CACHE_DIR" 2>/dev/null || true; } | cut -f1 | grep . || echo 0
  else
    echo 0
  fi
}

# One round of the load scenarios: every proxy started fresh and warmed, then each scenario
# run against each proxy in turn, so the runs compared sit seconds apart (the machine's speed
# swings within seconds: BENCHMARKS.md, Method). The proxies not under load stay idle.
throughput_round() {
  local rep=$1 order=$2 spec id tool path conns proxy
  local -A keys_filled=()
  for proxy in $order; do
    start_proxy "$proxy" "$CACHE_MIB"
    warm "$proxy" /obj/1k /obj/16k /obj/256k
  done
  for spec in "${THROUGHPUT_SCENARIOS[@]}"; do
    read -r id tool path conns <<<"$spec"
    selected "$id" || continue
    for proxy in $order; do
      use_proxy "$proxy"
      if [[ $tool == wrk-keys && -z ${keys_filled[$proxy]:-} ]]; then
        fill "$path" 0 "$KEYS" "$(new_out keys-prefill "$proxy" "$rep").txt"
        keys_filled[$proxy]=1
      fi
      measure "$proxy" "$rep" "$id" "$tool" "$path" "$conns"
    done
  done
  for proxy in $order; do stop_proxy "$proxy"; done
}

# 10,000 distinct 16 KiB objects into an empty 1 GiB cache: memory growth per payload byte.
fill_round() {
  local proxy=$1 rep=$2 out before after t0 t1 u0 u1 o0 o1 dir_kib
  start_proxy "$proxy" "$CACHE_MIB"
  out=$(new_out "$FILL_SCENARIO" "$proxy" "$rep")
  before=$(mem_kib "$PROXY_PID")
  o0=$(origin_requests)
  read -r t0 u0 <<<"$(cpu_ticks "$PROXY_PID")"
  fill /k16/ 0 "$FILL_KEYS" "$out.txt"
  sleep 1
  read -r t1 u1 <<<"$(cpu_ticks "$PROXY_PID")"
  o1=$(origin_requests)
  after=$(mem_kib "$PROXY_PID")
  dir_kib=$(nginx_cache_kib)
  printf '{"kind":"fill","scenario":"%s","proxy":"%s","rep":%s,"keys":%s,"object_bytes":16384,"payload_bytes":%s,"cpu_ticks":%s,"clk_tck":%s,"origin_requests":%s,"rss_before_kib":%s,"pss_before_kib":%s,"rss_kib":%s,"pss_kib":%s,"cache_dir_kib":%s,"output":"%s"}\n' \
    "$FILL_SCENARIO" "$proxy" "$rep" "$FILL_KEYS" "$((FILL_KEYS * 16384))" "$((t1 - t0))" "$CLK_TCK" \
    "$(origin_delta "$o0" "$o1")" "${before% *}" "${before#* }" "${after% *}" "${after#* }" "$dir_kib" "$out.txt" >>"$RUNS"
  log "  $FILL_SCENARIO $proxy: PSS ${before#* } -> ${after#* } KiB, cache dir ${dir_kib} KiB"
  stop_proxy "$proxy"
}

# 200,000 distinct keys into a 64 MiB cache, memory sampled every BUDGET_SAMPLE keys.
budget_round() {
  local proxy=$1 rep=$2 out before t0 t1 u0 u1 o0 o1 first=0 n mem samples="" prefix=/k1/ obj=1024
  [[ $BUDGET_OBJ == 16k ]] && prefix=/k16/ obj=16384
  start_proxy "$proxy" "$BUDGET_MIB"
  out=$(new_out "$BUDGET_SCENARIO" "$proxy" "$rep")
  before=$(mem_kib "$PROXY_PID")
  o0=$(origin_requests)
  read -r t0 u0 <<<"$(cpu_ticks "$PROXY_PID")"
  while ((first < BUDGET_KEYS)); do
    n=$((BUDGET_KEYS - first < BUDGET_SAMPLE ? BUDGET_KEYS - first : BUDGET_SAMPLE))
    fill "$prefix" "$first" "$n" "$out.$first.txt"
    first=$((first + n))
    mem=$(mem_kib "$PROXY_PID")
    samples+="${samples:+,}{\"keys\":$first,\"rss_kib\":${mem% *},\"pss_kib\":${mem#* },\"cache_dir_kib\":$(nginx_cache_kib)}"
  done
  sleep 1
  read -r t1 u1 <<<"$(cpu_ticks "$PROXY_PID")"
  o1=$(origin_requests)
  mem=$(mem_kib "$PROXY_PID")
  printf '{"kind":"budget","scenario":"%s","proxy":"%s","rep":%s,"keys":%s,"object_bytes":%s,"budget_bytes":%s,"cpu_ticks":%s,"clk_tck":%s,"origin_requests":%s,"rss_before_kib":%s,"pss_before_kib":%s,"rss_kib":%s,"pss_kib":%s,"cache_dir_kib":%s,"samples":[%s],"output_prefix":"%s"}\n' \
    "$BUDGET_SCENARIO" "$proxy" "$rep" "$BUDGET_KEYS" "$obj" "$((BUDGET_MIB * 1048576))" "$((t1 - t0))" \
    "$CLK_TCK" "$(origin_delta "$o0" "$o1")" "${before% *}" "${before#* }" "${mem% *}" "${mem#* }" "$(nginx_cache_kib)" \
    "$samples" "$out" >>"$RUNS"
  log "  $BUDGET_SCENARIO $proxy: PSS ${mem#* } KiB after $BUDGET_KEYS keys, cache dir $(nginx_cache_kib) KiB"
  stop_proxy "$proxy"
}

version_of() {
  case $1 in
    larder | larder-threads | larder-prealloc) "$LARDER_BIN" --version 2>&1 | head -1 ;;
    larder-base) echo "$("$LARDER_BASE_BIN" --version 2>&1 | head -1) ($LARDER_BASE_BIN)" ;;
    nginx | static) nginx -v 2>&1 | head -1 ;;
    varnish) varnishd -V 2>&1 | head -1 ;;
    haproxy) haproxy -v 2>&1 | head -1 ;;
    wrk) wrk -v 2>&1 | head -1 ;;
    h2load) h2load --version 2>&1 | head -1 ;;
  esac || true
}

# --- main -------------------------------------------------------------------------------------
main() {
  install_deps
  if wants_proxy larder || wants_proxy larder-threads || wants_proxy larder-prealloc; then
    [[ -x $LARDER_BIN ]] || die "no larder binary at $LARDER_BIN: run 'cargo build --release' or set LARDER_BIN"
  fi
  if wants_proxy larder-base; then
    [[ -n $LARDER_BASE_BIN && -x $LARDER_BASE_BIN ]] ||
      die "proxy larder-base needs LARDER_BASE_BIN, another larder binary (got '$LARDER_BASE_BIN')"
  fi
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  CLK_TCK=$(getconf CLK_TCK)

  WORK=$(mktemp -d /tmp/larder-bench.XXXXXX)
  SHM=$(mktemp -d /dev/shm/larder-bench.XXXXXX 2>/dev/null || mktemp -d /tmp/larder-bench-cache.XXXXXX)
  chmod 755 "$WORK" "$SHM"
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  mkdir -p "$WORK/runs" "$RESULTS_DIR"
  RUNS=$WORK/runs.jsonl
  : >"$RUNS"

  local -a lports
  read -r ORIGIN_PORT NGINX_PORT NGINX_H2_PORT VARNISH_PORT HAPROXY_PORT STATIC_PORT STATIC_H2_PORT \
    lports[0] lports[1] lports[2] lports[3] lports[4] lports[5] lports[6] lports[7] <<<"$(pick_ports 15)"
  # Listener and admin port of each Larder variant.
  LARDER_PORTS=([larder]="${lports[0]} ${lports[1]}" [larder-threads]="${lports[2]} ${lports[3]}"
    [larder-prealloc]="${lports[4]} ${lports[5]}" [larder-base]="${lports[6]} ${lports[7]}")
  start_origin

  local any_load=0 spec id rep proxy
  for spec in "${THROUGHPUT_SCENARIOS[@]}"; do
    read -r id _ <<<"$spec"
    selected "$id" && any_load=1
  done
  log "proxies: $PROXIES; scenarios: $SCENARIOS; duration $DURATION; repeats $REPEATS (fills $FILL_REPEATS)"
  # Interleaved: every round starts each proxy as a fresh process and runs each scenario
  # against each proxy in turn, the order rotated from round to round (A B C, B C A, C A B …):
  # no proxy always runs first. The fills run one proxy at a time, each from a fresh process.
  local rounds=$((REPEATS > FILL_REPEATS ? REPEATS : FILL_REPEATS))
  for ((rep = 1; rep <= rounds; rep++)); do
    local order
    order=$(rotated "$rep")
    if ((any_load && rep <= REPEATS)); then
      log "round $rep/$REPEATS: $order"
      throughput_round "$rep" "$order"
    fi
    ((rep <= FILL_REPEATS)) || continue
    if selected "$FILL_SCENARIO"; then
      for proxy in $order; do
        [[ $proxy == static ]] && continue
        log "round $rep/$FILL_REPEATS: $proxy $FILL_SCENARIO"
        fill_round "$proxy" "$rep"
      done
    fi
    if selected "$BUDGET_SCENARIO"; then
      for proxy in $order; do
        [[ $proxy == static ]] && continue
        log "round $rep/$FILL_REPEATS: $proxy $BUDGET_SCENARIO"
        budget_round "$proxy" "$rep"
      done
    fi
  done

  local versions="{" tool
  for tool in $PROXIES wrk h2load; do
    versions+="\"$tool\":\"$(version_of "$tool" | tr -d '"\\')\","
  done
  versions+="\"origin\":\"$(version_of nginx | tr -d '"\\')\"}"
  cat >"$WORK/meta.json" <<EOF
{"duration":"$DURATION","repeats":$REPEATS,"fill_repeats":$FILL_REPEATS,"proxies":"$PROXIES","scenarios":"$SCENARIOS",
 "cache_mib":$CACHE_MIB,"budget_mib":$BUDGET_MIB,"keys":$KEYS,"fill_keys":$FILL_KEYS,
 "budget_keys":$BUDGET_KEYS,"budget_sample":$BUDGET_SAMPLE,"budget_object":"$BUDGET_OBJ",
 "h2_connections":$H2_CONNS,"h2_streams":$H2_STREAMS,"larder_access_log":"$LARDER_ACCESS_LOG",
 "proxy_cpus":"$PROXY_CPUS","load_cpus":"$LOAD_CPUS",
 "cpus":$(nproc),"kernel":"$(uname -r)","date":"$(date -u +%Y-%m-%dT%H:%M:%SZ)","versions":$versions}
EOF
  python3 "$BENCH_DIR/report.py" "$RUNS" "$WORK/meta.json" "$RESULTS_DIR"
}

main "$@"
