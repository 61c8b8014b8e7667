#!/usr/bin/env python3
"""Turns bench/run.sh's run records into results/latest.json (every run, parsed, with the tools'
raw output) and results/latest.md (one Markdown table of medians with ratios to Larder).

Usage: report.py RUNS.jsonl META.json RESULTS_DIR
"""

import json
import re
import statistics
import sys
from pathlib import Path

UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def to_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    return float(m[1]) * UNIT_MS[m[2]] if m else None


def read(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def parse_wrk(text):
    out = {"rps": None, "requests": None, "seconds": None, "p50_ms": None, "p99_ms": None,
           "non_2xx": 0, "socket_errors": 0}
    if m := re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M):
        out["rps"] = float(m[1])
    if m := re.search(r"(\d+) requests in ([\d.]+\w+),", text):
        out["requests"] = int(m[1])
        out["seconds"] = to_ms(m[2]) / 1000 if to_ms(m[2]) else None
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", text, re.M):
        out[f"p{pct}_ms"] = to_ms(value)
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non_2xx"] = int(m[1])
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        out["socket_errors"] = sum(int(x) for x in m.groups())
    return out


def percentile(sorted_values, pct):
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, round(pct / 100 * (len(sorted_values) - 1))))
    return sorted_values[idx]


def parse_h2load(text, log_path):
    out = {"rps": None, "requests": None, "seconds": None, "p50_ms": None, "p99_ms": None,
           "non_2xx": 0, "socket_errors": 0}
    if m := re.search(r"finished in ([\d.]+\w+), ([\d.]+) req/s", text):
        out["seconds"] = (to_ms(m[1]) or 0) / 1000
        out["rps"] = float(m[2])
    if m := re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored, (\d+) timeout", text):
        out["requests"] = int(m[4])
        out["socket_errors"] = int(m[5]) + int(m[6]) + int(m[7])
    if m := re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text):
        out["non_2xx"] = int(m[3]) + int(m[4])
    # h2load prints no percentiles; its per-request log has the duration (µs) in column 3.
    durations = []
    for line in read(log_path).splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].strip().isdigit():
            durations.append(int(parts[2]) / 1000)
    durations.sort()
    out["p50_ms"] = percentile(durations, 50)
    out["p99_ms"] = percentile(durations, 99)
    out["latency_samples"] = len(durations)
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def parse_run(rec):
    run = dict(rec)
    cpu_s = rec["cpu_ticks"] / rec["clk_tck"]
    run["cpu_seconds"] = cpu_s
    if rec["kind"] == "load":
        text = read(rec["output"])
        parsed = parse_h2load(text, rec["latency_log"]) if rec["tool"] == "h2load" else parse_wrk(text)
        run.update(parsed)
        run["raw_output"] = text
    elif rec["kind"] == "fill":
        text = read(rec["output"])
        run.update(parse_wrk(text))
        run["raw_output"] = text
        grown_kib = rec["pss_kib"] - rec["pss_before_kib"] + rec["cache_dir_kib"]
        run["memory_growth_bytes"] = grown_kib * 1024
        run["memory_per_payload_byte"] = grown_kib * 1024 / rec["payload_bytes"]
    elif rec["kind"] == "budget":
        chunks = sorted(Path(rec["output_prefix"]).parent.glob(Path(rec["output_prefix"]).name + ".*.txt"),
                        key=lambda p: int(p.name.rsplit(".", 2)[-2]))
        texts = [read(p) for p in chunks]
        parsed = [parse_wrk(t) for t in texts]
        requests = sum(p["requests"] or 0 for p in parsed)
        seconds = sum(p["seconds"] or 0 for p in parsed)
        run.update({"requests": requests, "seconds": seconds,
                    "rps": requests / seconds if seconds else None,
                    "p50_ms": median([p["p50_ms"] for p in parsed]),
                    "p99_ms": max((p["p99_ms"] for p in parsed if p["p99_ms"] is not None), default=None),
                    "non_2xx": sum(p["non_2xx"] for p in parsed),
                    "socket_errors": sum(p["socket_errors"] for p in parsed)})
        run["raw_output"] = "\n".join(texts)
        totals = [s["pss_kib"] + s["cache_dir_kib"] for s in rec["samples"]]
        run["memory_final_bytes"] = (rec["pss_kib"] + rec["cache_dir_kib"]) * 1024
        run["memory_max_bytes"] = max(totals + [rec["pss_kib"] + rec["cache_dir_kib"]]) * 1024
    run["rps_per_cpu_second"] = (run["requests"] / cpu_s) if run.get("requests") and cpu_s > 0 else None
    return run


