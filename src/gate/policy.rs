//! The gate's decisions, pure: who may call the model ([`authorize`]), which requests pass the
//! model's limits ([`check_request`]), and the per-identity rate ([`Bucket::admit`]). The
//! operator writes a [`Policy`] for every model (a ConfigMap mounted into the pod); the gate
//! applies it to every request and to every open connection when it changes.
//!
//! Everything here is default-deny: an identity is allowed only when it is listed, a method or
//! path only when it matches the limits, and a quarantined policy allows nothing.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// What the operator decided for one model's endpoint. Serialized as JSON into the ConfigMap
/// `<model>-gate` (key `policy.json`); its format is part of Moat's interface with the gate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// The client identities (SPIFFE IDs, `spiffe://<trust domain>/ns/<ns>/sa/<sa>`) the model
    /// consented to and that hold a ModelClient for it.
    #[serde(default)]
    pub identities: BTreeSet<String>,
    /// The kill switch: every request is refused and every open connection closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
    /// Limits on every request.
    #[serde(default)]
    pub limits: Limits,
    /// What the audit log records of request bodies.
    #[serde(default)]
    pub audit: AuditPolicy,
}

/// Why the model is quarantined, for the refusals and the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quarantine {
    /// Who or what turned it on and why (for example `annotation moat.dev/quarantine: ...`).
    pub reason: String,
}

/// Limits on every request, with safe defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Most bytes a request body may hold.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: u64,
    /// Methods allowed (upper case).
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// Paths allowed: exact (`/v1/models`) or a prefix ending in `*` (`/v1/*`).
    #[serde(default = "default_paths")]
    pub paths: Vec<String>,
    /// Requests per second one identity may make, on average.
    #[serde(default = "default_rps")]
    pub requests_per_second: u32,
    /// Requests one identity may make at once above the average rate.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Requests one identity may have in flight at once.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_requests: u32,
    /// Seconds a client has to send a request's headers (and finish the TLS handshake).
    #[serde(default = "default_header_timeout")]
    pub header_timeout_seconds: u32,
    /// Seconds a connection may stay open with no request in flight. A request in flight, a
    /// long stream included, is never cut by a timeout.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u32,
}

fn default_max_request_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into(), "POST".into()]
}
fn default_paths() -> Vec<String> {
    vec!["/*".into()]
}
fn default_rps() -> u32 {
    100
}
fn default_burst() -> u32 {
    200
}
fn default_concurrency() -> u32 {
    64
}
fn default_header_timeout() -> u32 {
    10
}
fn default_idle_timeout() -> u32 {
    300
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: default_max_request_bytes(),
            methods: default_methods(),
            paths: default_paths(),
            requests_per_second: default_rps(),
            burst: default_burst(),
            max_concurrent_requests: default_concurrency(),
            header_timeout_seconds: default_header_timeout(),
            idle_timeout_seconds: default_idle_timeout(),
        }
    }
}

/// What the audit log records of request bodies. Bodies themselves are never logged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditPolicy {
    /// Record the SHA-256 of every request body (its size is always recorded).
    #[serde(default)]
    pub body_hash: bool,
}

/// Why a request was refused: its HTTP status and a reason a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The reason, for metrics (`reason` label) and the audit log.
    pub reason: Reason,
    /// What the client is told (one line).
    pub message: String,
}

/// The kinds of refusal, each with its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// No client certificate.
    NoCertificate,
    /// A client certificate Moat's CA did not issue, or expired, or not yet valid.
    UntrustedCertificate,
    /// A certificate from Moat's CA without a SPIFFE ID.
    NoIdentity,
    /// An identity the model did not consent to (or whose consent was withdrawn).
    NotConsented,
    /// The model is quarantined.
    Quarantined,
    /// A path with dot segments, encoded separators or other ambiguity.
    BadPath,
    /// A method the limits do not allow.
    MethodNotAllowed,
    /// A path the limits do not allow.
    PathNotAllowed,
    /// A body over `maxRequestBytes`.
    TooLarge,
    /// Over the identity's request rate.
    RateLimited,
    /// Over the identity's concurrent requests.
    TooManyConcurrent,
    /// The model server could not be reached.
    UpstreamUnavailable,
    /// The policy could not be read; the gate fails closed.
    NoPolicy,
}

