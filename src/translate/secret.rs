//! Certificates → SDS secrets with Istio's names: `default` (the gateway's own certificate and key),
//! `ROOTCA` (trust bundle), and the SPIFFE ID string for every additional identity.

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};

use crate::identity::{CertBundle, SecretSet};

/// SDS name of the gateway's own certificate.
pub const DEFAULT: &str = "default";
/// SDS name of the trust bundle.
pub const ROOTCA: &str = "ROOTCA";

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(s.as_bytes().to_vec())),
        watched_directory: None,
    })
}

fn tls_secret(name: &str, c: &CertBundle) -> Secret {
    Secret {
        name: name.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&c.chain_blob()),
            private_key: inline(c.key.expose()),
            ..Default::default()
        })),
    }
}

/// The SDS name under which an identity's certificate is served.
pub fn sds_name(set: &SecretSet, id: &crate::identity::SpiffeId) -> String {
    if set.default_identity.as_ref() == Some(id) {
        DEFAULT.to_string()
    } else {
        id.to_string()
    }
}

/// Every secret for a secret set. Nothing is emitted for identities without a certificate yet, so
/// Envoy keeps waiting (`initial_fetch_timeout: 0s`) instead of serving without one.
pub fn secrets(set: &SecretSet) -> Vec<Secret> {
    let mut out = Vec::new();
    for (id, c) in &set.certs {
        out.push(tls_secret(&sds_name(set, id), c));
    }
    if !set.roots_pem.is_empty() {
        out.push(Secret {
            name: ROOTCA.into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(&set.roots_pem.concat()),
                    ..Default::default()
                },
            )),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::dev_ca::DevCa;
    use crate::identity::verify::verify_chain;
    use crate::identity::{SpiffeId, csr};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn bundle(ca: &DevCa, id: &SpiffeId) -> Arc<CertBundle> {
        let k = csr::generate(id).unwrap();
        let chain = ca
            .sign_csr(&k.csr_pem, id, Duration::from_secs(60), SystemTime::now())
            .unwrap();
        Arc::new(verify_chain(id, k.key, &k.public_key_der, &chain, SystemTime::now()).unwrap())
    }

    #[test]
    fn istio_secret_names() {
        let ca = DevCa::new_root("cluster.local").unwrap();
        let gw = SpiffeId::parse("spiffe://cluster.local/ns/win/sa/gw").unwrap();
        let app = SpiffeId::parse("spiffe://cluster.local/ns/win/sa/app").unwrap();
        let mut set = SecretSet {
            default_identity: Some(gw.clone()),
            ..Default::default()
        };
        assert!(
            secrets(&set).is_empty(),
            "nothing before certificates exist"
        );
        set.certs.insert(gw.clone(), bundle(&ca, &gw));
        set.certs.insert(app.clone(), bundle(&ca, &app));
        set.roots_pem = vec![ca.roots_pem()];
        let s = secrets(&set);
        let mut names: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            vec!["ROOTCA", "default", "spiffe://cluster.local/ns/win/sa/app"]
        );
        let Some(secret::Type::TlsCertificate(t)) =
            &s.iter().find(|x| x.name == "default").unwrap().r#type
        else {
            panic!("default is a TLS certificate");
        };
        let Some(Specifier::InlineBytes(k)) = &t.private_key.as_ref().unwrap().specifier else {
            panic!("inline key");
        };
        assert!(String::from_utf8_lossy(k).contains("PRIVATE KEY"));
    }
}
