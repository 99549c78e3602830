//! High availability: several operator replicas elect a leader through a `coordination.k8s.io`
//! Lease (kube-lease-manager); only the leader runs the controller, so only the leader writes.
//! When leadership is lost the controller is stopped at once; a follower takes over once the
//! Lease expires (within its duration).

use std::{sync::Arc, time::Duration};

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tracing::{info, warn};

use super::{Settings, run};
use crate::telemetry::metrics::Metrics;

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Name of the Lease.
    pub name: String,
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// This process's identity in the Lease ([`identity`]: its pod name and a random suffix).
    pub identity: String,
    /// Seconds a Lease stays valid after its last renewal; a follower takes over after it.
    pub duration_seconds: u64,
    /// Seconds before expiry at which the leader renews.
    pub grace_seconds: u64,
}

/// The identity of this process in the Lease: `<pod>_<8 hex digits>`, the pod name (or `moat`
/// outside a pod) and `nonce`, random for each start. A container restarted after a crash keeps
/// its pod name but is a new process, with none of the old one's state: it must not renew the
/// Lease its predecessor held as if it were its own, and `kubectl get lease` tells the two apart.
pub fn identity(pod_name: Option<&str>, nonce: [u8; 4]) -> String {
    let pod = pod_name.filter(|p| !p.is_empty()).unwrap_or("moat");
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    format!("{pod}_{hex}")
}

/// How long a shutting-down leader waits for the Lease to be released.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the controller whenever this replica holds the Lease, until `shutdown` completes (a
/// termination signal). Then the controller stops and the Lease is released, so a follower
/// takes over at once rather than after the Lease expires.
pub async fn run_elected(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    lease: LeaseSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration_seconds)
        .with_grace(lease.grace_seconds)
        .with_field_manager("moat-leader-election")
        .build()
        .await?;
    let (leader, renewer) = manager.watch().await;
    metrics.set_leader(false);
    metrics.set_standby(true);
    tokio::select! {
        () = lead(leader, client, settings, metrics.clone(), &lease) => {}
        () = shutdown => info!(lease = %lease.name, "shutting down; releasing the Lease"),
    }
    // `lead` is dropped: the controller is aborted and the state channel closed, on which the
    // lease manager releases the Lease and ends.
    metrics.set_leader(false);
    metrics.set_standby(false);
    metrics.set_synced(false);
    match tokio::time::timeout(RELEASE_TIMEOUT, renewer).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(e)) => {
            warn!(error = %e, "the lease manager task failed");
            Ok(())
        }
        Err(_) => {
            warn!(lease = %lease.name, "the Lease was not released in time; it expires by itself");
            Ok(())
        }
    }
}

/// Runs the controller while `leader` says this replica leads; returns when the lease manager
/// ends.
async fn lead(
    mut leader: tokio::sync::watch::Receiver<bool>,
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    lease: &LeaseSettings,
) {
    loop {
        while !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                return;
            }
        }
        info!(lease = %lease.name, identity = %lease.identity, "became the leader");
        metrics.set_leader(true);
        let controller = AbortOnDrop(tokio::spawn(run(
            client.clone(),
            settings.clone(),
            metrics.clone(),
        )));
        let still_leader = loop {
            if leader.changed().await.is_err() {
                break false;
            }
            if !*leader.borrow_and_update() {
                break true;
            }
        };
        // Stopped and awaited before the gauges are reset, so a reconcile that was mid-poll
        // cannot set them again afterwards.
        controller.stop().await;
        metrics.set_leader(false);
        metrics.set_synced(false);
        metrics.clear_managed();
        if !still_leader {
            return;
        }
        warn!(lease = %lease.name, "lost leadership; controller stopped");
    }
}

/// Stops the controller when leadership ends, and also when this future itself is dropped (the
/// process shutting down, or a test killing the replica), so no write happens after it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Aborts the controller and waits until it has stopped.
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod identity_tests {
    use super::identity;

    #[test]
    fn the_identity_is_the_pod_name_and_a_suffix_of_each_start() {
        assert_eq!(
            identity(Some("moat-7d4f-abcde"), [0, 1, 0xab, 0xff]),
            "moat-7d4f-abcde_0001abff"
        );
        assert_eq!(identity(None, [1, 2, 3, 4]), "moat_01020304");
        assert_eq!(identity(Some(""), [1, 2, 3, 4]), "moat_01020304");
        assert_ne!(
            identity(Some("p"), [1, 2, 3, 4]),
            identity(Some("p"), [1, 2, 3, 5]),
            "a restarted container must not take over its predecessor's identity"
        );
    }
}
