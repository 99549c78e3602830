//! The imperative shell: watches SecureModelDeployments and every kind they own, and for each
//! one reads the live children, renders the desired ones (pure), applies them in a stated order
//! with server-side apply, repairs drift, prunes what is no longer desired and reports status.

mod apply;
pub mod ca;
mod certs;
mod client;
pub mod drift;
pub mod leader;
mod resolve;
pub mod status;
pub mod weights;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::StreamExt;
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
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    api::{SecureModelDeployment, SecureModelDeploymentStatus, conditions},
    render::{self, Children, Facts, MANAGED_BY, RenderError},
    telemetry::metrics::Metrics,
};

pub use apply::Repair;

/// The one field manager Moat applies with.
pub const FIELD_MANAGER: &str = "moat";

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
    failures: Mutex<HashMap<ObjectRef<SecureModelDeployment>, u32>>,
}

impl Context {
    fn forget_failures(&self, key: &ObjectRef<SecureModelDeployment>) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// Counts one more consecutive failure of `key` and returns how long to wait before the
    /// next attempt: 1 s, 2 s, 4 s ... capped at 5 minutes.
    fn backoff(&self, key: &ObjectRef<SecureModelDeployment>) -> Duration {
        let attempts = {
            let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
            let n = failures.entry(key.clone()).or_insert(0);
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

    /// Whether retrying cannot help until the user changes something: an invalid spec, a name
    /// taken by an object Moat does not control, or a child the API server rejects as invalid.
    pub fn needs_user_action(&self) -> bool {
        match self {
            Error::Invalid(_) | Error::Conflict { .. } => true,
            Error::Image(e) => e.needs_user_action(),
            Error::Weights(e) => e.needs_user_action(),
            Error::Apply {
                source: kube::Error::Api(s),
                ..
            } => s.code == 422,
            _ => false,
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

/// The User-Agent of Moat's API requests (audit logs attribute writes to it).
pub const USER_AGENT: &str = concat!("moat-operator/", env!("CARGO_PKG_VERSION"));

/// A client for the operator: the inferred configuration (KUBECONFIG out of cluster, the
/// ServiceAccount in cluster) with Moat's User-Agent.
pub async fn client() -> Result<Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    client_from(config)
}

/// A client from `config` with Moat's User-Agent.
pub fn client_from(mut config: kube::Config) -> Result<Client, kube::Error> {
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    Client::try_from(config)
}

/// A reflector for one child kind: its store, and the stream of changes that triggers reconciles
/// (deletions included).
fn reflect<K>(
    client: &Client,
    ns: Option<&str>,
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let config =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let stream = watcher(api::<K>(client, ns), config)
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    (store, stream)
}

/// Runs the controller until a shutdown signal arrives: one watch over all namespaces, or one
/// controller per namespace in [`Settings::namespaces`] (each with its own watches and caches, so
/// the operator needs no cluster-wide list or watch). The caches of the children are filled
/// before the first reconcile.
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>) {
    let (ca_tx, ca_rx) = watch::channel(None);
    let (smd_changes, _) = tokio::sync::broadcast::channel(1024);
    let authority = ca::run(client.clone(), settings.ca.clone(), ca_tx);
    metrics.set_synced(false);
    let controllers = async move {
        let mut scopes: Vec<Option<String>> =
            settings.namespaces.iter().cloned().map(Some).collect();
        scopes.sort();
        scopes.dedup();
        if scopes.is_empty() {
            scopes.push(None);
        }
        // `/readyz` turns ready when the last scope has filled its caches.
        let unsynced = Arc::new(std::sync::atomic::AtomicUsize::new(scopes.len()));
        futures::future::join_all(scopes.into_iter().map(|ns| {
            run_one(
                client.clone(),
                ns,
                settings.clone(),
                metrics.clone(),
                ca_rx.clone(),
                smd_changes.clone(),
                unsynced.clone(),
            )
        }))
        .await;
    };
    tokio::select! {
        () = authority => {}
        () = controllers => {}
    }
}

/// A stream that yields whenever the CA in use changes (every certificate is then re-checked).
fn ca_changes(
    rx: watch::Receiver<Option<Arc<ca::CaState>>>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

async fn run_one(
    client: Client,
    ns: Option<String>,
    settings: Settings,
    metrics: Arc<Metrics>,
    ca_rx: watch::Receiver<Option<Arc<ca::CaState>>>,
    smd_changes: tokio::sync::broadcast::Sender<(String, String)>,
    unsynced: Arc<std::sync::atomic::AtomicUsize>,
) {
    let smds: Api<SecureModelDeployment> = api(&client, ns.as_deref());
    let (sa_store, sa_stream) = reflect::<ServiceAccount>(&client, ns.as_deref());
    let (np_store, np_stream) = reflect::<NetworkPolicy>(&client, ns.as_deref());
    let (svc_store, svc_stream) = reflect::<Service>(&client, ns.as_deref());
    let (pdb_store, pdb_stream) = reflect::<PodDisruptionBudget>(&client, ns.as_deref());
    let (deploy_store, deploy_stream) = reflect::<Deployment>(&client, ns.as_deref());
    let (secret_store, secret_stream) = reflect::<Secret>(&client, ns.as_deref());
    let caches = Caches {
        service_accounts: sa_store,
        network_policies: np_store,
        services: svc_store,
        pod_disruption_budgets: pdb_store,
        deployments: deploy_store,
        secrets: secret_store,
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        caches.clone(),
        ca_rx.clone(),
        smd_changes,
    ));
    info!(
        namespace = ns.as_deref().unwrap_or("<all>"),
        "starting the SecureModelDeployment controller"
    );
    let controller = Controller::new(smds, watcher::Config::default().any_semantic())
        .owns_stream(sa_stream)
        .owns_stream(np_stream)
        .owns_stream(svc_stream)
        .owns_stream(pdb_stream)
        .owns_stream(deploy_stream)
        .owns_stream(secret_stream)
        .reconcile_all_on(ca_changes(ca_rx.clone()))
        .shutdown_on_signal();
    let counting = count_managed(
        controller.store(),
        caches.clone(),
        ns.clone().unwrap_or_else(|| "*".into()),
        ctx.metrics.clone(),
    );
    // The owned streams are polled by the controller; reconciles wait until the caches are full.
    // Reconciles also wait for the CA, for at most CA_WAIT: a CA that does not come (an unusable
    // user-supplied one) is then reported in each status as CAUnavailable.
    let mut ca_ready = ca_rx.clone();
    let ready_metrics = ctx.metrics.clone();
    let ready = async move {
        let _ = futures::join!(
            caches.service_accounts.wait_until_ready(),
            caches.network_policies.wait_until_ready(),
            caches.services.wait_until_ready(),
            caches.pod_disruption_budgets.wait_until_ready(),
            caches.deployments.wait_until_ready(),
            caches.secrets.wait_until_ready(),
            tokio::time::timeout(CA_WAIT, async move {
                // The guard wait_for returns is not Send; drop it at once.
                let _ = ca_ready.wait_for(Option::is_some).await.map(|_| ());
            }),
        );
        if unsynced.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            ready_metrics.set_synced(true);
        }
    };
    let ready = futures::future::FutureExt::shared(ready);
    let synced = ready.clone();
    let clients = client::run(client, ns.clone(), ctx.clone(), ca_changes(ca_rx));
    let work = controller
        .run(
            move |smd, ctx| {
                let ready = ready.clone();
                async move {
                    ready.await;
                    reconcile(smd, ctx).await
                }
            },
            error_policy,
            ctx,
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "reconcile failed");
            }
        });
    // Polled here too, so readiness is reported even before the first reconcile.
    let synced = async move {
        synced.await;
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = work => {}
        () = counting => {}
        () = clients => {}
        () = synced => {}
    }
    info!("controller stopped");
}

