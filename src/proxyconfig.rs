//! `winmesh proxy-config`: what the gateway Envoy has *applied*, read from its admin `/config_dump`
//! (or a saved dump), as tables like `istioctl proxy-config`: clusters with the identity each
//! presents and the SANs it accepts, listeners with their filter chains and state (active, warming,
//! or NACKed with Envoy's error), routes, endpoints with health and priority, and secrets with
//! their certificates' identity, serial and validity (Envoy redacts private keys in its dumps; none
//! is ever printed). Pure functions over the JSON: the CLI fetches, these render.

use serde_json::{Value, json};

/// The kinds `proxy-config` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Clusters,
    Listeners,
    Routes,
    Endpoints,
    Secrets,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// The admin path that holds what `kind` needs (endpoints need EDS, which Envoy dumps on request).
pub fn admin_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Endpoints => "/config_dump?include_eds",
        _ => "/config_dump",
    }
}

fn configs_of<'a>(dump: &'a Value, type_suffix: &str) -> impl Iterator<Item = &'a Value> + 'a {
    let suffix = type_suffix.to_string();
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |c| c["@type"].as_str().is_some_and(|t| t.ends_with(&suffix)))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn address(v: &Value) -> String {
    let sa = &v["socket_address"];
    format!("{}:{}", s(&sa["address"]), s(&sa["port_value"]))
}

/// The client certificate (SDS name) and accepted SANs of a cluster's mTLS transport socket.
fn cluster_tls(c: &Value) -> (String, String, String) {
    let sockets: Vec<&Value> = c["transport_socket_matches"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| &m["transport_socket"])
        .chain(std::iter::once(&c["transport_socket"]))
        .filter(|t| t["typed_config"]["common_tls_context"].is_object())
        .collect();
    let Some(t) = sockets.first() else {
        return ("-".into(), "-".into(), "plaintext".into());
    };
    let tc = &t["typed_config"];
    let common = &tc["common_tls_context"];
    let cert = common["tls_certificate_sds_secret_configs"][0]["name"].clone();
    let sans: Vec<String> = common["combined_validation_context"]["default_validation_context"]
        ["match_typed_subject_alt_names"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let mt = &m["matcher"];
            s(&mt["exact"])
                + &mt["prefix"]
                    .as_str()
                    .map(|p| format!("{p}*"))
                    .unwrap_or_default()
        })
        .collect();
    let mode = if c["transport_socket_matches"].is_array() {
        "auto-mTLS"
    } else {
        "mTLS"
    };
    (
        s(&cert),
        if sans.is_empty() {
            "-".into()
        } else {
            sans.join(",")
        },
        format!("{mode} sni={}", s(&tc["sni"])),
    )
}