impl Reason {
    /// The HTTP status of this refusal.
    pub fn status(self) -> u16 {
        match self {
            Self::NoCertificate => 401,
            Self::UntrustedCertificate | Self::NoIdentity | Self::NotConsented => 403,
            Self::Quarantined | Self::UpstreamUnavailable | Self::NoPolicy => 503,
            Self::BadPath => 400,
            Self::MethodNotAllowed => 405,
            Self::PathNotAllowed => 404,
            Self::TooLarge => 413,
            Self::RateLimited | Self::TooManyConcurrent => 429,
        }
    }

    /// The `reason` label and the audit log's `reason` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "NoCertificate",
            Self::UntrustedCertificate => "UntrustedCertificate",
            Self::NoIdentity => "NoIdentity",
            Self::NotConsented => "NotConsented",
            Self::Quarantined => "Quarantined",
            Self::BadPath => "BadPath",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::PathNotAllowed => "PathNotAllowed",
            Self::TooLarge => "TooLarge",
            Self::RateLimited => "RateLimited",
            Self::TooManyConcurrent => "TooManyConcurrent",
            Self::UpstreamUnavailable => "UpstreamUnavailable",
            Self::NoPolicy => "NoPolicy",
        }
    }
}

fn refuse(reason: Reason, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
    }
}

/// Who is on the other end of a TLS connection, as the handshake established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// No client certificate was presented.
    Anonymous,
    /// A certificate that does not chain to Moat's CA, or is outside its validity; `why` says
    /// which (from the verifier).
    Untrusted {
        /// The verifier's reason.
        why: String,
    },
    /// A certificate from Moat's CA; `identity` is its SPIFFE ID, if it has one.
    Verified {
        /// The URI SAN starting with `spiffe://`.
        identity: Option<String>,
    },
}

impl Peer {
    /// The identity for the audit log and metrics, when the certificate was verified.
    pub fn identity(&self) -> Option<&str> {
        match self {
            Self::Verified { identity } => identity.as_deref(),
            _ => None,
        }
    }
}

/// The `identity` label of the metrics of a caller without a verified `spiffe://` identity.
pub const UNVERIFIED: &str = "unverified";

/// The `identity` label of the metrics of a caller with a verified identity that `policy` does
/// not list (or before the gate has a policy).
pub const UNCONSENTED: &str = "unconsented";

/// The `identity` label of a caller's metric series: its SPIFFE ID when `policy` lists it,
/// [`UNCONSENTED`] for any other verified identity, [`UNVERIFIED`] without one. The label's
/// values are thus the policy's identities and two more, whatever certificates callers present
/// (a CA you brought may vouch for any number of `spiffe://` names); the audit log keeps each
/// refused caller's identity.
pub fn metric_identity<'a>(policy: Option<&Policy>, identity: Option<&'a str>) -> &'a str {
    match identity {
        None => UNVERIFIED,
        Some(id) if policy.is_some_and(|p| p.identities.contains(id)) => id,
        Some(_) => UNCONSENTED,
    }
}

/// Whether `peer` may call the model under `policy`: a verified identity the policy lists, and
/// no quarantine. Default deny.
pub fn authorize<'a>(policy: &Policy, peer: &'a Peer) -> Result<&'a str, Refusal> {
    if let Some(q) = &policy.quarantine {
        return Err(refuse(
            Reason::Quarantined,
            format!(
                "the model is quarantined ({}); no request is served",
                q.reason
            ),
        ));
    }
    match peer {
        Peer::Anonymous => Err(refuse(
            Reason::NoCertificate,
            "a client certificate is required: create a ModelClient and mount its Secret",
        )),
        Peer::Untrusted { why } => Err(refuse(
            Reason::UntrustedCertificate,
            format!("the client certificate is not one Moat's CA vouches for now: {why}"),
        )),
        Peer::Verified { identity: None } => Err(refuse(
            Reason::NoIdentity,
            "the client certificate carries no spiffe:// identity",
        )),
        Peer::Verified {
            identity: Some(identity),
        } => {
            if policy.identities.contains(identity) {
                Ok(identity)
            } else {
                Err(refuse(
                    Reason::NotConsented,
                    format!(
                        "{identity} may not call this model: it needs a ModelClient for this \
                         model, and the model's spec.access.clients must list its ServiceAccount"
                    ),
                ))
            }
        }
    }
}

