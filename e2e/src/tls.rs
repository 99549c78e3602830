//! A real TLS stack (rustls, TLS 1.3, in memory) for checking Moat-issued certificates: a model
//! server that requires a client certificate from the trust bundle with an allowed SPIFFE ID, and
//! a client that verifies the server's name against the bundle.

use std::sync::Arc;

use moat::pki::KeyedCertificate;
use rustls::{
    ClientConfig, ClientConnection, DistinguishedName, RootCertStore, ServerConfig,
    ServerConnection, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("certificates")
}

fn key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("key")
}

fn roots(bundle: &str) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs(bundle) {
        roots.add(c).expect("root");
    }
    Arc::new(roots)
}

/// Accepts a client certificate only when the chain verifies and its SPIFFE ID is allowed: what a
/// model server does with the identities Moat puts in client certificates.
#[derive(Debug)]
struct AllowedIdentities {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for AllowedIdentities {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| rustls::Error::General("unparsable client certificate".into()))?;
        let ids: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|e| {
                e.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if ids.iter().any(|id| self.allowed.contains(id)) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "client identity {ids:?} is not allowed"
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A model server: serving certificate, trusts `bundle` for clients, accepts `allowed` IDs.
pub fn server_config(serving: &KeyedCertificate, bundle: &str, allowed: &[String]) -> ServerConfig {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(bundle), provider())
        .build()
        .expect("client verifier");
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(Arc::new(AllowedIdentities {
            inner,
            allowed: allowed.to_vec(),
        }))
        .with_single_cert(certs(&serving.cert_pem), key(&serving.key_pem))
        .expect("server config")
}

/// A client trusting `bundle`, presenting `client` if given.
pub fn client_config(bundle: &str, client: Option<&KeyedCertificate>) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots(bundle));
    match client {
        Some(c) => builder
            .with_client_auth_cert(certs(&c.cert_pem), key(&c.key_pem))
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    }
}

/// Runs a handshake in memory and sends one request; `Err` names which side refused.
pub fn handshake(server: ServerConfig, client: ClientConfig, name: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut s = ServerConnection::new(Arc::new(server)).map_err(|e| e.to_string())?;
    let mut c = ClientConnection::new(
        Arc::new(client),
        ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    c.writer()
        .write_all(b"GET /health")
        .map_err(|e| e.to_string())?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).map_err(|e| e.to_string())?;
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).map_err(|e| e.to_string())?;
        }
        s.process_new_packets()
            .map_err(|e| format!("server refused: {e}"))?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).map_err(|e| e.to_string())?;
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).map_err(|e| e.to_string())?;
        }
        c.process_new_packets()
            .map_err(|e| format!("client refused: {e}"))?;
        let mut got = [0u8; 11];
        if !s.is_handshaking() && s.reader().read_exact(&mut got).is_ok() {
            return if &got == b"GET /health" {
                Ok(())
            } else {
                Err("garbled request".into())
            };
        }
    }
    Err("handshake did not finish".into())
}
