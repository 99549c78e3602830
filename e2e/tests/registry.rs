//! The loopback registry harness (`moat_e2e::registry`) against the real tools: Debian's
//! `docker-registry` with TLS and basic auth, images pushed by `skopeo` from OCI layouts. No
//! cluster needed. Also shows what the `oci-client` crate (the operator's resolver) gets from
//! this registry: the same digests as skopeo, and which error for which failure.

use std::time::{SystemTime, UNIX_EPOCH};

use moat_e2e::registry::{
    Creds, OCI_INDEX, Registry, RegistryOptions, TestImage, is_digest, sha256_digest,
};
use oci_client::{
    Client, Reference,
    client::{Certificate, CertificateEncoding, ClientConfig},
    errors::{OciDistributionError, OciErrorCode},
    secrets::RegistryAuth,
};

async fn registry() -> Registry {
    Registry::start(RegistryOptions::default())
        .await
        .expect("start docker-registry")
}

#[tokio::test]
async fn pushed_digests_are_the_manifest_digests() {
    let reg = registry().await;

    let single = TestImage::single("one");
    let digest = reg.push("team/app:v1", &single).await.expect("push single");
    assert!(is_digest(&digest), "{digest}");
    assert_eq!(digest, single.digest());
    let raw = reg.raw_manifest("team/app:v1").await.expect("raw");
    assert_eq!(digest, sha256_digest(&raw));
    assert_eq!(
        digest,
        reg.index_digest("team/app:v1").await.expect("index")
    );

    let multi = TestImage::multi_arch("one");
    let digest = reg.push("team/multi:v1", &multi).await.expect("push multi");
    assert!(is_digest(&digest), "{digest}");
    assert_eq!(digest, multi.digest());
    let raw = reg.raw_manifest("team/multi:v1").await.expect("raw");
    let index: serde_json::Value = serde_json::from_slice(&raw).expect("index json");
    assert_eq!(index["mediaType"], OCI_INDEX);
    assert_eq!(index["manifests"].as_array().map(Vec::len), Some(2));
    // skopeo's .Digest is the index digest, not a platform manifest's.
    assert_eq!(digest, sha256_digest(&raw));
    assert_eq!(
        digest,
        reg.index_digest("team/multi:v1").await.expect("index")
    );
    let platforms = multi.platform_digests();
    assert!(platforms.iter().all(|(_, d)| *d != digest));

    // Evidence: whichever platform skopeo resolves for .Architecture, .Digest stays the index's.
    for (arch, _) in &platforms {
        let out = tokio::process::Command::new("skopeo")
            .args(["inspect", "--override-arch", arch, "--creds"])
            .arg(format!("{}:{}", reg.username(), reg.password()))
            .arg("--cert-dir")
            .arg(reg.cert_dir())
            .args(["--format", "{{.Digest}} {{.Architecture}}"])
            .arg(format!("docker://{}", reg.image_ref("team/multi:v1")))
            .output()
            .await
            .expect("skopeo");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{digest} {arch}")
        );
    }
}

#[tokio::test]
async fn moving_and_deleting_a_tag() {
    let reg = registry().await;
    let first = reg
        .push("team/app:stable", &TestImage::single("a"))
        .await
        .expect("push");
    let moved = reg
        .move_tag("team/app:stable", &TestImage::single("b"))
        .await
        .expect("move");
    assert_ne!(first, moved);
    assert_eq!(
        reg.inspect_digest("team/app:stable")
            .await
            .expect("inspect"),
        moved
    );
    // The same for a multi-arch tag moved to a single image and back.
    let m1 = reg
        .push("team/multi:stable", &TestImage::multi_arch("a"))
        .await
        .expect("push");
    let m2 = reg
        .move_tag("team/multi:stable", &TestImage::single("a"))
        .await
        .expect("move");
    let m3 = reg
        .move_tag("team/multi:stable", &TestImage::multi_arch("b"))
        .await
        .expect("move");
    assert!(m1 != m2 && m2 != m3 && m1 != m3);

    reg.delete("team/app:stable").await.expect("delete");
    let err = reg
        .inspect_digest("team/app:stable")
        .await
        .expect_err("deleted");
    assert!(format!("{err:#}").contains("manifest unknown"), "{err:#}");
}