/// How long the first reconciles wait for the CA to be created or loaded.
const CA_WAIT: Duration = Duration::from_secs(15);

/// How often `moat_managed_objects` is recounted from the caches.
const COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps `moat_managed_objects` equal to what the caches of one watch scope hold: the
/// SecureModelDeployments and the children labelled as Moat's. Runs until dropped.
async fn count_managed(
    smds: Store<SecureModelDeployment>,
    caches: Caches,
    scope: String,
    metrics: Arc<Metrics>,
) {
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    loop {
        metrics.set_managed(
            &scope,
            std::collections::BTreeMap::from([
                ("SecureModelDeployment", count(smds.state().len())),
                (
                    "ServiceAccount",
                    count(caches.service_accounts.state().len()),
                ),
                (
                    "NetworkPolicy",
                    count(caches.network_policies.state().len()),
                ),
                ("Service", count(caches.services.state().len())),
                (
                    "PodDisruptionBudget",
                    count(caches.pod_disruption_budgets.state().len()),
                ),
                ("Deployment", count(caches.deployments.state().len())),
                ("Secret", count(caches.secrets.state().len())),
            ]),
        );
        let now = certs::now();
        let expiries: Vec<(String, String, i64)> = caches
            .secrets
            .state()
            .iter()
            .filter_map(|s| {
                let der = crate::pki::pem_certificates(&certs::stored(s).cert_pem)
                    .into_iter()
                    .next()?;
                let info = crate::pki::info(&der)?;
                Some((s.namespace()?, s.name_any(), info.not_after - now))
            })
            .collect();
        metrics.set_certificate_expiries(&scope, &expiries);
        tokio::time::sleep(COUNT_INTERVAL).await;
    }
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// One reconcile of one SecureModelDeployment. Everything it logs carries the object's
/// namespace and name (a span per reconcile).
#[tracing::instrument(skip_all, fields(kind = "SecureModelDeployment", namespace = %smd.namespace().unwrap_or_default(), name = %smd.name_any()))]
pub async fn reconcile(
    smd: Arc<SecureModelDeployment>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let key = ObjectRef::from_obj(&*smd);
    if smd.meta().deletion_timestamp.is_some() {
        // Children carry a controller ownerReference; the garbage collector removes them.
        ctx.forget_failures(&key);
        return Ok(Action::await_change());
    }
    // No receiver (no ModelClient controller yet) is fine.
    let _ = ctx
        .smd_changes
        .send((smd.namespace().unwrap_or_default(), smd.name_any()));
    let result = converge(&smd, &ctx).await;
    match &result {
        Ok(_) => ctx.forget_failures(&key),
        Err(e) => {
            ctx.metrics.reconcile_failed(e.metric_label());
            if e.needs_user_action() {
                report_stalled(&smd, &ctx, e).await?;
                return Ok(match e {
                    // A conflicting object Moat does not watch may be removed at any time.
                    Error::Conflict { .. } => {
                        ctx.forget_failures(&key);
                        Action::requeue(ctx.settings.resync_period)
                    }
                    // Credentials or a tag fixed in the registry (or a pull Secret, which Moat
                    // does not watch) are noticed by retrying, with backoff.
                    Error::Image(i) if !i.is_spec_error() => Action::requeue(ctx.backoff(&key)),
                    // A Secret or a PersistentVolumeClaim created or fixed later.
                    Error::Weights(_) => Action::requeue(ctx.backoff(&key)),
                    // Invalid specs wait for the user to change the spec.
                    _ => {
                        ctx.forget_failures(&key);
                        Action::await_change()
                    }
                });
            }
            report_retrying(&smd, &ctx, e).await;
        }
    }
    result
}

async fn converge(smd: &SecureModelDeployment, ctx: &Context) -> Result<Action, Error> {
    let namespace = smd.namespace().unwrap_or_default();
    let name = smd.name_any();
    render::validate(&smd.spec, &name)
        .map_err(|errors| Error::Invalid(RenderError::Invalid(errors)))?;
    // Dereference: the image digest (kept from the status, named by the spec, or resolved in
    // the registry now). No unpinned image ever reaches a pod: when the registry fails and the
    // pods have no digest yet, nothing is applied; when they have one, they keep it (and every
    // other child is still kept as desired), and the failure is reported after applying.
    let (pin, image_failure) = match resolve::pin(ctx, smd).await {
        Ok(pin) => (pin, None),
        Err(e) if e.is_spec_error() => return Err(Error::Image(e)),
        Err(e) => match smd.status.as_ref().and_then(|s| s.image.clone()) {
            Some(previous) => (
                resolve::Pin {
                    status: previous,
                    resolved: false,
                },
                Some(e),
            ),
            None => return Err(Error::Image(e)),
        },
    };
    // Dereference: the serving certificate (kept, or issued by the CA).
    let lifetime =
        render::certificate_lifetime(&smd.spec.tls.certificate_lifetime).map_err(|message| {
            Error::Invalid(RenderError::Invalid(vec![render::ValidationError {
                field: "spec.tls.certificateLifetime".into(),
                message,
            }]))
        })?;
    // Dereference: what the model weights need (key Secret, encrypted PVC), and Moat's own
    // image for the decrypting init container, pinned like the server's.
    let helper_image = match &smd.spec.model {
        Some(model) => {
            weights::check(ctx, smd, model)
                .await
                .map_err(Error::Weights)?;
            resolve::helper(ctx).await.map_err(Error::Image)?
        }
        None => String::new(),
    };
    let secret_name = render::tls_secret_name(&name);
    let live_secrets = apply::cached(&ctx.caches.secrets, &namespace, &name);
    let identity =
        crate::pki::Identity::server(&namespace, &name, &name, &ctx.settings.ca.cluster_domain);
    let certified = certs::certificate(
        ctx,
        &namespace,
        &secret_name,
        live_secrets.iter().find(|s| s.name_any() == secret_name),
        &identity,
        lifetime,
    )
    .await?;
    let resolved = render::Resolved {
        tls: render::ServingTls {
            cert_pem: certified.cert.cert_pem.clone(),
            key_pem: certified.cert.key_pem.clone(),
            ca_bundle_pem: certified.bundle_pem.clone(),
        },
        image: pin.status.pinned.clone(),
        helper_image,
    };
    let children =
        render::render_with(smd, &ctx.settings.facts, &resolved).map_err(Error::Invalid)?;
    // A change to children of a generation Moat already converged (not merely observed while
    // stalled) was made by someone else.
    let converged_before = smd.status.as_ref().is_some_and(|s| {
        s.observed_generation == smd.metadata.generation
            && !conditions::is_true(&s.conditions, conditions::STALLED)
    });
    // What changes because Moat's own facts changed since the last converged status (a new
    // certificate, a new pin) is an update, never drift of the objects that follow from it.
    let own = match (converged_before, before_facts(smd, &resolved, &certified)) {
        (true, Some(before)) => {
            let before = render::render_with(smd, &ctx.settings.facts, &before)
                .and_then(|c| c.objects())
                .map_err(Error::Invalid)?;
            drift::own_changes_of(&children.objects().map_err(Error::Invalid)?, &before)
        }
        _ => apply::OwnChanges::new(),
    };
    let mut applier = apply::Applier::new(ctx, smd, &namespace, converged_before, own);

    // The order matters: the pods must never run before their identity and their network
    // isolation exist. Destructured without `..` so a new child kind cannot be skipped.
    let Children {
        service_account,
        tls_secret,
        network_policies,
        service,
        pod_disruption_budget,
        deployment,
    } = children;
    let c = &ctx.caches;
    let live = apply::cached(&c.service_accounts, &namespace, &name);
    applier.ensure(vec![service_account], live).await?;
    applier.ensure(vec![tls_secret], live_secrets).await?;
    if let Some(reason) = certified.issued {
        publish(
            &ctx.recorder,
            &ctx.metrics,
            &smd.object_ref(&()),
            EventType::Normal,
            conditions::reason::CERTIFICATE_ISSUED,
            format!(
                "Issued serving certificate {} in Secret {secret_name} ({reason}); renewal at {}",
                certified.info.serial,
                certified.status(&secret_name).renew_at.0
            ),
            None,
        )
        .await;
    }
    let live = apply::cached(&c.network_policies, &namespace, &name);
    applier.ensure(network_policies, live).await?;
    let live = apply::cached(&c.services, &namespace, &name);
    applier.ensure(vec![service], live).await?;
    let live = apply::cached(&c.pod_disruption_budgets, &namespace, &name);
    applier
        .ensure(pod_disruption_budget.into_iter().collect(), live)
        .await?;
    let live = apply::cached(&c.deployments, &namespace, &name);
    let deployments = applier.ensure(vec![deployment], live).await?;
    let repairs = applier.finish();
    if pin.resolved {
        publish(
            &ctx.recorder,
            &ctx.metrics,
            &smd.object_ref(&()),
            EventType::Normal,
            conditions::reason::IMAGE_PINNED,
            format!(
                "Resolved {} to {} in its registry",
                pin.status.requested, pin.status.pinned
            ),
            None,
        )
        .await;
    }
    if let Some(e) = image_failure {
        // The pods keep the earlier digest; reconcile() reports the failure and retries.
        return Err(Error::Image(e));
    }

    // While the pods are not all ready, a failed decrypting init container is the likely reason:
    // read it from the pods (not watched, so look again shortly).
    let mut requeue = ctx.settings.resync_period.min(certified.renew_in());
    let mut decrypt_failure = None;
    if let (Some(model), Some(deploy)) = (&smd.spec.model, deployments.first())
        && status::rollout(deploy) != status::Rollout::Complete
    {
        decrypt_failure = weights::decrypt_failure(ctx, smd, model)
            .await
            .map_err(|source| Error::Read {
                kind: "Pod",
                source,
            })?;
        let again = if decrypt_failure.is_some() {
            MODEL_FAILED_RECHECK
        } else {
            MODEL_ROLLOUT_RECHECK
        };
        requeue = requeue.min(again);
    }

    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now());
    let mut new_status = status::converged(smd, deployments.first(), now.clone());
    if let Some(message) = decrypt_failure {
        status::model_failed(&mut new_status, smd, message, now);
    }
    new_status.certificate = Some(certified.status(&secret_name));
    new_status.image = Some(pin.status);
    if !repairs.is_empty() {
        let api: Api<SecureModelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
        let fresh = api.get_status(&name).await.map_err(Error::Status)?;
        new_status.drift = status::drift(
            fresh.status.as_ref().and_then(|s| s.drift.as_ref()),
            &repairs,
        );
    }
    write_status(smd, ctx, new_status, !repairs.is_empty()).await?;
    // Renewal is a scheduled requeue, not polling.
    Ok(Action::requeue(requeue))
}

