//! Moat-issued certificates with a real TLS stack (rustls, TLS 1.3, in memory) and with
//! `openssl verify`: a server and a client with Moat certificates complete a mutual-TLS
//! handshake; a client without a certificate, with one from another CA, with an expired one, or
//! with an identity the server does not accept is refused. After a CA rotation the trust bundle
//! (old and new CA) keeps certificates from both working.

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use moat::pki::{self, Ca, Identity, KeyedCertificate};
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

const TD: &str = "cluster.local";
const DAY: Duration = Duration::from_secs(86_400);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .expect("clock")
}

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
fn server_config(serving: &KeyedCertificate, bundle: &str, allowed: &[String]) -> ServerConfig {
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

fn client_config(bundle: &str, client: Option<&KeyedCertificate>) -> ClientConfig {
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
fn handshake(server: ServerConfig, client: ClientConfig, name: &str) -> Result<(), String> {
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

struct Pki {
    ca: Ca,
    bundle: String,
    serving: KeyedCertificate,
    allowed: String,
}

fn pki() -> Pki {
    let now = now();
    let ca = Ca::load(&pki::generate_ca(TD, now, 365 * DAY).expect("ca"), now).expect("load");
    let server_id = Identity::server("ml", "fraud", "fraud", "cluster.local");
    let serving = ca.issue(&server_id, TD, now, DAY).expect("serving");
    let allowed = Identity::client("payments", "checkout").spiffe_id(TD);
    Pki {
        bundle: ca.cert_pem.clone(),
        ca,
        serving,
        allowed,
    }
}

fn client(ca: &Ca, ns: &str, sa: &str, issued_at: i64, lifetime: Duration) -> KeyedCertificate {
    ca.issue(&Identity::client(ns, sa), TD, issued_at, lifetime)
        .expect("client")
}

#[test]
fn moat_certificates_complete_a_mutual_tls_handshake_for_every_service_name() {
    let p = pki();
    let c = client(&p.ca, "payments", "checkout", now(), DAY);
    for name in [
        "fraud",
        "fraud.ml",
        "fraud.ml.svc",
        "fraud.ml.svc.cluster.local",
    ] {
        handshake(
            server_config(&p.serving, &p.bundle, std::slice::from_ref(&p.allowed)),
            client_config(&p.bundle, Some(&c)),
            name,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // A name the certificate does not carry is refused by the client.
    let e = handshake(
        server_config(&p.serving, &p.bundle, std::slice::from_ref(&p.allowed)),
        client_config(&p.bundle, Some(&c)),
        "fraud.other.svc",
    )
    .expect_err("wrong server name accepted");
    assert!(e.contains("client refused"), "{e}");
}

#[test]
fn clients_without_a_valid_allowed_certificate_are_refused() {
    let p = pki();
    let server = || server_config(&p.serving, &p.bundle, std::slice::from_ref(&p.allowed));
    let n = now();

    let e = handshake(server(), client_config(&p.bundle, None), "fraud.ml.svc")
        .expect_err("no client certificate accepted");
    assert!(e.contains("server refused"), "no certificate: {e}");

    let stranger = Ca::load(&pki::generate_ca(TD, n, DAY).expect("ca"), n).expect("load");
    let foreign = client(&stranger, "payments", "checkout", n, DAY);
    let e = handshake(
        server(),
        client_config(&p.bundle, Some(&foreign)),
        "fraud.ml.svc",
    )
    .expect_err("certificate from another CA accepted");
    assert!(e.contains("server refused"), "other CA: {e}");

    let old_ca = Ca::load(
        &pki::generate_ca(TD, n - 3 * 86_400, 10 * DAY).expect("ca"),
        n,
    )
    .expect("load");
    let expired = client(&old_ca, "payments", "checkout", n - 2 * 86_400, DAY);
    let e = handshake(
        server_config(
            &p.serving,
            &old_ca.cert_pem,
            std::slice::from_ref(&p.allowed),
        ),
        client_config(&p.bundle, Some(&expired)),
        "fraud.ml.svc",
    )
    .expect_err("expired certificate accepted");
    assert!(
        e.contains("server refused") && e.contains("xpired"),
        "expired: {e}"
    );

    let other = client(&p.ca, "payments", "intruder", n, DAY);
    let e = handshake(
        server(),
        client_config(&p.bundle, Some(&other)),
        "fraud.ml.svc",
    )
    .expect_err("wrong identity accepted");
    assert!(e.contains("not allowed"), "wrong identity: {e}");
}

#[test]
fn after_a_ca_rotation_the_bundle_keeps_old_and_new_certificates_working() {
    let p = pki();
    let n = now();
    let old_client = client(&p.ca, "payments", "checkout", n, DAY);
    let new_ca = Ca::load(&pki::generate_ca(TD, n, 365 * DAY).expect("ca"), n).expect("load");
    let bundle = format!("{}{}", new_ca.cert_pem, p.ca.cert_pem);
    let new_serving = new_ca
        .issue(
            &Identity::server("ml", "fraud", "fraud", "cluster.local"),
            TD,
            n,
            DAY,
        )
        .expect("serving");
    let new_client = client(&new_ca, "payments", "checkout", n, DAY);
    // Every mix of old and new leaves handshakes while both CAs are in the bundle.
    for (serving, c) in [
        (&p.serving, &new_client),
        (&new_serving, &old_client),
        (&new_serving, &new_client),
    ] {
        handshake(
            server_config(serving, &bundle, std::slice::from_ref(&p.allowed)),
            client_config(&bundle, Some(c)),
            "fraud.ml.svc",
        )
        .expect("handshake across the rotation");
    }
    // Without the old CA in the bundle, an old leaf fails: the overlap is what keeps it working.
    assert!(
        handshake(
            server_config(
                &new_serving,
                &new_ca.cert_pem,
                std::slice::from_ref(&p.allowed)
            ),
            client_config(&new_ca.cert_pem, Some(&old_client)),
            "fraud.ml.svc",
        )
        .is_err()
    );
}

#[test]
fn openssl_verifies_the_chains_and_rejects_a_foreign_ca() {
    let p = pki();
    let dir = std::env::temp_dir().join(format!("moat-pki-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let ca = write("ca.crt", &p.bundle);
    let serving = write("serving.crt", &p.serving.cert_pem);
    let c = client(&p.ca, "payments", "checkout", now(), DAY);
    let client_crt = write("client.crt", &c.cert_pem);
    let verify = |purpose: &str, cert: &std::path::Path, ca: &std::path::Path| {
        Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(ca)
            .arg(cert)
            .output()
            .expect("run openssl (make deps installs it)")
    };
    let out = verify("sslserver", &serving, &ca);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
    let out = verify("sslclient", &client_crt, &ca);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A serving certificate is not a client certificate, and a foreign CA verifies nothing.
    assert!(!verify("sslclient", &serving, &ca).status.success());
    let n = now();
    let stranger = Ca::load(&pki::generate_ca(TD, n, DAY).expect("ca"), n).expect("load");
    let other_ca = write("other.crt", &stranger.cert_pem);
    assert!(!verify("sslserver", &serving, &other_ca).status.success());
    std::fs::remove_dir_all(&dir).ok();
}