def fmt_num(v, digits=0):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def fmt_ratio(v, base):
    if v is None or not base:
        return ""
    return f" ({v / base:.2f}×)"


def paired_ratio(runs, scenario, proxy, key):
    """Median over rounds of proxy/Larder within one round: the proxies of a round run back to
    back, so a shift in the machine's speed between rounds (other tenants of the host) cancels."""
    base = {r["rep"]: r.get(key) for r in runs
            if r["scenario"] == scenario and r["proxy"] == "larder"}
    return median([r[key] / base[r["rep"]] for r in runs
                   if r["scenario"] == scenario and r["proxy"] == proxy
                   and r.get(key) is not None and base.get(r["rep"])])


def summarize(runs, proxies):
    order = []
    for r in runs:
        if r["scenario"] not in order:
            order.append(r["scenario"])
    rows = []
    for scenario in order:
        per_proxy = {}
        for proxy in proxies:
            rs = [r for r in runs if r["scenario"] == scenario and r["proxy"] == proxy]
            if not rs:
                continue
            kind = rs[0]["kind"]
            row = {"scenario": scenario, "proxy": proxy, "kind": kind, "runs": len(rs),
                   "rps": median([r.get("rps") for r in rs]),
                   "rps_per_cpu_second": median([r.get("rps_per_cpu_second") for r in rs]),
                   "cpu_seconds": median([r["cpu_seconds"] for r in rs]),
                   "p50_ms": median([r.get("p50_ms") for r in rs]),
                   "p99_ms": median([r.get("p99_ms") for r in rs]),
                   "errors": sum((r.get("non_2xx") or 0) + (r.get("socket_errors") or 0) for r in rs)}
            notes = []
            if kind == "load":
                row["paired_rps_vs_larder"] = paired_ratio(runs, scenario, proxy, "rps")
                row["paired_rps_per_cpu_second_vs_larder"] = paired_ratio(
                    runs, scenario, proxy, "rps_per_cpu_second")
                row["mem_bytes"] = median([r["pss_kib"] * 1024 for r in rs])
                requests = sum(r.get("requests") or 0 for r in rs)
                origin = sum(r["origin_requests"] for r in rs)
                row["origin_share"] = origin / requests if requests else None
                if scenario.startswith(("hit-", "keys", "h2c-")) and requests and origin / requests > 0.01:
                    notes.append(f"{origin / requests:.1%} of requests reached the origin")
                # Where the proxy's CPU goes: its own code (user) or the kernel's (system calls,
                # the loopback's TCP work done on its behalf). Older records have no split.
                with_user = [r for r in rs if "user_ticks" in r and r.get("requests")]
                if with_user:
                    per_request = 1e6 / sum(r["requests"] for r in with_user) / with_user[0]["clk_tck"]
                    user = sum(r["user_ticks"] for r in with_user) * per_request
                    system = sum(r["cpu_ticks"] - r["user_ticks"] for r in with_user) * per_request
                    row["cpu_us_per_request"] = {"user": user, "system": system}
                    notes.append(f"CPU µs/req: {user:.1f} user + {system:.1f} sys")
            elif kind == "fill":
                row["mem_bytes"] = median([r["memory_growth_bytes"] for r in rs])
                row["memory_per_payload_byte"] = median([r["memory_per_payload_byte"] for r in rs])
                notes.append(f"growth = {row['memory_per_payload_byte']:.2f} × payload")
                before = median([r["pss_before_kib"] * 1024 for r in rs])
                notes.append(f"{before / 2**20:,.0f} MiB before the fill")
            elif kind == "budget":
                row["mem_bytes"] = median([r["memory_final_bytes"] for r in rs])
                row["mem_max_bytes"] = max(r["memory_max_bytes"] for r in rs)
                notes.append(f"max {row['mem_max_bytes'] / 2**20:,.0f} MiB; "
                             f"budget {rs[0]['budget_bytes'] / 2**20:,.0f} MiB")
                # Levelled off: under 5% growth over the last quarter of the keys (every run).
                growth = []
                for r in rs:
                    samples = r["samples"]
                    if len(samples) >= 2:
                        last = samples[-1]
                        ref = next((x for x in samples if x["keys"] >= 0.75 * last["keys"]), samples[0])
                        ref_total = ref["pss_kib"] + ref["cache_dir_kib"]
                        last_total = last["pss_kib"] + last["cache_dir_kib"]
                        growth.append((last_total - ref_total) / last_total if last_total else 0)
                if growth:
                    row["last_quarter_growth"] = max(growth)
                    notes.append("levelled off" if max(growth) < 0.05 else
                                 f"still growing: +{max(growth):.0%} over the last quarter of keys")
            if proxy == "nginx" and kind in ("fill", "budget"):
                notes.append("incl. tmpfs cache dir")
            if row["errors"]:
                notes.append(f"{row['errors']} errors")
            row["notes"] = notes
            per_proxy[proxy] = row
        base = per_proxy.get("larder")
        for proxy, row in per_proxy.items():
            if base:
                for key in ("rps", "rps_per_cpu_second", "p99_ms", "mem_bytes"):
                    if row.get(key) is not None and base.get(key):
                        row[f"{key}_vs_larder"] = row[key] / base[key]
            rows.append(row)
    return rows