/// One row per thing shown, as JSON objects (the table and the structured outputs share them).
pub fn rows(kind: Kind, dump: &Value, health: Option<&Value>, name: Option<&str>) -> Vec<Value> {
    let keep = |n: &str| name.is_none_or(|want| n == want);
    let mut out = Vec::new();
    match kind {
        Kind::Clusters => {
            for cfg in configs_of(dump, "ClustersConfigDump") {
                for (state, list) in [
                    ("active", &cfg["dynamic_active_clusters"]),
                    ("warming", &cfg["dynamic_warming_clusters"]),
                    ("static", &cfg["static_clusters"]),
                ] {
                    for e in list.as_array().into_iter().flatten() {
                        let c = &e["cluster"];
                        let n = s(&c["name"]);
                        if !keep(&n) {
                            continue;
                        }
                        let (cert, sans, tls) = cluster_tls(c);
                        out.push(json!({"name": n, "type": s(&c["type"]), "state": state,
                            "presents": cert, "accepts": sans, "tls": tls,
                            "version": s(&e["version_info"])}));
                    }
                }
            }
        }
        Kind::Listeners => {
            for cfg in configs_of(dump, "ListenersConfigDump") {
                for l in cfg["dynamic_listeners"].as_array().into_iter().flatten() {
                    let n = s(&l["name"]);
                    if !keep(&n) {
                        continue;
                    }
                    let (state, body) = if l["active_state"].is_object() {
                        ("active", &l["active_state"])
                    } else if l["warming_state"].is_object() {
                        ("warming", &l["warming_state"])
                    } else {
                        ("error", &l["error_state"])
                    };
                    let lis = &body["listener"];
                    let chains: Vec<String> = lis["filter_chains"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| {
                            let m = &c["filter_chain_match"];
                            let sni = m["server_names"]
                                .as_array()
                                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","));
                            let src = m["source_prefix_ranges"].as_array().map(|a| {
                                a.iter()
                                    .map(|r| {
                                        format!(
                                            "{}/{}",
                                            s(&r["address_prefix"]),
                                            s(&r["prefix_len"])
                                        )
                                    })
                                    .collect::<Vec<_>>()
                                    .join(",")
                            });
                            match (sni, src) {
                                (Some(sni), _) => format!("sni={sni}"),
                                (_, Some(src)) => format!("from={src}"),
                                _ => "*".into(),
                            }
                        })
                        .collect();
                    let mut row = json!({"name": n, "address": address(&lis["address"]),
                        "chains": chains.join(" "), "state": state,
                        "version": s(&body["version_info"])});
                    // A NACKed update: Envoy keeps the last good listener and says why.
                    if let Some(err) = l["error_state"]["details"].as_str() {
                        row["error"] = json!(err);
                    }
                    out.push(row);
                }
            }
        }
        Kind::Routes => {
            for cfg in configs_of(dump, "RoutesConfigDump") {
                for r in cfg["dynamic_route_configs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let rc = &r["route_config"];
                    let n = s(&rc["name"]);
                    if !keep(&n) {
                        continue;
                    }
                    for vh in rc["virtual_hosts"].as_array().into_iter().flatten() {
                        for route in vh["routes"].as_array().into_iter().flatten() {
                            let m = &route["match"];
                            let matcher = m["prefix"]
                                .as_str()
                                .map(|p| format!("prefix {p}"))
                                .or_else(|| m["path"].as_str().map(|p| format!("path {p}")))
                                .unwrap_or_else(|| "*".into());
                            let target = route["route"]["cluster"]
                                .as_str()
                                .map(str::to_string)
                                .or_else(|| {
                                    route["direct_response"]["status"]
                                        .as_u64()
                                        .map(|c| format!("direct {c}"))
                                })
                                .unwrap_or_else(|| "-".into());
                            out.push(json!({"name": n, "virtual_host": s(&vh["name"]),
                                "domains": vh["domains"].as_array().map(|d| d.iter().map(s).collect::<Vec<_>>().join(",")).unwrap_or_default(),
                                "match": matcher, "cluster": target}));
                        }
                    }
                }
            }
        }
        Kind::Endpoints => {
            // Health as Envoy's /clusters reports it, by cluster and address.
            let mut health_of = std::collections::HashMap::new();
            for c in health
                .and_then(|h| h["cluster_statuses"].as_array())
                .into_iter()
                .flatten()
            {
                for h in c["host_statuses"].as_array().into_iter().flatten() {
                    let st = &h["health_status"];
                    let state = if st["eds_health_status"]
                        .as_str()
                        .is_some_and(|x| x != "HEALTHY")
                        || st["failed_outlier_check"] == json!(true)
                        || st["failed_active_health_check"] == json!(true)
                    {
                        s(&st["eds_health_status"]).replace("HEALTHY", "UNHEALTHY")
                    } else {
                        "HEALTHY".to_string()
                    };
                    health_of.insert((s(&c["name"]), address(&h["address"])), state);
                }
            }
            for cfg in configs_of(dump, "EndpointsConfigDump") {
                for e in cfg["dynamic_endpoint_configs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let cla = &e["endpoint_config"];
                    let cluster = s(&cla["cluster_name"]);
                    if !keep(&cluster) {
                        continue;
                    }
                    for group in cla["endpoints"].as_array().into_iter().flatten() {
                        for lb in group["lb_endpoints"].as_array().into_iter().flatten() {
                            let addr = address(&lb["endpoint"]["address"]);
                            let status = health_of
                                .get(&(cluster.clone(), addr.clone()))
                                .cloned()
                                .unwrap_or_else(|| {
                                    lb["health_status"]
                                        .as_str()
                                        .unwrap_or("UNKNOWN")
                                        .to_string()
                                });
                            let tls = lb["metadata"]["filter_metadata"]["envoy.transport_socket_match"]
                                ["tlsMode"]
                                .as_str()
                                .unwrap_or("disabled")
                                .to_string();
                            out.push(json!({"endpoint": addr, "status": status,
                                "priority": group["priority"].as_u64().unwrap_or(0),
                                "tls_mode": tls, "cluster": cluster}));
                        }
                    }
                }
            }
        }
        Kind::Secrets => {
            for cfg in configs_of(dump, "SecretsConfigDump") {
                for (state, list) in [
                    ("active", &cfg["dynamic_active_secrets"]),
                    ("warming", &cfg["dynamic_warming_secrets"]),
                ] {
                    for e in list.as_array().into_iter().flatten() {
                        let n = s(&e["name"]);
                        if !keep(&n) {
                            continue;
                        }
                        let sec = &e["secret"];
                        let (kind, pem) = if sec["tls_certificate"].is_object() {
                            ("cert", &sec["tls_certificate"]["certificate_chain"])
                        } else {
                            ("ca", &sec["validation_context"]["trusted_ca"])
                        };
                        let mut row = json!({"name": n, "type": kind, "state": state});
                        if let Some(info) = first_cert(pem) {
                            row["identity"] = json!(info.0);
                            row["serial"] = json!(info.1);
                            row["not_before"] = json!(info.2);
                            row["not_after"] = json!(info.3);
                            row["valid"] = json!(info.4);
                        }
                        out.push(row);
                    }
                }
            }
        }
    }
    out
}

