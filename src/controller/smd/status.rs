//! Step 5, status: observe the rollout (and, while it is incomplete, why a decrypting init
//! container failed), compute the status (pure, `core::status`) and write it when it changed.
//! Also how a failed reconcile is reported: Stalled, or Reconciling while retried.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use tracing::warn;

use super::apply::Applied;
use crate::{
    api::{SecureModelDeployment, SecureModelDeploymentStatus},
    controller::{Context, Error, certs, events::publish, resolve, weights},
    core::status,
    render,
};

/// While a model's pods roll out, how soon Moat looks at their init containers again.
const MODEL_ROLLOUT_RECHECK: Duration = Duration::from_secs(5);
/// How soon Moat looks again at pods whose init container failed.
const MODEL_FAILED_RECHECK: Duration = Duration::from_secs(30);

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
    } = applied;
    // While the pods are not all ready, a failed decrypting init container is the likely reason:
    // read it from the pods (not watched, so look again shortly).
    let mut requeue = ctx
        .settings
        .resync_period
        .min(certified.renew_in(now.as_second()));
    let mut decrypt_failure = None;
    if let (Some(model), Some(deploy)) = (&smd.spec.model, &deployment)
        && status::rollout(deploy) != status::Rollout::Complete
    {
        decrypt_failure = weights::decrypt_failure(ctx, smd, model)
            .await
            .map_err(|source| Error::Read {
                kind: "Pod",
                source,
            })?;
        requeue = requeue.min(if decrypt_failure.is_some() {
            MODEL_FAILED_RECHECK
        } else {
            MODEL_ROLLOUT_RECHECK
        });
    }
    let at = Time(now);
    let mut new_status = status::converged(smd, deployment.as_ref(), at.clone());
    if let Some(message) = decrypt_failure {
        status::model_failed(&mut new_status, smd, message, at.clone());
    }
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
    let mut patch = serde_json::json!({"status": new});
    if let (false, Some(status)) = (
        with_drift,
        patch.get_mut("status").and_then(|s| s.as_object_mut()),
    ) {
        status.remove("drift");
    }
    super::super::apply::patch_status(ctx, &api, "SecureModelDeployment", &smd.name_any(), &patch)
        .await
}
