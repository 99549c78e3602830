//! The imperative shell, wired: watches SecureModelDeployments, ModelClients and every kind
//! they own, and runs their reconcilers. This file only wires; each concern has its own file:
//!
//! - [`context`]: settings, caches, the shared reconcile context, backoff and the clock;
//! - [`error`]: the reconcile error and its disposition table;
//! - `smd/`: the SecureModelDeployment reconcile, one file per pipeline step;
//! - `client`: the ModelClient controller; `ca`: Moat's CA; [`leader`]: leader election;
//! - [`guard`]: watches that skip (and report) a malformed object; [`models`]: the SMD caches of
//!   every watch scope, where ModelClients look up their model;
//! - `apply`: server-side apply of children with drift repair; `certs`, `resolve`, [`weights`]:
//!   what the dereference step reads; `census`: the gauges recounted from the caches (managed
//!   objects, certificates, model conditions, the CA); `events`: Events; `connect`: the
//!   Kubernetes client.

mod apply;
pub mod ca;
mod census;
mod certs;
mod client;
pub mod clients;
mod connect;
pub mod context;
pub mod error;
mod events;
mod gate;
pub mod guard;
pub mod leader;
pub mod models;
mod resolve;
mod smd;
pub mod weights;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Secret, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    api::SecureModelDeployment,
    render::{BREAK_GLASS_ANNOTATION, MANAGED_BY},
    telemetry::metrics::Metrics,
};
use guard::Guarded;

pub use crate::core::drift::Repair;
pub use connect::{USER_AGENT, client, client_from};
pub use context::{Caches, Context, DeletedWithReason, ImageSettings, Settings};
pub use error::{Disposition, Error};
pub use smd::reconcile;

/// The one field manager Moat applies with.
pub const FIELD_MANAGER: &str = "moat";

/// The backoff of a controller's merged trigger stream: none.
///
/// kube-runtime's `Controller` merges every trigger (the watch of the primary kind, each owned
/// kind's watch, Moat's own wake-ups) into one stream and, by default, pauses that whole stream
/// for an exponential backoff (up to about a minute with jitter) after an error from any of
/// them. While it pauses, no watcher is polled: their in-flight connects and watches stall, the
/// API server closes them (its TLS handshake and idle timeouts), and the next wake-up meets one of
/// those stale errors and pauses again. After an API server restart this kept a controller from
/// ever watching again (the fault-injection suite's `api_server_killed` scenario). Every watch
/// Moat makes has a backoff of its own (`default_backoff()`), which pauses only that watch, so
/// the merged stream needs none: an error in one trigger never delays another.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NoMergedBackoff;

impl Iterator for NoMergedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoMergedBackoff {
    fn reset(&mut self) {}
}

/// A reflector for one child kind: its store, and the stream of changes that triggers reconciles
/// (deletions included).
fn reflect<K>(
    client: &Client,
    ns: Option<&str>,
    deleted_with_reason: &DeletedWithReason,
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let deleted = deleted_with_reason.clone();
    let config =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let stream = watcher(api::<K>(client, ns), config)
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| {
            // A child deleted through break-glass: its reason, for the repair to record.
            if let Ok(watcher::Event::Delete(obj)) = event
                && let Some(reason) = crate::core::drift::break_glass_reason(
                    obj.meta().annotations.as_ref(),
                    BREAK_GLASS_ANNOTATION,
                )
            {
                deleted.insert(
                    <K as k8s_openapi::Resource>::KIND,
                    obj.meta().namespace.as_deref().unwrap_or_default(),
                    &obj.name_any(),
                    reason,
                );
            }
        })
        .touched_objects();
    (store, stream)
}