/// Whether a connection authorized earlier as `identity` may stay open under `policy` (a new
/// policy can revoke it or quarantine the model).
pub fn still_allowed(policy: &Policy, identity: Option<&str>) -> bool {
    policy.quarantine.is_none() && identity.is_some_and(|id| policy.identities.contains(id))
}

/// Whether a request passes the limits, from its method, its path (without the query) and its
/// declared body length. A body without a declared length is counted as it streams.
pub fn check_request(
    limits: &Limits,
    method: &str,
    path: &str,
    content_length: Option<u64>,
) -> Result<(), Refusal> {
    if !path_is_canonical(path) {
        return Err(refuse(
            Reason::BadPath,
            "the path must be absolute, without dot segments, empty segments, backslashes or encoded separators",
        ));
    }
    if !limits.methods.iter().any(|m| m == method) {
        return Err(refuse(
            Reason::MethodNotAllowed,
            format!(
                "method {method} is not allowed here (allowed: {})",
                limits.methods.join(", ")
            ),
        ));
    }
    if !limits.paths.iter().any(|p| path_matches(p, path)) {
        return Err(refuse(
            Reason::PathNotAllowed,
            format!("path {path} is not served here"),
        ));
    }
    if let Some(length) = content_length
        && length > limits.max_request_bytes
    {
        return Err(too_large(limits.max_request_bytes));
    }
    Ok(())
}

/// The refusal of a body over `max` bytes.
pub fn too_large(max: u64) -> Refusal {
    refuse(
        Reason::TooLarge,
        format!("the request body is over the limit of {max} bytes"),
    )
}

/// Whether `pattern` (exact, or a prefix ending in `*`) matches `path`.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => path == pattern,
    }
}

/// A path the model server cannot read differently from the gate: absolute, and with no `.` or
/// `..` segment, no empty segment (`//`), no backslash, no percent-encoded `.`, `/` or `\`, and
/// no control characters. Everything else is passed on byte for byte.
pub fn path_is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if path.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c", "%00"]
        .iter()
        .any(|e| lower.contains(e))
    {
        return false;
    }
    if rest.is_empty() {
        return true;
    }
    // A trailing slash is an empty last segment, which servers read alike; others are not.
    let segments: Vec<&str> = rest.split('/').collect();
    segments.iter().enumerate().all(|(i, s)| {
        let last = i + 1 == segments.len();
        *s != "." && *s != ".." && (!s.is_empty() || last)
    })
}

/// A token bucket: `tokens` left (in thousandths of a request) at `at` (nanoseconds on a
/// monotonic clock). Pure: [`Bucket::admit`] returns the next state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Thousandths of a request available.
    pub milli_tokens: u64,
    /// When `milli_tokens` was computed, nanoseconds.
    pub at: u64,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(limits: &Limits, now: u64) -> Self {
        Self {
            milli_tokens: capacity(limits),
            at: now,
        }
    }

    /// Whether one more request at `now` fits the rate and burst of `limits`, and the bucket
    /// after it. A clock that went backwards refills nothing.
    pub fn admit(self, limits: &Limits, now: u64) -> (bool, Self) {
        let elapsed = now.saturating_sub(self.at);
        let refill = u128::from(elapsed) * u128::from(limits.requests_per_second) / 1_000_000;
        let tokens = u128::from(self.milli_tokens)
            .saturating_add(refill)
            .min(u128::from(capacity(limits)));
        let tokens = u64::try_from(tokens).unwrap_or(u64::MAX);
        let at = now.max(self.at);
        if tokens >= 1000 {
            (
                true,
                Self {
                    milli_tokens: tokens - 1000,
                    at,
                },
            )
        } else {
            (
                false,
                Self {
                    milli_tokens: tokens,
                    at,
                },
            )
        }
    }
}

/// The bucket's size: the burst, and at least one request.
fn capacity(limits: &Limits) -> u64 {
    u64::from(limits.burst.max(1)) * 1000
}

