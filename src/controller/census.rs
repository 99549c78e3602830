//! `moat_managed_objects` and `moat_certificate_expiry_seconds`, recounted from the caches of one
//! watch scope.

use std::{sync::Arc, time::Duration};

use kube::{ResourceExt, runtime::reflector::Store};

use super::{Caches, certs, guard::Guarded};
use crate::{api::SecureModelDeployment, telemetry::metrics::Metrics};

/// How often `moat_managed_objects` is recounted from the caches.
const COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps `moat_managed_objects` equal to what the caches of one watch scope hold: the
/// SecureModelDeployments and the children labelled as Moat's. Runs until dropped.
pub(super) async fn count_managed(
    smds: Store<Guarded<SecureModelDeployment>>,
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
                ("ConfigMap", count(caches.config_maps.state().len())),
            ]),
        );
        let now = super::context::now().as_second();
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
