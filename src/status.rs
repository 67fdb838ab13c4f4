//! `winmesh status`: the syncz view as a table, like `istioctl proxy-status`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Minimal HTTP/1.1 GET against the (loopback) debug server. Returns status code and body.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    http_get_host(addr, path, &addr.to_string(), token).await
}

/// Like [`http_get`] with an explicit `Host` header.
pub async fn http_get_host(
    addr: SocketAddr,
    path: &str,
    host: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow::anyhow!("timed out talking to {addr}"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response from {addr}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP status line from {addr}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Renders `/debug/syncz` JSON as a table: one row per stream, one column per xDS type.
pub fn render_table(syncz: &Value) -> String {
    let cols = ["CDS", "EDS", "SDS", "LDS", "RDS"];
    let mut rows = vec![vec![
        "NAME".to_string(),
        "CLUSTER".into(),
        "SERVICE".into(),
        "MODE".into(),
        "CDS".into(),
        "EDS".into(),
        "SDS".into(),
        "LDS".into(),
        "RDS".into(),
        "VERSION".into(),
        "PEER".into(),
    ]];
    let empty = vec![];
    for c in syncz["clients"].as_array().unwrap_or(&empty) {
        let mut row = vec![
            c["node_id"].as_str().unwrap_or("").to_string(),
            c["cluster"].as_str().unwrap_or("").to_string(),
            c["service"].as_str().unwrap_or("").to_string(),
            c["mode"].as_str().unwrap_or("").to_string(),
        ];
        for col in cols {
            let st = c["types"]
                .as_array()
                .and_then(|ts| ts.iter().find(|t| t["short"] == col))
                .map(|t| {
                    let s = t["status"].as_str().unwrap_or("");
                    match s {
                        "NOT_SENT" => "NOT SENT".to_string(),
                        other => other.to_string(),
                    }
                })
                .unwrap_or_else(|| "IGNORED".into());
            row.push(st);
        }
        row.push(c["envoy_version"].as_str().unwrap_or("").to_string());
        row.push(c["peer"].as_str().unwrap_or("").to_string());
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_has_a_row_per_client_and_a_column_per_type() {
        let v = json!({"clients": [{
            "node_id": "gw", "cluster": "c", "service": "ADS", "mode": "SotW",
            "envoy_version": "1.40.0", "peer": "127.0.0.1:5",
            "types": [{"short": "CDS", "status": "SYNCED"}, {"short": "LDS", "status": "NACKED"},
                      {"short": "EDS", "status": "NOT_SENT"}]
        }]});
        let t = render_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAME"));
        assert!(lines[1].contains("SYNCED") && lines[1].contains("NACKED"));
        assert!(lines[1].contains("NOT SENT") && lines[1].contains("IGNORED"));
    }

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