#[tokio::test]
async fn credentials_are_required() {
    let reg = registry().await;
    reg.push("team/app:v1", &TestImage::single("a"))
        .await
        .expect("push");
    let anonymous = reg
        .inspect_digest_as("team/app:v1", Creds::Anonymous)
        .await
        .expect_err("anonymous pull refused");
    assert!(
        format!("{anonymous:#}").contains("unauthorized"),
        "{anonymous:#}"
    );
    let wrong = reg
        .inspect_digest_as("team/app:v1", Creds::Basic(reg.username(), "wrong"))
        .await
        .expect_err("wrong password refused");
    assert!(format!("{wrong:#}").contains("unauthorized"), "{wrong:#}");

    let dockerconfig: serde_json::Value =
        serde_json::from_slice(&reg.dockerconfigjson()).expect("json");
    let entry = &dockerconfig["auths"][reg.host()];
    assert_eq!(entry["username"], reg.username());
    assert_eq!(entry["password"], reg.password());

    // An anonymous registry serves without credentials.
    let open = Registry::start(RegistryOptions::anonymous())
        .await
        .expect("start");
    let d = open
        .push("team/app:v1", &TestImage::single("a"))
        .await
        .expect("push");
    assert_eq!(
        open.inspect_digest_as("team/app:v1", Creds::Anonymous)
            .await
            .expect("anonymous"),
        d
    );
}

#[tokio::test]
async fn restart_keeps_port_and_images() {
    let mut reg = registry().await;
    let host = reg.host();
    let single = reg
        .push("team/app:v1", &TestImage::single("keep"))
        .await
        .expect("push");
    let multi = reg
        .push("team/multi:v1", &TestImage::multi_arch("keep"))
        .await
        .expect("push");

    reg.stop().await.expect("stop");
    assert!(!reg.is_up().await);
    let err = reg
        .inspect_digest("team/app:v1")
        .await
        .expect_err("registry down");
    assert!(format!("{err:#}").contains("connection refused"), "{err:#}");

    reg.restart().await.expect("restart");
    assert!(reg.is_up().await);
    assert_eq!(reg.host(), host);
    assert_eq!(reg.inspect_digest("team/app:v1").await.expect("v1"), single);
    assert_eq!(
        reg.inspect_digest("team/multi:v1").await.expect("multi"),
        multi
    );
}

fn oci_client(ca_pem: Option<&str>) -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        extra_root_certificates: ca_pem
            .map(|pem| Certificate {
                encoding: CertificateEncoding::Pem,
                data: pem.as_bytes().to_vec(),
            })
            .into_iter()
            .collect(),
        ..Default::default()
    })
}

fn basic(reg: &Registry) -> RegistryAuth {
    RegistryAuth::Basic(reg.username().into(), reg.password().into())
}

fn reference(reg: &Registry, repo_tag: &str) -> Reference {
    reg.image_ref(repo_tag).parse().expect("reference")
}

/// Fetches a digest and returns the error, printing it (Display, source chain, Debug) for the
/// record.
async fn oci_error(
    what: &str,
    client: &Client,
    image: &Reference,
    auth: &RegistryAuth,
) -> OciDistributionError {
    let err = client
        .fetch_manifest_digest(image, auth)
        .await
        .expect_err(what);
    eprintln!(
        "oci-client, {what}:\n  Display: {err}\n  chain: {}\n  Debug: {err:?}",
        chain(&err)
    );
    err
}

/// The Display of every error in the source chain, joined by `: `.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        parts.push(e.to_string());
        source = e.source();
    }
    parts.join(": ")
}

fn manifest_unknown(err: &OciDistributionError) -> bool {
    matches!(err, OciDistributionError::RegistryError { envelope, .. }
        if envelope.errors.iter().any(|e| e.code == OciErrorCode::ManifestUnknown))
}

/// The first rustls error or I/O error kind in a reqwest error's source chain. reqwest nests
/// `io::Error(Other)` around `io::Error(InvalidData)` around the `rustls::Error`, and an
/// `io::Error` skips its inner error in `source()`: look inside with `get_ref()`.
fn transport_cause(err: &OciDistributionError) -> String {
    let OciDistributionError::RequestError(e) = err else {
        return format!("not a RequestError: {err:?}");
    };
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = next {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return format!("rustls: {tls:?}");
        }
        next = match s.downcast_ref::<std::io::Error>() {
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => return format!("io: {:?}", io.kind()),
            },
            None => s.source(),
        };
    }
    "none".into()
}

