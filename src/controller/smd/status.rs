//! Step 6, status: observe the rollout (and, while it is incomplete, whether the pods of the
//! current revision failed: `core::revision`), compute the status (pure, `core::status`) and
//! write it when it changed.
//! Also how a failed reconcile is reported: Stalled, or Reconciling while retried.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Resource, ResourceExt,
    api::ListParams,
    runtime::{controller::Action, events::EventType},
};
use tracing::warn;

use super::{apply::Applied, revisions::Revisions};
use crate::{
    api::{SecureModelDeployment, SecureModelDeploymentStatus},
    controller::{Context, Error, certs, events::publish, resolve},
    core::{revision, status},
    render::{self, DEPLOYMENT_LABEL},
};

/// While a model's pods roll out, how soon Moat looks at their init containers again.
const MODEL_ROLLOUT_RECHECK: Duration = Duration::from_secs(5);
/// How soon Moat looks again at pods whose init container failed.
const MODEL_FAILED_RECHECK: Duration = Duration::from_secs(30);
/// While a revision awaits approval, how soon Moat looks for new ModelApprovals.
const APPROVAL_RECHECK: Duration = Duration::from_secs(5);
/// How soon after recording a failed revision Moat rolls back (the status write is in the cache
/// by then).
const ROLL_BACK_AFTER: Duration = Duration::from_millis(500);

/// Reports a converged reconcile and says when to look again (the certificate's renewal is a
/// scheduled requeue, not polling).
pub(super) async fn report(
    ctx: &Context,
    smd: &SecureModelDeployment,
    pin: resolve::Pin,
    helper_image: String,
    certified: certs::Certified,
    applied: Applied,
    now: Timestamp,
) -> Result<Action, Error> {
    let Applied {
        deployment,
        repairs,
        gate,
        revisions,
    } = applied;
    let rollout = deployment
        .as_ref()
        .map(status::rollout)
        .unwrap_or(status::Rollout::Progressing(
            "creating the Deployment".into(),
        ));
    let Revisions {
        current,
        serving,
        history,
        approved,
        awaiting,
        lost_known_good,
    } = revisions;
    // While the pods of the revision the spec asks for are not all ready, a failed container is
    // the likely reason: read it from the pods (not watched, so look again shortly).
    let mut requeue = ctx
        .settings
        .resync_period
        .min(certified.renew_in(now.as_second()));
    let mut found = None;
    if rollout != status::Rollout::Complete && serving.as_ref() == Some(&current) {
        let api: Api<Pod> =
            Api::namespaced(ctx.client.clone(), &smd.namespace().unwrap_or_default());
        let pods = api
            .list(&ListParams::default().labels(&format!("{DEPLOYMENT_LABEL}={}", smd.name_any())))
            .await
            .map_err(|source| Error::Read {
                kind: "Pod",
                source,
            })?;
        found = revision::pod_failure(&pods.items, &current.template_hash);
        requeue = requeue.min(if found.is_some() {
            MODEL_FAILED_RECHECK
        } else {
            MODEL_ROLLOUT_RECHECK
        });
    }
    let at = Time(now);
    let previous = smd.status.as_ref().and_then(|s| s.revisions.as_ref());
    let mut revs = revision::after_apply(
        previous,
        &current,
        serving.as_ref(),
        &rollout,
        revision::failure(&rollout, found),
        smd.metadata.generation.unwrap_or(0),
        &at,
    );
    revs.history = history;
    if lost_known_good {
        revs.last_known_good = None;
    }
    revs.approved = approved;
    revs.awaiting = awaiting;
    if revs.awaiting.is_some() {
        // Approvals are not watched: look for new ones shortly.
        requeue = requeue.min(APPROVAL_RECHECK);
    }
    if revision::must_roll_back(&revs) {
        // Recorded now; the next reconcile puts the last known-good template back.
        requeue = ROLL_BACK_AFTER;
    }
    let mut new_status = status::converged(smd, deployment.as_ref(), at.clone());
    status::revisions(&mut new_status, smd, revs, at.clone());
    if let Some(why) = &gate.quarantined {
        status::quarantined(&mut new_status, why, at.clone());
    }
    new_status.gate = Some(gate);
    new_status.certificate = Some(certified.status(&render::tls_secret_name(&smd.name_any())));
    new_status.image = Some(crate::api::ImageStatus {
        helper: Some(helper_image).filter(|h| !h.is_empty()),
        ..pin.status
    });
    if !repairs.is_empty() {
        // The cached object may not show the previous reconcile's count yet: read it fresh.
        let api: Api<SecureModelDeployment> =
            Api::namespaced(ctx.client.clone(), &smd.namespace().unwrap_or_default());
        let fresh = api
            .get_status(&smd.name_any())
            .await
            .map_err(Error::Status)?;
        new_status.drift = status::drift(
            fresh.status.as_ref().and_then(|s| s.drift.as_ref()),
            &repairs,
        );
    }
    write(smd, ctx, new_status, !repairs.is_empty()).await?;
    Ok(Action::requeue(requeue))
}

