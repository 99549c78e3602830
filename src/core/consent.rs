//! Two-sided consent, pure: a ModelClient asks for a client certificate in the client's
//! namespace; the SecureModelDeployment it names consents when one of its `spec.access.clients`
//! names that namespace and lists the ServiceAccount.

use kube::ResourceExt;

use crate::api::{ModelClient, SecureModelDeployment};

/// Whether `smd` (the referenced SecureModelDeployment, if it exists) consents to `mc`; `Err`
/// says why not, for the ModelClient's status.
pub fn consent(mc: &ModelClient, smd: Option<&SecureModelDeployment>) -> Result<(), String> {
    let target = &mc.spec.deployment_ref;
    let Some(smd) = smd else {
        return Err(format!(
            "SecureModelDeployment {}/{} does not exist",
            target.namespace, target.name
        ));
    };
    let namespace = mc.namespace().unwrap_or_default();
    let sa = &mc.spec.service_account_name;
    let allowed = smd
        .spec
        .access
        .clients
        .iter()
        .any(|c| c.namespace == namespace && c.service_accounts.iter().any(|s| s == sa));
    if allowed {
        Ok(())
    } else {
        Err(format!(
            "SecureModelDeployment {}/{} does not allow ServiceAccount {sa} of namespace {namespace}: \
             its owners must add it to spec.access.clients[].serviceAccounts for namespace {namespace}",
            target.namespace, target.name
        ))
    }
}

/// The client identities the gate of `smd` lets through: the SPIFFE ID of every ModelClient in
/// `clients` that names `smd`, is not being deleted, and has its consent. A ModelClient deleted,
/// or a ServiceAccount taken off `spec.access.clients`, drops out at once.
pub fn gate_identities<'a>(
    smd: &SecureModelDeployment,
    clients: impl IntoIterator<Item = &'a ModelClient>,
    trust_domain: &str,
) -> std::collections::BTreeSet<String> {
    let (namespace, name) = (smd.namespace().unwrap_or_default(), smd.name_any());
    clients
        .into_iter()
        .filter(|mc| {
            mc.spec.deployment_ref.namespace == namespace
                && mc.spec.deployment_ref.name == name
                && mc.metadata.deletion_timestamp.is_none()
                && consent(mc, Some(smd)).is_ok()
        })
        .map(|mc| {
            crate::pki::Identity::client(
                &mc.namespace().unwrap_or_default(),
                &mc.spec.service_account_name,
            )
            .spiffe_id(trust_domain)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;
    use serde_json::json;

    fn mc(sa: &str) -> ModelClient {
        fixture::model_client("c", "ml", "fraud")
            .namespace("payments")
            .service_account(sa)
            .secret("fraud-client")
            .build()
            .expect("mc")
    }

    fn smd(clients: serde_json::Value) -> SecureModelDeployment {
        fixture::smd("fraud")
            .namespace("ml")
            .clients(clients)
            .build()
            .expect("smd")
    }

    #[test]
    fn consent_needs_the_namespace_and_the_service_account_on_the_model_side() {
        let allowed = smd(json!([{"namespace": "payments", "serviceAccounts": ["checkout"]}]));
        assert_eq!(consent(&mc("checkout"), Some(&allowed)), Ok(()));
        let e = consent(&mc("intruder"), Some(&allowed)).expect_err("other SA");
        assert!(e.contains("does not allow ServiceAccount intruder"), "{e}");
        // Network access alone (no serviceAccounts) is no consent to a certificate.
        let network_only = smd(json!([{"namespace": "payments"}]));
        assert!(consent(&mc("checkout"), Some(&network_only)).is_err());
        let other_ns = smd(json!([{"namespace": "billing", "serviceAccounts": ["checkout"]}]));
        assert!(consent(&mc("checkout"), Some(&other_ns)).is_err());
        let e = consent(&mc("checkout"), None).expect_err("missing model");
        assert!(e.contains("does not exist"), "{e}");
    }

    /// The gate lets through exactly the consented ModelClients of this model.
    #[test]
    fn gate_identities_are_the_consented_model_clients_of_this_model() {
        let model =
            smd(json!([{"namespace": "payments", "serviceAccounts": ["checkout", "refunds"]}]));
        let mut deleting = mc("refunds");
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let other_model = fixture::model_client("o", "ml", "other")
            .namespace("payments")
            .service_account("checkout")
            .secret("s")
            .build()
            .expect("mc");
        let clients = [mc("checkout"), mc("intruder"), deleting, other_model];
        let ids = gate_identities(&model, &clients, "cluster.local");
        assert_eq!(
            ids.into_iter().collect::<Vec<_>>(),
            vec!["spiffe://cluster.local/ns/payments/sa/checkout".to_string()]
        );
        let none = smd(json!([{"namespace": "payments"}]));
        assert!(gate_identities(&none, &clients, "cluster.local").is_empty());
    }
}
