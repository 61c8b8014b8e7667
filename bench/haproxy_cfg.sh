# Sourced by bench/run.sh and bench/profile.sh: HAProxy's cache configuration, the one both
# measure it with.
#
# write_haproxy_cfg FILE PORT ORIGIN_PORT CACHE_MIB [MAX_OBJECT_BYTES]  (8 MiB by default; HAProxy
# refuses an object size above half the cache)
write_haproxy_cfg() {
  cat >"$1" <<EOF
global
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
cache bench
  total-max-size $4
  max-object-size ${5:-8388608}
  max-age 3600
frontend fe
  bind 127.0.0.1:$2
  default_backend origin
backend origin
  http-request cache-use bench
  http-response cache-store bench
  server origin 127.0.0.1:$3
EOF
}
