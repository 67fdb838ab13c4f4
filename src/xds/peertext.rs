//! Strings a peer controls (node ids, NACK texts, type URLs, resource names) on their way into logs
//! and debug views: control characters escaped, length capped. A raw `\n` in a NACK text would
//! otherwise forge well-formed log lines, and a 1 MB node id would be printed in full.

/// Longest node id or cluster accepted on a stream (Istio's are ~100 bytes).
pub const MAX_NODE_ID: usize = 256;
/// Longest NACK text kept for `/debug/syncz`.
pub const MAX_NACK_TEXT: usize = 4096;
/// Longest peer string printed in a log line.
pub const MAX_LOGGED: usize = 512;

/// `s` with control characters escaped (`\n` → `\\n`, others `\u{..}`), cut to `max` characters
/// with a note of the original size.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 16);
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push_str(&format!("…[{} bytes]", s.len()));
            return out;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a node id or cluster is acceptable: short, and no control characters.
pub fn valid_name(s: &str) -> bool {
    s.len() <= MAX_NODE_ID && !s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_log_lines() {
        let forged = "oops\n2026-12-02T00:00:00Z ERROR winmesh: FORGED\r\x1b[31m";
        let p = printable(forged, 1000);
        assert!(
            !p.contains('\n') && !p.contains('\r') && !p.contains('\x1b'),
            "{p}"
        );
        assert!(p.contains("\\n2026") && p.contains("\\r"), "{p}");
    }

    #[test]
    fn long_strings_are_cut_with_their_size() {
        let s = "é".repeat(10_000);
        let p = printable(&s, 10);
        assert_eq!(p, format!("{}…[20000 bytes]", "é".repeat(10)));
        assert_eq!(printable("short", 10), "short");
    }

    #[test]
    fn node_names() {
        assert!(valid_name("sidecar~10.0.0.1~gw.win~win.svc.cluster.local"));
        assert!(!valid_name(&"x".repeat(MAX_NODE_ID + 1)));
        assert!(!valid_name("a\nb"));
    }
}
