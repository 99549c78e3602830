//! Step 4, apply: the only writes of a reconcile, in the stated order. The key Secret's owner
//! (crypto-shredding) first; then the ServiceAccount, the serving Secret and the NetworkPolicies
//! before the Service, the PodDisruptionBudget and the Deployment, so a pod never runs without
//! its identity and its network isolation. Events are published at the end.

use k8s_openapi::{api::apps::v1::Deployment, jiff::Timestamp};
use kube::{ResourceExt, runtime::events::EventType};

use super::{build::Built, dereference::Dereferenced};
use crate::{
    api::{SecureModelDeployment, conditions::reason},
    controller::{Context, Error, Repair, apply::Applier, weights},
    render::{self, Children},
};

/// What [`apply`] left live.
pub(super) struct Applied {
    /// The Deployment after the apply.
    pub deployment: Option<Deployment>,
    /// Changes by someone else that were reverted.
    pub repairs: Vec<Repair>,
}

/// Makes the live children exactly `built`.
pub(super) async fn apply(
    ctx: &Context,
    smd: &SecureModelDeployment,
    facts: &Dereferenced,
    built: Built,
    now: Timestamp,
) -> Result<Applied, Error> {
    let Built {
        children,
        converged_before,
        own,
        shred,
    } = built;
    if let Some((key, patch)) = shred {
        weights::set_owner(ctx, &key, patch)
            .await
            .map_err(Error::Weights)?;
    }
    let namespace = smd.namespace().unwrap_or_default();
    let mut applier = Applier::new(ctx, smd, &namespace, converged_before, own, now);
    let live = &facts.live;
    // Destructured without `..` so a new child kind cannot be skipped.
    let Children {
        service_account,
        tls_secret,
        network_policies,
        service,
        pod_disruption_budget,
        deployment,
    } = children;
    applier
        .ensure(vec![service_account], live.service_accounts.clone())
        .await?;
    applier
        .ensure(vec![tls_secret], live.secrets.clone())
        .await?;
    applier
        .ensure(network_policies, live.network_policies.clone())
        .await?;
    applier.ensure(vec![service], live.services.clone()).await?;
    applier
        .ensure(
            pod_disruption_budget.into_iter().collect(),
            live.pod_disruption_budgets.clone(),
        )
        .await?;
    let deployment = applier
        .ensure(vec![deployment], live.deployments.clone())
        .await?
        .into_iter()
        .next();
    let certified = &facts.certified;
    if let Some(why) = certified.issued {
        let secret_name = render::tls_secret_name(&smd.name_any());
        applier.note(
            EventType::Normal,
            reason::CERTIFICATE_ISSUED,
            format!(
                "Issued serving certificate {} in Secret {secret_name} ({why}); renewal at {}",
                certified.info.serial,
                certified.status(&secret_name).renew_at.0
            ),
        );
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
    })
}
