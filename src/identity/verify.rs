//! Checks an issued chain before it replaces anything: istiod's layout (`[leaf, intermediates…, roots]`
//! where the last element may hold several root PEMs), the leaf's URI SAN, that the leaf carries the
//! key we generated, that it chains to the returned roots, and that it is inside its validity window.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

use super::{CertBundle, CertInfo, PrivateKeyPem, SpiffeId};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("certificate chain has {0} element(s); need a leaf and a root")]
    TooShort(usize),
    #[error("element {index} of the chain is not PEM certificates: {reason}")]
    BadPem { index: usize, reason: String },
    #[error("element {index} of the chain holds no certificate")]
    Empty { index: usize },
    #[error("certificate {index} cannot be parsed: {reason}")]
    BadCert { index: usize, reason: String },
    #[error("leaf URI SANs are {got:?}, expected exactly [{expected}]")]
    WrongSan { expected: String, got: Vec<String> },
    #[error("leaf public key is not the key of our CSR")]
    WrongKey,
    #[error("leaf is not valid before {0}")]
    NotYetValid(String),
    #[error("leaf expired at {0}")]
    Expired(String),
    #[error("leaf does not chain to the returned roots: {0}")]
    Untrusted(String),
}

/// Splits a PEM blob into DER certificates.
pub fn pem_certs(blob: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for item in Pem::iter_from_buffer(blob.as_bytes()) {
        let pem = item.map_err(|e| e.to_string())?;
        if pem.label == "CERTIFICATE" {
            out.push(pem.contents);
        }
    }
    Ok(out)
}

fn to_pem(der: &[u8]) -> String {
    use std::fmt::Write;
    let b64 = base64_encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        let _ = writeln!(s, "{}", String::from_utf8_lossy(chunk));
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn asn1_time(t: &ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Facts about a DER certificate.
pub fn cert_info(der: &[u8], index: usize) -> Result<(CertInfo, Vec<String>, Vec<u8>), ChainError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| ChainError::BadCert {
        index,
        reason: e.to_string(),
    })?;
    let mut sans = Vec::new();
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => {
                    uris.push(u.to_string());
                    sans.push(format!("URI:{u}"));
                }
                GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                other => sans.push(format!("{other}")),
            }
        }
    }
    let info = CertInfo {
        serial: cert.raw_serial_as_string().replace(':', ""),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        sans,
        not_before: asn1_time(&cert.validity().not_before),
        not_after: asn1_time(&cert.validity().not_after),
        sha256: Sha256::digest(der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    };
    Ok((
        info,
        uris,
        cert.public_key().subject_public_key.data.to_vec(),
    ))
}

fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Verifies an istiod-style `cert_chain` for `identity`, issued for the key whose raw public key is
/// `public_key_der`, at time `now`.
pub fn verify_chain(
    identity: &SpiffeId,
    key: PrivateKeyPem,
    public_key_der: &[u8],
    cert_chain: &[String],
    now: SystemTime,
) -> Result<CertBundle, ChainError> {
    if cert_chain.len() < 2 {
        return Err(ChainError::TooShort(cert_chain.len()));
    }
    let mut ders: Vec<Vec<Vec<u8>>> = Vec::new();
    for (index, elem) in cert_chain.iter().enumerate() {
        let certs = pem_certs(elem).map_err(|reason| ChainError::BadPem { index, reason })?;
        if certs.is_empty() {
            return Err(ChainError::Empty { index });
        }
        ders.push(certs);
    }
    let roots_der = ders.pop().unwrap_or_default();
    let mut chain_der: Vec<Vec<u8>> = ders.into_iter().flatten().collect();
    if chain_der.is_empty() {
        return Err(ChainError::TooShort(1));
    }
    let leaf_der = chain_der.remove(0);
    let (leaf, uris, spki) = cert_info(&leaf_der, 0)?;
    if uris != [identity.to_string()] {
        return Err(ChainError::WrongSan {
            expected: identity.to_string(),
            got: uris,
        });
    }
    if spki != public_key_der {
        return Err(ChainError::WrongKey);
    }
    if now < leaf.not_before {
        return Err(ChainError::NotYetValid(fmt_time(leaf.not_before)));
    }
    if now > leaf.not_after {
        return Err(ChainError::Expired(fmt_time(leaf.not_after)));
    }
    let intermediates = chain_der
        .iter()
        .enumerate()
        .map(|(i, d)| cert_info(d, i + 1).map(|x| x.0))
        .collect::<Result<Vec<_>, _>>()?;
    let roots = roots_der
        .iter()
        .enumerate()
        .map(|(i, d)| cert_info(d, cert_chain.len() - 1 + i).map(|x| x.0))
        .collect::<Result<Vec<_>, _>>()?;

    let anchors = roots_der
        .iter()
        .map(|d| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(d.as_slice()))
                .map(|a| a.to_owned())
                .map_err(|e| ChainError::Untrusted(format!("bad root: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let inter: Vec<CertificateDer<'_>> = chain_der
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let leaf_cert = CertificateDer::from(leaf_der.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf_cert)
        .map_err(|e| ChainError::Untrusted(format!("{e:?}")))?;
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inter,
        UnixTime::since_unix_epoch(since),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| ChainError::Untrusted(format!("{e:?}")))?;

    let mut chain_pem = vec![to_pem(&leaf_der)];
    chain_pem.extend(chain_der.iter().map(|d| to_pem(d)));
    Ok(CertBundle {
        identity: identity.clone(),
        key,
        chain_pem,
        roots_pem: roots_der.iter().map(|d| to_pem(d)).collect(),
        leaf,
        intermediates,
        roots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }
}