/// The first certificate of a data source (`inline_bytes` base64 or `inline_string`): its URI SAN
/// (else subject), serial, validity and whether it is valid now.
fn first_cert(ds: &Value) -> Option<(String, String, String, String, bool)> {
    use base64::Engine;
    let pem_bytes = match (ds["inline_bytes"].as_str(), ds["inline_string"].as_str()) {
        (Some(b), _) => base64::engine::general_purpose::STANDARD.decode(b).ok()?,
        (_, Some(t)) => t.as_bytes().to_vec(),
        _ => return None,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem_bytes).ok()?;
    let cert = pem.parse_x509().ok()?;
    let uri = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|g| match g {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
        })
        .unwrap_or_else(|| cert.subject().to_string());
    let v = cert.validity();
    Some((
        uri,
        cert.raw_serial_as_string().replace(':', ""),
        v.not_before.to_string(),
        v.not_after.to_string(),
        v.is_valid(),
    ))
}

/// The columns of each kind's table, in order.
fn columns(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Clusters => &["name", "type", "state", "presents", "accepts", "tls"],
        Kind::Listeners => &["name", "address", "state", "chains", "error"],
        Kind::Routes => &["name", "domains", "match", "cluster"],
        Kind::Endpoints => &["endpoint", "status", "priority", "tls_mode", "cluster"],
        Kind::Secrets => &[
            "name",
            "type",
            "state",
            "identity",
            "serial",
            "not_after",
            "valid",
        ],
    }
}

/// Renders rows as an aligned table, JSON or YAML.
pub fn render(kind: Kind, rows: &[Value], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).unwrap_or_default() + "\n",
        Format::Yaml => serde_yaml::to_string(rows).unwrap_or_default(),
        Format::Table => {
            let cols = columns(kind);
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    cols.iter()
                        .map(|c| {
                            // Peer-supplied text: one line, no control characters.
                            s(&r[*c])
                                .chars()
                                .map(|ch| if ch.is_control() { ' ' } else { ch })
                                .collect()
                        })
                        .collect()
                })
                .collect();
            let width: Vec<usize> = (0..cols.len())
                .map(|i| {
                    cells
                        .iter()
                        .map(|r| r[i].chars().count())
                        .chain(std::iter::once(cols[i].len()))
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |vals: Vec<String>| {
                let mut l = String::new();
                for (i, v) in vals.iter().enumerate() {
                    if i + 1 == vals.len() {
                        l.push_str(v);
                    } else {
                        l.push_str(&format!("{v:<w$}  ", w = width[i]));
                    }
                }
                l.trim_end().to_string() + "\n"
            };
            let mut out = line(cols.iter().map(|c| c.to_ascii_uppercase()).collect());
            for r in cells {
                out.push_str(&line(r));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> Value {
        use base64::Engine;
        let ca = crate::identity::dev_ca::DevCa::new_root("cluster.local").unwrap();
        let id = crate::identity::SpiffeId::parse("spiffe://cluster.local/ns/win/sa/app").unwrap();
        let (_key, chain) = ca.issue(&id, std::time::Duration::from_secs(3600)).unwrap();
        let chain_b64 = base64::engine::general_purpose::STANDARD.encode(chain.concat());
        json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
             "dynamic_listeners": [
                {"name": "good", "active_state": {"version_info": "v1", "listener": {
                    "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15443}},
                    "filter_chains": [{"filter_chain_match": {"server_names": ["outbound_.80_._.a.b.svc.cluster.local"]}}]}}},
                {"name": "nacked", "error_state": {"details": "bad\nFORGED line", "last_update_attempt": "x"}}
             ]},
            {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
             "dynamic_active_secrets": [
                {"name": "spiffe://cluster.local/ns/win/sa/app", "secret": {"tls_certificate": {
                    "certificate_chain": {"inline_bytes": chain_b64},
                    "private_key": {"inline_bytes": "W3JlZGFjdGVkXQ=="}}}}
             ]}
        ]})
    }

    #[test]
    fn nacked_listeners_show_envoys_error_on_one_line() {
        let d = dump();
        let r = rows(Kind::Listeners, &d, None, None);
        assert_eq!(r[0]["state"], "active");
        assert_eq!(r[0]["chains"], "sni=outbound_.80_._.a.b.svc.cluster.local");
        assert_eq!(r[1]["state"], "error");
        let table = render(Kind::Listeners, &r, Format::Table);
        assert!(table.starts_with("NAME"), "{table}");
        assert!(
            table.contains("bad FORGED line"),
            "control characters flattened: {table}"
        );
        assert_eq!(table.lines().count(), 3);
        assert_eq!(rows(Kind::Listeners, &d, None, Some("good")).len(), 1);
    }

    #[test]
    fn secrets_show_the_certificate_never_the_key() {
        let r = rows(Kind::Secrets, &dump(), None, None);
        assert_eq!(r[0]["identity"], "spiffe://cluster.local/ns/win/sa/app");
        assert_eq!(r[0]["valid"], true);
        assert!(r[0]["serial"].as_str().is_some_and(|s| !s.is_empty()));
        for f in [Format::Table, Format::Json, Format::Yaml] {
            let out = render(Kind::Secrets, &r, f);
            assert!(
                !out.contains("W3JlZGFjdGVkXQ") && !out.contains("private"),
                "{out}"
            );
        }
    }
}
