//! Asks a registry for the digest a tag points to, over the OCI distribution API (oci-client).
//!
//! Every resolution uses a new client: oci-client caches credentials and tokens per registry,
//! and a shared client would let one namespace's pull Secret authorise another namespace's
//! resolution. Resolutions happen once per spec change, so the cost does not matter.

use std::time::Duration;

use oci_client::{
    Client, Reference,
    client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    errors::{OciDistributionError, OciErrorCode},
    secrets::RegistryAuth,
};

use super::ImageError;

/// Registry access settings shared by every resolution: trust and time limits. TLS
/// verification is always on; `extra_roots` are trusted besides the system's roots.
#[derive(Clone, Debug)]
pub struct Registry {
    extra_roots: Vec<Vec<u8>>,
    timeout: Duration,
}

impl Default for Registry {
    /// The system's roots only, 10 s per resolution.
    fn default() -> Self {
        Self {
            extra_roots: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// User-Agent of registry requests.
const USER_AGENT: &str = concat!("moat-operator/", env!("CARGO_PKG_VERSION"));

impl Registry {
    /// Settings with the CA certificates of `ca_bundle_pem` trusted in addition to the system
    /// roots, and `timeout` for each resolution.
    pub fn new(ca_bundle_pem: Option<&str>, timeout: Duration) -> Result<Self, String> {
        let extra_roots = match ca_bundle_pem {
            None => Vec::new(),
            Some(pem) => {
                let certs = crate::pki::pem_certificates(pem);
                if certs.is_empty() {
                    return Err("the registry CA bundle holds no CERTIFICATE block".into());
                }
                certs
            }
        };
        Ok(Self {
            extra_roots,
            timeout,
        })
    }

    fn client(&self) -> Result<Client, OciDistributionError> {
        // oci-client's TLS (reqwest with rustls, no provider compiled in) uses the process-wide
        // crypto provider; install ring's, the one every other TLS user in Moat uses. Already
        // installed is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = ClientConfig {
            protocol: ClientProtocol::Https,
            accept_invalid_certificates: false,
            extra_root_certificates: self
                .extra_roots
                .iter()
                .map(|der| Certificate {
                    encoding: CertificateEncoding::Der,
                    data: der.clone(),
                })
                .collect(),
            // A multi-arch index is pinned as a whole: never pick a platform.
            platform_resolver: None,
            connect_timeout: Some(self.timeout),
            read_timeout: Some(self.timeout),
            user_agent: USER_AGENT,
            ..ClientConfig::default()
        };
        // `Client::new` would fall back to a default configuration (without the extra roots)
        // on error; fail instead.
        Client::try_from(config)
    }

    /// The digest `reference` points to now: for a multi-arch image, the digest of the index.
    /// `credentials` are a username and password from a pull Secret.
    pub async fn digest(
        &self,
        reference: &Reference,
        credentials: Option<(String, String)>,
    ) -> Result<String, ImageError> {
        let image = reference.whole();
        let client = self.client().map_err(|e| classify(&image, &e))?;
        let auth = match credentials {
            Some((user, password)) => RegistryAuth::Basic(user, password),
            None => RegistryAuth::Anonymous,
        };
        let digest = match tokio::time::timeout(
            self.timeout,
            client.fetch_manifest_digest(reference, &auth),
        )
        .await
        {
            Ok(result) => result.map_err(|e| classify(&image, &e))?,
            Err(_) => {
                return Err(ImageError::Unreachable {
                    image,
                    message: format!("no answer within {}s", self.timeout.as_secs()),
                });
            }
        };
        if !is_sha256_digest(&digest) {
            return Err(ImageError::Unreachable {
                image,
                message: format!("the registry answered with an unusable digest {digest:?}"),
            });
        }
        Ok(digest)
    }
}

/// `sha256:` and 64 lower-case hex digits.
pub fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The error's text with its sources (reqwest hides the TLS or connect cause in them).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// Sorts oci-client's errors into what the user must do about them.
fn classify(image: &str, e: &OciDistributionError) -> ImageError {
    let image = image.to_string();
    let message = chain(e);
    match e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => {
            ImageError::Unauthorized { image, message }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => {
            ImageError::NotFound { image, message }
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                ImageError::Unauthorized { image, message }
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                ImageError::NotFound { image, message }
            } else {
                ImageError::Unreachable { image, message }
            }
        }
        OciDistributionError::ServerError { code, .. } => match code {
            401 | 403 => ImageError::Unauthorized { image, message },
            404 => ImageError::NotFound { image, message },
            _ => ImageError::Unreachable { image, message },
        },
        _ => ImageError::Unreachable { image, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sha256_digests_are_accepted() {
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert!(is_sha256_digest(&format!("sha256:{hex}")));
        assert!(!is_sha256_digest(&format!("sha512:{hex}")));
        assert!(!is_sha256_digest(&format!("sha256:{}", &hex[1..])));
        assert!(!is_sha256_digest(&format!("sha256:{}", hex.to_uppercase())));
    }

    #[test]
    fn a_bundle_without_certificates_is_refused() {
        let e = Registry::new(Some("not pem"), Duration::from_secs(1)).expect_err("not pem");
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let ca =
            crate::pki::generate_ca("test", 1_800_000_000, Duration::from_secs(3600)).expect("ca");
        let twice = format!("{}{}", ca.cert_pem, ca.key_pem) + &ca.cert_pem;
        let r = Registry::new(Some(&twice), Duration::from_secs(1)).expect("pem");
        assert_eq!(r.extra_roots.len(), 2, "the key block is skipped");
    }

    #[test]
    fn registry_answers_are_sorted_by_what_the_user_must_do() {
        let e = classify(
            "r/m:v1",
            &OciDistributionError::UnauthorizedError { url: "u".into() },
        );
        assert_eq!(e.reason(), "ImagePullSecretRejected");
        let e = classify(
            "r/m:v1",
            &OciDistributionError::ServerError {
                code: 404,
                url: "u".into(),
                message: "".into(),
            },
        );
        assert_eq!(e.reason(), "ImageNotFound");
        let e = classify(
            "r/m:v1",
            &OciDistributionError::ServerError {
                code: 503,
                url: "u".into(),
                message: "".into(),
            },
        );
        assert_eq!(e.reason(), "RegistryUnreachable");
    }
}
