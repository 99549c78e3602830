//! Where the artifact comes from: a local file (`file://` URL or plain path, such as a mounted
//! PersistentVolumeClaim) or an `https://` URL. Plain `http://` is refused, and so is a redirect
//! to it; TLS verification is always on, against Mozilla's roots (compiled in) plus the
//! certificates of `--ca-file`.

use std::{
    fmt,
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use super::ModelError;

/// An artifact location.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file.
    File(PathBuf),
    /// An HTTPS URL.
    Https(String),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Source {
    /// The location for messages: a URL without its query string or fragment, which may hold
    /// credentials (pre-signed URLs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Https(url) => {
                let end = url.find(['?', '#']).unwrap_or(url.len());
                let shown = &url[..end];
                // Userinfo (https://user:pass@host/) is credentials too.
                match shown.split_once("://").and_then(|(_, rest)| {
                    let authority_end = rest.find('/').unwrap_or(rest.len());
                    rest[..authority_end].rfind('@').map(|at| (rest, at))
                }) {
                    Some((rest, at)) => write!(f, "https://{}", &rest[at + 1..]),
                    None => f.write_str(shown),
                }
            }
        }
    }
}

impl Source {
    /// Parses `--source`: `https://...`, `file://<path>` or a plain path.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        let usage = |reason: String| ModelError::Usage {
            flag: "--source",
            reason,
        };
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("https://") {
            Ok(Source::Https(s.to_string()))
        } else if lower.starts_with("http://") {
            Err(usage(
                "plain http:// is refused (the artifact and its metadata would travel unauthenticated); use https://".into(),
            ))
        } else if let Some(path) = s.strip_prefix("file://") {
            if path.is_empty() {
                return Err(usage(
                    "file:// needs a path, such as file:///models/m.tar.age".into(),
                ));
            }
            Ok(Source::File(PathBuf::from(path)))
        } else if let Some((scheme, _)) = s.split_once("://") {
            Err(usage(format!(
                "unsupported scheme {scheme:?}; use https:// or file://"
            )))
        } else if s.is_empty() {
            Err(usage("empty".into()))
        } else {
            Ok(Source::File(PathBuf::from(s)))
        }
    }

    /// Opens the artifact for reading. Over HTTPS, a read that waits longer than
    /// `read_timeout` for data fails the download (a stalled server must not hang the pod).
    pub fn open(
        &self,
        ca_file: Option<&Path>,
        read_timeout: Duration,
    ) -> Result<Box<dyn Read + Send>, ModelError> {
        match self {
            Source::File(path) => {
                let file = File::open(path).map_err(|e| ModelError::io("opening", path, e))?;
                Ok(Box::new(file))
            }
            Source::Https(url) => {
                let agent = agent(ca_file, read_timeout)?;
                let shown = self.to_string();
                let fetch_error = |reason: String| ModelError::Fetch {
                    reason: reason.replace(url.as_str(), &shown),
                    url: shown.clone(),
                };
                let response = agent
                    .get(url.as_str())
                    .call()
                    .map_err(|e| fetch_error(e.to_string()))?;
                Ok(Box::new(response.into_body().into_reader()))
            }
        }
    }
}

/// The certificates of a PEM bundle.
pub fn read_ca_file(path: &Path) -> Result<Vec<Certificate<'static>>, ModelError> {
    let pem = std::fs::read(path).map_err(|e| ModelError::io("reading --ca-file", path, e))?;
    let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(cert)) => Some(cert),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(ModelError::Usage {
            flag: "--ca-file",
            reason: format!("{} holds no PEM certificate", path.display()),
        });
    }
    Ok(certs)
}

/// An HTTPS-only agent that trusts Mozilla's roots and the certificates of `ca_file`, and gives
/// up on a connection that sends nothing for `read_timeout`.
fn agent(ca_file: Option<&Path>, read_timeout: Duration) -> Result<ureq::Agent, ModelError> {
    let mut roots: Vec<Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|der| Certificate::from_der(der.as_ref()))
        .collect();
    if let Some(path) = ca_file {
        roots.extend(read_ca_file(path)?);
    }
    let tls = TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    let config = ureq::Agent::config_builder()
        .https_only(true)
        .tls_config(tls)
        .http_status_as_error(true)
        .max_redirects(5)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(read_timeout))
        .user_agent(concat!("moat/", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(config.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations_and_refuses_plain_http() {
        assert_eq!(
            Source::parse("https://a.example/m.age").expect("https"),
            Source::Https("https://a.example/m.age".into())
        );
        assert_eq!(
            Source::parse("file:///models/m.age").expect("file"),
            Source::File("/models/m.age".into())
        );
        assert_eq!(
            Source::parse("m.age").expect("path"),
            Source::File("m.age".into())
        );
        for bad in [
            "http://a.example/m",
            "HTTP://a.example/m",
            "s3://b/k",
            "file://",
            "",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_never_show_query_strings_or_userinfo() {
        let s =
            Source::parse("https://u:secret@a.example/m.age?X-Amz-Signature=abc#f").expect("https");
        assert_eq!(s.to_string(), "https://a.example/m.age");
        let s = Source::parse("https://a.example/p@x/m.age").expect("https");
        assert_eq!(s.to_string(), "https://a.example/p@x/m.age");
    }
}