/// Reports an error that needs the user: Stalled with the reason, and a Warning Event when the
/// status changed.
pub(super) async fn report_stalled(
    smd: &SecureModelDeployment,
    ctx: &Context,
    e: &Error,
    now: Timestamp,
) -> Result<(), Error> {
    let failure = e.failure();
    let new = status::stalled(smd, &failure, Time(now));
    let changed = !smd
        .status
        .as_ref()
        .is_some_and(|old| status::same(old, &new));
    write(smd, ctx, new, false).await?;
    if changed {
        publish(
            &ctx.recorder,
            &ctx.metrics,
            &smd.object_ref(&()),
            EventType::Warning,
            failure.reason,
            failure.message,
            None,
        )
        .await;
    }
    Ok(())
}

/// Reports a transient error while it is retried: Reconciling with the error.
pub(super) async fn report_retrying(
    smd: &SecureModelDeployment,
    ctx: &Context,
    e: &Error,
    now: Timestamp,
) {
    let new = status::retrying(smd, &e.failure(), Time(now));
    if let Err(err) = write(smd, ctx, new, false).await {
        warn!(error = %err, "could not report the failure in status");
    }
}

/// Writes the status if it differs from the current one (ignoring transition times).
///
/// `status.drift` is written only when `with_drift` (this reconcile repaired something): the
/// cached object may carry an older count, which must never overwrite a newer one.
async fn write(
    smd: &SecureModelDeployment,
    ctx: &Context,
    mut new: SecureModelDeploymentStatus,
    with_drift: bool,
) -> Result<(), Error> {
    if !with_drift {
        new.drift = smd.status.as_ref().and_then(|s| s.drift.clone());
    }
    if smd
        .status
        .as_ref()
        .is_some_and(|old| status::same(old, &new))
    {
        return Ok(());
    }
    let api: Api<SecureModelDeployment> =
        Api::namespaced(ctx.client.clone(), &smd.namespace().unwrap_or_default());
    // Only what changed, with `null` for what was cleared (a lifted failure, a lifted
    // quarantine): a merge patch leaves alone what it does not mention.
    let old = serde_json::to_value(smd.status.clone().unwrap_or_default()).map_err(|source| {
        Error::Serialize {
            kind: "SecureModelDeployment",
            source,
        }
    })?;
    let new = serde_json::to_value(&new).map_err(|source| Error::Serialize {
        kind: "SecureModelDeployment",
        source,
    })?;
    let mut patch = serde_json::json!({"status": status::merge_patch(&old, &new)});
    if let (false, Some(status)) = (
        with_drift,
        patch.get_mut("status").and_then(|s| s.as_object_mut()),
    ) {
        status.remove("drift");
    }
    super::super::apply::patch_status(ctx, &api, "SecureModelDeployment", &smd.name_any(), &patch)
        .await
}
