//! Moat's certificate authority: kept in a `kubernetes.io/tls` Secret in the operator's namespace
//! (`tls.crt`, `tls.key`, and `ca.crt`, the trust bundle), created on first start, rotated at two
//! thirds of its validity with overlap, or imported from a Secret the user made.
//!
//! [`plan`] (in `core::ca`) is pure: it decides from the stored Secret and the time what the CA
//! is and whether the Secret must be written. [`run`] is the shell: it reads and writes the Secret, watches it, and
//! publishes the usable CA to the reconcilers through a `watch` channel. Only the leader runs it.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;
use tracing::{info, warn};

pub use crate::core::ca::{CaPlan, CaSettings, CaState, StoredCa, plan, secret_of, stored_of};

fn unix_now() -> i64 {
    super::context::now().as_second()
}

/// Reads the Secret, plans, and writes until the plan is to use a CA.
async fn step(api: &Api<Secret>, settings: &CaSettings) -> Result<Option<CaState>, String> {
    for _ in 0..5 {
        let secret = api
            .get_opt(&settings.secret_name)
            .await
            .map_err(|e| format!("reading the CA Secret: {e}"))?;
        let stored = secret.as_ref().map(stored_of);
        let now = unix_now();
        match plan(
            stored.as_ref(),
            now,
            settings.validity,
            &settings.trust_domain,
        )
        .map_err(|e| e.to_string())?
        {
            CaPlan::Use(state) => return Ok(Some(*state)),
            CaPlan::Unusable(why) => return Err(why),
            CaPlan::Write { stored, reason } => {
                let rv = secret.and_then(|s| s.metadata.resource_version);
                let body = secret_of(settings, &stored, rv.clone());
                let written = match rv {
                    None => api.create(&PostParams::default(), &body).await,
                    Some(_) => {
                        api.replace(&settings.secret_name, &PostParams::default(), &body)
                            .await
                    }
                };
                match written {
                    Ok(_) => info!(
                        secret = %settings.secret_name,
                        namespace = %settings.namespace,
                        "{reason}"
                    ),
                    // Someone else wrote first: read again.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(format!("writing the CA Secret: {e}")),
                }
            }
        }
    }
    Err("the CA Secret kept changing while Moat wrote it".into())
}

/// Keeps the CA usable and published on `tx` until dropped: creates or rotates it when due, and
/// reloads it whenever the Secret changes.
pub async fn run(client: Client, settings: CaSettings, tx: watch::Sender<Option<Arc<CaState>>>) {
    let api: Api<Secret> = Api::namespaced(client, &settings.namespace);
    let config =
        watcher::Config::default().fields(&format!("metadata.name={}", settings.secret_name));
    let mut changes = watcher(api.clone(), config)
        .default_backoff()
        .touched_objects()
        .boxed();
    let mut retry = Duration::from_secs(1);
    loop {
        let wait = match step(&api, &settings).await {
            Ok(Some(state)) => {
                retry = Duration::from_secs(1);
                let wait = Duration::from_secs(
                    u64::try_from(state.next_check - unix_now())
                        .unwrap_or(0)
                        .max(1),
                );
                let state = Arc::new(state);
                tx.send_if_modified(|current| {
                    let same = current.as_ref().is_some_and(|c| {
                        c.ca.info == state.ca.info && c.bundle_pem == state.bundle_pem
                    });
                    if !same {
                        info!(serial = %state.ca.info.serial, imported = state.imported, "CA in use");
                        *current = Some(state.clone());
                    }
                    !same
                });
                wait.min(Duration::from_secs(3600))
            }
            Ok(None) => retry,
            Err(why) => {
                warn!(secret = %settings.secret_name, namespace = %settings.namespace, "{why}");
                tx.send_if_modified(|current| current.take().is_some());
                retry = (retry * 2).min(Duration::from_secs(60));
                retry
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = changes.next() => {}
        }
    }
}
