//! Moat's certificate authority: kept in a `kubernetes.io/tls` Secret in the operator's namespace
//! (`tls.crt`, `tls.key`, and `ca.crt`, the trust bundle), created on first start, rotated at two
//! thirds of its validity with overlap, or imported from a Secret the user made.
//!
//! [`plan`] (in `core::ca`) is pure: it decides from the stored Secret and the time what the CA
//! is and whether the Secret must be written. [`run`] is the shell: it reads and writes the Secret, watches it, and
//! publishes the usable CA to the reconcilers through a `watch` channel, and what it knows of
//! the CA ([`CaHealth`]: usable or not, and the stored certificate's expiry either way) to the
//! census through another. Only the leader runs it.

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

pub use crate::core::ca::{
    CaHealth, CaPlan, CaSettings, CaState, StoredCa, certificate_not_after, plan, secret_of,
    stored_of,
};

fn unix_now() -> i64 {
    super::context::now().as_second()
}

/// Why no CA could be had this time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// The API server could not be asked (unreachable, throttling, starting up): the CA in use
    /// stays in use, since nothing says it changed.
    Api(String),
    /// The stored CA cannot be used (or the Secret kept changing): the CA is withdrawn.
    Unusable(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Api(why) | Self::Unusable(why) => f.write_str(why),
        }
    }
}

/// The longest wait before the CA Secret is read again after the API server could not be asked:
/// short, so that the CA is checked again soon after an outage ends.
const API_RETRY_MAX: Duration = Duration::from_secs(8);
/// The longest wait before an unusable CA is read again (a change of the Secret wakes it sooner).
const UNUSABLE_RETRY_MAX: Duration = Duration::from_secs(60);

/// What a failure does: whether the CA in use is withdrawn, and how long to wait before the next
/// attempt (doubling from `retry`, capped by the kind of failure).
fn after_failure(failure: &Failure, retry: Duration) -> (bool, Duration) {
    match failure {
        Failure::Api(_) => (false, (retry * 2).min(API_RETRY_MAX)),
        Failure::Unusable(_) => (true, (retry * 2).min(UNUSABLE_RETRY_MAX)),
    }
}

/// Reads the Secret, plans, and writes until the plan is to use a CA. Each read of the Secret
/// sets `not_after` to the expiry of the certificate it holds (`None`: no Secret, or no
/// certificate that parses); a failed read leaves it as it was.
async fn step(
    api: &Api<Secret>,
    settings: &CaSettings,
    not_after: &mut Option<i64>,
) -> Result<CaState, Failure> {
    for _ in 0..5 {
        let secret = api
            .get_opt(&settings.secret_name)
            .await
            .map_err(|e| Failure::Api(format!("reading the CA Secret: {e}")))?;
        let stored = secret.as_ref().map(stored_of);
        *not_after = stored.as_ref().and_then(certificate_not_after);
        let now = unix_now();
        match plan(
            stored.as_ref(),
            now,
            settings.validity,
            &settings.trust_domain,
        )
        .map_err(|e| Failure::Unusable(e.to_string()))?
        {
            CaPlan::Use(state) => return Ok(*state),
            CaPlan::Unusable(why) => return Err(Failure::Unusable(why)),
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
                    Err(e) => return Err(Failure::Api(format!("writing the CA Secret: {e}"))),
                }
            }
        }
    }
    Err(Failure::Unusable(
        "the CA Secret kept changing while Moat wrote it".into(),
    ))
}

/// Keeps the CA usable and published on `tx` until dropped: creates or rotates it when due, and
/// reloads it whenever the Secret changes. After each attempt, `health` says whether a CA is in
/// use and when the certificate in the Secret expires, which stays known while the CA cannot be
/// used (a rotation that cannot be written, an expired CA you brought) and, through a failed
/// read of the Secret, as last read.
pub async fn run(
    client: Client,
    settings: CaSettings,
    tx: watch::Sender<Option<Arc<CaState>>>,
    health: watch::Sender<Option<CaHealth>>,
) {
    let api: Api<Secret> = Api::namespaced(client, &settings.namespace);
    let config =
        watcher::Config::default().fields(&format!("metadata.name={}", settings.secret_name));
    let mut changes = watcher(api.clone(), config)
        .default_backoff()
        .touched_objects()
        .boxed();
    let mut retry = Duration::from_secs(1);
    let mut not_after = None;
    loop {
        let wait = match step(&api, &settings, &mut not_after).await {
            Ok(state) => {
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
            Err(failure) => {
                warn!(secret = %settings.secret_name, namespace = %settings.namespace, "{failure}");
                let (withdraw, next) = after_failure(&failure, retry);
                if withdraw {
                    tx.send_if_modified(|current| current.take().is_some());
                }
                retry = next;
                retry
            }
        };
        // Usable while a CA is in use: an API server that could not be asked keeps it in use.
        health.send_replace(Some(CaHealth {
            usable: tx.borrow().is_some(),
            not_after,
        }));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = changes.next() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An API server that cannot be asked (an outage, throttling) never withdraws the CA in use,
    /// and it is asked again within seconds; an unusable CA is withdrawn and read again less
    /// often.
    #[test]
    fn only_an_unusable_ca_is_withdrawn_and_outages_retry_soon() {
        let outage = Failure::Api("reading the CA Secret: connection refused".into());
        let mut retry = Duration::from_secs(1);
        for _ in 0..20 {
            let (withdraw, next) = after_failure(&outage, retry);
            assert!(!withdraw, "an outage withdrew the CA");
            assert!(next > Duration::ZERO && next <= API_RETRY_MAX, "{next:?}");
            retry = next;
        }
        assert_eq!(retry, API_RETRY_MAX);
        let unusable = Failure::Unusable("tls.key does not match tls.crt".into());
        let (withdraw, next) = after_failure(&unusable, Duration::from_secs(1));
        assert!(withdraw);
        assert_eq!(next, Duration::from_secs(2));
        assert_eq!(
            after_failure(&unusable, Duration::from_secs(50)).1,
            UNUSABLE_RETRY_MAX
        );
        assert_eq!(
            outage.to_string(),
            "reading the CA Secret: connection refused"
        );
    }
}
