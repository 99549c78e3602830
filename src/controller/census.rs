//! `moat_managed_objects`, `moat_certificate_expiry_seconds`, `moat_certificate_renewal_seconds`,
//! `moat_model_condition`, `moat_ca_expiry_seconds` and `moat_ca_usable`, recounted from the
//! caches of one watch scope (and from what the CA's keeper found).

use std::{sync::Arc, time::Duration};

use kube::{ResourceExt, runtime::reflector::Store};

use super::{Caches, ca::CaHealth, certs, guard::Guarded};
use crate::{
    api::SecureModelDeployment,
    telemetry::metrics::{CertificateTimes, ConditionLabels, Metrics},
};

/// Where the CA is kept (the operator's namespace and the Secret's name), and what the CA's
/// keeper ([`super::ca::run`]) last found.
pub(super) struct CaSource {
    /// Namespace of the CA Secret.
    pub namespace: String,
    /// Name of the CA Secret.
    pub secret: String,
    /// Whether a CA is usable and when the stored one expires; `None` until first looked at.
    pub health: tokio::sync::watch::Receiver<Option<CaHealth>>,
}

/// The CA gauges at `now`: whether a CA is usable (`None`: not looked at yet) and the seconds
/// until the stored CA certificate expires, known whether or not it is usable.
fn ca_gauges(health: Option<CaHealth>, now: i64) -> (Option<bool>, Option<i64>) {
    (
        health.map(|h| h.usable),
        health.and_then(|h| h.not_after).map(|t| t - now),
    )
}

/// The condition gauges of the SecureModelDeployments in `smds`: each condition whose status is
/// `True` or `False`, labelled with the model, the condition type and its reason.
fn conditions(smds: &[Arc<Guarded<SecureModelDeployment>>]) -> Vec<(ConditionLabels, bool)> {
    smds.iter()
        .flat_map(|smd| {
            let namespace = smd.namespace().unwrap_or_default();
            let name = smd.name_any();
            smd.conditions()
                .iter()
                .filter(|c| c.status == "True" || c.status == "False")
                .map(move |c| {
                    (
                        ConditionLabels {
                            namespace: namespace.clone(),
                            name: name.clone(),
                            condition: c.type_.clone(),
                            reason: c.reason.clone(),
                        },
                        c.status == "True",
                    )
                })
        })
        .collect()
}

/// How often the gauges are recounted from the caches.
const COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps `moat_managed_objects` equal to what the caches of one watch scope hold (the
/// SecureModelDeployments and the children labelled as Moat's), the certificate gauges to the
/// Secrets there, `moat_model_condition` to the models' conditions, and `moat_ca_expiry_seconds`
/// and `moat_ca_usable` to the CA. Runs until dropped.
pub(super) async fn count_managed(
    smds: Store<Guarded<SecureModelDeployment>>,
    caches: Caches,
    scope: String,
    metrics: Arc<Metrics>,
    ca: CaSource,
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
        metrics.set_model_conditions(&scope, conditions(&smds.state()));
        let now = super::context::now().as_second();
        let (ca_usable, ca_expiry) = ca_gauges(*ca.health.borrow(), now);
        metrics.set_ca(&ca.namespace, &ca.secret, ca_usable, ca_expiry);
        let expiries: Vec<CertificateTimes> = caches
            .secrets
            .state()
            .iter()
            .filter_map(|s| {
                let der = crate::pki::pem_certificates(&certs::stored(s).cert_pem)
                    .into_iter()
                    .next()?;
                let info = crate::pki::info(&der)?;
                Some(CertificateTimes {
                    namespace: s.namespace()?,
                    secret: s.name_any(),
                    expiry: info.not_after - now,
                    renewal: info.renew_at() - now,
                })
            })
            .collect();
        metrics.set_certificate_expiries(&scope, &expiries);
        tokio::time::sleep(COUNT_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

    use super::*;
    use crate::api::conditions::{self, reason};

    #[test]
    fn the_ca_expiry_is_reported_while_the_ca_is_unusable() {
        let rotation_failing = CaHealth {
            usable: false,
            not_after: Some(1_000 + 86_400),
        };
        assert_eq!(
            ca_gauges(Some(rotation_failing), 1_000),
            (Some(false), Some(86_400))
        );
        let unreadable = CaHealth {
            usable: false,
            not_after: None,
        };
        assert_eq!(ca_gauges(Some(unreadable), 1_000), (Some(false), None));
        assert_eq!(ca_gauges(None, 1_000), (None, None));
    }

    #[test]
    fn each_true_or_false_condition_of_each_model_is_a_gauge_with_its_reason() {
        let now = Time(Timestamp::from_second(1_000).expect("time"));
        let mut quarantined = crate::fixture::smd("fraud")
            .namespace("ml")
            .build()
            .expect("smd");
        let mut st = quarantined.status.clone().unwrap_or_default();
        conditions::set_kstatus(
            &mut st.conditions,
            [
                (false, reason::QUARANTINED, "quarantined".into()),
                (false, reason::AS_EXPECTED, String::new()),
                (false, reason::AS_EXPECTED, String::new()),
            ],
            Some(1),
            &now,
        );
        // An Unknown condition says nothing either way: no series.
        st.conditions
            .push(conditions::new("Other", true, "X", "", None, now.clone()));
        st.conditions.last_mut().expect("pushed").status = "Unknown".into();
        quarantined.status = Some(st);
        let fresh = crate::fixture::smd("new")
            .namespace("ml")
            .build()
            .expect("smd");
        let got = conditions(&[
            Arc::new(Guarded::new(quarantined)),
            Arc::new(Guarded::new(fresh)),
        ]);
        let got: Vec<(&str, &str, &str, bool)> = got
            .iter()
            .map(|(l, v)| (l.name.as_str(), l.condition.as_str(), l.reason.as_str(), *v))
            .collect();
        assert_eq!(
            got,
            vec![
                ("fraud", "Ready", "Quarantined", false),
                ("fraud", "Reconciling", "AsExpected", false),
                ("fraud", "Stalled", "AsExpected", false),
            ]
        );
    }
}
