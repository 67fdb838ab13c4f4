//! Ports for test listeners that nothing else on the machine will take in the meantime.
//!
//! Binding port 0 and releasing it hands out a port from the kernel's *ephemeral* range, the same
//! range every outgoing connection (Envoy's upstream connections, reqwest, gRPC clients) draws its
//! local port from. Between the release and the moment Envoy binds it, any of those connections
//! can take it ("cannot bind ... Address already in use", seen in CI). So test ports come from
//! below the ephemeral range instead, each checked free by a bind, never handed out twice by one
//! process, and spread across processes by a pid-derived start.

use std::net::TcpListener;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port tests use; well above the well-known and registered-service ports in use here.
const FLOOR: u32 = 20_000;

fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(32_768)
}

static NEXT: AtomicU32 = AtomicU32::new(0);
static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A loopback TCP port that is free now and outside the ephemeral range.
pub fn free_port() -> u16 {
    let top = ephemeral_low().max(FLOOR + 1_000);
    let span = top - FLOOR;
    let start = (std::process::id().wrapping_mul(7_919)) % span;
    for _ in 0..span {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FLOOR + (start + i) % span) as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port between {FLOOR} and {top}");
}
