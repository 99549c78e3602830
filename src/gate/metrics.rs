//! The gate's Prometheus metrics (prometheus-client), served on their own port, which the
//! NetworkPolicy opens only to the monitoring namespace.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of request counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The caller's SPIFFE ID when the policy lists it, else `unconsented` (another verified
    /// identity) or `unverified` ([`super::policy::metric_identity`]).
    pub identity: String,
    /// The HTTP status the gate answered with.
    pub code: u16,
}

/// Labels of per-identity series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    /// The caller's SPIFFE ID when the policy lists it, else `unconsented` (another verified
    /// identity) or `unverified` ([`super::policy::metric_identity`]).
    pub identity: String,
}

/// Labels of byte counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// The caller's SPIFFE ID when the policy lists it, else `unconsented` (another verified
    /// identity) or `unverified` ([`super::policy::metric_identity`]).
    pub identity: String,
    /// `in` (request bodies) or `out` (response bodies).
    pub direction: &'static str,
}

/// Labels of refusal counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The caller's SPIFFE ID when the policy lists it, else `unconsented` (another verified
    /// identity) or `unverified` ([`super::policy::metric_identity`]).
    pub identity: String,
    /// [`super::policy::Reason::as_str`].
    pub reason: &'static str,
}

/// Labels of reload counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `policy` or `certificate`.
    pub what: &'static str,
    /// `loaded` or `failed`.
    pub result: &'static str,
}

/// Every metric the gate exports, prefixed `moat_gate_`.
pub struct GateMetrics {
    registry: Registry,
    /// Requests answered, by identity and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Requests refused by the gate itself, by identity and reason.
    pub refusals: Family<RefusalLabels, Counter>,
    /// Time from the request's headers to the end of its response body.
    pub duration: Family<IdentityLabels, Histogram>,
    /// Body bytes, by identity and direction.
    pub bytes: Family<BytesLabels, Counter>,
    /// Open client connections.
    pub connections: Gauge,
    /// Connections closed because their identity was revoked or the model quarantined.
    pub connections_closed: Counter,
    /// 1 while the model is quarantined.
    pub quarantined: Gauge,
    /// Identities the current policy allows.
    pub identities: Gauge,
    /// Policy and certificate reloads.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Audit lines lost because the log could not keep up.
    pub audit_dropped: Counter,
}

impl Default for GateMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("moat_gate");
        let requests = Family::<RequestLabels, Counter>::default();
        let refusals = Family::<RefusalLabels, Counter>::default();
        let duration = Family::<IdentityLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ])
        });
        let bytes = Family::<BytesLabels, Counter>::default();
        let connections = Gauge::default();
        let connections_closed = Counter::default();
        let quarantined = Gauge::default();
        let identities = Gauge::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let audit_dropped = Counter::default();
        registry.register(
            "requests",
            "Requests answered, by identity and status",
            requests.clone(),
        );
        registry.register(
            "refusals",
            "Requests the gate refused, by identity and reason",
            refusals.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's headers to the end of its response",
            duration.clone(),
        );
        registry.register(
            "bytes",
            "Body bytes by identity and direction",
            bytes.clone(),
        );
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "connections_revoked",
            "Connections closed because their identity was revoked or the model quarantined",
            connections_closed.clone(),
        );
        registry.register(
            "quarantined",
            "1 while the model is quarantined",
            quarantined.clone(),
        );
        registry.register(
            "policy_identities",
            "Client identities the current policy allows",
            identities.clone(),
        );
        registry.register(
            "reloads",
            "Policy and certificate reloads, by result",
            reloads.clone(),
        );
        registry.register(
            "audit_dropped",
            "Audit lines lost because standard output could not keep up",
            audit_dropped.clone(),
        );
        Self {
            registry,
            requests,
            refusals,
            duration,
            bytes,
            connections,
            connections_closed,
            quarantined,
            identities,
            reloads,
            audit_dropped,
        }
    }
}

impl GateMetrics {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Counts a reload of `what`.
    pub fn reloaded(&self, what: &'static str, ok: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                what,
                result: if ok { "loaded" } else { "failed" },
            })
            .inc();
    }
}
