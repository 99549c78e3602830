//! Prometheus metrics of the operator (prometheus-client).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
    time::Instant,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of per-reason error counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Error kind (`Error::metric_label`).
    pub reason: String,
}

/// Labels of per-kind counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Kubernetes kind.
    pub kind: String,
}

/// Labels of API write counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// Kubernetes kind.
    pub kind: String,
    /// What was written: apply, delete, patch-status, patch-managed-fields, patch-annotations
    /// (a recorded break-glass reason removed), create.
    pub verb: String,
}

/// Labels of certificate counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    /// `serving` or `client`.
    pub usage: String,
}

/// Labels of image resolution counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `pinned`, or the condition reason of the failure (`RegistryUnreachable`, ...).
    pub outcome: String,
}

/// Labels of per-certificate gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabels {
    /// Namespace of the Secret.
    pub namespace: String,
    /// Name of the Secret.
    pub secret: String,
}

/// Labels of drift repairs counted by the object that owns the repaired child.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OwnerLabels {
    /// Kind of the owner: `SecureModelDeployment`, or `ModelClient` for a client's Secret.
    pub owner: String,
    /// Namespace of the owner (and of the repaired child).
    pub namespace: String,
    /// Name of the owner.
    pub name: String,
    /// Kubernetes kind of the repaired child.
    pub kind: String,
}

/// An object that owns repaired children, as the drift-by-owner series name it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Owner {
    /// `SecureModelDeployment` or `ModelClient`.
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Labels of break-glass changes: the model (or ModelClient) whose child was changed, and the
/// child's kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakGlassLabels {
    /// Namespace of the owner (and of the child).
    pub namespace: String,
    /// Name of the SecureModelDeployment (or ModelClient) owning the child.
    pub name: String,
    /// Kubernetes kind of the child.
    pub kind: String,
}

/// Labels of per-model condition gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    /// Namespace of the SecureModelDeployment.
    pub namespace: String,
    /// Name of the SecureModelDeployment.
    pub name: String,
    /// Condition type: `Ready`, `Reconciling` or `Stalled`.
    pub condition: String,
    /// The condition's reason (`RolloutComplete`, `Quarantined`, `RegistryUnreachable`, ...).
    pub reason: String,
}

/// One certificate as the census sees it: where it is stored and its timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateTimes {
    /// Namespace of the Secret.
    pub namespace: String,
    /// Name of the Secret.
    pub secret: String,
    /// Seconds until the certificate expires (negative once expired).
    pub expiry: i64,
    /// Seconds until it is due for renewal, two thirds into its lifetime (negative once due).
    pub renewal: i64,
}

/// Gauges of one family that each watch scope (a namespace, or `*` for all) replaces as a whole:
/// the series a scope reported before and no longer reports are removed.
struct ScopedGauges<L> {
    family: Family<L, Gauge>,
    by_scope: Mutex<HashMap<String, Vec<L>>>,
}

impl<L: Clone + std::hash::Hash + Eq> ScopedGauges<L> {
    fn new(family: Family<L, Gauge>) -> Self {
        Self {
            family,
            by_scope: Mutex::default(),
        }
    }

    /// Replaces what `scope` reports with `values`.
    fn replace(&self, scope: &str, values: impl IntoIterator<Item = (L, i64)>) {
        let mut scopes = self
            .by_scope
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let values: Vec<(L, i64)> = values.into_iter().collect();
        for gone in scopes
            .get(scope)
            .into_iter()
            .flatten()
            .filter(|l| !values.iter().any(|(v, _)| v == *l))
        {
            self.family.remove(gone);
        }
        for (label, value) in &values {
            self.family.get_or_create(label).set(*value);
        }
        scopes.insert(
            scope.to_string(),
            values.into_iter().map(|(l, _)| l).collect(),
        );
    }

    /// The value of `label`, if a scope reports it.
    fn get(&self, label: &L) -> Option<i64> {
        self.by_scope
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .any(|ls| ls.contains(label))
            .then(|| self.family.get_or_create(label).get())
    }

