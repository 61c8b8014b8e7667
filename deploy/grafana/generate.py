#!/usr/bin/env python3
"""Generates larder-dashboard.json (Grafana 10+, schema 39). Edit here, then run it:
    python3 deploy/grafana/generate.py
Every query works on Larder's raw metrics (no recording rules needed)."""
import json, os

SEL = 'job=~"$job", instance=~"$instance"'
ROW_H, W = 8, 12
panels, y = [], 0
pid = 0

def next_id():
    global pid
    pid += 1
    return pid

def ts(title, targets, unit="short", x=0, w=W, h=ROW_H, stack=False, desc=""):
    return {
        "id": next_id(), "type": "timeseries", "title": title, "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
            "stacking": {"mode": "normal" if stack else "none"}}}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}} for i, (e, l) in enumerate(targets)],
    }

def stat(title, expr, unit, x, w=6, thresholds=None, desc=""):
    steps = thresholds or [{"color": "green", "value": None}]
    return {
        "id": next_id(), "type": "stat", "title": title, "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": 4},
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
        "targets": [{"refId": "A", "expr": expr, "datasource": {"type": "prometheus", "uid": "${datasource}"}}],
    }

def row(title):
    global y
    panels.append({"id": next_id(), "type": "row", "title": title, "collapsed": False,
                   "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
    y += 1

HIT = 'result=~"hit|revalidated|coalesced|stale"'
# The requests the cache could have answered (bypasses are not cache traffic).
CACHEABLE = 'result!="bypass"'
row("Overview")
panels += [
    stat("Requests/s", f'sum(rate(larder_requests_total{{{SEL}}}[$__rate_interval]))', "reqps", 0),
    stat("Hit ratio", f'sum(rate(larder_cache_lookups_total{{{SEL}, {HIT}}}[$__rate_interval])) / sum(rate(larder_cache_lookups_total{{{SEL}, {CACHEABLE}}}[$__rate_interval]))',
         "percentunit", 6, thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 0.5}, {"color": "green", "value": 0.8}]),
    stat("5xx ratio", f'sum(rate(larder_requests_total{{{SEL}, status_class="5xx"}}[$__rate_interval])) / sum(rate(larder_requests_total{{{SEL}}}[$__rate_interval]))',
         "percentunit", 12, thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.01}, {"color": "red", "value": 0.05}]),
    stat("Open connections", f'sum(larder_active_connections{{{SEL}}})', "short", 18),
]
y += 4
row("Traffic")
panels += [
    ts("Requests by status class", [(f'sum by (status_class) (rate(larder_requests_total{{{SEL}}}[$__rate_interval]))', "{{status_class}}")], "reqps", 0, stack=True),
    ts("Requests by route", [(f'sum by (route) (rate(larder_requests_total{{{SEL}}}[$__rate_interval]))', "{{route}}")], "reqps", W),
]
y += ROW_H
panels += [
    ts("Latency (to the last body byte)", [
        (f'histogram_quantile({q}, sum by (le, source) (rate(larder_request_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))', f"p{int(q*100)} {{{{source}}}}")
        for q in (0.5, 0.95, 0.99)], "s", 0, desc="source=cache: served from the store; source=upstream: misses and passes."),
    ts("Bytes served, cache vs upstream", [(f'sum by (source) (rate(larder_response_body_bytes_total{{{SEL}}}[$__rate_interval]))', "{{source}}")], "Bps", W, stack=True),
]
y += ROW_H
row("Cache")
panels += [
    ts("Hit ratio per resource type", [(
        f'sum by (resource_type) (rate(larder_cache_lookups_total{{{SEL}, {HIT}}}[$__rate_interval])) / sum by (resource_type) (rate(larder_cache_lookups_total{{{SEL}, {CACHEABLE}, resource_type!=""}}[$__rate_interval]))',
        "{{resource_type}}")], "percentunit", 0),
    ts("Cache results", [(f'sum by (result) (rate(larder_cache_lookups_total{{{SEL}}}[$__rate_interval]))', "{{result}}")], "reqps", W, stack=True),
]
y += ROW_H
panels += [
    ts("Cache memory vs budget", [
        (f'sum by (resource_type) (larder_cache_size_bytes{{{SEL}}})', "{{resource_type}} stored"),
        (f'sum by (resource_type) (larder_cache_capacity_bytes{{{SEL}}})', "{{resource_type}} budget")], "bytes", 0),
    ts("Evictions", [(f'sum by (resource_type) (rate(larder_cache_evictions_total{{{SEL}}}[$__rate_interval]))', "{{resource_type}}")], "ops", W),
]
y += ROW_H
panels += [
    ts("Stale responses served", [
        (f'sum by (reason) (rate(larder_cache_stale_served_total{{{SEL}}}[$__rate_interval]))', "{{reason}}")], "reqps", 0,
        desc="stale-while-revalidate (served while refreshing), stale-if-error and unreachable (the origin failed)."),
    ts("Not cached, by reason", [(f'topk(10, sum by (reason) (rate(larder_cache_not_cached_total{{{SEL}}}[$__rate_interval])))', "{{reason}}")], "reqps", W, stack=True),
]
y += ROW_H
panels += [
    ts("Revalidations", [(f'sum by (outcome) (rate(larder_cache_revalidations_total{{{SEL}}}[$__rate_interval]))', "{{outcome}}")], "ops", 0),
    ts("Stored objects", [(f'sum by (resource_type) (larder_cache_objects{{{SEL}}})', "{{resource_type}}")], "short", W),
]
y += ROW_H
row("Upstream")
panels += [
    ts("Upstream latency p99 (to response head)", [(f'histogram_quantile(0.99, sum by (le, cluster) (rate(larder_upstream_request_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))', "{{cluster}}")], "s", 0),
    ts("Upstream errors", [(f'sum by (cluster, kind) (rate(larder_upstream_errors_total{{{SEL}}}[$__rate_interval]))', "{{cluster}} {{kind}}")], "ops", W, stack=True),
]
y += ROW_H
panels += [
    ts("Fills in flight and requests waiting on them", [
        (f'sum(larder_cache_fills_in_flight{{{SEL}}})', "fills"),
        (f'sum(larder_cache_coalesce_waiters{{{SEL}}})', "waiting")], "short", 0,
        desc="One origin fetch per key; concurrent requests for it wait (coalesce). Waiters piling up mean a slow origin."),
    ts("Upstream connections open", [(f'sum by (cluster) (larder_upstream_connections{{{SEL}}})', "{{cluster}}")], "short", W),
]
y += ROW_H
row("Purges and config")
panels += [
    ts("Purge requests", [(f'sum by (source, result) (rate(larder_purge_requests_total{{{SEL}}}[$__rate_interval]))', "{{source}} {{result}}")], "ops", 0),
    ts("Objects purged", [(f'sum by (kind) (rate(larder_purged_objects_total{{{SEL}}}[$__rate_interval]))', "{{kind}}")], "ops", W, stack=True),
]
y += ROW_H
panels += [
    ts("Purge relay failures per peer", [(f'sum by (peer) (rate(larder_purge_fanout_failures_total{{{SEL}}}[$__rate_interval]))', "{{peer}}")], "ops", 0),
    ts("Config reloads", [(f'sum by (result) (increase(larder_config_reloads_total{{{SEL}}}[$__rate_interval]))', "{{result}}")], "short", W),
]

dashboard = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "title": "Larder", "uid": "larder-overview", "tags": ["larder", "cache", "proxy"],
    "description": "Larder caching proxy: traffic, hit ratio, latency, cache memory, upstreams, purges.",
    "editable": True, "schemaVersion": 39, "version": 1, "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"}, "timezone": "browser", "graphTooltip": 1,
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source", "current": {}},
        {"name": "job", "type": "query", "label": "Job", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": "label_values(larder_build_info, job)", "refId": "job"}, "definition": "label_values(larder_build_info, job)",
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "current": {}},
        {"name": "instance", "type": "query", "label": "Instance", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": 'label_values(larder_build_info{job=~"$job"}, instance)', "refId": "instance"},
         "definition": 'label_values(larder_build_info{job=~"$job"}, instance)',
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "current": {}},
    ]},
    "annotations": {"list": [{"name": "Config reloads", "datasource": {"type": "prometheus", "uid": "${datasource}"}, "enable": True,
                              "expr": f'changes(larder_config_reloads_total{{{SEL}}}[1m]) > 0', "iconColor": "blue", "titleFormat": "config reload"}]},
    "panels": panels,
}
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "larder-dashboard.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print(f"wrote {out}: {len(panels)} panels")