/// Runs the controller until a shutdown signal arrives: one watch over all namespaces, or one
/// controller per namespace in [`Settings::namespaces`] (each with its own watches and caches, so
/// the operator needs no cluster-wide list or watch). The caches of the children are filled
/// before the first reconcile.
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>) {
    let (ca_tx, ca_rx) = watch::channel(None);
    let (health_tx, ca_health) = watch::channel(None);
    let (smd_changes, _) = tokio::sync::broadcast::channel(1024);
    let authority = ca::run(client.clone(), settings.ca.clone(), ca_tx, health_tx);
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
        // Each scope's SMD cache, made here so that every scope's ModelClients can read all.
        let reflectors: Vec<_> = scopes
            .into_iter()
            .map(|ns| {
                let (store, writer) = reflector::store();
                let (synced_tx, synced) = watch::channel(false);
                let (mc_store, mc_writer) = reflector::store();
                let (mc_synced_tx, mc_synced) = watch::channel(false);
                (
                    ns,
                    (store, writer, synced_tx, synced),
                    (mc_store, mc_writer, mc_synced_tx, mc_synced),
                )
            })
            .collect();
        let models = models::Models::new(
            reflectors
                .iter()
                .map(|(ns, (store, _, _, synced), _)| (ns.clone(), store.clone(), synced.clone()))
                .collect(),
        );
        let clients = clients::Clients::new(
            reflectors
                .iter()
                .map(|(_, _, (store, _, _, synced))| (store.clone(), synced.clone()))
                .collect(),
        );
        let (client_changes, _) = tokio::sync::broadcast::channel(1024);
        futures::future::join_all(reflectors.into_iter().map(
            |(
                ns,
                (store, writer, synced_tx, synced),
                (mc_store, mc_writer, mc_synced_tx, mc_synced),
            )| {
                run_one(
                    client.clone(),
                    Scope {
                        ns,
                        store,
                        writer,
                        synced_tx,
                        synced,
                        models: models.clone(),
                        clients: clients.clone(),
                        mc_store,
                        mc_writer,
                        mc_synced_tx,
                        mc_synced,
                        client_changes: client_changes.clone(),
                    },
                    settings.clone(),
                    metrics.clone(),
                    Authority {
                        state: ca_rx.clone(),
                        health: ca_health.clone(),
                    },
                    smd_changes.clone(),
                    unsynced.clone(),
                )
            },
        ))
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

/// The models named on `rx`, as references the controller reconciles (models outside this
/// scope are not in its store and are skipped).
fn model_refs(
    rx: tokio::sync::broadcast::Receiver<(String, String)>,
) -> impl futures::Stream<Item = reflector::ObjectRef<Guarded<SecureModelDeployment>>> + Send + 'static
{
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok((namespace, name)) => {
                    return Some((reflector::ObjectRef::new(&name).within(&namespace), rx));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

/// One watch scope: its namespace (`None`: all), its SMD cache and the writer that fills it, and
/// the SMD caches of every scope.
struct Scope {
    ns: Option<String>,
    store: models::ModelStore,
    writer: reflector::store::Writer<Guarded<SecureModelDeployment>>,
    /// Set once the SMD watch has listed everything ([`models::Synced`]).
    synced_tx: watch::Sender<bool>,
    synced: models::Synced,
    models: models::Models,
    /// The ModelClient caches of every scope, and this scope's cache, its writer and fill
    /// signal.
    clients: clients::Clients,
    mc_store: clients::ClientStore,
    mc_writer: reflector::store::Writer<Guarded<crate::api::ModelClient>>,
    mc_synced_tx: watch::Sender<bool>,
    mc_synced: models::Synced,
    /// `(namespace, name)` of the model a ModelClient names, whenever that ModelClient changes
    /// or goes: the model's gate policy is recomputed.
    client_changes: tokio::sync::broadcast::Sender<(String, String)>,
}

/// What [`ca::run`] publishes: the CA in use (for the reconcilers) and what it found of the CA
/// (for the census).
struct Authority {
    state: watch::Receiver<Option<Arc<ca::CaState>>>,
    health: watch::Receiver<Option<ca::CaHealth>>,
}

async fn run_one(
    client: Client,
    scope: Scope,
    settings: Settings,
    metrics: Arc<Metrics>,
    authority: Authority,
    smd_changes: tokio::sync::broadcast::Sender<(String, String)>,
    unsynced: Arc<std::sync::atomic::AtomicUsize>,
) {
    let Scope {
        ns,
        store: smd_store,
        writer,
        synced_tx,
        synced,
        models,
        clients,
        mc_store,
        mc_writer,
        mc_synced_tx,
        mc_synced,
        client_changes,
    } = scope;
    let Authority {
        state: ca_rx,
        health: ca_health,
    } = authority;
    let smds: Api<Guarded<SecureModelDeployment>> = api(&client, ns.as_deref());
    let deleted_with_reason = DeletedWithReason::default();
    let (sa_store, sa_stream) =
        reflect::<ServiceAccount>(&client, ns.as_deref(), &deleted_with_reason);
    let (np_store, np_stream) =
        reflect::<NetworkPolicy>(&client, ns.as_deref(), &deleted_with_reason);
    let (svc_store, svc_stream) = reflect::<Service>(&client, ns.as_deref(), &deleted_with_reason);
    let (pdb_store, pdb_stream) =
        reflect::<PodDisruptionBudget>(&client, ns.as_deref(), &deleted_with_reason);
    let (deploy_store, deploy_stream) =
        reflect::<Deployment>(&client, ns.as_deref(), &deleted_with_reason);
    let (secret_store, secret_stream) =
        reflect::<Secret>(&client, ns.as_deref(), &deleted_with_reason);
    // A ModelClient's Secret is judged from this cache, so its change is passed on only once the
    // cache holds it (a watch of its own could trigger the reconcile before the cache catches up).
    let (client_secrets_tx, client_secrets) = tokio::sync::mpsc::unbounded_channel();
    let secret_stream = secret_stream.inspect(move |event| {
        if let Some(owner) = event.as_ref().ok().and_then(client::owner) {
            let _ = client_secrets_tx.send(owner);
        }
    });
    let (config_map_store, config_map_stream) =
        reflect::<ConfigMap>(&client, ns.as_deref(), &deleted_with_reason);
    let caches = Caches {
        service_accounts: sa_store,
        network_policies: np_store,
        services: svc_store,
        pod_disruption_budgets: pdb_store,
        deployments: deploy_store,
        secrets: secret_store,
        config_maps: config_map_store,
    };
    let mut ctx = Context::new(
        client.clone(),
        settings,
        metrics,
        caches.clone(),
        ca_rx.clone(),
        smd_changes,
        clients.clone(),
    );
    ctx.deleted_with_reason = deleted_with_reason;
    let ctx = Arc::new(ctx);
    info!(
        namespace = ns.as_deref().unwrap_or("<all>"),
        "starting the SecureModelDeployment controller"
    );
    // A deleted model is announced too, so the ModelClients that refer to it re-check consent.
    let deleted = ctx.smd_changes.clone();
    let smd_stream = watcher(smds, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(watcher::Event::Delete(smd)) => {
                let _ = deleted.send((smd.namespace().unwrap_or_default(), smd.name_any()));
            }
            Ok(watcher::Event::InitDone) => {
                synced_tx.send_replace(true);
            }
            _ => {}
        })
        .applied_objects();
    let controller = Controller::for_stream(smd_stream, smd_store.clone())
        .owns_stream(sa_stream)
        .owns_stream(np_stream)
        .owns_stream(svc_stream)
        .owns_stream(pdb_stream)
        .owns_stream(deploy_stream)
        .owns_stream(secret_stream)
        .owns_stream(config_map_stream)
        .reconcile_on(model_refs(client_changes.subscribe()))
        .reconcile_all_on(ca_changes(ca_rx.clone()))
        .trigger_backoff(NoMergedBackoff)
        .shutdown_on_signal();
    let counting = census::count_managed(
        controller.store(),
        caches.clone(),
        ns.clone(),
        ctx.metrics.clone(),
        census::CaSource {
            namespace: ctx.settings.ca.namespace.clone(),
            secret: ctx.settings.ca.secret_name.clone(),
            health: ca_health,
        },
        census::OwnerCaches {
            smds_synced: synced.clone(),
            clients: mc_store,
            clients_synced: mc_synced,
        },
    );
    // The owned streams are polled by the controller; reconciles wait until the caches are full.
    // Reconciles also wait for the CA, for at most CA_WAIT: a CA that does not come (an unusable
    // user-supplied one) is then reported in each status as CAUnavailable.
    let mut ca_ready = ca_rx.clone();
    let ready_metrics = ctx.metrics.clone();
    let ready = async move {
        let mut smd_synced = synced;
        let _ = futures::join!(
            // Not smd_store.wait_until_ready(): the controller waits there already, and a Store
            // wakes only one of its waiters (see models::Synced).
            async move {
                let _ = smd_synced.wait_for(|filled| *filled).await.map(|_| ());
            },
            caches.service_accounts.wait_until_ready(),
            caches.network_policies.wait_until_ready(),
            caches.services.wait_until_ready(),
            caches.pod_disruption_budgets.wait_until_ready(),
            caches.deployments.wait_until_ready(),
            caches.secrets.wait_until_ready(),
            caches.config_maps.wait_until_ready(),
            clients.synced(),
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
    let model_clients = client::run(
        client,
        ns.clone(),
        ctx.clone(),
        models,
        ca_changes(ca_rx),
        client::Reflector {
            writer: mc_writer,
            synced: mc_synced_tx,
            changes: client_changes,
            secrets: client_secrets,
        },
    );
    let work = controller
        .run(
            move |smd: Arc<Guarded<SecureModelDeployment>>, ctx: Arc<Context>| {
                let ready = ready.clone();
                async move {
                    ready.await;
                    match &smd.object {
                        Ok(decoded) => smd::reconcile(decoded.clone(), ctx).await,
                        Err(why) => smd::malformed(&smd, why, &ctx).await,
                    }
                }
            },
            smd::error_policy,
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
        () = model_clients => {}
        () = synced => {}
    }
    info!("controller stopped");
}

/// How long the first reconciles wait for the CA to be created or loaded.
const CA_WAIT: Duration = Duration::from_secs(15);

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::utils::Backoff;

    use super::*;

    /// The merged trigger stream is never paused: every error is followed by a zero wait, and
    /// the backoff never gives up (which would end the stream, and with it the controller).
    #[test]
    fn the_merged_trigger_stream_never_pauses_or_gives_up() {
        let mut backoff = NoMergedBackoff;
        for _ in 0..10_000 {
            assert_eq!(backoff.next(), Some(Duration::ZERO));
        }
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::ZERO));
    }
}
