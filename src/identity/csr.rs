//! Keys and CSRs shaped like ztunnel's: ECDSA P-256 / SHA-256, empty subject, one URI SAN (the SPIFFE
//! ID), key kept as PKCS#8 PEM. istiod only uses the CSR's public key and signature.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use super::{PrivateKeyPem, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("cannot generate key: {0}")]
    Key(rcgen::Error),
    #[error("cannot build CSR for {identity}: {source}")]
    Csr {
        identity: String,
        source: rcgen::Error,
    },
}

/// A fresh key and the CSR for `identity`.
pub struct KeyAndCsr {
    pub key: PrivateKeyPem,
    pub csr_pem: String,
    /// The raw public key (EC point), to check the issued leaf carries our key.
    pub public_key_der: Vec<u8>,
}

pub fn generate(identity: &SpiffeId) -> Result<KeyAndCsr, CsrError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CsrError::Key)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity.to_string().try_into().map_err(|e| CsrError::Csr {
        identity: identity.to_string(),
        source: e,
    })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(|e| CsrError::Csr {
        identity: identity.to_string(),
        source: e,
    })?;
    let csr_pem = csr.pem().map_err(|e| CsrError::Csr {
        identity: identity.to_string(),
        source: e,
    })?;
    Ok(KeyAndCsr {
        key: PrivateKeyPem::new(key.serialize_pem()),
        csr_pem,
        public_key_der: key.public_key_raw().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn csr_has_empty_subject_and_the_spiffe_uri() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/win/sa/gw").unwrap();
        let k = generate(&id).unwrap();
        assert!(k.key.expose().contains("BEGIN PRIVATE KEY"), "PKCS#8");
        let (_, pem) = x509_parser::pem::parse_x509_pem(k.csr_pem.as_bytes()).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(&pem.contents).unwrap();
        csr.verify_signature().unwrap();
        let info = &csr.certification_request_info;
        assert_eq!(info.subject.iter().count(), 0, "empty subject");
        let mut uris = vec![];
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        uris.push(u.to_string());
                    }
                }
            }
        }
        assert_eq!(uris, vec![id.to_string()]);
        assert_eq!(
            csr.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
        );
    }
}
