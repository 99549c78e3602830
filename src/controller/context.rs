//! What every reconcile shares: the operator's settings, the caches of the children, the client,
//! metrics, the Event recorder, the CA, per-object backoff, and the clock.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
    jiff::Timestamp,
};
use kube::{
    Client,
    api::DynamicObject,
    runtime::{
        events::{Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};
use tokio::{sync::watch, time::Instant};

use super::ca;
use crate::{
    render::{self, Facts},
    telemetry::metrics::Metrics,
};

/// Operator settings that are not part of any object.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch; empty watches all namespaces.
    pub namespaces: Vec<String>,
    /// Requeue interval for a converged object (a periodic resync).
    pub resync_period: Duration,
    /// Facts rendering depends on.
    pub facts: Facts,
    /// Moat's certificate authority.
    pub ca: ca::CaSettings,
    /// How images are pinned.
    pub image: ImageSettings,
    /// StorageClasses the platform team declared encrypted: the only ones a PVC model source
    /// may use.
    pub encrypted_storage_classes: Vec<String>,
    /// Whether the chart's MutatingAdmissionPolicy records who changed each model's spec (the
    /// annotation `moat.dev/spec-author`): only then does Moat believe the annotation (a
    /// revision's author, and who may not approve it); otherwise authors are `unknown`.
    pub spec_author_policy: bool,
}

/// Operator-level image settings.
#[derive(Clone, Debug)]
pub struct ImageSettings {
    /// Registries model images may come from (host[:port]); empty allows every registry.
    pub allowed_registries: Vec<String>,
    /// Trust and time limits for registry requests.
    pub registry: crate::image::Registry,
    /// Moat's own image, run as the decrypting init container.
    pub helper_image: String,
    /// The helper image's digest, resolved once per operator process (shared by every watch
    /// scope).
    pub helper_pin: Arc<tokio::sync::OnceCell<String>>,
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            allowed_registries: Vec::new(),
            registry: crate::image::Registry::default(),
            helper_image: render::DEFAULT_HELPER_IMAGE.into(),
            helper_pin: Arc::default(),
        }
    }
}

/// In-memory caches (reflector stores) of every child kind Moat manages, fed by the same watches
/// that trigger reconciles. Reads of children come from here; writes are confirmed against a
/// fresh read first, so a stale cache never causes a wrong write.
#[derive(Clone)]
pub struct Caches {
    /// ServiceAccounts labelled `app.kubernetes.io/managed-by=moat`.
    pub service_accounts: Store<ServiceAccount>,
    /// NetworkPolicies labelled as Moat's.
    pub network_policies: Store<NetworkPolicy>,
    /// Services labelled as Moat's.
    pub services: Store<Service>,
    /// PodDisruptionBudgets labelled as Moat's.
    pub pod_disruption_budgets: Store<PodDisruptionBudget>,
    /// Deployments labelled as Moat's.
    pub deployments: Store<Deployment>,
    /// Secrets labelled as Moat's (serving and client certificates).
    pub secrets: Store<Secret>,
    /// ConfigMaps labelled as Moat's (the gates' policies).
    pub config_maps: Store<ConfigMap>,
}

/// Shared state of the reconciler.
pub struct Context {
    /// Client for every API call.
    pub client: Client,
    /// Caches of the children.
    pub caches: Caches,
    /// Operator settings.
    pub settings: Settings,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// The CA in use, once [`ca::run`] has one.
    pub ca: watch::Receiver<Option<Arc<ca::CaState>>>,
    /// `(namespace, name)` of every SecureModelDeployment reconciled, so ModelClients in other
    /// watch scopes re-check consent when a model's access list changes.
    pub smd_changes: tokio::sync::broadcast::Sender<(String, String)>,
    /// The ModelClients of every watch scope (the identities each gate lets through).
    pub clients: super::clients::Clients,
    /// Children deleted while carrying a break-glass reason, until their repair records it (the
    /// watches of the children fill it: [`Context::new`] starts it empty).
    pub deleted_with_reason: DeletedWithReason,
    /// Per-object backoff of failed reconciles.
    failures: Backoff,
}

/// Children that were deleted while carrying a break-glass reason (`moat.dev/break-glass-reason`),
/// by kind, namespace and name, with the reason: the watch sees the deleted object, the reconcile
/// that recreates it does not, so the watch leaves the reason here for the repair to record.
#[derive(Default, Clone)]
pub struct DeletedWithReason(Arc<Mutex<HashMap<ChildKey, String>>>);

/// A child's kind, namespace and name.
type ChildKey = (String, String, String);

impl DeletedWithReason {
    /// Reasons kept at most: deletions whose owner went too (the garbage collector's) are never
    /// taken, so past this many the oldest are forgotten.
    const MAX: usize = 1024;

