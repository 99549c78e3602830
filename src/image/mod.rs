//! Image pinning decisions, pure: parsing references (with oci-client's implementation of the
//! distribution reference grammar), the registry allow-list, whether a tag must be resolved or
//! the earlier pin kept, and registry credentials from `kubernetes.io/dockerconfigjson` Secrets.
//! [`registry`] asks the registry; the controller reads the pull Secrets and records the pin.

pub mod registry;

use base64::Engine as _;
use oci_client::Reference;

use crate::api::{ImagePolicy, ImageStatus};

pub use registry::Registry;

/// Annotation on a SecureModelDeployment: a new value (any text, for example a timestamp) asks
/// Moat to resolve the image's tag again.
pub const RESOLVE_ANNOTATION: &str = "moat.dev/resolve-image";

/// Why an image cannot be pinned. Messages name the image and what to do; they never contain
/// credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// Not an image reference.
    #[error("{image:?} is not an image reference: {reason}")]
    Invalid {
        /// The image as written.
        image: String,
        /// The parser's complaint.
        reason: String,
    },
    /// `imagePolicy: RequireDigest` and the image names no digest.
    #[error(
        "{image} names no digest, and spec.imagePolicy is RequireDigest; write the image as repository@sha256:<digest>"
    )]
    DigestRequired {
        /// The image as written.
        image: String,
    },
    /// The registry is not on the operator's allow-list.
    #[error(
        "registry {registry} is not allowed (allowed: {allowed}); use an image from an allowed registry or ask the platform team to allow it"
    )]
    NotAllowed {
        /// The image's registry.
        registry: String,
        /// The allow-list, comma-separated.
        allowed: String,
    },
    /// An image pull Secret is missing or unusable.
    #[error("image pull Secret {name}: {problem}")]
    PullSecret {
        /// Name of the Secret.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The registry refused the credentials (or their absence).
    #[error(
        "the registry refused access to {image} ({message}); check spec.imagePullSecrets and the credentials in them"
    )]
    Unauthorized {
        /// The image.
        image: String,
        /// The registry's answer.
        message: String,
    },
    /// The repository or tag does not exist.
    #[error("{image} was not found in the registry ({message})")]
    NotFound {
        /// The image.
        image: String,
        /// The registry's answer.
        message: String,
    },
    /// The registry could not be reached or failed; Moat retries.
    #[error("cannot resolve {image} in its registry ({message}); retrying")]
    Unreachable {
        /// The image.
        image: String,
        /// What went wrong.
        message: String,
    },
}

impl ImageError {
    /// Whether a user must change something (the spec, a Secret, the allow-list) first.
    pub fn needs_user_action(&self) -> bool {
        !matches!(self, ImageError::Unreachable { .. })
    }

    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        use crate::api::conditions::reason;
        match self {
            ImageError::Invalid { .. } => reason::INVALID_SPEC,
            ImageError::DigestRequired { .. } => reason::DIGEST_REQUIRED,
            ImageError::NotAllowed { .. } => reason::REGISTRY_NOT_ALLOWED,
            ImageError::PullSecret { .. } | ImageError::Unauthorized { .. } => {
                reason::IMAGE_PULL_SECRET_REJECTED
            }
            ImageError::NotFound { .. } => reason::IMAGE_NOT_FOUND,
            ImageError::Unreachable { .. } => reason::REGISTRY_UNREACHABLE,
        }
    }

    /// Whether the failure is about the spec itself, so nothing should be applied until it
    /// changes (as opposed to the registry's answer, when the earlier pin keeps running).
    pub fn is_spec_error(&self) -> bool {
        matches!(
            self,
            ImageError::Invalid { .. }
                | ImageError::DigestRequired { .. }
                | ImageError::NotAllowed { .. }
        )
    }
}

