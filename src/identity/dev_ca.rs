//! The embedded development CA (`ca: dev`). It signs the way istiod does: only the CSR's public key is
//! used; the leaf has an empty subject, a critical URI SAN with the SPIFFE ID, serverAuth + clientAuth,
//! and NotBefore backdated two minutes; the chain comes back as `[leaf, intermediates…, root bundle]`.
//! Its root persists in a state directory so restarts keep the same trust. It powers the local demo and
//! the tests, and issues certificates for other test parties (`winmesh dev-ca issue`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};

use super::csr;
use super::{PrivateKeyPem, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    #[error("dev CA state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dev CA state {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("bad CSR: {0}")]
    BadCsr(String),
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A CA that can sign leaves (a root, or an intermediate under a root).
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// Intermediates between this CA and the root, this CA first (empty for a root CA).
    chain_above: Vec<String>,
    /// Root bundle returned as the last chain element (the root, plus any extra roots).
    roots_pem: Vec<String>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("roots", &self.roots_pem.len())
            .finish()
    }
}

fn serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&b)
}

fn ca_params(org: &str, cn: &str, now: SystemTime, ttl: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = (now - Duration::from_secs(120)).into();
    p.not_after = (now + ttl).into();
    p.serial_number = Some(serial());
    // Authority key identifiers, as istiod's (Go x509) certificates carry: with two roots of the
    // same name in a bundle (a root rotation), a verifier then picks the issuer by key, not by
    // name alone (BoringSSL otherwise fails such chains half the time with a bad signature).
    p.use_authority_key_identifier_extension = true;
    p
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevCaError + '_ {
    move |source| DevCaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes private material: a new file readable by its owner only (mode 0600 on Unix, whatever the
/// mode of a file it replaces), written in full next to `path` and then renamed over it, so readers
/// never see half a key and an old 0644 file never lends its mode to a new key. On Windows the file
/// inherits the directory's ACL: keep the state directory restricted to the service account.
pub fn write_private(path: &Path, data: &str) -> Result<(), DevCaError> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{:08x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(data.as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path)(e)
    })
}

