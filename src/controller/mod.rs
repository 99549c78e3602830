//! The imperative shell, wired: watches SecureModelDeployments, ModelClients and every kind
//! they own, and runs their reconcilers. This file only wires; each concern has its own file:
//!
//! - [`context`]: settings, caches, the shared reconcile context, backoff and the clock;
//! - [`error`]: the reconcile error and its disposition table;
//! - `smd/`: the SecureModelDeployment reconcile, one file per pipeline step;
//! - `client`: the ModelClient controller; `ca`: Moat's CA; [`leader`]: leader election;
//! - `apply`: server-side apply of children with drift repair; `certs`, `resolve`, [`weights`]:
//!   what the dereference step reads; `census`: the managed-object gauges; `events`: Events;
//!   `connect`: the Kubernetes client.

mod apply;
pub mod ca;
mod census;
mod certs;
mod client;
mod connect;
pub mod context;
pub mod error;
mod events;
pub mod leader;
mod resolve;
mod smd;
pub mod weights;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Secret, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        Controller, WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{api::SecureModelDeployment, render::MANAGED_BY, telemetry::metrics::Metrics};

pub use crate::core::drift::Repair;
pub use connect::{USER_AGENT, client, client_from};
pub use context::{Caches, Context, ImageSettings, Settings};
pub use error::{Disposition, Error};
pub use smd::reconcile;

/// The one field manager Moat applies with.
pub const FIELD_MANAGER: &str = "moat";

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
    let counting = census::count_managed(
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
    let smd_store = controller.store();
    let ready = async move {
        let _ = futures::join!(
            smd_store.wait_until_ready(),
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
                    smd::reconcile(smd, ctx).await
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
        () = clients => {}
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