/// The rendering inputs of the last converged status, where they differ from `now`: the
/// certificate (by serial) and the pinned image. `None` when nothing Moat dereferences changed.
fn before_facts(
    smd: &SecureModelDeployment,
    now: &render::Resolved,
    certified: &certs::Certified,
) -> Option<render::Resolved> {
    let status = smd.status.as_ref()?;
    let cert_changed = status
        .certificate
        .as_ref()
        .is_some_and(|c| c.serial != certified.info.serial);
    let earlier_pin = status
        .image
        .as_ref()
        .map(|i| i.pinned.clone())
        .filter(|p| *p != now.image);
    if !cert_changed && earlier_pin.is_none() {
        return None;
    }
    Some(render::Resolved {
        // Only which paths depend on the certificate matters, not the earlier value.
        tls: if cert_changed {
            render::ServingTls::placeholder()
        } else {
            now.tls.clone()
        },
        image: earlier_pin.unwrap_or_else(|| now.image.clone()),
        helper_image: now.helper_image.clone(),
    })
}

/// While a model's pods roll out, how soon Moat looks at their init containers again.
const MODEL_ROLLOUT_RECHECK: Duration = Duration::from_secs(5);
/// How soon Moat looks again at pods whose init container failed.
const MODEL_FAILED_RECHECK: Duration = Duration::from_secs(30);