#[tokio::test]
async fn oci_client_resolves_the_same_digests_and_reports_failures() {
    let mut reg = registry().await;
    let single = reg
        .push("team/app:v1", &TestImage::single("oci"))
        .await
        .expect("push");
    let multi = reg
        .push("team/multi:v1", &TestImage::multi_arch("oci"))
        .await
        .expect("push");
    let client = oci_client(Some(reg.ca_pem()));
    for (repo_tag, want) in [("team/app:v1", &single), ("team/multi:v1", &multi)] {
        let got = client
            .fetch_manifest_digest(&reference(&reg, repo_tag), &basic(&reg))
            .await
            .expect("fetch_manifest_digest");
        assert_eq!(&got, want, "{repo_tag}");
    }

    // Each failure with a fresh client (see below for why).
    let ca = reg.ca_pem().to_string();
    let fresh = || oci_client(Some(&ca));
    let app = reference(&reg, "team/app:v1");
    let wrong = RegistryAuth::Basic(reg.username().into(), "wrong".into());
    for (what, auth) in [
        ("no credentials", &RegistryAuth::Anonymous),
        ("wrong password", &wrong),
    ] {
        let err = oci_error(what, &fresh(), &app, auth).await;
        assert!(
            matches!(err, OciDistributionError::UnauthorizedError { .. }),
            "{err:?}"
        );
    }
    // distribution answers MANIFEST_UNKNOWN (404) for an unknown repository too, not NAME_UNKNOWN.
    for (what, repo_tag) in [
        ("unknown tag", "team/app:nope"),
        ("unknown repository", "team/nothing:v1"),
    ] {
        let err = oci_error(what, &fresh(), &reference(&reg, repo_tag), &basic(&reg)).await;
        assert!(manifest_unknown(&err), "{err:?}");
    }
    let other_ca = moat::pki::generate_ca("elsewhere", now(), std::time::Duration::from_secs(3600))
        .expect("ca");
    for (what, client) in [
        (
            "untrusted CA (another CA configured)",
            oci_client(Some(&other_ca.cert_pem)),
        ),
        ("untrusted CA (no extra CA)", oci_client(None)),
    ] {
        let err = oci_error(what, &client, &app, &basic(&reg)).await;
        assert_eq!(
            transport_cause(&err),
            "rustls: InvalidCertificate(UnknownIssuer)"
        );
    }

    // One client keeps the credentials it was first given for a registry: after a wrong
    // password, the right one is not used (and after the right one, a wrong one still works).
    // A resolver must use a fresh client per credentials (e.g. per resolution).
    let shared = fresh();
    let first = shared.fetch_manifest_digest(&app, &wrong).await;
    let second = shared.fetch_manifest_digest(&app, &basic(&reg)).await;
    assert!(
        matches!(first, Err(OciDistributionError::UnauthorizedError { .. })),
        "{first:?}"
    );
    assert!(
        matches!(second, Err(OciDistributionError::UnauthorizedError { .. })),
        "right password after a wrong one on the same client: {second:?}"
    );
    let shared = fresh();
    let first = shared.fetch_manifest_digest(&app, &basic(&reg)).await;
    let second = shared.fetch_manifest_digest(&app, &wrong).await;
    assert_eq!(first.as_ref().ok(), Some(&single));
    assert_eq!(
        second.as_ref().ok(),
        Some(&single),
        "wrong password after the right one on the same client"
    );

    reg.stop().await.expect("stop");
    let err = oci_error("registry down", &fresh(), &app, &basic(&reg)).await;
    assert_eq!(transport_cause(&err), "io: ConnectionRefused");
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .expect("clock")
}

/// `moat render --resolve` asks the registry for the tag's digest as the operator does (its CA
/// and the credentials of a `.dockerconfigjson`), and renders the pods with it; without the
/// credentials the registry's refusal is the one-line error.
#[tokio::test]
async fn moat_render_resolves_the_tag_it_renders() {
    let reg = registry().await;
    let digest = reg
        .push("serving/model:v1", &TestImage::single("render"))
        .await
        .expect("push");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = dir.path().join("smd.yaml");
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/full.yaml"
    ))
    .expect("fixture");
    let image = reg.image_ref("serving/model:v1");
    let text = fixture.replace("registry.example.com:5000/serving/vllm:v0.6.3", &image);
    assert_ne!(text, fixture, "the fixture's image was replaced");
    std::fs::write(&spec, text).expect("write spec");
    let config = dir.path().join("config.json");
    std::fs::write(&config, reg.dockerconfigjson()).expect("write config");
    let moat = moat_e2e::moat_binary().expect("moat binary");
    let render = |with_credentials: bool| {
        let mut command = std::process::Command::new(&moat);
        command
            .arg("render")
            .arg("-f")
            .arg(&spec)
            .arg("--resolve")
            .arg("--ca-file")
            .arg(reg.ca_file());
        if with_credentials {
            command.arg("--docker-config").arg(&config);
        }
        command.output().expect("run moat render")
    };
    let out = render(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8_lossy(&out.stdout);
    let want = format!("image: {}/serving/model@{digest}", reg.host());
    assert!(yaml.contains(&want), "{want} not in the render:\n{yaml}");
    assert!(
        !yaml.contains(&format!("image: {image}")),
        "the tag was rendered"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("resolves to {digest}")));

    let out = render(false);
    assert!(!out.status.success(), "resolved without credentials");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("moat: error:"), "{err}");
}