    /// Removes every series.
    fn clear(&self) {
        self.by_scope
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        self.family.clear();
    }
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    errors: Family<ErrorLabels, Counter>,
    duration: Histogram,
    drift_repairs: Family<KindLabels, Counter>,
    drift_repairs_by_owner: Family<OwnerLabels, Counter>,
    /// The series of `drift_repairs_by_owner` (a Family cannot list them), so those of owners
    /// that are gone can be removed; held while a repair is counted.
    drift_owners: Mutex<HashSet<OwnerLabels>>,
    break_glass: Family<BreakGlassLabels, Counter>,
    api_writes: Family<WriteLabels, Counter>,
    leader: Gauge,
    synced: Gauge,
    /// A follower that has joined the leader election (ready to take over).
    standby: std::sync::atomic::AtomicBool,
    managed: Family<KindLabels, Gauge>,
    certificates_issued: Family<UsageLabels, Counter>,
    certificate_expiry: ScopedGauges<SecretLabels>,
    /// Certificates renewed on schedule have a positive `certificate_renewal`.
    certificate_renewal: ScopedGauges<SecretLabels>,
    /// The CA's time to expiry, usable or not (one series, from every scope alike).
    ca_expiry: ScopedGauges<SecretLabels>,
    /// 1 while a CA is usable, 0 while not (one series).
    ca_usable: ScopedGauges<SecretLabels>,
    /// 1 for each condition of each SecureModelDeployment that is True, 0 when False.
    model_conditions: ScopedGauges<ConditionLabels>,
    image_resolutions: Family<OutcomeLabels, Counter>,
    /// What each watch scope (a namespace, or `*` for all) contributes to `managed`.
    managed_by_scope: Mutex<HashMap<String, BTreeMap<&'static str, i64>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("moat");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let drift_repairs = Family::<KindLabels, Counter>::default();
        let drift_repairs_by_owner = Family::<OwnerLabels, Counter>::default();
        let api_writes = Family::<WriteLabels, Counter>::default();
        let break_glass = Family::<BreakGlassLabels, Counter>::default();
        registry.register(
            "reconcile",
            "Reconciles of SecureModelDeployments",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles by reason",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of a reconcile",
            duration.clone(),
        );
        registry.register(
            "drift_repairs",
            "Changes made outside Moat that Moat reverted, by kind",
            drift_repairs.clone(),
        );
        registry.register(
            "drift_repairs_by_owner",
            "Changes made outside Moat that Moat reverted, by the SecureModelDeployment or ModelClient owning the child, and the child's kind",
            drift_repairs_by_owner.clone(),
        );
        registry.register(
            "break_glass",
            "Changes to Moat's children made through break-glass (the child carried the moat.dev/break-glass-reason annotation), recorded and then reverted, by owner and the child's kind",
            break_glass.clone(),
        );
        registry.register(
            "api_writes",
            "Write calls to the Kubernetes API, by kind and verb",
            api_writes.clone(),
        );
        // Without leader election every replica leads; run_elected resets it.
        let leader = Gauge::default();
        leader.set(1);
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease (or runs without leader election)",
            leader.clone(),
        );
        let synced = Gauge::default();
        registry.register(
            "caches_synced",
            "1 once every watch of the running controller has filled its cache (0 on a follower)",
            synced.clone(),
        );
        let managed = Family::<KindLabels, Gauge>::default();
        registry.register(
            "managed_objects",
            "Objects this replica manages, by kind: SecureModelDeployments and their children",
            managed.clone(),
        );
        let certificates_issued = Family::<UsageLabels, Counter>::default();
        registry.register(
            "certificates_issued",
            "Certificates issued (new or renewed), by usage",
            certificates_issued.clone(),
        );
        let certificate_expiry = Family::<SecretLabels, Gauge>::default();
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the certificate in each Secret Moat manages expires",
            certificate_expiry.clone(),
        );
        let certificate_renewal = Family::<SecretLabels, Gauge>::default();
        registry.register(
            "certificate_renewal_seconds",
            "Seconds until the certificate in each Secret Moat manages is due for renewal (two thirds into its lifetime); negative once due",
            certificate_renewal.clone(),
        );
        let ca_expiry = Family::<SecretLabels, Gauge>::default();
        registry.register(
            "ca_expiry_seconds",
            "Seconds until the CA certificate in its Secret expires, whether or not the CA is usable (negative once expired)",
            ca_expiry.clone(),
        );
        let ca_usable = Family::<SecretLabels, Gauge>::default();
        registry.register(
            "ca_usable",
            "1 while Moat has a usable CA to issue certificates with, 0 while it has none (the Secret unreadable, a creation or rotation that cannot be written, an unusable CA you brought)",
            ca_usable.clone(),
        );
        // The drift alerts count a series that appeared since the operator started in full.
        let start_time: Gauge = Gauge::default();
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        );
        registry.register(
            "start_time_seconds",
            "Unix time this operator process started (its counters count from then)",
            start_time,
        );
        let model_conditions = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "model_condition",
            "Conditions of each SecureModelDeployment: 1 when True, 0 when False, with the reason; condition RevisionFailed (1, with the failure's reason) while a revision of the model is recorded as failed, rolled back or not",
            model_conditions.clone(),
        );
        let image_resolutions = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "image_resolutions",
            "Tags resolved to a digest in a registry, by outcome",
            image_resolutions.clone(),
        );
        Self {
            registry,
            reconciles,
            synced,
            standby: std::sync::atomic::AtomicBool::new(false),
            image_resolutions,
            certificates_issued,
            certificate_expiry: ScopedGauges::new(certificate_expiry),
            certificate_renewal: ScopedGauges::new(certificate_renewal),
            ca_expiry: ScopedGauges::new(ca_expiry),
            ca_usable: ScopedGauges::new(ca_usable),
            model_conditions: ScopedGauges::new(model_conditions),
            errors,
            duration,
            drift_repairs,
            drift_repairs_by_owner,
            drift_owners: Mutex::default(),
            break_glass,
            api_writes,
            leader,
            managed,
            managed_by_scope: Mutex::default(),
        }
    }
}