/// Writes the status if it differs from the current one (ignoring transition times).
///
/// `status.drift` is written only when `with_drift` (this reconcile repaired something): the
/// cached object may carry an older count, which must never overwrite a newer one.
async fn write_status(
    smd: &SecureModelDeployment,
    ctx: &Context,
    mut new: SecureModelDeploymentStatus,
    with_drift: bool,
) -> Result<(), Error> {
    if !with_drift {
        new.drift = smd.status.as_ref().and_then(|s| s.drift.clone());
    }
    if smd
        .status
        .as_ref()
        .is_some_and(|old| status::same(old, &new))
    {
        return Ok(());
    }
    let api: Api<SecureModelDeployment> =
        Api::namespaced(ctx.client.clone(), &smd.namespace().unwrap_or_default());
    let mut patch = serde_json::json!({"status": new});
    if let (false, Some(status)) = (
        with_drift,
        patch.get_mut("status").and_then(|s| s.as_object_mut()),
    ) {
        status.remove("drift");
    }
    ctx.metrics
        .api_write("SecureModelDeployment", "patch-status");
    api.patch_status(
        &smd.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::Status)?;
    Ok(())
}

async fn report_stalled(
    smd: &SecureModelDeployment,
    ctx: &Context,
    e: &Error,
) -> Result<(), Error> {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now());
    let new = status::stalled(smd, e, now);
    let changed = !smd
        .status
        .as_ref()
        .is_some_and(|old| status::same(old, &new));
    write_status(smd, ctx, new, false).await?;
    if changed {
        let regarding = smd.object_ref(&());
        let reason = e.reason();
        publish(
            &ctx.recorder,
            &ctx.metrics,
            &regarding,
            EventType::Warning,
            reason,
            e.to_string(),
            None,
        )
        .await;
    }
    Ok(())
}

async fn report_retrying(smd: &SecureModelDeployment, ctx: &Context, e: &Error) {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now());
    let new = status::retrying(smd, e, now);
    if let Err(err) = write_status(smd, ctx, new, false).await {
        warn!(error = %err, "could not report the failure in status");
    }
}

/// Publishes an Event about `regarding`; failures are logged, never fatal.
pub(crate) async fn publish(
    recorder: &Recorder,
    metrics: &Metrics,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<k8s_openapi::api::core::v1::ObjectReference>,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: related,
    };
    metrics.api_write("Event", "create");
    if let Err(e) = recorder.publish(&event, regarding).await {
        warn!(error = %e, "could not publish an Event");
    }
}

/// Retries with exponential backoff per object (see [`Context::backoff`]).
fn error_policy(smd: Arc<SecureModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(&ObjectRef::from_obj(&*smd));
    warn!(name = %smd.name_any(), error = %error, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}
