//! `winmesh status`: the syncz view as a table, like `istioctl proxy-status`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

/// Largest response body `status` reads (a registry view of a very large mesh fits).
pub const MAX_BODY: usize = 256 * 1024 * 1024;

/// HTTP/1.1 GET against the (loopback) debug server or Envoy's admin. Returns status code and body.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    http_get_host(addr, path, &addr.to_string(), token).await
}

/// Like [`http_get`] with an explicit Host header. hyper parses the response (chunked or not), the
/// body is read up to [`MAX_BODY`] and decoded lossily, so a peer can neither make this panic (a
/// UTF-8 character split across chunks) nor make it read without bound.
pub async fn http_get_host(
    addr: SocketAddr,
    path: &str,
    host: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty, Limited};
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| anyhow::anyhow!("HTTP to {addr}: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::get(path).header(hyper::header::HOST, host);
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| anyhow::anyhow!("request to {addr}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| anyhow::anyhow!("HTTP to {addr}: {e}"))?;
        let code = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer from {addr}: {e}"))?
            .to_bytes();
        driver.abort();
        anyhow::Ok((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow::anyhow!("timed out talking to {addr}"))?
}

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

/// The admin `/stats` query for [`envoy_config_status`].
pub const CONFIG_STATS_PATH: &str = "/stats?filter=update_";

/// Whether Envoy has accepted a first CDS and LDS config, decided from its own counters the way
/// istio-agent's readiness probe does (pilot/cmd/pilot-agent/status/ready/probe.go,
/// `checkConfigStatus`). The counters live as long as the Envoy process, so a restarted winmesh
/// does not forget that Envoy already runs a good config.
pub fn envoy_config_status(stats: &str) -> Result<(), String> {
    let mut v = [0u64; 4];
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let i = match name.trim() {
            "cluster_manager.cds.update_success" => 0,
            "cluster_manager.cds.update_rejected" => 1,
            "listener_manager.lds.update_success" => 2,
            "listener_manager.lds.update_rejected" => 3,
            _ => continue,
        };
        v[i] = value.trim().parse().unwrap_or(0);
    }
    let [cds_ok, cds_rej, lds_ok, lds_rej] = v;
    let counts = format!(
        "cds updates: {cds_ok} successful, {cds_rej} rejected; lds updates: {lds_ok} successful, {lds_rej} rejected"
    );
    match (cds_ok > 0, lds_ok > 0) {
        (true, true) => Ok(()),
        (false, false) if cds_rej == 0 && lds_rej == 0 => Err(format!(
            "config not received from winmesh (is it serving this node?): {counts}"
        )),
        _ if cds_rej > 0 || lds_rej > 0 => Err(format!(
            "config received from winmesh, but was rejected: {counts}"
        )),
        _ => Err(format!("config not fully received from winmesh: {counts}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The cases of istio-agent's own probe test, with its decisions.
    #[test]
    fn envoy_config_status_decides_as_istio_agent_does() {
        let ok = "cluster_manager.cds.update_success: 1\nlistener_manager.lds.update_success: 1\n";
        assert_eq!(envoy_config_status(ok), Ok(()));
        // After a first success, later rejections do not matter.
        let later = "cluster_manager.cds.update_success: 3\ncluster_manager.cds.update_rejected: 2\nlistener_manager.lds.update_success: 1\n";
        assert_eq!(envoy_config_status(later), Ok(()));
        let rejected =
            "cluster_manager.cds.update_rejected: 1\nlistener_manager.lds.update_success: 1\n";
        assert!(
            envoy_config_status(rejected)
                .unwrap_err()
                .contains("but was rejected")
        );
        let only_cds = "cluster_manager.cds.update_success: 1\n";
        assert!(
            envoy_config_status(only_cds)
                .unwrap_err()
                .contains("not fully received")
        );
        assert!(
            envoy_config_status("")
                .unwrap_err()
                .contains("config not received")
        );
    }

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

    /// A chunked answer that splits a UTF-8 character between chunks used to panic the readiness
    /// probe ("end byte index is not a char boundary").
    #[tokio::test]
    async fn a_character_split_across_chunks_does_not_panic() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            // "é" is C3 A9: one byte in each chunk.
            let mut resp =
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nx\xc3\r\n".to_vec();
            resp.extend_from_slice(b"2\r\n\xa9y\r\n0\r\n\r\n");
            s.write_all(&resp).await.unwrap();
        });
        let (code, body) = http_get(addr, "/readyz", None).await.unwrap();
        assert_eq!((code, body.as_str()), (200, "xéy"));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn connection_refused_names_the_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = http_get(addr, "/readyz", None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&addr.to_string()), "{e}");
    }
}