    /// Notes that `kind` `namespace/name` was deleted carrying `reason`.
    pub fn insert(&self, kind: &str, namespace: &str, name: &str, reason: String) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert((kind.into(), namespace.into(), name.into()), reason);
    }

    /// The reason `kind` `namespace/name` carried when it was deleted, forgotten once taken.
    pub fn take(&self, kind: &str, namespace: &str, name: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(kind.into(), namespace.into(), name.into()))
    }
}

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long to wait before the next attempt on an object that has been failing for `failing_for`:
/// as long again (at least 1 s, at most 5 minutes). Retries thus come about 1, 2, 4, 8 ... seconds
/// after the first failure, however many other events made it fail meanwhile, and after a fault
/// ends (a registry or API outage) the object is retried within about as long as it lasted. A
/// count of attempts would instead be inflated by every watch event during the fault.
pub fn backoff_delay(failing_for: Duration) -> Duration {
    failing_for.clamp(Duration::from_secs(1), MAX_BACKOFF)
}

/// When each failing object's current run of failures began.
#[derive(Default)]
pub struct Backoff(Mutex<HashMap<ObjectRef<DynamicObject>, Instant>>);

impl Backoff {
    /// Records a failure of `key` at `now`; returns how long to wait before the next attempt.
    pub fn failed(&self, key: ObjectRef<DynamicObject>, now: Instant) -> Duration {
        let since = *self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert(now);
        backoff_delay(now.saturating_duration_since(since))
    }

    /// Forgets `key`'s failures (it succeeded, or waits for a change).
    pub fn forget(&self, key: &ObjectRef<DynamicObject>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

impl Context {
    pub(super) fn forget_failures<K: kube::Resource<DynamicType = ()>>(&self, key: &ObjectRef<K>) {
        self.failures.forget(&key.clone().erase());
    }

    /// Records a failure of `key` and returns how long to wait before the next attempt
    /// ([`backoff_delay`] of how long it has been failing).
    pub(super) fn backoff<K: kube::Resource<DynamicType = ()>>(
        &self,
        key: &ObjectRef<K>,
    ) -> Duration {
        self.failures.failed(key.clone().erase(), Instant::now())
    }
}

impl Context {
    /// A new context.
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        caches: Caches,
        ca: watch::Receiver<Option<Arc<ca::CaState>>>,
        smd_changes: tokio::sync::broadcast::Sender<(String, String)>,
        clients: super::clients::Clients,
    ) -> Self {
        let reporter = Reporter {
            controller: "moat".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            caches,
            settings,
            metrics,
            ca,
            smd_changes,
            clients,
            deleted_with_reason: DeletedWithReason::default(),
            failures: Backoff::default(),
        }
    }
}

/// The one place the reconcilers read the clock; everything downstream takes the time as data.
pub fn now() -> Timestamp {
    Timestamp::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_as_long_as_the_failure_has_lasted_between_1_s_and_5_min() {
        let s = Duration::from_secs;
        for (failing_for, wait) in [
            (Duration::ZERO, s(1)),
            (Duration::from_millis(300), s(1)),
            (s(1), s(1)),
            (s(7), s(7)),
            (s(64), s(64)),
            (s(299), s(299)),
            (s(301), s(300)),
            (s(86_400), s(300)),
        ] {
            assert_eq!(backoff_delay(failing_for), wait, "{failing_for:?}");
        }
    }

    /// A deletion's reason is taken once, by the repair of that very object.
    #[test]
    fn a_deleted_childs_reason_is_taken_once() {
        let deleted = DeletedWithReason::default();
        deleted.insert("Secret", "ml", "fraud-tls", "INC-7".into());
        assert_eq!(deleted.take("Secret", "ml", "other"), None);
        assert_eq!(deleted.take("Service", "ml", "fraud-tls"), None);
        assert_eq!(
            deleted.take("Secret", "ml", "fraud-tls").as_deref(),
            Some("INC-7")
        );
        assert_eq!(deleted.take("Secret", "ml", "fraud-tls"), None);
    }

    /// Many failures in a short time (watch events during an outage) do not push the next retry
    /// out: after 2 s of failing, the wait is 2 s, whether 3 or 30 attempts failed; a success
    /// starts the count afresh.
    #[test]
    fn many_failures_in_a_short_time_do_not_inflate_the_backoff() {
        let backoff = Backoff::default();
        let key = ObjectRef::<k8s_openapi::api::core::v1::ConfigMap>::new("m")
            .within("n")
            .erase();
        let other = ObjectRef::<k8s_openapi::api::core::v1::ConfigMap>::new("o")
            .within("n")
            .erase();
        let start = Instant::now();
        for i in 0..30 {
            let at = start + Duration::from_millis(i * 10);
            assert_eq!(backoff.failed(key.clone(), at), Duration::from_secs(1));
        }
        let later = start + Duration::from_secs(2);
        assert_eq!(backoff.failed(key.clone(), later), Duration::from_secs(2));
        assert_eq!(
            backoff.failed(other, later),
            Duration::from_secs(1),
            "per object"
        );
        backoff.forget(&key);
        assert_eq!(backoff.failed(key, later), Duration::from_secs(1), "afresh");
    }
}
