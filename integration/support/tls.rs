//! An Istio-style mTLS client for tests: verifies the server chain against the mesh roots and checks
//! its URI SAN (not a DNS name), presents a client certificate, offers a chosen ALPN list and SNI, and
//! speaks one HTTP/1.1 request per connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_parser::prelude::*;

pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    winmesh::identity::verify::pem_certs(pem)
        .unwrap()
        .into_iter()
        .map(CertificateDer::from)
        .collect()
}

pub fn key(pem: &str) -> PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// How the server's URI SAN must look.
#[derive(Debug, Clone)]
pub enum SanCheck {
    Exact(Vec<String>),
    Prefix(String),
}

#[derive(Debug)]
struct SpiffeVerifier {
    roots: Vec<CertificateDer<'static>>,
    san: SanCheck,
    /// Serial of the last certificate the server presented.
    seen_serial: Arc<Mutex<String>>,
}

pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let mut out = vec![];
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                out.push(u.to_string());
            }
        }
    }
    out
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors: Vec<_> = self
            .roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
            .collect();
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("{e:?}")))?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("untrusted server chain: {e:?}")))?;
        let sans = uri_sans(end_entity);
        let ok = match &self.san {
            SanCheck::Exact(want) => sans.iter().any(|s| want.contains(s)),
            SanCheck::Prefix(p) => sans.iter().any(|s| s.starts_with(p)),
        };
        if !ok {
            return Err(rustls::Error::General(format!(
                "server SANs {sans:?} do not match {:?}",
                self.san
            )));
        }
        let (_, cert) = X509Certificate::from_der(end_entity).unwrap();
        *self.seen_serial.lock().unwrap() = cert.raw_serial_as_string().replace(':', "");
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client identity and trust, Istio-style.
#[derive(Clone)]
pub struct MeshClient {
    pub chain_pem: String,
    pub key_pem: String,
    pub roots_pem: String,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: String,
    pub server_serial: String,
    pub alpn: Option<String>,
}

impl MeshClient {
    /// One HTTP/1.1 GET over a fresh mTLS connection.
    pub async fn get(
        &self,
        addr: SocketAddr,
        sni: &str,
        alpn: &[&str],
        san: SanCheck,
        path: &str,
    ) -> Result<Reply, String> {
        self.get_with(addr, sni, alpn, san, path, &[]).await
    }

    /// A TLS 1.2 handshake offering only `suites` (and this client's certificate): `Ok` with the
    /// negotiated suite's name, or the handshake error.
    pub async fn handshake_tls12(
        &self,
        addr: SocketAddr,
        sni: &str,
        alpn: &[&str],
        suites: &[rustls::SupportedCipherSuite],
    ) -> Result<String, String> {
        install_provider();
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: suites.to_vec(),
            ..rustls::crypto::ring::default_provider()
        };
        let verifier = Arc::new(SpiffeVerifier {
            roots: certs(&self.roots_pem),
            san: SanCheck::Prefix("spiffe://".into()),
            seen_serial: Arc::new(Mutex::new(String::new())),
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(certs(&self.chain_pem), key(&self.key_pem))
            .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let fut = async {
            let tls = connect(cfg, addr, sni).await?;
            Ok::<_, String>(
                tls.get_ref()
                    .1
                    .negotiated_cipher_suite()
                    .map(|s| format!("{:?}", s.suite()))
                    .unwrap_or_default(),
            )
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .map_err(|_| "timed out".to_string())?
    }

    /// Like `get`, with extra request headers.
    pub async fn get_with(
        &self,
        addr: SocketAddr,
        sni: &str,
        alpn: &[&str],
        san: SanCheck,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        install_provider();
        let seen = Arc::new(Mutex::new(String::new()));
        let verifier = Arc::new(SpiffeVerifier {
            roots: certs(&self.roots_pem),
            san,
            seen_serial: seen.clone(),
        });
        let mut cfg = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(certs(&self.chain_pem), key(&self.key_pem))
            .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let fut = async {
            let mut tls = connect(cfg, addr, sni).await?;
            let alpn = tls
                .get_ref()
                .1
                .alpn_protocol()
                .map(|a| String::from_utf8_lossy(a).to_string());
            let extra: String = headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}\r\n"))
                .collect();
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\n{extra}Connection: close\r\n\r\n");
            tls.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            let read = tls.read_to_end(&mut buf).await;
            if let (Err(e), true) = (&read, buf.is_empty()) {
                return Err(format!("reading the response: {e}"));
            }
            let text = String::from_utf8_lossy(&buf).to_string();
            let (head, body) = text
                .split_once("\r\n\r\n")
                .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("bad status line: {head:?}"))?;
            Ok::<_, String>(Reply {
                status,
                body: body.to_string(),
                headers: head.to_string(),
                server_serial: seen.lock().unwrap().clone(),
                alpn,
            })
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .map_err(|_| "timed out".to_string())?
    }
}

/// TCP connect and TLS handshake to `addr` with SNI `sni`.
async fn connect(
    cfg: rustls::ClientConfig,
    addr: SocketAddr,
    sni: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
