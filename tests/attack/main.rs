//! The attack and fault suite: scripted raw clients and origins around a real Larder, each case
//! asserting what the client and the origin saw, bounded in time and count.
//! - `http1`: request smuggling and malformed framing, both directions.

#[path = "../common/mod.rs"]
mod common;

mod http1;
mod raw;
