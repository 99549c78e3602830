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
        core::v1::{Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
    jiff::Timestamp,
};
use kube::{
    Client,
    runtime::{
        events::{Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};
use tokio::sync::watch;

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
    /// Consecutive failures per object, for backoff.
    failures: Mutex<HashMap<ObjectRef<kube::api::DynamicObject>, u32>>,
}

impl Context {
    pub(super) fn forget_failures<K: kube::Resource<DynamicType = ()>>(&self, key: &ObjectRef<K>) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key.clone().erase());
    }

    /// Counts one more consecutive failure of `key` and returns how long to wait before the
    /// next attempt: 1 s, 2 s, 4 s ... capped at 5 minutes.
    pub(super) fn backoff<K: kube::Resource<DynamicType = ()>>(
        &self,
        key: &ObjectRef<K>,
    ) -> Duration {
        let attempts = {
            let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
            let n = failures.entry(key.clone().erase()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        Duration::from_secs(1u64 << attempts.clamp(1, 10).saturating_sub(1))
            .min(Duration::from_secs(300))
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
            failures: Mutex::new(HashMap::new()),
        }
    }
}

/// The one place the reconcilers read the clock; everything downstream takes the time as data.
pub fn now() -> Timestamp {
    Timestamp::now()
}
