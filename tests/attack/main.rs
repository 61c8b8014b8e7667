//! The attack and fault suite: scripted raw clients and origins around a real Larder, each case
//! asserting what the client and the origin saw, bounded in time and count.
//! - `http1`: request smuggling and malformed framing, both directions.
//! - `http2`: rapid reset, CONTINUATION and PING/SETTINGS floods, HPACK bomb, malformed streams.
//! - `poisoning`: unkeyed inputs, host/port/scheme keys, path spellings, deception, CPDoS, Vary.
//! - `privacy`: personal answers stay with their user, coalesced or not, in a randomized run.
//! - `exhaustion`: slow clients, range amplification, big heads, floods, a cold-key stampede,
//!   a long unique-URL fill.
//! - `origin_faults`: truncated and reset bodies, hangs, stale-if-error.

#[path = "../common/mod.rs"]
mod common;

mod exhaustion;
mod http1;
mod http2;
mod origin_faults;
mod poisoning;
mod privacy;
mod raw;

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}