/// Parses an image reference (`nginx` means `docker.io/library/nginx:latest`).
pub fn parse(image: &str) -> Result<Reference, ImageError> {
    let reference = image
        .parse::<Reference>()
        .map_err(|e| ImageError::Invalid {
            image: image.to_string(),
            reason: e.to_string(),
        })?;
    // oci-client reads an upper-case first component without a dot or a port (`Team/model`) as
    // the start of a Docker Hub repository, which no registry accepts and whose pin
    // (`docker.io/Team/model@...`) no parser reads back; Docker, containerd and the kubelet read
    // it as a registry host instead. Found by the image_reference fuzz target.
    if reference
        .repository()
        .bytes()
        .any(|b| b.is_ascii_uppercase())
    {
        return Err(ImageError::Invalid {
            image: image.to_string(),
            reason: "repository names are lower case; a registry host needs a dot or a port \
                     (registry.example.com/team/model)"
                .into(),
        });
    }
    Ok(reference)
}

/// Host (and port) of a registry name, lower-case, without scheme or path; Docker Hub's aliases
/// become `docker.io`.
pub fn normalize_registry(name: &str) -> String {
    let host = name
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        // Space before a path (`registry.example.com /v1/`) too: found by the image_reference
        // fuzz target (normalising twice differed).
        .trim()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

/// Checks the image's registry against `allowed` (empty allows every registry).
pub fn check_allowed(reference: &Reference, allowed: &[String]) -> Result<(), ImageError> {
    let registry = normalize_registry(reference.registry());
    if allowed.is_empty() || allowed.iter().any(|a| normalize_registry(a) == registry) {
        Ok(())
    } else {
        Err(ImageError::NotAllowed {
            registry,
            allowed: allowed.join(", "),
        })
    }
}

/// `registry/repository@digest`: the reference the pods get.
pub fn pinned(reference: &Reference, digest: &str) -> String {
    format!(
        "{}/{}@{}",
        reference.registry(),
        reference.repository(),
        digest
    )
}

/// What to do about the image of a spec.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// The spec names a digest: use it; nothing to ask the registry.
    Digest(String),
    /// The earlier pin is still right (same image, no new resolve request).
    Keep(ImageStatus),
    /// Ask the registry for the tag's digest.
    Resolve(Reference),
}

/// Decides what to do about `image` under `policy` and the registry allow-list `allowed`,
/// given the earlier pin and the value of [`RESOLVE_ANNOTATION`].
pub fn plan(
    image: &str,
    policy: ImagePolicy,
    allowed: &[String],
    previous: Option<&ImageStatus>,
    request: Option<&str>,
) -> Result<Plan, ImageError> {
    let reference = parse(image)?;
    check_allowed(&reference, allowed)?;
    if let Some(digest) = reference.digest() {
        return Ok(Plan::Digest(pinned(&reference, digest)));
    }
    if policy == ImagePolicy::RequireDigest {
        return Err(ImageError::DigestRequired {
            image: image.to_string(),
        });
    }
    match previous {
        Some(p) if p.requested == image && p.resolve_request.as_deref() == request => {
            Ok(Plan::Keep(p.clone()))
        }
        _ => Ok(Plan::Resolve(reference)),
    }
}