def markdown(rows, meta):
    lines = [
        "| scenario | proxy | req/s | req/s per proxy CPU-s | paired ratios | p50 ms | p99 ms | RSS MiB | notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    bases = {r["scenario"]: r for r in rows if r["proxy"] == "larder"}
    for r in rows:
        base = bases.get(r["scenario"], {})
        mem = r.get("mem_bytes")
        paired = ""
        if r.get("paired_rps_vs_larder") is not None:
            paired = "{:.2f}× · {:.2f}×".format(
                r["paired_rps_vs_larder"], r.get("paired_rps_per_cpu_second_vs_larder") or 0)
        lines.append("| {} | {} | {}{} | {}{} | {} | {} | {}{} | {}{} | {} |".format(
            r["scenario"], r["proxy"],
            fmt_num(r["rps"]), fmt_ratio(r["rps"], base.get("rps")),
            fmt_num(r["rps_per_cpu_second"]), fmt_ratio(r["rps_per_cpu_second"], base.get("rps_per_cpu_second")),
            paired,
            fmt_num(r["p50_ms"], 2),
            fmt_num(r["p99_ms"], 2), fmt_ratio(r["p99_ms"], base.get("p99_ms")),
            fmt_num(mem / 2**20 if mem is not None else None, 1), fmt_ratio(mem, base.get("mem_bytes")),
            "; ".join(r["notes"])))
    header = [
        "# Larder benchmark results",
        "",
        f"{meta['date']} · {meta['cpus']} CPUs · kernel {meta['kernel']} · "
        f"duration {meta['duration']} · medians of {meta['repeats']} interleaved run(s)"
        + (f" ({meta['fill_repeats']} for the fills)" if "fill_repeats" in meta else "")
        + (
            f" · proxy pinned to CPU {meta['proxy_cpus']}, load and origin to CPU {meta['load_cpus']}"
            if meta.get("proxy_cpus")
            else ""
        ),
        "",
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in meta["versions"].items()),
        "",
        "Ratios in parentheses are to Larder. req/s per proxy CPU-s = requests / (utime+stime of all "
        "the proxy's processes during the run). RSS = PSS summed over the proxy's processes after the "
        "run; for fill-16k the growth during the fill; for budget-64mib the final value. Paired "
        "ratios (req/s · per CPU-s) are medians of each round's ratio to Larder's run in the same "
        "round: a shift of the machine's speed between rounds cancels in them, not in the medians.",
        "",
    ]
    return "\n".join(header + lines) + "\n"


def main():
    runs_path, meta_path, results_dir = sys.argv[1:4]
    meta = json.loads(Path(meta_path).read_text())
    records = [json.loads(line) for line in Path(runs_path).read_text().splitlines() if line.strip()]
    runs = [parse_run(r) for r in records]
    proxies = meta["proxies"].split()
    rows = summarize(runs, proxies)
    md = markdown(rows, meta)
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in runs:  # work-dir paths mean nothing once the run is over
        for key in ("output", "latency_log", "output_prefix"):
            r.pop(key, None)
    (out / "latest.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1) + "\n")
    (out / "latest.md").write_text(md)
    print(md)
    print(f"written: {out / 'latest.md'}, {out / 'latest.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
