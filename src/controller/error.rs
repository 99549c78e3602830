//! The one error type of a SecureModelDeployment reconcile, and its disposition table: for each
//! variant, whether it is invalid input (Stalled, until something changes) or transient
//! (Reconciling, retried with backoff).

use super::weights;
use crate::{api::conditions, core::status::Failure, render::RenderError};

/// What can go wrong in one reconcile. Each step has its own variant carrying its source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec cannot be rendered; the user must change it. Reported as `Stalled`.
    #[error("invalid spec: {0}")]
    Invalid(#[source] RenderError),
    /// An object with a child's name exists and is not controlled by this SecureModelDeployment.
    #[error(
        "{kind} {name} already exists and is not managed by this SecureModelDeployment; delete or rename it"
    )]
    Conflict {
        /// Kind of the object in the way.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// Reading the live children failed.
    #[error("reading {kind} objects: {source}")]
    Read {
        /// Kind being read.
        kind: &'static str,
        /// Cause.
        source: kube::Error,
    },
    /// Applying a child failed.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        /// Kind being applied.
        kind: &'static str,
        /// Name of the child.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Taking over fields another manager added failed.
    #[error("taking back fields of {kind} {name}: {source}")]
    TakeOver {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Deleting a child that is no longer desired failed.
    #[error("deleting {kind} {name}: {source}")]
    Prune {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("updating status: {0}")]
    Status(#[source] kube::Error),
    /// Moat's CA is not available yet (being created, or a user-supplied CA is unusable; the
    /// operator log says which). Retried with backoff.
    #[error("Moat's certificate authority is not available yet; see the operator log")]
    CaUnavailable,
    /// A certificate could not be issued.
    #[error("issuing a certificate: {0}")]
    Certificate(#[source] crate::pki::PkiError),
    /// The image cannot be pinned to a digest.
    #[error("{0}")]
    Image(#[source] crate::image::ImageError),
    /// What `spec.model` refers to is missing or not allowed.
    #[error("{0}")]
    Weights(#[source] weights::WeightsError),
    /// A child could not be serialized (a bug).
    #[error("serializing {kind}: {source}")]
    Serialize {
        /// Kind.
        kind: &'static str,
        /// Cause.
        source: serde_json::Error,
    },
}

impl Error {
    /// Short, bounded label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid_spec",
            Error::Conflict { .. } => "conflict",
            Error::Read { .. } => "read",
            Error::Apply { .. } => "apply",
            Error::TakeOver { .. } => "take_over",
            Error::Prune { .. } => "prune",
            Error::Status(_) => "status",
            Error::Serialize { .. } => "serialize",
            Error::CaUnavailable => "ca_unavailable",
            Error::Certificate(_) => "certificate",
            Error::Image(_) => "image",
            Error::Weights(_) => "model",
        }
    }

    /// The `Reconciling` reason while a transient failure is retried.
    pub fn retry_reason(&self) -> &'static str {
        match self {
            Error::Image(e) => e.reason(),
            Error::CaUnavailable => conditions::reason::CA_UNAVAILABLE,
            _ => conditions::reason::APPLY_FAILED,
        }
    }

    /// The condition reason for an error that needs the user.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Conflict { .. } => conditions::reason::CONFLICT,
            Error::Apply { .. } => conditions::reason::REJECTED,
            Error::Image(e) => e.reason(),
            Error::Weights(e) => e.reason(),
            _ => conditions::reason::INVALID_SPEC,
        }
    }
}

/// What the reconciler does after an error: the one table of [`Error::disposition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Invalid input: Stalled; wait for the object to change (no retry).
    AwaitChange,
    /// Invalid input that may be fixed outside the object (a Secret, a PVC, the registry's
    /// answer): Stalled; look again with backoff.
    StalledRetry,
    /// An object Moat does not control has a child's name: Stalled; look again at the resync
    /// period (it may be removed at any time, unwatched).
    StalledResync,
    /// Transient: Reconciling with the error; retried with backoff; Ready unchanged.
    Transient,
}

