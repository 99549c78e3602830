//! `moat_managed_objects`, `moat_certificate_expiry_seconds`, `moat_certificate_renewal_seconds`,
//! `moat_model_condition`, `moat_ca_expiry_seconds` and `moat_ca_usable`, recounted from the
//! caches of one watch scope (and from what the CA's keeper found); and the
//! `moat_drift_repairs_by_owner_total` series of owners no longer in those caches, removed.

use std::{collections::HashSet, sync::Arc, time::Duration};

use kube::{Resource, ResourceExt, runtime::reflector::Store};

use super::{Caches, ca::CaHealth, certs, clients::ClientStore, guard::Guarded, models::Synced};
use crate::{
    api::{ModelClient, SecureModelDeployment},
    telemetry::metrics::{CertificateTimes, ConditionLabels, Metrics, Owner},
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

/// The owners of drift repairs in one watch scope, beside its SecureModelDeployments: its
/// ModelClients, and whether both caches have filled (an empty cache before that must not
/// read as "every owner deleted").
pub(super) struct OwnerCaches {
    /// Set once the scope's SecureModelDeployment watch has listed everything.
    pub smds_synced: Synced,
    /// The scope's ModelClients.
    pub clients: ClientStore,
    /// Set once the ModelClient watch has listed everything.
    pub clients_synced: Synced,
}

/// The SecureModelDeployments and ModelClients in the caches (malformed ones too: they exist).
fn owners(
    smds: &[Arc<Guarded<SecureModelDeployment>>],
    clients: &[Arc<Guarded<ModelClient>>],
) -> HashSet<Owner> {
    fn of<K: Resource<DynamicType = ()>>(objects: &[Arc<Guarded<K>>]) -> Vec<Owner> {
        objects
            .iter()
            .map(|o| Owner {
                kind: K::kind(&()).into_owned(),
                namespace: o.namespace().unwrap_or_default(),
                name: o.name_any(),
            })
            .collect()
    }
    of(smds).into_iter().chain(of(clients)).collect()
}

/// Removes the drift-by-owner series of the SecureModelDeployments and ModelClients of
/// `namespace`'s scope (`None`: all) that are no longer in its caches: they were deleted. Does
/// nothing until both caches have filled.
fn forget_deleted_owners(
    metrics: &Metrics,
    namespace: Option<&str>,
    smds: &Store<Guarded<SecureModelDeployment>>,
    caches: &OwnerCaches,
) {
    if !*caches.smds_synced.borrow() || !*caches.clients_synced.borrow() {
        return;
    }
    metrics.retain_drift_owners(namespace, || owners(&smds.state(), &caches.clients.state()));
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
/// `True` or `False`, labelled with the model, the condition type and its reason; and, while a
/// revision of the model is recorded as failed (`status.revisions.failed`, also after the pods
/// went back to the last known-good one, when `Stalled` says `RolledBack`), the pseudo-condition
/// [`REVISION_FAILED`] with the failure's reason, so that a failed decryption alerts whether or
/// not it was rolled back.
fn conditions(smds: &[Arc<Guarded<SecureModelDeployment>>]) -> Vec<(ConditionLabels, bool)> {
    smds.iter()
        .flat_map(|smd| {
            let namespace = smd.namespace().unwrap_or_default();
            let name = smd.name_any();
            let failed = smd
                .object
                .as_ref()
                .ok()
                .and_then(|o| o.status.as_ref())
                .and_then(|s| s.revisions.as_ref())
                .and_then(|r| r.failed.as_ref())
                .map(|f| {
                    (
                        ConditionLabels {
                            namespace: namespace.clone(),
                            name: name.clone(),
                            condition: REVISION_FAILED.into(),
                            reason: f.reason.clone(),
                        },
                        true,
                    )
                });
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
                .chain(failed)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The `condition` label of `moat_model_condition` that carries a failed revision's reason.
pub const REVISION_FAILED: &str = "RevisionFailed";

/// How often the gauges are recounted from the caches.
const COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps `moat_managed_objects` equal to what the caches of one watch scope (`namespace`,
/// `None` for all) hold (the SecureModelDeployments and the children labelled as Moat's), the
/// certificate gauges to the Secrets there, `moat_model_condition` to the models' conditions,
/// `moat_ca_expiry_seconds` and `moat_ca_usable` to the CA, and removes the drift-by-owner series
/// of the scope's deleted owners. Runs until dropped.
pub(super) async fn count_managed(
    smds: Store<Guarded<SecureModelDeployment>>,
    caches: Caches,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    ca: CaSource,
    owner_caches: OwnerCaches,
) {
    let scope = namespace.clone().unwrap_or_else(|| "*".into());
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
        forget_deleted_owners(&metrics, namespace.as_deref(), &smds, &owner_caches);
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
    use kube::runtime::{reflector, watcher};

    use super::*;
    use crate::api::conditions::{self, reason};

    fn smd(name: &str) -> Guarded<SecureModelDeployment> {
        Guarded::new(
            crate::fixture::smd(name)
                .namespace("ml")
                .build()
                .expect("smd"),
        )
    }

    fn by_owner(m: &Metrics, owner: &str, name: &str) -> bool {
        m.encode().expect("encode").contains(&format!(
            "moat_drift_repairs_by_owner_total{{owner=\"{owner}\",namespace=\"ml\",name=\"{name}\""
        ))
    }

    #[test]
    fn a_deleted_model_loses_its_drift_series_once_the_caches_have_filled() {
        let m = Metrics::default();
        let (smds, mut smd_writer) = reflector::store();
        let (clients, mut client_writer) = reflector::store::<Guarded<ModelClient>>();
        let (smds_filled, smds_synced) = tokio::sync::watch::channel(false);
        let (clients_filled, clients_synced) = tokio::sync::watch::channel(false);
        let caches = OwnerCaches {
            smds_synced,
            clients,
            clients_synced,
        };
        let client = Guarded::new(
            crate::fixture::model_client("checkout", "ml", "fraud")
                .namespace("ml")
                .build()
                .expect("model client"),
        );
        for name in ["fraud", "gone"] {
            m.drift_repaired("SecureModelDeployment", "ml", name, "Deployment");
        }
        m.drift_repaired("ModelClient", "ml", "checkout", "Secret");
        // Before the caches have filled, an empty cache says nothing: every series stays.
        forget_deleted_owners(&m, Some("ml"), &smds, &caches);
        assert!(by_owner(&m, "SecureModelDeployment", "gone"));
        smd_writer.apply_watcher_event(&watcher::Event::Init);
        smd_writer.apply_watcher_event(&watcher::Event::InitApply(smd("fraud")));
        smd_writer.apply_watcher_event(&watcher::Event::InitApply(smd("gone")));
        smd_writer.apply_watcher_event(&watcher::Event::InitDone);
        client_writer.apply_watcher_event(&watcher::Event::Init);
        client_writer.apply_watcher_event(&watcher::Event::InitApply(client));
        client_writer.apply_watcher_event(&watcher::Event::InitDone);
        smds_filled.send_replace(true);
        forget_deleted_owners(&m, Some("ml"), &smds, &caches);
        assert!(by_owner(&m, "SecureModelDeployment", "gone"));
        // `gone` is deleted (its watch event removes it from the cache) before the
        // ModelClients' cache has filled: still kept, then removed once it has.
        smd_writer.apply_watcher_event(&watcher::Event::Delete(smd("gone")));
        forget_deleted_owners(&m, Some("ml"), &smds, &caches);
        assert!(by_owner(&m, "SecureModelDeployment", "gone"));
        clients_filled.send_replace(true);
        forget_deleted_owners(&m, Some("ml"), &smds, &caches);
        assert!(!by_owner(&m, "SecureModelDeployment", "gone"));
        assert!(by_owner(&m, "SecureModelDeployment", "fraud"));
        assert!(by_owner(&m, "ModelClient", "checkout"));
    }

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

    /// A failed revision is a gauge of its own, with the failure's reason, also while the model
    /// is rolled back (Stalled says RolledBack).
    #[test]
    fn a_failed_revision_is_a_gauge_with_its_reason() {
        let now = Time(Timestamp::from_second(1_000).expect("time"));
        let mut rolled = crate::fixture::smd("fraud")
            .namespace("ml")
            .build()
            .expect("smd");
        let failed = crate::api::FailedRevision {
            revision: crate::api::RevisionRef {
                name: "fraud-b".into(),
                revision: 2,
                template_hash: "b".repeat(64),
            },
            reason: reason::MODEL_DECRYPTION_FAILED.into(),
            message: "wrong key".into(),
            at: now.clone(),
            generation: None,
        };
        let mut st = crate::api::SecureModelDeploymentStatus::default();
        conditions::set_stalled(&mut st.conditions, reason::ROLLED_BACK, "m", Some(1), &now);
        st.revisions = Some(crate::api::RevisionsStatus {
            failed: Some(failed),
            ..Default::default()
        });
        rolled.status = Some(st);
        let got = conditions(&[Arc::new(Guarded::new(rolled))]);
        assert!(
            got.iter().any(|(l, v)| l.condition == REVISION_FAILED
                && l.reason == reason::MODEL_DECRYPTION_FAILED
                && *v),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|(l, v)| l.condition == "Stalled" && l.reason == reason::ROLLED_BACK && *v)
        );
    }
}