impl DevCa {
    /// A new self-signed root valid for ten years.
    pub fn new_root(trust_domain: &str) -> Result<DevCa, DevCaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| DevCaError::Sign(e.to_string()))?;
        let params = ca_params(
            trust_domain,
            "winmesh dev root CA",
            SystemTime::now(),
            Duration::from_secs(10 * 365 * 86400),
        );
        let cert = params
            .self_signed(&key)
            .map_err(|e| DevCaError::Sign(e.to_string()))?;
        let cert_pem = cert.pem();
        Ok(DevCa {
            issuer: Issuer::new(params, key),
            roots_pem: vec![cert_pem.clone()],
            cert_pem,
            chain_above: vec![],
        })
    }

    /// Loads the root from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<DevCa, DevCaError> {
        let cert_path = dir.join("root-cert.pem");
        let key_path = dir.join("root-key.pem");
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| DevCaError::Corrupt {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
            // A key that is not the certificate's would sign leaves that fail verification.
            let cert_key = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
                .ok()
                .and_then(|(_, pem)| {
                    pem.parse_x509()
                        .ok()
                        .map(|c| c.public_key().subject_public_key.data.to_vec())
                });
            match cert_key {
                Some(k) if k == key.public_key_raw() => {}
                Some(_) => {
                    return Err(DevCaError::Corrupt {
                        path: key_path.clone(),
                        reason: format!(
                            "this private key does not belong to {}",
                            cert_path.display()
                        ),
                    });
                }
                None => {
                    return Err(DevCaError::Corrupt {
                        path: cert_path.clone(),
                        reason: "not a PEM certificate".into(),
                    });
                }
            }
            let issuer =
                Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| DevCaError::Corrupt {
                    path: cert_path.clone(),
                    reason: e.to_string(),
                })?;
            return Ok(DevCa {
                issuer,
                roots_pem: vec![cert_pem.clone()],
                cert_pem,
                chain_above: vec![],
            });
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ca = DevCa::new_root(trust_domain)?;
        write_private(&key_path, &ca.issuer.key().serialize_pem())?;
        std::fs::write(&cert_path, &ca.cert_pem).map_err(io(&cert_path))?;
        Ok(ca)
    }

    /// An intermediate CA signed by `self`.
    pub fn intermediate(&self, name: &str) -> Result<DevCa, DevCaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| DevCaError::Sign(e.to_string()))?;
        let params = ca_params(
            "winmesh",
            name,
            SystemTime::now(),
            Duration::from_secs(365 * 86400),
        );
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| DevCaError::Sign(e.to_string()))?;
        let cert_pem = cert.pem();
        let mut chain_above = vec![cert_pem.clone()];
        chain_above.extend(self.chain_above.iter().cloned());
        Ok(DevCa {
            issuer: Issuer::new(params, key),
            cert_pem,
            chain_above,
            roots_pem: self.roots_pem.clone(),
        })
    }

    /// Adds another root to the bundle returned with every chain (simulates root rotation).
    pub fn with_extra_root(mut self, root_pem: &str) -> Self {
        self.roots_pem.push(root_pem.to_string());
        self
    }

    /// This CA's own certificate.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The root bundle (PEM) clients must trust.
    pub fn roots_pem(&self) -> String {
        self.roots_pem.concat()
    }

    /// Signs a leaf for `identity` with the public key of `csr_pem`, valid for `ttl` from `now`
    /// (NotBefore backdated two minutes). Returns istiod's `cert_chain` layout.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<String>, DevCaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| DevCaError::BadCsr(e.to_string()))?;
        self.sign_key(&csr.public_key, identity, ttl, now)
    }

    fn sign_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<String>, DevCaError> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| DevCaError::Sign(e.to_string()))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = (now - Duration::from_secs(120)).into();
        p.not_after = (now + ttl).into();
        p.serial_number = Some(serial());
        p.use_authority_key_identifier_extension = true;
        let leaf = p
            .signed_by(public_key, &self.issuer)
            .map_err(|e| DevCaError::Sign(e.to_string()))?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain_above.iter().cloned());
        chain.push(self.roots_pem());
        Ok(chain)
    }

    /// Issues a TLS server certificate for a DNS name (e.g. a test istiod's serving certificate).
    pub fn issue_server(
        &self,
        dns: &str,
        ttl: Duration,
    ) -> Result<(PrivateKeyPem, String), DevCaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| DevCaError::Sign(e.to_string()))?;
        let mut p = CertificateParams::new(vec![dns.to_string()])
            .map_err(|e| DevCaError::Sign(e.to_string()))?;
        p.distinguished_name = DistinguishedName::new();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = (SystemTime::now() - Duration::from_secs(120)).into();
        p.not_after = (SystemTime::now() + ttl).into();
        p.serial_number = Some(serial());
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| DevCaError::Sign(e.to_string()))?;
        let mut chain = cert.pem();
        chain.push_str(&self.chain_above.concat());
        Ok((PrivateKeyPem::new(key.serialize_pem()), chain))
    }

    /// Issues a key and certificate for a test party (e.g. a Linux sidecar in tests and the demo).
    pub fn issue(
        &self,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<(PrivateKeyPem, Vec<String>), DevCaError> {
        let k = csr::generate(identity).map_err(|e| DevCaError::Sign(e.to_string()))?;
        let chain = self.sign_csr(&k.csr_pem, identity, ttl, SystemTime::now())?;
        Ok((k.key, chain))
    }

    /// Writes `cert-chain.pem` (leaf + intermediates), `key.pem` (owner-only) and `root-cert.pem` for
    /// `identity` into `out`.
    pub fn issue_to_dir(
        &self,
        identity: &SpiffeId,
        ttl: Duration,
        out: &Path,
    ) -> Result<(), DevCaError> {
        let (key, chain) = self.issue(identity, ttl)?;
        std::fs::create_dir_all(out).map_err(io(out))?;
        let n = chain.len();
        let cert_chain = chain[..n - 1].concat();
        let p = out.join("cert-chain.pem");
        std::fs::write(&p, cert_chain).map_err(io(&p))?;
        let p = out.join("root-cert.pem");
        std::fs::write(&p, &chain[n - 1]).map_err(io(&p))?;
        write_private(&out.join("key.pem"), key.expose())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::verify::verify_chain;
    use x509_parser::prelude::*;

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/win/sa/gw").unwrap()
    }

    #[test]
    fn signs_like_istiod() {
        let ca = DevCa::new_root("cluster.local").unwrap();
        let k = csr::generate(&id()).unwrap();
        let now = SystemTime::now();
        let chain = ca
            .sign_csr(&k.csr_pem, &id(), Duration::from_secs(3600), now)
            .unwrap();
        assert_eq!(chain.len(), 2, "[leaf, root]");
        let der = crate::identity::verify::pem_certs(&chain[0])
            .unwrap()
            .remove(0);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(cert.subject().iter().count(), 0, "empty subject");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "critical URI SAN");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let nb = cert.validity().not_before.timestamp();
        let now_s = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (now_s - 125..=now_s - 115).contains(&nb),
            "backdated 2 minutes"
        );
        assert!(!cert.is_ca());
        let b = verify_chain(&id(), k.key, &k.public_key_der, &chain, now).unwrap();
        assert_eq!(b.chain_pem.len(), 1);
        assert_eq!(b.roots_pem.len(), 1);
    }

    #[test]
    fn intermediates_and_multi_root_bundles_verify() {
        let root = DevCa::new_root("cluster.local").unwrap();
        let other = DevCa::new_root("cluster.local").unwrap();
        let inter = root
            .intermediate("istiod intermediate")
            .unwrap()
            .with_extra_root(other.cert_pem());
        let k = csr::generate(&id()).unwrap();
        let chain = inter
            .sign_csr(
                &k.csr_pem,
                &id(),
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(chain.len(), 3, "[leaf, intermediate, roots]");
        assert_eq!(
            crate::identity::verify::pem_certs(&chain[2]).unwrap().len(),
            2
        );
        let b = verify_chain(&id(), k.key, &k.public_key_der, &chain, SystemTime::now()).unwrap();
        assert_eq!(b.chain_pem.len(), 2);
        assert_eq!(b.roots.len(), 2);
        assert_eq!(b.intermediates.len(), 1);
    }

    #[test]
    fn plugged_in_ca_layout_with_the_root_inside_the_chain_verifies() {
        // istiod with cacerts answers [leaf, cert-chain.pem (intermediate + root), root-cert.pem].
        let root = DevCa::new_root("cluster.local").unwrap();
        let inter = root.intermediate("plugged-in intermediate").unwrap();
        let k = csr::generate(&id()).unwrap();
        let mut chain = inter
            .sign_csr(
                &k.csr_pem,
                &id(),
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        chain[1] = format!("{}{}", chain[1], root.cert_pem());
        let b = verify_chain(&id(), k.key, &k.public_key_der, &chain, SystemTime::now()).unwrap();
        assert_eq!(
            b.chain_pem.len(),
            3,
            "leaf, intermediate, root as istiod sent them"
        );
        assert_eq!(b.roots.len(), 1);
    }

    #[test]
    fn root_persists_across_restarts_with_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = DevCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let b = DevCa::load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("root-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A chain from the reloaded CA verifies against the first root.
        let k = csr::generate(&id()).unwrap();
        let chain = b
            .sign_csr(
                &k.csr_pem,
                &id(),
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(chain.last().unwrap(), a.cert_pem());
    }

    /// Reissuing over an existing world-readable key.pem must not keep its mode.
    #[cfg(unix)]
    #[test]
    fn private_files_are_owner_only_even_over_a_0644_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let ca = DevCa::new_root("cluster.local").unwrap();
        ca.issue_to_dir(&id(), Duration::from_secs(60), dir.path())
            .unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            std::fs::read_to_string(&key)
                .unwrap()
                .contains("PRIVATE KEY")
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind");
    }

    #[test]
    fn a_root_key_that_does_not_match_the_root_cert_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        DevCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let other = tempfile::tempdir().unwrap();
        DevCa::load_or_create(other.path(), "cluster.local").unwrap();
        std::fs::copy(
            other.path().join("root-key.pem"),
            dir.path().join("root-key.pem"),
        )
        .unwrap();
        let Err(e) = DevCa::load_or_create(dir.path(), "cluster.local") else {
            panic!("mismatch accepted")
        };
        assert!(e.to_string().contains("does not belong to"), "{e}");
        assert!(
            !e.to_string().contains("PRIVATE KEY"),
            "no key material in errors"
        );
    }

    #[test]
    fn issue_to_dir_writes_the_three_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new_root("cluster.local").unwrap();
        ca.issue_to_dir(&id(), Duration::from_secs(60), dir.path())
            .unwrap();
        for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
            assert!(dir.path().join(f).is_file(), "{f}");
        }
    }

    #[test]
    fn verification_rejects_wrong_san_key_time_and_trust() {
        let ca = DevCa::new_root("cluster.local").unwrap();
        let now = SystemTime::now();
        let k = csr::generate(&id()).unwrap();
        let other = SpiffeId::parse("spiffe://cluster.local/ns/x/sa/y").unwrap();
        // Wrong SAN.
        let chain = ca
            .sign_csr(&k.csr_pem, &other, Duration::from_secs(60), now)
            .unwrap();
        let e = verify_chain(&id(), k.key.clone(), &k.public_key_der, &chain, now).unwrap_err();
        assert!(
            matches!(e, crate::identity::verify::ChainError::WrongSan { .. }),
            "{e}"
        );
        // Wrong key.
        let k2 = csr::generate(&id()).unwrap();
        let chain = ca
            .sign_csr(&k2.csr_pem, &id(), Duration::from_secs(60), now)
            .unwrap();
        let e = verify_chain(&id(), k.key.clone(), &k.public_key_der, &chain, now).unwrap_err();
        assert_eq!(e, crate::identity::verify::ChainError::WrongKey);
        // Expired.
        let chain = ca
            .sign_csr(&k.csr_pem, &id(), Duration::from_secs(60), now)
            .unwrap();
        let e = verify_chain(
            &id(),
            k.key.clone(),
            &k.public_key_der,
            &chain,
            now + Duration::from_secs(3600),
        )
        .unwrap_err();
        assert!(matches!(e, crate::identity::verify::ChainError::Expired(_)));
        // Untrusted: the root bundle is another CA.
        let stranger = DevCa::new_root("cluster.local").unwrap();
        let mut chain = ca
            .sign_csr(&k.csr_pem, &id(), Duration::from_secs(60), now)
            .unwrap();
        *chain.last_mut().unwrap() = stranger.cert_pem().to_string();
        let e = verify_chain(&id(), k.key.clone(), &k.public_key_der, &chain, now).unwrap_err();
        assert!(
            matches!(e, crate::identity::verify::ChainError::Untrusted(_)),
            "{e}"
        );
        // Garbage and too-short chains.
        let e = verify_chain(
            &id(),
            k.key.clone(),
            &k.public_key_der,
            &["junk".into(), "junk".into()],
            now,
        )
        .unwrap_err();
        assert!(
            matches!(e, crate::identity::verify::ChainError::Empty { index: 0 }),
            "{e}"
        );
        let e = verify_chain(&id(), k.key, &k.public_key_der, &chain[..1], now).unwrap_err();
        assert_eq!(e, crate::identity::verify::ChainError::TooShort(1));
    }
}