impl Error {
    /// The disposition of every variant, in one place.
    pub fn disposition(&self) -> Disposition {
        match self {
            Error::Invalid(_) => Disposition::AwaitChange,
            Error::Conflict { .. } => Disposition::StalledResync,
            // A child the API server rejects as invalid needs a spec change.
            Error::Apply {
                source: kube::Error::Api(s),
                ..
            } if s.code == 422 => Disposition::AwaitChange,
            // Credentials or a tag fixed in the registry (or a pull Secret, which Moat does not
            // watch) are noticed by retrying; a bad reference in the spec is not.
            Error::Image(e) if e.needs_user_action() && e.is_spec_error() => {
                Disposition::AwaitChange
            }
            Error::Image(e) if e.needs_user_action() => Disposition::StalledRetry,
            // A Secret or a PersistentVolumeClaim created or fixed later.
            Error::Weights(e) if e.needs_user_action() => Disposition::StalledRetry,
            Error::Read { .. }
            | Error::Apply { .. }
            | Error::TakeOver { .. }
            | Error::Prune { .. }
            | Error::Status(_)
            | Error::CaUnavailable
            | Error::Certificate(_)
            | Error::Image(_)
            | Error::Weights(_)
            | Error::Serialize { .. } => Disposition::Transient,
        }
    }

    /// Whether retrying cannot help until the user changes something.
    pub fn needs_user_action(&self) -> bool {
        self.disposition() != Disposition::Transient
    }

    /// How the status reports this error: the condition reason and the message.
    pub fn failure(&self) -> Failure {
        Failure {
            reason: if self.needs_user_action() {
                self.reason()
            } else {
                self.retry_reason()
            },
            message: self.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageError;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("m", "r")
                .with_code(code)
                .boxed(),
        )
    }

    /// The disposition table, one row per kind of failure.
    #[test]
    fn every_error_has_the_disposition_its_cause_calls_for() {
        let rows: Vec<(Error, Disposition, &str)> = vec![
            (
                Error::Invalid(RenderError::MissingNamespace),
                Disposition::AwaitChange,
                conditions::reason::INVALID_SPEC,
            ),
            (
                Error::Conflict {
                    kind: "Service",
                    name: "m".into(),
                },
                Disposition::StalledResync,
                conditions::reason::CONFLICT,
            ),
            (
                Error::Apply {
                    kind: "Deployment",
                    name: "m".into(),
                    source: api_error(422),
                },
                Disposition::AwaitChange,
                conditions::reason::REJECTED,
            ),
            (
                Error::Apply {
                    kind: "Deployment",
                    name: "m".into(),
                    source: api_error(500),
                },
                Disposition::Transient,
                conditions::reason::APPLY_FAILED,
            ),
            (
                Error::Read {
                    kind: "Pod",
                    source: api_error(503),
                },
                Disposition::Transient,
                conditions::reason::APPLY_FAILED,
            ),
            (
                Error::Status(api_error(409)),
                Disposition::Transient,
                conditions::reason::APPLY_FAILED,
            ),
            (
                Error::CaUnavailable,
                Disposition::Transient,
                conditions::reason::CA_UNAVAILABLE,
            ),
            (
                Error::Image(ImageError::Invalid {
                    image: "x".into(),
                    reason: "bad".into(),
                }),
                Disposition::AwaitChange,
                conditions::reason::INVALID_SPEC,
            ),
            (
                Error::Image(ImageError::NotAllowed {
                    registry: "r".into(),
                    allowed: "a".into(),
                }),
                Disposition::AwaitChange,
                conditions::reason::REGISTRY_NOT_ALLOWED,
            ),
            (
                Error::Image(ImageError::NotFound {
                    image: "r/m:v9".into(),
                    message: "no such tag".into(),
                }),
                Disposition::StalledRetry,
                conditions::reason::IMAGE_NOT_FOUND,
            ),
            (
                Error::Image(ImageError::Unreachable {
                    image: "r/m:v1".into(),
                    message: "down".into(),
                }),
                Disposition::Transient,
                conditions::reason::REGISTRY_UNREACHABLE,
            ),
            (
                Error::Weights(weights::WeightsError::PvcMissing {
                    namespace: "n".into(),
                    name: "p".into(),
                }),
                Disposition::StalledRetry,
                conditions::reason::MODEL_SOURCE_MISSING,
            ),
            (
                Error::Weights(weights::WeightsError::Api {
                    what: "reading".into(),
                    source: api_error(500),
                }),
                Disposition::Transient,
                conditions::reason::APPLY_FAILED,
            ),
        ];
        for (error, disposition, reason) in rows {
            assert_eq!(error.disposition(), disposition, "{error}");
            assert_eq!(error.failure().reason, reason, "{error}");
            assert_eq!(error.failure().message, error.to_string());
        }
    }
}
