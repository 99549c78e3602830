//! The gate's TLS: the model's serving certificate, and client certificates checked against
//! Moat's CA after the handshake, so that a refused client gets an HTTP answer with its reason
//! (and an audit line) instead of a bare handshake failure.
//!
//! The handshake asks every client for a certificate and checks that the client holds its key
//! (the CertificateVerify signature, by rustls's WebPKI verifier). Whether the certificate chains
//! to Moat's CA and is valid now is decided once per connection by the same verifier, and the
//! result ([`Peer`]) goes to [`super::policy::authorize`] on every request. A connection whose
//! certificate is not trusted can only ever get 403.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use x509_parser::extensions::GeneralName;

use super::{GateError, policy::Peer};

/// The serving configuration and the verifier that judges client certificates, loaded together
/// from one read of the files.
pub struct Tls {
    /// For new connections.
    pub config: Arc<ServerConfig>,
    /// Moat's CA as a client certificate verifier.
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

/// Builds the TLS configuration from PEM: the serving certificate chain, its key, and the CA
/// bundle client certificates must chain to.
pub fn load(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Tls, GateError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| GateError::Tls(format!("serving certificate: {e}")))?;
    if chain.is_empty() {
        return Err(GateError::Tls(
            "serving certificate: no CERTIFICATE block".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| GateError::Tls(format!("serving key: {e}")))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        let ca = ca.map_err(|e| GateError::Tls(format!("CA bundle: {e}")))?;
        roots
            .add(ca)
            .map_err(|e| GateError::Tls(format!("CA bundle: {e}")))?;
    }
    if roots.is_empty() {
        return Err(GateError::Tls("CA bundle: no CERTIFICATE block".into()));
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| GateError::Tls(format!("CA bundle: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GateError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(Deferred {
            inner: verifier.clone(),
        }))
        .with_single_cert(chain, key)
        .map_err(|e| GateError::Tls(format!("serving certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Tls {
        config: Arc::new(config),
        verifier,
    })
}

impl Tls {
    /// Who the peer of a finished handshake is: no certificate, one Moat's CA does not vouch
    /// for at `now`, or a verified one with its SPIFFE ID.
    pub fn peer(&self, certs: Option<&[CertificateDer<'_>]>, now: UnixTime) -> Peer {
        let Some((leaf, intermediates)) = certs.and_then(<[_]>::split_first) else {
            return Peer::Anonymous;
        };
        if let Err(e) = self.verifier.verify_client_cert(leaf, intermediates, now) {
            return Peer::Untrusted { why: e.to_string() };
        }
        Peer::Verified {
            identity: spiffe_id(leaf),
        }
    }
}

/// The first `spiffe://` URI SAN of a DER certificate.
pub fn spiffe_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_string()),
        _ => None,
    })
}

/// Asks for a client certificate and checks possession of its key in the handshake; the chain
/// is judged afterwards ([`Tls::peer`]).
#[derive(Debug)]
struct Deferred {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for Deferred {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
