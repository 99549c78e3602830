//! Step 5, apply: the writes of the children, in the stated order: the ServiceAccount, the serving Secret and the NetworkPolicies
//! before the Service, the PodDisruptionBudget and the Deployment, so a pod never runs without
//! its identity and its network isolation. Events are published at the end.

use k8s_openapi::{api::apps::v1::Deployment, jiff::Timestamp};
use kube::{Resource, ResourceExt, runtime::events::EventType};

use super::{build::Built, dereference::Dereferenced, revisions::Revisions};
use crate::{
    api::{SecureModelDeployment, conditions::reason},
    controller::{Context, Error, Repair, apply::Applier, events::publish, gate, weights},
    render::{self, Children},
};

/// What [`apply`] left live.
pub(super) struct Applied {
    /// The Deployment after the apply.
    pub deployment: Option<Deployment>,
    /// Changes by someone else that were reverted.
    pub repairs: Vec<Repair>,
    /// What guards the endpoint, for the status.
    pub gate: crate::api::GateStatus,
    /// The revision the spec asks for and the one the pods run.
    pub revisions: Revisions,
}

/// Makes the live children exactly `built`.
pub(super) async fn apply(
    ctx: &Context,
    smd: &SecureModelDeployment,
    facts: &Dereferenced,
    built: Built,
    revisions: Revisions,
    now: Timestamp,
) -> Result<Applied, Error> {
    let Built {
        children,
        converged_before,
        own,
        gate,
    } = built;
    let namespace = smd.namespace().unwrap_or_default();
    let mut applier = Applier::new(ctx, smd, &namespace, converged_before, own, now);
    let live = &facts.live;
    // Destructured without `..` so a new child kind cannot be skipped.
    let Children {
        service_account,
        tls_secret,
        network_policies,
        service,
        gate_policy,
        pod_disruption_budget,
        deployment,
    } = children;
    applier
        .ensure(vec![service_account], &live.service_accounts)
        .await?;
    // A renewed certificate (or CA bundle) is announced to the running pods too when the gate
    // reloads it there (below): the kubelet would otherwise refresh the Secret volume only at its
    // periodic pod sync (a minute or more), and a short-lived certificate could expire first.
    let tls_changed = live
        .secrets
        .iter()
        .find(|s| s.name_any() == tls_secret.name_any())
        .is_none_or(|s| s.data != tls_secret.data);
    applier.ensure(vec![tls_secret], &live.secrets).await?;
    // Published now: should a later apply fail, the retry keeps this certificate and would not
    // announce it.
    let certified = &facts.certified;
    if let Some(why) = certified.issued {
        let secret_name = render::tls_secret_name(&smd.name_any());
        publish(
            &ctx.recorder,
            &ctx.metrics,
            &smd.object_ref(&()),
            EventType::Normal,
            reason::CERTIFICATE_ISSUED,
            format!(
                "Issued serving certificate {} in Secret {secret_name} ({why}); renewal at {}",
                certified.info.serial,
                certified.status(&secret_name).renew_at.0
            ),
            None,
        )
        .await;
    }
    applier
        .ensure(network_policies, &live.network_policies)
        .await?;
    applier.ensure(vec![service], &live.services).await?;
    // Before the Deployment: the pods mount it. A new policy is also announced to the running
    // pods (below), so their kubelet refreshes the volume at once.
    let policy_changed = gate_policy.as_ref().is_some_and(|want| {
        live.config_maps
            .iter()
            .find(|cm| cm.name_any() == want.name_any())
            .is_none_or(|cm| cm.data != want.data)
    });
    applier
        .ensure(gate_policy.into_iter().collect(), &live.config_maps)
        .await?;
    applier
        .ensure(
            pod_disruption_budget.into_iter().collect(),
            &live.pod_disruption_budgets,
        )
        .await?;
    let deployment = applier
        .ensure(vec![deployment], &live.deployments)
        .await?
        .into_iter()
        .next();
    if let (true, Some(hash)) = (policy_changed, &gate.policy_hash) {
        gate::announce(
            ctx,
            smd,
            &namespace,
            render::gate::POLICY_HASH_ANNOTATION,
            hash,
        )
        .await?;
    }
    if tls_changed && gate.policy_hash.is_some() {
        let hash = certified.tls().hash();
        gate::announce(ctx, smd, &namespace, render::TLS_HASH_ANNOTATION, &hash).await?;
    }
    if facts.pin.resolved {
        applier.note(
            EventType::Normal,
            reason::IMAGE_PINNED,
            format!(
                "Resolved {} to {} in its registry",
                facts.pin.status.requested, facts.pin.status.pinned
            ),
        );
    }
    Ok(Applied {
        deployment,
        repairs: applier.finish(),
        gate,
        revisions,
    })
}

/// The key Secret's ownerReferences for crypto-shredding, written as soon as the key Secret is
/// read and before anything else can fail: a SecureModelDeployment deleted while, say, its CA is
/// unavailable must not take a key with it that the user asked to keep (or keep one it asked to
/// shred).
pub(super) async fn key_owner(
    ctx: &Context,
    smd: &SecureModelDeployment,
    key: Option<&k8s_openapi::api::core::v1::Secret>,
) -> Result<(), Error> {
    let (Some(model), Some(key)) = (&smd.spec.model, key) else {
        return Ok(());
    };
    match weights::shred_owner_patch(smd, key, model.delete_key_with_deployment) {
        Some(patch) => weights::set_owner(ctx, key, patch)
            .await
            .map_err(Error::Weights),
        None => Ok(()),
    }
}