/// The refusal for going over the rate.
pub fn rate_limited(limits: &Limits) -> Refusal {
    refuse(
        Reason::RateLimited,
        format!(
            "over the limit of {} requests per second (burst {}) for this identity; retry later",
            limits.requests_per_second, limits.burst
        ),
    )
}

/// Whether one more request fits `in_flight` under the concurrency limit.
pub fn admit_concurrent(limits: &Limits, in_flight: u32) -> Result<(), Refusal> {
    if in_flight < limits.max_concurrent_requests {
        Ok(())
    } else {
        Err(refuse(
            Reason::TooManyConcurrent,
            format!(
                "over the limit of {} requests in flight for this identity; retry later",
                limits.max_concurrent_requests
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const ALICE: &str = "spiffe://cluster.local/ns/payments/sa/checkout";

    fn policy(ids: &[&str]) -> Policy {
        Policy {
            identities: ids.iter().map(|s| s.to_string()).collect(),
            quarantine: None,
            limits: Limits::default(),
            audit: AuditPolicy::default(),
        }
    }

    fn verified(id: &str) -> Peer {
        Peer::Verified {
            identity: Some(id.into()),
        }
    }

    /// Metric labels are bounded by the policy: any identity it does not list is `unconsented`.
    #[test]
    fn a_metric_identity_is_a_listed_one_or_one_of_two_fixed_labels() {
        let alice = "spiffe://cluster.local/ns/payments/sa/checkout";
        let p = policy(&[alice]);
        assert_eq!(metric_identity(Some(&p), Some(alice)), alice);
        for stranger in [
            "spiffe://cluster.local/ns/payments/sa/other",
            "spiffe://any.trust.domain/whatever/a-CA-you-brought-vouches-for",
        ] {
            assert_eq!(metric_identity(Some(&p), Some(stranger)), UNCONSENTED);
        }
        // Before a policy is read, nobody is consented to.
        assert_eq!(metric_identity(None, Some(alice)), UNCONSENTED);
        assert_eq!(metric_identity(Some(&p), None), UNVERIFIED);
    }

    /// Default deny: only a verified, listed identity passes; each other peer gets its reason.
    #[test]
    fn only_a_verified_consented_identity_is_authorized() {
        let p = policy(&[ALICE]);
        assert_eq!(authorize(&p, &verified(ALICE)), Ok(ALICE));
        let other = "spiffe://cluster.local/ns/payments/sa/other";
        let e = authorize(&p, &verified(other)).expect_err("not listed");
        assert_eq!((e.reason, e.reason.status()), (Reason::NotConsented, 403));
        assert!(e.message.contains(other), "{}", e.message);
        for (peer, reason) in [
            (Peer::Anonymous, Reason::NoCertificate),
            (
                Peer::Untrusted {
                    why: "expired".into(),
                },
                Reason::UntrustedCertificate,
            ),
            (Peer::Verified { identity: None }, Reason::NoIdentity),
        ] {
            assert_eq!(
                authorize(&p, &peer).map_err(|e| e.reason),
                Err(reason),
                "{peer:?}"
            );
        }
        assert!(authorize(&policy(&[]), &verified(ALICE)).is_err());
    }

    /// Quarantine refuses everyone, listed or not, and closes every connection.
    #[test]
    fn quarantine_refuses_everyone() {
        let mut p = policy(&[ALICE]);
        p.quarantine = Some(Quarantine {
            reason: "incident 42".into(),
        });
        let e = authorize(&p, &verified(ALICE)).expect_err("quarantined");
        assert_eq!((e.reason, e.reason.status()), (Reason::Quarantined, 503));
        assert!(e.message.contains("incident 42"));
        assert!(!still_allowed(&p, Some(ALICE)));
        p.quarantine = None;
        assert!(still_allowed(&p, Some(ALICE)));
        assert!(!still_allowed(&p, Some("spiffe://x/ns/a/sa/b")));
        assert!(!still_allowed(&p, None));
    }

    #[test]
    fn limits_refuse_methods_paths_and_sizes_with_their_status() {
        let limits = Limits {
            paths: vec!["/v1/chat/completions".into(), "/v1/models".into()],
            max_request_bytes: 10,
            ..Limits::default()
        };
        assert_eq!(
            check_request(&limits, "POST", "/v1/chat/completions", Some(10)),
            Ok(())
        );
        for (method, path, len, status) in [
            ("POST", "/v1/chat/completions", Some(11), 413),
            ("DELETE", "/v1/models", None, 405),
            ("GET", "/admin", None, 404),
            ("GET", "/v1/models/", None, 404),
            ("GET", "/v1/models/../admin", None, 400),
            ("GET", "/v1/%2e%2e/admin", None, 400),
            ("GET", "v1/models", None, 400),
        ] {
            let got = check_request(&limits, method, path, len).map_err(|e| e.reason.status());
            assert_eq!(got, Err(status), "{method} {path} {len:?}");
        }
        assert_eq!(check_request(&Limits::default(), "GET", "/", None), Ok(()));
    }

    #[test]
    fn prefix_patterns_match_what_they_start() {
        assert!(path_matches("/v1/*", "/v1/completions"));
        assert!(path_matches("/v1/*", "/v1/"));
        assert!(!path_matches("/v1/*", "/v2/completions"));
        assert!(path_matches("/*", "/anything/at/all"));
        assert!(!path_matches("/health", "/healthz"));
    }

    #[test]
    fn policy_json_round_trips_and_fills_defaults() {
        let p: Policy = serde_json::from_str(r#"{"identities": ["a"]}"#).expect("parses");
        assert_eq!(p.limits, Limits::default());
        assert!(p.quarantine.is_none());
        let back: Policy =
            serde_json::from_str(&serde_json::to_string(&p).expect("json")).expect("parses");
        assert_eq!(back, p);
        assert!(serde_json::from_str::<Policy>(r#"{"identites": []}"#).is_err());
    }

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate() {
        let limits = Limits {
            requests_per_second: 10,
            burst: 3,
            ..Limits::default()
        };
        let mut b = Bucket::full(&limits, 0);
        for _ in 0..3 {
            let (ok, next) = b.admit(&limits, 0);
            assert!(ok);
            b = next;
        }
        let (ok, b) = b.admit(&limits, 0);
        assert!(!ok, "burst spent");
        // 10 per second: one more after 100 ms, not before.
        assert!(!b.admit(&limits, 99_000_000).0);
        assert!(b.admit(&limits, 100_000_000).0);
    }

    proptest! {
        /// Over any window, a bucket admits at most burst + rate * seconds requests, and a clock
        /// that goes backwards never adds tokens.
        #[test]
        fn a_bucket_never_admits_more_than_burst_plus_rate(
            rps in 1u32..1000,
            burst in 0u32..100,
            steps in proptest::collection::vec(0u64..50_000_000, 1..300),
        ) {
            let limits = Limits { requests_per_second: rps, burst, ..Limits::default() };
            let mut now = 0u64;
            let mut b = Bucket::full(&limits, now);
            let mut admitted = 0u64;
            for step in steps {
                now += step;
                let (ok, next) = b.admit(&limits, now);
                admitted += u64::from(ok);
                b = next;
                let (_, back) = b.admit(&limits, now.saturating_sub(step));
                prop_assert!(back.milli_tokens <= b.milli_tokens);
            }
            let bound = u128::from(burst.max(1)) + u128::from(now) * u128::from(rps) / 1_000_000_000 + 1;
            prop_assert!(u128::from(admitted) <= bound, "admitted {} > {}", admitted, bound);
        }

        /// A canonical path never contains a dot segment or an encoded separator, whatever the
        /// input; and a refused path never reaches the limits' path match.
        #[test]
        fn canonical_paths_have_no_traversal(path in "[/a-z.%25CF2e\\\\]{0,24}") {
            if path_is_canonical(&path) {
                prop_assert!(path.starts_with('/'));
                prop_assert!(!path.split('/').any(|s| s == ".." || s == "."));
                prop_assert!(!path.to_ascii_lowercase().contains("%2e"));
                prop_assert!(!path.contains('\\'));
            } else {
                prop_assert_eq!(
                    check_request(&Limits::default(), "GET", &path, None).map_err(|e| e.reason),
                    Err(Reason::BadPath)
                );
            }
        }
    }
}