/// Username and password for `registry` from the `.dockerconfigjson` contents of `secrets`
/// (name, bytes), first match wins. `Ok(None)`: no Secret has an entry for the registry.
pub fn credentials(
    secrets: &[(String, Vec<u8>)],
    registry: &str,
) -> Result<Option<(String, String)>, ImageError> {
    let want = normalize_registry(registry);
    for (name, bytes) in secrets {
        let bad = |problem: &str| ImageError::PullSecret {
            name: name.clone(),
            problem: problem.to_string(),
        };
        let config: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|_| bad("its .dockerconfigjson is not JSON"))?;
        let Some(auths) = config.get("auths").and_then(|a| a.as_object()) else {
            return Err(bad("its .dockerconfigjson has no \"auths\""));
        };
        for (server, entry) in auths {
            if normalize_registry(server) != want {
                continue;
            }
            let field = |k: &str| entry.get(k).and_then(|v| v.as_str()).map(str::to_string);
            if let (Some(user), Some(pass)) = (field("username"), field("password")) {
                return Ok(Some((user, pass)));
            }
            let auth = field("auth")
                .ok_or_else(|| bad("the entry has neither auth nor username and password"))?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad("the entry's auth is not base64"))?;
            let text =
                String::from_utf8(decoded).map_err(|_| bad("the entry's auth is not text"))?;
            let (user, pass) = text
                .split_once(':')
                .ok_or_else(|| bad("the entry's auth is not user:password"))?;
            return Ok(Some((user.to_string(), pass.to_string())));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn status(requested: &str, request: Option<&str>) -> ImageStatus {
        ImageStatus {
            requested: requested.into(),
            pinned: format!("r.example.com/m@{DIGEST}"),
            resolved_at: None,
            resolve_request: request.map(str::to_string),
            helper: None,
        }
    }

    fn resolve(
        image: &str,
        previous: Option<&ImageStatus>,
        request: Option<&str>,
    ) -> Result<Plan, ImageError> {
        plan(image, ImagePolicy::Resolve, &[], previous, request)
    }

    #[test]
    fn tags_resolve_once_until_the_image_or_the_request_changes() {
        let image = "r.example.com/m:v1";
        assert!(matches!(resolve(image, None, None), Ok(Plan::Resolve(_))));
        let earlier = status(image, None);
        assert_eq!(
            resolve(image, Some(&earlier), None),
            Ok(Plan::Keep(earlier.clone()))
        );
        assert!(matches!(
            resolve("r.example.com/m:v2", Some(&earlier), None),
            Ok(Plan::Resolve(_))
        ));
        assert!(matches!(
            resolve(image, Some(&earlier), Some("2026-11-22")),
            Ok(Plan::Resolve(_))
        ));
        let honoured = status(image, Some("2026-11-22"));
        assert!(matches!(
            resolve(image, Some(&honoured), Some("2026-11-22")),
            Ok(Plan::Keep(_))
        ));
        // Removing the annotation after it was honoured is a change too.
        assert!(matches!(
            resolve(image, Some(&honoured), None),
            Ok(Plan::Resolve(_))
        ));
    }

    #[test]
    fn digests_are_used_as_they_are_and_tags_dropped() {
        assert_eq!(
            resolve(
                &format!("r.example.com:5000/team/m:v1@{DIGEST}"),
                None,
                None
            ),
            Ok(Plan::Digest(format!("r.example.com:5000/team/m@{DIGEST}")))
        );
        assert_eq!(
            resolve(&format!("nginx@{DIGEST}"), None, None),
            Ok(Plan::Digest(format!("docker.io/library/nginx@{DIGEST}")))
        );
    }

    #[test]
    fn require_digest_refuses_tags_and_the_allow_list_applies_to_digests_too() {
        let e = plan(
            "r.example.com/m:v1",
            ImagePolicy::RequireDigest,
            &[],
            None,
            None,
        )
        .expect_err("a tag");
        assert_eq!(e.reason(), "DigestRequired");
        assert!(e.is_spec_error());
        let earlier = status("r.example.com/m:v1", None);
        assert!(
            plan(
                "r.example.com/m:v1",
                ImagePolicy::RequireDigest,
                &[],
                Some(&earlier),
                None
            )
            .is_err(),
            "an earlier pin of the tag does not satisfy RequireDigest"
        );
        let digest = format!("r.example.com/m@{DIGEST}");
        assert!(matches!(
            plan(&digest, ImagePolicy::RequireDigest, &[], None, None),
            Ok(Plan::Digest(_))
        ));
        let allowed = vec!["trusted.example.com".to_string()];
        let e = plan(&digest, ImagePolicy::RequireDigest, &allowed, None, None)
            .expect_err("not allowed");
        assert_eq!(e.reason(), "RegistryNotAllowed");
        let e = plan(
            "r.example.com/m:v1",
            ImagePolicy::Resolve,
            &allowed,
            Some(&earlier),
            None,
        )
        .expect_err("an earlier pin is no exception");
        assert_eq!(e.reason(), "RegistryNotAllowed");
    }

    #[test]
    fn the_allow_list_compares_normalised_registries() {
        let r = parse("Registry.Example.com:5000/m:v1").expect("parse");
        assert!(check_allowed(&r, &[]).is_ok());
        assert!(check_allowed(&r, &["registry.example.com:5000".into()]).is_ok());
        let e = check_allowed(&r, &["registry.example.com".into()]).expect_err("port differs");
        assert_eq!(e.reason(), "RegistryNotAllowed");
        assert!(
            e.to_string()
                .contains("registry.example.com:5000 is not allowed"),
            "{e}"
        );
        // Whitespace around the host, also before a path (the fuzz target's crash-space-before-path).
        assert_eq!(
            normalize_registry(" Registry.Example.com\t/v1/ "),
            "registry.example.com"
        );
        let normal = normalize_registry("Regist0E0````1\t/rple.{co");
        assert_eq!(normalize_registry(&normal), normal);
        let hub = parse("nginx:1").expect("parse");
        assert!(check_allowed(&hub, &["https://index.docker.io/v1/".into()]).is_ok());
    }

    #[test]
    fn credentials_come_from_the_matching_dockerconfigjson_entry() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let cfg = format!(
            r#"{{"auths": {{"https://other.example.com": {{"auth": "eDp5"}}, "registry.example.com:5000": {{"auth": "{auth}"}}}}}}"#
        );
        let secrets = vec![("pull".to_string(), cfg.into_bytes())];
        assert_eq!(
            credentials(&secrets, "registry.example.com:5000"),
            Ok(Some(("alice".into(), "s3cret".into())))
        );
        assert_eq!(credentials(&secrets, "third.example.com"), Ok(None));
        let plain = vec![(
            "p".to_string(),
            br#"{"auths": {"r.io": {"username": "u", "password": "p"}}}"#.to_vec(),
        )];
        assert_eq!(
            credentials(&plain, "r.io"),
            Ok(Some(("u".into(), "p".into())))
        );
        let broken = vec![("bad".to_string(), b"not json".to_vec())];
        let e = credentials(&broken, "r.io").expect_err("not json");
        assert!(e.to_string().starts_with("image pull Secret bad:"), "{e}");
        assert!(!e.to_string().contains("s3cret"));
    }

    #[test]
    fn errors_say_whether_the_user_must_act() {
        let unreachable = ImageError::Unreachable {
            image: "i".into(),
            message: "connection refused".into(),
        };
        assert!(!unreachable.needs_user_action());
        let unauthorized = ImageError::Unauthorized {
            image: "i".into(),
            message: "401".into(),
        };
        assert!(unauthorized.needs_user_action() && !unauthorized.is_spec_error());
        assert!(parse("UPPER/Case:tag").is_err());
    }

    #[test]
    fn an_upper_case_first_component_is_refused_not_read_as_docker_hub() {
        // The image_reference fuzz target's crash: parsed as docker.io/Registr05o0m/..., pinned
        // as a reference that does not parse (fuzz/corpus/image_reference/crash-upper-case-host).
        let e = parse("Registr05o0m/registry.exampl").expect_err("upper case");
        assert_eq!(e.reason(), "InvalidSpec");
        assert!(e.to_string().contains("lower case"), "{e}");
        let digest = format!("Team/model@{DIGEST}");
        assert!(plan(&digest, ImagePolicy::Resolve, &[], None, None).is_err());
        // Upper case stays fine in a registry host that has a dot or a port, and in tags.
        let r = parse("Registry.Example.com:5000/team/model:V1").expect("host");
        assert_eq!(r.repository(), "team/model");
        assert!(parse("localhost/model:Latest").is_ok());
        let pinned = pinned(&r, DIGEST);
        assert!(parse(&pinned).is_ok(), "{pinned}");
    }
}
