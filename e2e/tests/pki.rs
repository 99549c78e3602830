//! Moat-issued certificates with a real TLS stack (rustls, TLS 1.3, in memory) and with
//! `openssl verify`: a server and a client with Moat certificates complete a mutual-TLS
//! handshake; a client without a certificate, with one from another CA, with an expired one, or
//! with an identity the server does not accept is refused. After a CA rotation the trust bundle
//! (old and new CA) keeps certificates from both working.

use std::{
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use moat::pki::{self, Ca, Identity, KeyedCertificate};
use moat_e2e::tls::{client_config, handshake, server_config};

const TD: &str = "cluster.local";
const DAY: Duration = Duration::from_secs(86_400);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .expect("clock")
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