/// Observes a reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    start: Instant,
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the returned guard is dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: &self.duration,
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, reason: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a drift repair of a child of `kind` owned by the `owner` (its kind)
    /// `namespace/name`: in `moat_drift_repairs_total{kind}` and
    /// `moat_drift_repairs_by_owner_total{owner,namespace,name,kind}`.
    pub fn drift_repaired(&self, owner: &str, namespace: &str, name: &str, kind: &str) {
        self.drift_repairs
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
        let labels = OwnerLabels {
            owner: owner.into(),
            namespace: namespace.into(),
            name: name.into(),
            kind: kind.into(),
        };
        let mut owners = self
            .drift_owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.drift_repairs_by_owner.get_or_create(&labels).inc();
        owners.insert(labels);
    }

    /// Removes the `moat_drift_repairs_by_owner_total` series of the owners in `namespace`
    /// (`None`: every namespace) that `live` does not list: SecureModelDeployments and
    /// ModelClients that were deleted. `live` is called while no repair can be counted, so an
    /// owner counted before it lists the owners is among them unless it is gone.
    pub fn retain_drift_owners(
        &self,
        namespace: Option<&str>,
        live: impl FnOnce() -> HashSet<Owner>,
    ) {
        let mut owners = self
            .drift_owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let live = live();
        owners.retain(|l| {
            let keep = namespace.is_some_and(|ns| ns != l.namespace)
                || live.contains(&Owner {
                    kind: l.owner.clone(),
                    namespace: l.namespace.clone(),
                    name: l.name.clone(),
                });
            if !keep {
                self.drift_repairs_by_owner.remove(l);
            }
            keep
        });
    }

    /// Counts a break-glass change to a child of `kind` of `namespace/name` (its owner), in
    /// `moat_break_glass_total{namespace,name,kind}`. The repair that follows is counted as drift
    /// too.
    pub fn break_glass_used(&self, namespace: &str, name: &str, kind: &str) {
        self.break_glass
            .get_or_create(&BreakGlassLabels {
                namespace: namespace.into(),
                name: name.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// Counts a registry resolution with its outcome.
    pub fn image_resolution(&self, outcome: &str) {
        self.image_resolutions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts an API write.
    pub fn api_write(&self, kind: &str, verb: &str) {
        self.api_writes
            .get_or_create(&WriteLabels {
                kind: kind.into(),
                verb: verb.into(),
            })
            .inc();
    }

    /// Records the objects one watch scope (a namespace, or `*` for all) manages, by kind,
    /// replacing what it recorded before.
    pub fn set_managed(&self, scope: &str, counts: BTreeMap<&'static str, i64>) {
        let mut scopes = self
            .managed_by_scope
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = scopes.insert(scope.to_string(), counts.clone());
        self.apply_delta(old.as_ref(), Some(&counts));
    }

    /// Forgets everything (leadership lost: another replica manages the objects now).
    pub fn clear_managed(&self) {
        let mut scopes = self
            .managed_by_scope
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        scopes.clear();
        self.managed.clear();
        self.certificate_expiry.clear();
        self.certificate_renewal.clear();
        self.ca_expiry.clear();
        self.ca_usable.clear();
        self.model_conditions.clear();
    }

    fn apply_delta(
        &self,
        old: Option<&BTreeMap<&'static str, i64>>,
        new: Option<&BTreeMap<&'static str, i64>>,
    ) {
        let mut delta: BTreeMap<&'static str, i64> = BTreeMap::new();
        for (kind, n) in new.into_iter().flatten() {
            *delta.entry(kind).or_default() += n;
        }
        for (kind, n) in old.into_iter().flatten() {
            *delta.entry(kind).or_default() -= n;
        }
        for (kind, d) in delta {
            if d != 0 {
                self.managed
                    .get_or_create(&KindLabels { kind: kind.into() })
                    .inc_by(d);
            }
        }
    }

    /// Objects of `kind` this replica manages.
    pub fn managed(&self, kind: &str) -> i64 {
        self.managed
            .get_or_create(&KindLabels { kind: kind.into() })
            .get()
    }

    /// Counts an issued certificate (`serving` or `client`).
    pub fn certificate_issued(&self, usage: &str) {
        self.certificates_issued
            .get_or_create(&UsageLabels {
                usage: usage.into(),
            })
            .inc();
    }

    /// Replaces the time-to-expiry and time-to-renewal gauges of one watch scope with
    /// `certificates`; gauges of Secrets no longer listed are removed.
    pub fn set_certificate_expiries(&self, scope: &str, certificates: &[CertificateTimes]) {
        let labels = |c: &CertificateTimes| SecretLabels {
            namespace: c.namespace.clone(),
            secret: c.secret.clone(),
        };
        self.certificate_expiry
            .replace(scope, certificates.iter().map(|c| (labels(c), c.expiry)));
        self.certificate_renewal
            .replace(scope, certificates.iter().map(|c| (labels(c), c.renewal)));
    }

    /// Seconds until the certificate in `namespace/secret` expires, if Moat tracks it.
    pub fn certificate_expiry(&self, namespace: &str, secret: &str) -> Option<i64> {
        self.certificate_expiry.get(&SecretLabels {
            namespace: namespace.into(),
            secret: secret.into(),
        })
    }

    /// Records the CA stored in `namespace/secret`: whether one is usable (`None`: not looked
    /// at yet, no `moat_ca_usable` series), and the seconds until the certificate in the Secret
    /// expires, whenever it is known, usable or not: a CA whose rotation fails keeps its expiry
    /// (`None`: unknown, no `moat_ca_expiry_seconds` series).
    pub fn set_ca(
        &self,
        namespace: &str,
        secret: &str,
        usable: Option<bool>,
        expiry_seconds: Option<i64>,
    ) {
        let label = SecretLabels {
            namespace: namespace.into(),
            secret: secret.into(),
        };
        // One series whichever scope reports it: the CA is the same for all.
        self.ca_expiry
            .replace("*", expiry_seconds.map(|s| (label.clone(), s)));
        self.ca_usable
            .replace("*", usable.map(|u| (label, i64::from(u))));
    }

    /// Replaces the condition gauges of one watch scope: for each SecureModelDeployment, each of
    /// its conditions whose status is `True` or `False` (a condition `Unknown` has no series).
    pub fn set_model_conditions(&self, scope: &str, conditions: Vec<(ConditionLabels, bool)>) {
        self.model_conditions.replace(
            scope,
            conditions
                .into_iter()
                .map(|(labels, status)| (labels, i64::from(status))),
        );
    }

    /// The condition gauge of `namespace/name` for `condition` with `reason`, if reported.
    pub fn model_condition(
        &self,
        namespace: &str,
        name: &str,
        condition: &str,
        reason: &str,
    ) -> Option<i64> {
        self.model_conditions.get(&ConditionLabels {
            namespace: namespace.into(),
            name: name.into(),
            condition: condition.into(),
            reason: reason.into(),
        })
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Whether this replica leads.
    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    /// Records whether every watch of the running controller has filled its cache.
    pub fn set_synced(&self, synced: bool) {
        self.synced.set(i64::from(synced));
    }

    /// Records whether this replica has joined the leader election as a follower.
    pub fn set_standby(&self, standby: bool) {
        self.standby
            .store(standby, std::sync::atomic::Ordering::Relaxed);
    }

    /// What `/readyz` answers: `Ok` with what this replica is ready for, or `Err` with why not.
    /// A replica that reconciles is ready once its caches are filled (its first reconciles then
    /// see every child); a follower is ready once it takes part in the leader election, so it
    /// can take over (a rolling update of the operator waits for that).
    pub fn readiness(&self) -> Result<&'static str, &'static str> {
        if self.synced.get() == 1 {
            Ok("ok: reconciling, caches synced")
        } else if !self.is_leader() && self.standby.load(std::sync::atomic::Ordering::Relaxed) {
            Ok("ok: follower, standing by to take over the Lease")
        } else {
            Err("not ready: waiting for the caches to sync (or for the Lease)")
        }
    }

    /// Total API writes so far (for tests and benchmarks).
    pub fn api_writes_total(&self) -> u64 {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            return 0;
        }
        text.lines()
            .filter(|l| l.starts_with("moat_api_writes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(smds: i64, deployments: i64) -> BTreeMap<&'static str, i64> {
        BTreeMap::from([("SecureModelDeployment", smds), ("Deployment", deployments)])
    }

    #[test]
    fn managed_objects_sum_over_scopes_and_replace_per_scope() {
        let m = Metrics::default();
        m.set_managed("team-a", counts(2, 2));
        m.set_managed("team-b", counts(3, 3));
        assert_eq!(m.managed("SecureModelDeployment"), 5);
        // A recount replaces the scope's numbers; it does not add to them.
        m.set_managed("team-a", counts(1, 1));
        assert_eq!(m.managed("SecureModelDeployment"), 4);
        assert_eq!(m.managed("Deployment"), 4);
        let text = m.encode().expect("encode");
        assert!(
            text.contains("moat_managed_objects{kind=\"Deployment\"} 4"),
            "{text}"
        );
        m.clear_managed();
        assert_eq!(m.managed("Deployment"), 0);
        m.set_managed("team-a", counts(1, 0));
        assert_eq!(m.managed("SecureModelDeployment"), 1);
    }

    #[test]
    fn certificate_expiries_are_replaced_per_scope() {
        let m = Metrics::default();
        let e = |ns: &str, name: &str, secs: i64| CertificateTimes {
            namespace: ns.to_string(),
            secret: name.to_string(),
            expiry: secs,
            renewal: secs / 3 - 20,
        };
        m.set_certificate_expiries("a", &[e("a", "x-tls", 100), e("a", "y-tls", 50)]);
        m.set_certificate_expiries("b", &[e("b", "z-tls", 10)]);
        assert_eq!(m.certificate_expiry("a", "y-tls"), Some(50));
        m.set_certificate_expiries("a", &[e("a", "x-tls", 90)]);
        assert_eq!(m.certificate_expiry("a", "x-tls"), Some(90));
        assert_eq!(m.certificate_expiry("a", "y-tls"), None);
        assert_eq!(m.certificate_expiry("b", "z-tls"), Some(10));
        let text = m.encode().expect("encode");
        assert!(!text.contains("y-tls"), "{text}");
        assert!(
            text.contains("moat_certificate_expiry_seconds{namespace=\"b\",secret=\"z-tls\"} 10"),
            "{text}"
        );
        // The renewal gauge follows the same Secrets, negative once the renewal is due.
        assert!(
            text.contains("moat_certificate_renewal_seconds{namespace=\"b\",secret=\"z-tls\"} -17"),
            "{text}"
        );
        assert!(
            text.contains("moat_certificate_renewal_seconds{namespace=\"a\",secret=\"x-tls\"} 10"),
            "{text}"
        );
    }

    #[test]
    fn drift_repairs_are_counted_by_kind_and_by_owner() {
        let m = Metrics::default();
        m.drift_repaired("SecureModelDeployment", "ml", "fraud", "NetworkPolicy");
        m.drift_repaired("SecureModelDeployment", "ml", "fraud", "NetworkPolicy");
        m.drift_repaired("ModelClient", "payments", "checkout", "Secret");
        let text = m.encode().expect("encode");
        assert!(
            text.contains("moat_drift_repairs_total{kind=\"NetworkPolicy\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "moat_drift_repairs_by_owner_total{owner=\"SecureModelDeployment\",namespace=\"ml\",name=\"fraud\",kind=\"NetworkPolicy\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "moat_drift_repairs_by_owner_total{owner=\"ModelClient\",namespace=\"payments\",name=\"checkout\",kind=\"Secret\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn break_glass_changes_are_counted_by_owner_and_kind() {
        let m = Metrics::default();
        let before = m.encode().expect("encode");
        assert!(
            !before.contains("moat_break_glass_total{"),
            "no series before the first break-glass change: {before}"
        );
        m.break_glass_used("ml", "fraud", "Deployment");
        m.break_glass_used("ml", "fraud", "Deployment");
        m.break_glass_used("ml", "fraud", "Secret");
        let text = m.encode().expect("encode");
        assert!(
            text.contains(
                "moat_break_glass_total{namespace=\"ml\",name=\"fraud\",kind=\"Deployment\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "moat_break_glass_total{namespace=\"ml\",name=\"fraud\",kind=\"Secret\"} 1"
            ),
            "{text}"
        );
    }

    fn condition(name: &str, condition: &str, reason: &str) -> ConditionLabels {
        ConditionLabels {
            namespace: "ml".into(),
            name: name.into(),
            condition: condition.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn model_conditions_follow_each_scope_and_a_new_reason_replaces_the_old_series() {
        let m = Metrics::default();
        m.set_model_conditions(
            "ml",
            vec![
                (condition("a", "Ready", "RolloutComplete"), true),
                (condition("a", "Stalled", "AsExpected"), false),
            ],
        );
        assert_eq!(
            m.model_condition("ml", "a", "Ready", "RolloutComplete"),
            Some(1)
        );
        assert_eq!(
            m.model_condition("ml", "a", "Stalled", "AsExpected"),
            Some(0)
        );
        // Quarantined: Ready turns False with another reason; the old series goes.
        m.set_model_conditions("ml", vec![(condition("a", "Ready", "Quarantined"), false)]);
        assert_eq!(
            m.model_condition("ml", "a", "Ready", "Quarantined"),
            Some(0)
        );
        assert_eq!(
            m.model_condition("ml", "a", "Ready", "RolloutComplete"),
            None
        );
        let text = m.encode().expect("encode");
        assert!(
            text.contains(
                "moat_model_condition{namespace=\"ml\",name=\"a\",condition=\"Ready\",reason=\"Quarantined\"} 0"
            ),
            "{text}"
        );
        assert!(!text.contains("RolloutComplete"), "{text}");
        // A deleted model leaves the scope's next report, and its series with it.
        m.set_model_conditions("ml", vec![]);
        assert!(!m.encode().expect("encode").contains("name=\"a\""));
    }

    #[test]
    fn losing_leadership_removes_the_per_object_gauges() {
        let m = Metrics::default();
        m.set_model_conditions(
            "ml",
            vec![(condition("a", "Ready", "RolloutComplete"), true)],
        );
        m.set_ca("moat-system", "moat-ca", Some(true), Some(3600));
        assert!(
            m.encode().expect("encode").contains(
                "moat_ca_expiry_seconds{namespace=\"moat-system\",secret=\"moat-ca\"} 3600"
            )
        );
        m.clear_managed();
        let text = m.encode().expect("encode");
        assert!(!text.contains("moat-ca"), "{text}");
        assert!(!text.contains("RolloutComplete"), "{text}");
    }

    #[test]
    fn the_ca_expiry_stays_while_the_ca_is_unusable_and_usability_is_a_gauge() {
        let m = Metrics::default();
        let expiry = "moat_ca_expiry_seconds{namespace=\"moat-system\",secret=\"moat-ca\"}";
        let usable = "moat_ca_usable{namespace=\"moat-system\",secret=\"moat-ca\"}";
        m.set_ca("moat-system", "moat-ca", Some(true), Some(3600));
        let text = m.encode().expect("encode");
        assert!(text.contains(&format!("{expiry} 3600")), "{text}");
        assert!(text.contains(&format!("{usable} 1")), "{text}");
        // A rotation that cannot be written: the CA is unusable, and the old certificate's
        // expiry is what MoatCAExpiringSoon must see.
        m.set_ca("moat-system", "moat-ca", Some(false), Some(60));
        let text = m.encode().expect("encode");
        assert!(text.contains(&format!("{expiry} 60")), "{text}");
        assert!(text.contains(&format!("{usable} 0")), "{text}");
        // Expired: negative.
        m.set_ca("moat-system", "moat-ca", Some(false), Some(-5));
        assert!(
            m.encode()
                .expect("encode")
                .contains(&format!("{expiry} -5"))
        );
        // No certificate known: no expiry series (never a made-up 0), usable still reported.
        m.set_ca("moat-system", "moat-ca", Some(false), None);
        let text = m.encode().expect("encode");
        assert!(!text.contains("moat_ca_expiry_seconds{"), "{text}");
        assert!(text.contains(&format!("{usable} 0")), "{text}");
        // Not looked at yet: nothing.
        m.set_ca("moat-system", "moat-ca", None, None);
        assert!(!m.encode().expect("encode").contains("moat-ca"));
    }

    fn owner(kind: &str, namespace: &str, name: &str) -> Owner {
        Owner {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn drift_series_of_owners_that_are_gone_are_removed_within_the_scope() {
        let m = Metrics::default();
        m.drift_repaired("SecureModelDeployment", "ml", "kept", "Deployment");
        m.drift_repaired("SecureModelDeployment", "ml", "deleted", "NetworkPolicy");
        m.drift_repaired("SecureModelDeployment", "ml", "deleted", "Service");
        m.drift_repaired("ModelClient", "ml", "deleted", "Secret");
        m.drift_repaired("SecureModelDeployment", "other", "elsewhere", "Deployment");
        // The scope `ml` holds `kept` and a ModelClient named like the deleted model.
        m.retain_drift_owners(Some("ml"), || {
            HashSet::from([
                owner("SecureModelDeployment", "ml", "kept"),
                owner("ModelClient", "ml", "deleted"),
            ])
        });
        let text = m.encode().expect("encode");
        assert!(
            !text.contains("name=\"deleted\",kind=\"NetworkPolicy\""),
            "{text}"
        );
        assert!(
            !text.contains("name=\"deleted\",kind=\"Service\""),
            "{text}"
        );
        assert!(
            text.contains("moat_drift_repairs_by_owner_total{owner=\"ModelClient\",namespace=\"ml\",name=\"deleted\",kind=\"Secret\"} 1"),
            "{text}"
        );
        assert!(text.contains("name=\"kept\""), "{text}");
        // Another scope's series are not this scope's to judge.
        assert!(text.contains("name=\"elsewhere\""), "{text}");
        // The totals by kind stay: they count every repair ever made.
        assert!(
            text.contains("moat_drift_repairs_total{kind=\"NetworkPolicy\"} 1"),
            "{text}"
        );
        // The scope of every namespace judges all; a recreated owner starts again from 1.
        m.retain_drift_owners(None, HashSet::new);
        let text = m.encode().expect("encode");
        assert!(
            !text.contains("moat_drift_repairs_by_owner_total{"),
            "{text}"
        );
        m.drift_repaired("SecureModelDeployment", "ml", "kept", "Deployment");
        assert!(
            m.encode().expect("encode").contains(
                "moat_drift_repairs_by_owner_total{owner=\"SecureModelDeployment\",namespace=\"ml\",name=\"kept\",kind=\"Deployment\"} 1"
            )
        );
    }
}
